"""`launch doctor --only slurm` (the real command) on a real SLURM cluster (slurm/cluster.sh: nodes n1, n2 of 4 CPUs,
no GPUs, partition debug): from the login node through `sbatch --test-only` of the job `launch --slurm` would
submit, and inside allocations (salloc, a batch job) against the allocation SLURM granted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LAUNCH, launch_env, run_launch, write_recipe

pytestmark = pytest.mark.slurm

# conftest.BASE on the CPU, with a SLURM section the cluster can give: 10 minutes, signalled 30 s before
JOB = ("trainer.device=cpu", "slurm={time_min: 10, signal_grace_s: 30, max_requeues: 3}")


def login_env(**extra: str) -> dict[str, str]:
    """launch_env() as on a login node: none of an enclosing job's SLURM variables (SLURM_CONF stays)."""
    env = {k: v for k, v in launch_env(**extra).items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env["COLUMNS"] = "200"  # one table row per check, for the assertions on stdout
    return env


def slurm_row(run_dir: Path) -> dict | None:
    results = {d["check"]: d for d in json.loads((run_dir / "doctor.json").read_text())["results"]}
    return results.get("slurm")


def doctor(tmp_path: Path, *args: str, expect: int, env: dict | None = None, prefix: tuple[str, ...] = (),
           run: str = "run") -> tuple[subprocess.CompletedProcess, dict | None]:
    """`[PREFIX] launch doctor RECIPE --run-dir TMP/RUN --only slurm ARGS`; its exit status must be `expect`;
    returns the process and doctor.json's slurm row (None when there is none)."""
    recipe = write_recipe(tmp_path, *JOB)
    run_dir = tmp_path / run
    cmd = ["doctor", recipe, "--run-dir", str(run_dir), "--only", "slurm", *args]
    if prefix:  # salloc runs the command in the allocation it gets
        r = subprocess.run([*prefix, LAUNCH, *cmd], cwd=tmp_path, env=env or login_env(), capture_output=True,
                           text=True, timeout=240)
    else:
        r = run_launch(*cmd, cwd=tmp_path, env=env or login_env(), timeout=240)
    assert r.returncode == expect, f"`{' '.join([*prefix, 'launch', *cmd])}` exited {r.returncode}, expected " \
                                   f"{expect}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    return r, slurm_row(run_dir)


def test_a_job_that_fits_the_cluster_passes_sbatch_test_only(slurm_cluster, tmp_path):
    r, row = doctor(tmp_path, "--slurm", "--nodes", "2", "--gpus", "1", expect=0)
    assert row is not None and row["status"] == "pass", r.stdout
    assert "on n[1-2]" in row["figure"] and "in partition debug" in row["figure"], row
    # sbatch was given the header `launch --slurm` would submit: the recipe's nodes, time limit, signal, requeue
    options = row["details"]["sbatch_options"]
    assert options["nodes"] == "2" and options["time"] == "10" and options["signal"] == "USR2@30", options
    assert "requeue" in options and options["ntasks-per-node"] == "1", options
    assert any(line.startswith("slurm") and "PASS" in line for line in r.stdout.splitlines()), r.stdout
    # the same row for a recipe whose backend is slurm, without --slurm; and none for a local recipe without it
    r, row = doctor(tmp_path, "--nodes", "2", "--gpus", "1", "backend=slurm", expect=0, run="backend")
    assert row is not None and row["status"] == "pass", r.stdout
    r, row = doctor(tmp_path, "--nodes", "2", "--gpus", "1", expect=0, run="local")
    assert row is None and "slurm" not in r.stdout, r.stdout


def test_more_nodes_than_the_cluster_has_fails_naming_the_shortfall(slurm_cluster, tmp_path):
    r, row = doctor(tmp_path, "--slurm", "--nodes", "5", "--gpus", "1", expect=1)
    assert row["status"] == "fail" and row["figure"].startswith("sbatch refuses the job: "), row
    assert "nodes 5 > 2: partition debug has 2 nodes; run with --nodes 2 (launch.nodes)" in row["advice"], row
    assert any(line.startswith("slurm") and "FAIL" in line for line in r.stdout.splitlines()), r.stdout


def test_a_partition_that_does_not_exist_fails_naming_slurm_partition(slurm_cluster, tmp_path):
    _, row = doctor(tmp_path, "--slurm", "--nodes", "2", "slurm.partition=debgu", expect=1)
    assert row["status"] == "fail" and "Invalid partition name" in row["figure"], row
    assert row["advice"] == "no partition 'debgu': set slurm.partition to one of debug (did you mean debug?)", row


def test_more_cpus_per_task_than_a_node_has_fails_naming_the_key(slurm_cluster, tmp_path):
    _, row = doctor(tmp_path, "--slurm", "--nodes", "1", "slurm.cpus_per_task=8", expect=1)
    assert row["status"] == "fail" and "Requested node configuration is not available" in row["figure"], row
    assert "CPUs per node 4 < 8" in row["advice"] and "slurm.cpus_per_task" in row["advice"], row


@pytest.fixture
def partition(slurm_cluster):
    """Make a partition on n1 with the given settings (scontrol create) for one test; deleted afterwards."""
    made = []

    def make(**settings: str) -> str:
        name = f"doctor{os.getpid()}x{len(made)}"
        r = subprocess.run(["scontrol", "create", f"PartitionName={name}", "Nodes=n1", "State=UP",
                            *(f"{k}={v}" for k, v in settings.items())], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        made.append(name)
        return name

    yield make
    for name in made:
        subprocess.run(["scontrol", "delete", f"PartitionName={name}"], capture_output=True, timeout=60)


def test_a_time_limit_over_the_partitions_and_a_partition_that_cancels_preempted_jobs(partition, tmp_path):
    short = partition(MaxTime="2")
    _, row = doctor(tmp_path, "--slurm", "--nodes", "1", f"slurm.partition={short}", expect=1)
    assert row["status"] == "fail" and "Requested time limit is invalid" in row["figure"], row
    assert row["advice"] == f"time limit 10 min > MaxTime 2 min: partition {short} allows 2 min; set " \
                            f"slurm.time_min=2 or pick another partition (slurm.partition)", row
    cancels = partition(PreemptMode="CANCEL")
    _, row = doctor(tmp_path, "--slurm", "--nodes", "1", f"slurm.partition={cancels}", expect=0, run="cancels")
    assert row["status"] == "warn" and row["figure"] == f"partition {cancels} cancels preempted jobs " \
                                                        f"(PreemptMode=CANCEL)", row
    # with slurm.max_requeues=0 the job does not expect to come back: nothing to warn about
    _, row = doctor(tmp_path, "--slurm", "--nodes", "1", f"slurm.partition={cancels}", "slurm.max_requeues=0",
                    expect=0, run="no-requeues")
    assert row["status"] == "pass", row


def test_inside_an_allocation_smaller_than_the_recipe_fails_naming_the_nodes(slurm_cluster, tmp_path):
    salloc = ("salloc", "-N", "1", "-t", "10")
    _, row = doctor(tmp_path, "--nodes", "2", "--gpus", "1", expect=1, prefix=salloc)
    assert row["status"] == "fail" and row["figure"] == "nodes 1 < 2", row
    assert "launch.nodes=2 (1 short); allocate 2 (salloc -N 2" in row["advice"], row
    assert row["details"]["nodes"] == 1 and row["details"]["time_limit_min"] == 10, row
    # the recipe that fits this allocation passes: 1 node, a 10-minute limit as slurm.time_min asks
    _, row = doctor(tmp_path, "--nodes", "1", "--gpus", "1", expect=0, prefix=salloc, run="fits")
    assert row["status"] == "pass" and row["figure"].startswith("job "), row
    assert "1 node x 1 task" in row["figure"] and "limit 10 min, interactive" in row["figure"], row


def test_an_allocation_shorter_than_the_signal_grace_fails(slurm_cluster, tmp_path):
    _, row = doctor(tmp_path, "--nodes", "1", "slurm.signal_grace_s=120", expect=1, prefix=("salloc", "-N", "1",
                                                                                          "-t", "2"))
    assert row["status"] == "fail" and row["figure"] == "time limit 2 min <= signal grace 120 s", row
    assert "slurm.signal_grace_s" in row["advice"], row


def test_a_batch_job_that_cannot_requeue_warns_about_max_requeues(slurm_cluster, tmp_path):
    recipe = write_recipe(tmp_path, *JOB)
    run_dir = tmp_path / "run"
    r = subprocess.run(["sbatch", "--wait", "--no-requeue", "-N", "1", "-t", "10", "-o", str(tmp_path / "job.out"),
                        "--wrap", f"{LAUNCH} doctor {recipe} --run-dir {run_dir} --only slurm --nodes 1"],
                       cwd=tmp_path, env=login_env(), capture_output=True, text=True, timeout=240)
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{out}"
    row = slurm_row(run_dir)
    assert row["status"] == "warn" and row["figure"].endswith("cannot requeue (Requeue=0)"), row
    assert "slurm.max_requeues=3" in row["advice"] and "--requeue" in row["advice"], row
    assert row["details"]["batch"] is True and row["details"]["requeue"] == "0", row


def test_missing_commands_and_a_controller_that_is_down_fail_with_their_words(slurm_cluster, tmp_path):
    no_slurm = login_env(PATH=str(Path(sys.executable).parent))
    _, row = doctor(tmp_path, "--slurm", "--nodes", "1", expect=1, env=no_slurm)
    assert row["figure"] == "sbatch not found" and "not on PATH" in row["advice"], row
    # a controller that does not answer: the cluster's own config, pointing at a port nothing listens on
    conf = tmp_path / "slurm.conf"
    text = Path("/etc/slurm/slurm.conf").read_text()
    assert "SlurmctldPort=17000" in text
    conf.write_text(text.replace("SlurmctldPort=17000", "SlurmctldPort=17999"))
    _, row = doctor(tmp_path, "--slurm", "--nodes", "1", expect=1, env=login_env(SLURM_CONF=str(conf)), run="down")
    assert row["status"] == "fail" and row["figure"] == "SLURM does not answer", row
    assert "`scontrol show partition` said: " in row["advice"], row
    assert "Unable to contact slurm controller" in row["advice"] and "scontrol ping" in row["advice"], row


def test_slurm_time_limits_and_messages_parse():
    """The formats SLURM writes that the test cluster does not show (days, UNLIMITED), and how a refusal is
    quoted: its most specific line, without the command's prefix."""
    from launcher.doctor.slurm import _minutes, _said
    assert [_minutes(t) for t in ("10", "5:00", "01:30:00", "1-00:00:00", "2-12", "UNLIMITED", "INFINITE")] == \
        [10, 5, 90, 1440, 3600, None, None]
    with pytest.raises(ValueError):
        _minutes("Partition_Limit")
    err = "sbatch: error: invalid partition specified: nope\nallocation failure: Invalid partition name specified\n"
    assert _said("", err) == "Invalid partition name specified"
    assert _said("", "sbatch: error: Batch job submission failed: Unable to contact slurm controller\n") == \
        "Batch job submission failed: Unable to contact slurm controller"

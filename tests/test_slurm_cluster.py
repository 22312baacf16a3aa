"""The SLURM backend on a real cluster: slurmctld, slurmdbd and two slurmd on this machine (slurm/cluster.sh),
2 nodes x 2 processes = 4 gloo ranks."""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_params, launch, run_launch, write_recipe

pytestmark = pytest.mark.slurm

# conftest.BASE with these changes; tests change trainer.max_steps (12), model.step_sleep and slurm.* further
JOB = ("seed=11", "model.dropout=0.2", "model.step_sleep=0.0", "data.train.num_samples=512", "data.batch_size=8",
       "data.num_workers=1", "trainer.device=cpu", "checkpoint.every_steps=1000",
       "slurm={time_min: 10, signal_grace_s: 30, max_requeues: 3}")


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "launch.json").read_text())["job_id"]


def state(job: str) -> str:
    from launcher.backends.slurm_state import job_state
    return job_state(job)


def wait_state(job: str, final: set[str], timeout: float, settle: float = 10) -> str:
    from launcher.backends.slurm_state import wait_state as wait
    return wait(job, final, timeout, settle)


def metrics_step(run_dir: Path) -> int:
    try:
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(rows[-1])["step"] if rows else 0
    except (OSError, ValueError):
        return 0


def test_two_node_job_trains_with_right_ranks(slurm_cluster, tmp_path):
    secret = "tok-slurm-3b9d27c1"  # given by reference: the job's ranks resolve it, nothing written holds it
    recipe = write_recipe(tmp_path, *JOB, name="job.yaml")
    r, run_dir = launch(tmp_path, recipe, "--nodes", "2", "--slurm", "--wait",
                        "data.train._target_=components.TokenDataset", "data.train.token=${oc.env:FAKE_TOKEN}",
                        timeout=300, env={"FAKE_TOKEN": secret, "EXPECTED_TOKEN": secret})
    assert not [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert "${oc.env:FAKE_TOKEN}" in (run_dir / "config.yaml").read_text()
    assert re.search(r"submitted SLURM job \d+ \(2 nodes x 2 processes\)", r.stderr)
    assert "scancel" in r.stderr and "launch status" in r.stderr
    for rank in range(4):
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"worker start: rank {rank} local_rank {rank % 2} world_size 4 node {rank // 2}" in text, text[:500]
    assert metrics_step(run_dir) == 12
    status = run_launch("status", str(run_dir), cwd=tmp_path)
    assert "COMPLETED" in status.stdout and "step 12" in status.stdout and "checkpoint: step 12" in status.stdout


STEPS = 30  # the reference job and the jobs compared with it


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory) -> Path:
    """The job that the interrupted ones must equal, run once, uninterrupted. It runs with the default
    trainer.device=auto on the test cluster's GPU-less partition: no GPUs asked for, CPU processes."""
    tmp = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(tmp, *JOB, f"trainer.max_steps={STEPS}", "model.step_sleep=0.15", name="job.yaml")
    r, ref = launch(tmp, recipe, "--nodes", "2", "--slurm", "--wait", "trainer.device=auto", run="ref", timeout=300)
    assert "launch: partition debug has no GPUs: the job runs 2 CPU processes per node with gloo" in r.stderr, \
        r.stderr
    script = next((ref / "slurm" / job_id(ref)).glob("*_submission.sh")).read_text()
    assert "--gpus" not in script and "--gres" not in script, script
    assert sorted(losses(ref)) == list(range(1, STEPS + 1))
    return ref


def wait_for(what: str, done, job: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not done():
        assert time.time() < deadline, f"job {job}: {what} did not happen; it is {state(job)}"
        time.sleep(0.05)


def marker(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "preempted.json").read_text())
    except (OSError, ValueError):
        return {}


def test_signals_to_the_whole_job_checkpoint_requeue_and_resume_exactly(slurm_cluster, reference, tmp_path):
    """SIGUSR2 to every process of the job, the batch shell included (scancel --full; bash dies of it by default),
    at a random moment; after the requeue, SIGTERM (a preemption without a user signal). Each time every rank
    writes one committed checkpoint and the job requeues; the end equals the uninterrupted job."""
    rng = random.Random(3)
    recipe = write_recipe(tmp_path, *JOB, f"trainer.max_steps={STEPS}", "model.step_sleep=0.15", name="job.yaml")
    _, run_dir = launch(tmp_path, recipe, "--nodes", "2", "--slurm")
    job = job_id(run_dir)
    first = rng.randint(2, 10)
    wait_for(f"step {first}", lambda: metrics_step(run_dir) >= first, job)
    time.sleep(rng.uniform(0, 0.15))  # anywhere within a step
    sig = subprocess.run(["scancel", "--signal=USR2", "--full", job], capture_output=True, text=True)
    assert sig.returncode == 0, sig.stderr
    wait_for("the preemption checkpoint", lambda: marker(run_dir).get("restart") == "0", job)
    stop1 = marker(run_dir)["step"]
    second = stop1 + rng.randint(2, 6)
    wait_for(f"step {second} after the requeue", lambda: metrics_step(run_dir) >= second, job, timeout=180)
    sig = subprocess.run(["scancel", "--signal=TERM", job], capture_output=True, text=True)
    assert sig.returncode == 0, sig.stderr
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300) == "COMPLETED"
    stop2 = marker(run_dir)
    assert stop2["restart"] == "1" and second <= stop2["step"] < STEPS, stop2
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "received SIGUSR2" in log0 and "received SIGTERM" in log0, log0[-3000:]
    assert log0.count("resume: from") == 2 and f"step {stop1}," in log0 and f"step {stop2['step']}," in log0
    for step in (stop1, stop2["step"]):
        folder = run_dir / "checkpoints" / f"step-{step:09d}"
        assert sorted(p.name for p in folder.glob("rank*.json")) == [f"rank{k}.json" for k in range(4)], folder
        assert (folder / "manifest.json").exists(), folder
    got, expected = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [s for s in got if got[s] != expected[s]] == [], "per-step losses differ from the uninterrupted job"
    final = checkpoint_params(run_dir / "checkpoints" / f"step-{STEPS:09d}")
    want = checkpoint_params(reference / "checkpoints" / f"step-{STEPS:09d}")
    for k in want:
        assert torch.equal(final[k], want[k]), \
            f"{k} differs from the uninterrupted run by {(final[k] - want[k]).abs().max():.3g}"


def test_signal_while_workers_start_is_not_lost(slurm_cluster, tmp_path):
    """A preemption signal that comes while the node tasks are still starting (before any worker exists) must
    neither kill them (SIGUSR2's default action) nor be forgotten: the job checkpoints, requeues and finishes."""
    recipe = write_recipe(tmp_path, *JOB, "trainer.max_steps=6", name="job.yaml")
    _, run_dir = launch(tmp_path, recipe, "--nodes", "2", "--slurm")
    job = job_id(run_dir)
    # signal as soon as both node tasks are up (submitit's first line), before they start any worker
    outs = [run_dir / "slurm" / job / f"{job}_{node}_log.out" for node in (0, 1)]
    deadline = time.time() + 120
    while not all("Starting with JobEnvironment" in (p.read_text() if p.exists() else "") for p in outs):
        assert time.time() < deadline, f"job {job} did not start: {state(job)}"
        time.sleep(0.02)
    assert not (run_dir / "logs" / "rank0.log").exists(), "the workers started before the test could signal"
    sig = subprocess.run(["scancel", "--signal=USR2", job], capture_output=True, text=True)
    assert sig.returncode == 0, sig.stderr
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300) == "COMPLETED"
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["step"] == 1 and marker["restart"] == "0", marker
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "received SIGUSR2" in log0 and "resume: from" in log0, log0[-2000:]
    assert metrics_step(run_dir) == 6


def test_time_limit_shorter_than_training_finishes_across_allocations(slurm_cluster, tmp_path):
    # SLURM sends the signal at its first check after (end - grace - 30 s): with a 60 s limit and a 10 s grace,
    # 20 to 50 s into each allocation, so one allocation trains 13 to 43 s. 52 s of steps need 2 or more.
    recipe = write_recipe(tmp_path, *JOB, "trainer.max_steps=260", "model.step_sleep=0.2", "slurm.time_min=1",
                          "slurm.signal_grace_s=10", "slurm.max_requeues=8", name="job.yaml")
    _, run_dir = launch(tmp_path, recipe, "--nodes", "2", "--slurm")
    job = job_id(run_dir)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "COMPLETED"
    assert metrics_step(run_dir) == 260
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert log0.count("resume: from") >= 1, "the job never ran past one allocation"


def test_bad_partition_surfaces_sbatch_error(slurm_cluster, tmp_path):
    recipe = write_recipe(tmp_path, *JOB, name="job.yaml")
    r, _ = launch(tmp_path, recipe, "--nodes", "2", "--slurm", "slurm.partition=nope", expect=2)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("launch: error:")]
    assert len(lines) == 1 and "sbatch refused the job" in lines[0] and "partition" in lines[0].lower(), r.stderr
    r, _ = launch(tmp_path, recipe, "--nodes", "5", "--slurm", run="r2", expect=2)
    assert "sbatch refused the job" in r.stderr, r.stderr
    r, _ = launch(tmp_path, recipe, "--nodes", "2", "--slurm", "trainer.device=cuda", run="r3", expect=2)
    assert "launch: error: partition debug has no GPUs: set trainer.device=cpu, or pick a GPU partition" in r.stderr


def test_status_and_a_cancel_right_after_the_preemption_checkpoint_wins(slurm_cluster, tmp_path):
    """`launch cancel` while the job has just checkpointed for a preemption and is about to requeue itself: the job
    ends CANCELLED and never comes back (a requeued job would run again ~12 s later here)."""
    recipe = write_recipe(tmp_path, *JOB, "trainer.max_steps=2000", "model.step_sleep=0.1", name="job.yaml")
    _, run_dir = launch(tmp_path, recipe, "--nodes", "2", "--slurm")
    job = job_id(run_dir)
    wait_for("step 2", lambda: metrics_step(run_dir) >= 2, job)
    s = run_launch("status", str(run_dir), cwd=tmp_path)
    assert f"SLURM job:  {job}: RUNNING" in s.stdout and "logs:" in s.stdout
    sig = subprocess.run(["scancel", "--signal=USR2", job], capture_output=True, text=True)
    assert sig.returncode == 0, sig.stderr
    wait_for("the preemption checkpoint", lambda: marker(run_dir).get("restart") == "0", job)
    c = run_launch("cancel", str(run_dir), cwd=tmp_path)
    assert c.returncode == 0 and f"cancelled SLURM job {job}" in c.stdout
    assert wait_state(job, {"CANCELLED"}, 90, settle=20) == "CANCELLED"
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert log0.count("worker start: rank 0 ") == 1, "the cancelled job ran again"

"""The SLURM submit path without a cluster: the sbatch script (golden file), the standalone script, allocation
checks. The real cluster tests are in test_slurm_cluster.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import json

from conftest import ROOT, run_launch
from launcher import recipe
from launcher.backends import slurm, slurm_node
from launcher.backends.plan import Options
from launcher.errors import UsageError

GOLDEN = Path(__file__).parent / "golden"
RECIPE = ROOT / "recipes" / "quickstart.yaml"
# A partition the test cluster lacks: where sinfo answers, it does not know it, so GPUs are asked for as without sinfo
ARGS = ["--nodes", "2", "--gpus", "2", "--slurm", "slurm.partition=gpu", "slurm.time_min=30",
        "slurm.signal_grace_s=45", "slurm.account=proj1", "slurm.setup=[module load cuda, source venv/bin/activate]",
        "slurm.extra_sbatch={mail-type: END}"]


def normalise(text: str, run_dir: str) -> str:
    return text.replace(run_dir, "<RUN_DIR>").replace(sys.executable, "<PYTHON>")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LAUNCHER_REFRESH_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}: run with LAUNCHER_REFRESH_GOLDEN=1 to create it"
    assert text == path.read_text(), (f"{name} changed; if the change is intended, refresh the golden file: "
                                      f"LAUNCHER_REFRESH_GOLDEN=1 scripts/test.sh tests/test_slurm_submit.py")


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path):
    run_dir = str(tmp_path / "run")
    r = run_launch(str(RECIPE), *ARGS, "--run-dir", run_dir, "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = r.stdout.split("# sbatch script that would be submitted (nothing was submitted)\n", 1)[1]
    check_golden("sbatch_dry_run.txt", normalise(script, run_dir))
    assert not Path(run_dir).exists()


def test_emit_sbatch_writes_a_standalone_script(tmp_path):
    run_dir = str(tmp_path / "run")
    r = run_launch(str(RECIPE), *ARGS, "--run-dir", run_dir, "--emit-sbatch", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check_golden("sbatch_standalone.txt", normalise(r.stdout, run_dir).replace(str(RECIPE), "<RECIPE>"))
    assert (Path(run_dir) / "config.yaml").exists(), "the standalone script runs the saved config"
    assert "$SLURM_NODEID" not in r.stdout, "node ranks must be read by each task, never expanded at submit time"


def test_gpus_are_asked_for_once(tmp_path):
    """No --gpus-per-node of the launcher's own when slurm.extra_sbatch asks for GPUs already, in either script."""
    def scripts(extra: str) -> list[str]:
        run_dir = str(tmp_path / f"run{len(list(tmp_path.iterdir()))}")
        base = [str(RECIPE), "--nodes", "2", "--gpus", "2", "--slurm", "slurm.partition=gpu",
                f"slurm.extra_sbatch={extra}", "--run-dir", run_dir]
        dry = run_launch(*base, "--dry-run", cwd=tmp_path)
        emitted = run_launch(*base, "--emit-sbatch", cwd=tmp_path)
        assert dry.returncode == 0 and emitted.returncode == 0, dry.stderr + emitted.stderr
        return [dry.stdout.split("# sbatch script that would be submitted", 1)[1], emitted.stdout]

    for text in scripts("{gres: 'gpu:a100:2'}"):
        assert "#SBATCH --gres=gpu:a100:2" in text and "--gpus" not in text, text
    for text in scripts("{gpus-per-task: 1}"):
        assert [ln for ln in text.splitlines() if "--gpus" in ln] == ["#SBATCH --gpus-per-task=1"], text
    for text in scripts("{gres: 'nvme:1'}"):  # not a GPU: the launcher still asks for them
        assert "#SBATCH --gres=nvme:1" in text and "#SBATCH --gpus-per-node=2" in text, text


def test_the_slurm_plan_is_what_dry_run_prints_and_launch_json_holds(tmp_path):
    """The command's --dry-run text and launch.json come from slurm.plan(...): describe() and to_dict()."""
    run_dir = str(tmp_path / "run")
    flags = ["launch.nodes=2", "launch.gpus_per_node=2", "backend=slurm", "slurm.partition=gpu"]
    cfg = recipe.load(str(RECIPE), flags).cfg
    cfg.run.dir = run_dir
    p = slurm.plan(cfg, run_dir, Options())
    assert p.to_dict() == {"backend": "slurm", "nodes": 2, "procs_per_node": 2, "world_size": 4}
    assert p.describe() == ("# sbatch script that would be submitted (nothing was submitted)\n"
                            + recipe.redact(slurm.sbatch_script(cfg, run_dir)) + "\n")
    args = [str(RECIPE), "--nodes", "2", "--gpus", "2", "--slurm", "slurm.partition=gpu", "--run-dir", run_dir]
    r = run_launch(*args, "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "# resolved recipe\n" + recipe.to_yaml(cfg) + p.describe()
    r = run_launch(*args, "--emit-sbatch", cwd=tmp_path)  # writes the run directory, submits nothing
    assert r.returncode == 0, r.stderr
    launch = json.loads((Path(run_dir) / "launch.json").read_text())
    assert {k: launch[k] for k in p.to_dict()} == p.to_dict() and "job_id" not in launch
    with pytest.raises(UsageError, match="--run-dir holds a newline"):
        slurm.plan(cfg, str(tmp_path / "a\nrun"), Options())


def _env(**kw: str) -> slurm_node.SlurmEnv:
    base = dict(job_id="42", node_id=0, nnodes=2, ntasks_per_node=1, nodelist="n[1-2]", restart_count=0)
    base.update(kw)
    return slurm_node.SlurmEnv(**base)  # type: ignore[arg-type]


def test_allocation_mismatch_names_the_numbers():
    cfg = recipe.load(str(RECIPE), ["launch.nodes=2", "launch.gpus_per_node=4"]).cfg
    slurm_node.check_allocation(_env(), cfg)
    with pytest.raises(UsageError, match=r"the allocation has 3 node\(s\) but the recipe asks for launch.nodes=2"):
        slurm_node.check_allocation(_env(nnodes=3), cfg)
    with pytest.raises(UsageError, match="SLURM started 4 tasks per node; the launcher needs exactly 1"):
        slurm_node.check_allocation(_env(ntasks_per_node=4), cfg)


def test_slurm_env_parses_tasks_per_node_forms(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "1(x2)")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    env = slurm_node.SlurmEnv.from_environ()
    assert (env.job_id, env.node_id, env.nnodes, env.ntasks_per_node, env.restart_count) == ("7", 1, 2, 1, 0)

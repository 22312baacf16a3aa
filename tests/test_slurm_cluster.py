"""The SLURM backend on a real cluster: slurmctld, slurmdbd and two slurmd on this machine (slurm/cluster.sh),
2 nodes x 2 processes = 4 gloo ranks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, checkpoint_params, launch_env, require, run_launch

pytestmark = pytest.mark.slurm

RECIPE = """\
seed: 11
model: {_target_: components.KillableMLP, in_features: 32, hidden: 16, out_features: 4, dropout: 0.2,
        step_sleep: %(sleep)s}
data:
  train: {_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 512}
  batch_size: 8
  num_workers: 1
trainer: {max_steps: %(steps)d, log_every_steps: 1, device: cpu}
checkpoint: {every_steps: 1000, keep: 0}
slurm: {time_min: %(time_min)d, signal_grace_s: %(grace)d, max_requeues: %(requeues)d}
"""


@pytest.fixture(scope="session")
def slurm_cluster():
    require(os.geteuid() == 0 and shutil.which("apt-get") is not None,
            "the SLURM tests stand up a cluster with slurm/cluster.sh, which needs root and apt-get")
    r = subprocess.run([str(ROOT / "slurm" / "cluster.sh"), "start"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"slurm/cluster.sh start failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    yield
    subprocess.run([str(ROOT / "slurm" / "cluster.sh"), "stop"], capture_output=True, text=True, timeout=120)


def write(tmp_path: Path, steps: int = 12, sleep: float = 0.0, time_min: int = 10, grace: int = 30,
          requeues: int = 3) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(RECIPE % dict(steps=steps, sleep=sleep, time_min=time_min, grace=grace, requeues=requeues))
    return str(p)


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "launch.json").read_text())["job_id"]


def state(job: str) -> str:
    from launcher.backends.slurm import job_state
    return job_state(job)


def wait_state(job: str, final: set[str], timeout: float, settle: float = 10) -> str:
    from launcher.backends.slurm import wait_state as wait
    return wait(job, final, timeout, settle)


def metrics_step(run_dir: Path) -> int:
    try:
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(rows[-1])["step"] if rows else 0
    except (OSError, ValueError):
        return 0


def test_two_node_job_trains_with_right_ranks(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    r = run_launch(write(tmp_path), "--nodes", "2", "--gpus", "2", "--slurm", "--wait", "--run-dir", str(run_dir),
                   cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"submitted SLURM job \d+ \(2 nodes x 2 processes\)", r.stderr)
    assert "scancel" in r.stderr and "launch status" in r.stderr
    for rank in range(4):
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"worker start: rank {rank} local_rank {rank % 2} world_size 4 node {rank // 2}" in text, text[:500]
    assert metrics_step(run_dir) == 12
    status = run_launch("status", str(run_dir), cwd=tmp_path)
    assert "COMPLETED" in status.stdout and "step 12" in status.stdout and "checkpoint: step 12" in status.stdout


def test_preemption_checkpoints_requeues_and_resumes_exactly(slurm_cluster, tmp_path):
    steps = 40
    recipe = write(tmp_path, steps=steps, sleep=0.15)
    ref = tmp_path / "ref"  # the same job, uninterrupted
    r = run_launch(recipe, "--nodes", "2", "--gpus", "2", "--slurm", "--wait", "--run-dir", str(ref), cwd=tmp_path,
                   timeout=300)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "run"
    r = run_launch(recipe, "--nodes", "2", "--gpus", "2", "--slurm", "--run-dir", str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = job_id(run_dir)
    deadline = time.time() + 120
    while metrics_step(run_dir) < 10:
        assert time.time() < deadline, f"job {job} made no progress: {state(job)}"
        time.sleep(0.5)
    sig = subprocess.run(["scancel", "--signal=USR2", job], capture_output=True, text=True)
    assert sig.returncode == 0, sig.stderr
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300) == "COMPLETED"
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert 10 <= marker["step"] < steps
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "preemption signal" in log0 and f"resume: from" in log0 and f"step {marker['step']}," in log0
    assert metrics_step(run_dir) == steps
    def losses(d: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
    got, expected = losses(run_dir), losses(ref)
    assert sorted(got) == list(range(1, steps + 1))
    assert [s for s in got if got[s] != expected[s]] == [], "per-step losses differ from the uninterrupted job"
    final = checkpoint_params(run_dir / "checkpoints" / f"step-{steps:09d}")
    want = checkpoint_params(ref / "checkpoints" / f"step-{steps:09d}")
    for k in want:
        assert torch.equal(final[k], want[k]), \
            f"{k} differs from the uninterrupted run by {(final[k] - want[k]).abs().max():.3g}"


def test_signal_while_workers_start_is_not_lost(slurm_cluster, tmp_path):
    """A preemption signal that comes while the node tasks are still starting (before any worker exists) must
    neither kill them (SIGUSR2's default action) nor be forgotten: the job checkpoints, requeues and finishes."""
    run_dir = tmp_path / "run"
    r = run_launch(write(tmp_path, steps=6), "--nodes", "2", "--gpus", "2", "--slurm", "--run-dir", str(run_dir),
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
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
    run_dir = tmp_path / "run"
    # SLURM sends the signal at its first check after (end - grace - 30 s): with a 60 s limit and a 10 s grace,
    # 20 to 50 s into each allocation, so one allocation trains 13 to 43 s. 52 s of steps need 2 or more.
    recipe = write(tmp_path, steps=260, sleep=0.2, time_min=1, grace=10, requeues=8)
    r = run_launch(recipe, "--nodes", "2", "--gpus", "2", "--slurm", "--run-dir", str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = job_id(run_dir)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "COMPLETED"
    assert metrics_step(run_dir) == 260
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert log0.count("resume: from") >= 1, "the job never ran past one allocation"


def test_bad_partition_surfaces_sbatch_error(slurm_cluster, tmp_path):
    r = run_launch(write(tmp_path), "--nodes", "2", "--gpus", "2", "--slurm", "slurm.partition=nope",
                   "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("launch: error:")]
    assert len(lines) == 1 and "sbatch refused the job" in lines[0] and "partition" in lines[0].lower(), r.stderr
    r = run_launch(write(tmp_path), "--nodes", "5", "--gpus", "2", "--slurm", "--run-dir", str(tmp_path / "r2"),
                   cwd=tmp_path)
    assert r.returncode == 2 and "sbatch refused the job" in r.stderr, r.stderr


def test_status_and_cancel(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    r = run_launch(write(tmp_path, steps=2000, sleep=0.1), "--nodes", "2", "--gpus", "2", "--slurm",
                   "--run-dir", str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = job_id(run_dir)
    wait_state(job, {"RUNNING"}, 120, settle=0)
    s = run_launch("status", str(run_dir), cwd=tmp_path)
    assert f"SLURM job:  {job}: RUNNING" in s.stdout and "logs:" in s.stdout
    c = run_launch("cancel", str(run_dir), cwd=tmp_path)
    assert c.returncode == 0 and f"cancelled SLURM job {job}" in c.stdout
    assert wait_state(job, {"CANCELLED"}, 60) == "CANCELLED"

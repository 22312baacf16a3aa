"""`launch sweep --slurm` on the real cluster (slurm/cluster.sh): every trial a SLURM job of 2 gloo ranks, two at
a time; one trial's job is preempted (SIGUSR2, as SLURM sends it before a preemption or the time limit), requeues
itself and resumes from its checkpoint, and the sweep ends with both trials COMPLETE."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import LAUNCH, launch_env, run_launch, write_recipe

pytestmark = pytest.mark.slurm

RECIPE = """\
seed: 5
model: {_target_: components.KillableMLP, in_features: 32, hidden: 16, out_features: 4, step_sleep: 0.05}
data:
  train: {_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 256}
  batch_size: 16
  num_workers: 0
trainer: {max_steps: 60, log_every_steps: 5, device: cpu}
checkpoint: {every_steps: 10, keep: 0}
slurm: {time_min: 10, signal_grace_s: 30, max_requeues: 3}
sweep:
  metric: train/loss
  sampler: grid
  parallel: 2
  params:
    optimizer.lr: {type: choice, values: [0.003, 0.01]}
"""


def rows(sweep_dir: Path) -> list[dict]:
    try:
        return json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    except (OSError, ValueError):
        return []


def test_a_slurm_sweep_with_a_trial_preempted_and_requeued(slurm_cluster, tmp_path):
    recipe = write_recipe(tmp_path, base=RECIPE)
    sweep_dir = tmp_path / "sw"
    ctl = subprocess.Popen([LAUNCH, "sweep", recipe, "--dir", str(sweep_dir), "--gpus", "2", "--slurm"],
                           cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        target = None
        while time.time() < deadline and target is None:  # a trial whose job has trained past its first checkpoint
            time.sleep(0.5)
            for r in rows(sweep_dir):
                ckpts = list((Path(r["run_dir"]) / "checkpoints").glob("step-*/manifest.json"))
                if r["state"] == "RUNNING" and r.get("job_id") and ckpts:
                    target = r
                    break
        assert target is not None, f"no trial got going: {rows(sweep_dir)}"
        sig = subprocess.run(["scancel", "--signal=USR2", str(target["job_id"])], capture_output=True, text=True)
        assert sig.returncode == 0, sig.stderr
        _, err = ctl.communicate(timeout=420)
    finally:
        if ctl.poll() is None:
            ctl.send_signal(signal.SIGKILL)
            ctl.communicate()
            subprocess.run(["scancel", "-u", "root"], capture_output=True)
    assert ctl.returncode == 0, err[-4000:]
    final = {r["number"]: r for r in rows(sweep_dir)}
    assert [final[n]["state"] for n in (0, 1)] == ["COMPLETE", "COMPLETE"], (final, err[-3000:])
    assert {final[n]["params"]["optimizer.lr"] for n in (0, 1)} == {0.003, 0.01}
    assert all(final[n]["job_id"] for n in (0, 1)) and final[0]["job_id"] != final[1]["job_id"]
    run = Path(target["run_dir"])
    marker = json.loads((run / "preempted.json").read_text())
    assert marker["restart"] == "0" and marker["step"] >= 10, marker
    log0 = (run / "logs" / "rank0.log").read_text()
    assert "received SIGUSR2" in log0 and "resume: from" in log0, log0[-3000:]
    ready = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "ready"]
    assert len(ready) == 2 and ready[1]["resumed_step"] == marker["step"], ready
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 60 and final[target["number"]]["value"] == pytest.approx(last["loss"])
    status = run_launch("sweep", "status", str(sweep_dir), cwd=tmp_path)
    assert "2 of 2 trials (2 COMPLETE)" in status.stdout, status.stdout


def test_the_controller_as_a_requeueable_job_requeues_itself_and_follows_its_trials(slurm_cluster, tmp_path):
    recipe = write_recipe(tmp_path, "trainer.max_steps=80", base=RECIPE)
    sweep_dir = tmp_path / "sw"
    dry = run_launch("sweep", recipe, "--dir", str(sweep_dir), "--gpus", "2", "--slurm", "--controller-job",
                     "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "#SBATCH --requeue" in dry.stdout and "#SBATCH --signal=B:USR2@30" in dry.stdout
    assert not sweep_dir.exists()
    bad = run_launch("sweep", recipe, "--dir", str(sweep_dir), "--gpus", "2", "--slurm", "--controller-job",
                     "run.name=a\nb", cwd=tmp_path)
    assert bad.returncode == 2 and "a newline" in bad.stderr, bad.stderr
    r = run_launch("sweep", recipe, "--dir", str(sweep_dir), "--gpus", "2", "--slurm", "--controller-job",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = json.loads((sweep_dir / "controller-job.json").read_text())["job_id"]
    deadline = time.time() + 240
    while time.time() < deadline and not any(r_["state"] == "RUNNING" and r_.get("job_id") and r_.get("steps")
                                             for r_ in rows(sweep_dir)):
        time.sleep(0.5)
    assert rows(sweep_dir), f"the controller job {job} started no trial"
    sig = subprocess.run(["scancel", "--signal=USR2", "--batch", job], capture_output=True, text=True)
    assert sig.returncode == 0, sig.stderr
    from launcher.backends.slurm_state import wait_state
    try:
        assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 420) == "COMPLETED"
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = (sweep_dir / f"controller-{job}.log").read_text()
    assert "requeued this controller's job" in log and "the 2 running SLURM trial(s) go on" in log, log[-3000:]
    assert log.count("started on SLURM job") == 2, log[-3000:]  # the requeued controller submitted nothing again
    final = rows(sweep_dir)
    assert [r_["state"] for r_ in final] == ["COMPLETE", "COMPLETE"], (final, log[-3000:])
    for r_ in final:  # each trial ran once, in one job, while its controller was requeued
        ready = [json.loads(line) for line in (Path(r_["run_dir"]) / "events.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "ready"]
        assert len(ready) == 1, ready

"""Time on the one-machine SLURM cluster (slurm/cluster.sh start first), printed as a table (not a test):

    .venv/bin/python bench/bench_slurm.py

1. `launch --slurm` to the first finished training step, split into: submit (the command returns), queue
   (submitted -> job start, from sacct), start-up and rendezvous (job start -> every rank's worker is up), first step.
2. Preemption: the USR2 signal (sent by this script with scancel) -> the emergency checkpoint committed.
3. `launch cancel` right after that commit, while the job is about to requeue itself -> the job is CANCELLED (and
   still is 20 s later: a requeued job would be running again by then).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = str(Path(sys.executable).parent / "launch")
RECIPE = """\
seed: 0
model: {_target_: launcher.zoo.models.MLP, in_features: 32, hidden: 64, out_features: 4}
data: {train: {_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 100000}, batch_size: 64,
       num_workers: 1}
trainer: {max_steps: 100000, log_every_steps: 10, device: cpu}
"""


def sacct_time(job: str, field: str) -> float:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", field], capture_output=True,
                         text=True).stdout.split()
    return dt.datetime.fromisoformat(out[0]).timestamp()


def log_time(line: str) -> float:
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    recipe = tmp / "r.yaml"
    recipe.write_text(RECIPE)
    run_dir = tmp / "run"
    t0 = time.time()
    r = subprocess.run([LAUNCH, str(recipe), "--nodes", "2", "--gpus", "2", "--slurm", "--run-dir", str(run_dir)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    t_submit = time.time()
    if r.returncode != 0:
        sys.exit(r.stderr)
    job = json.loads((run_dir / "launch.json").read_text())["job_id"]
    events = run_dir / "events.jsonl"
    while not events.exists() or "first_step" not in events.read_text():
        time.sleep(0.2)
    first = json.loads(events.read_text().splitlines()[0])["time"]
    start = sacct_time(job, "Start")
    workers = max(log_time(next(ln for ln in (run_dir / "logs" / f"rank{k}.log").read_text().splitlines()
                                if "worker start" in ln)) for k in range(4))
    time.sleep(3)
    t_sig = time.time()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    log0 = run_dir / "logs" / "rank0.log"
    while "committed (preemption signal)" not in log0.read_text():
        time.sleep(0.1)
    commit = log_time(next(ln for ln in log0.read_text().splitlines() if "committed (preemption signal)" in ln))
    t_cancel = time.time()
    subprocess.run([LAUNCH, "cancel", str(run_dir)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    sys.path.insert(0, str(ROOT))
    from launcher.backends.slurm_state import wait_state
    settle = 20
    wait_state(job, {"CANCELLED"}, 120, settle_s=settle)  # raises if the job came back
    cancelled = time.time() - settle - t_cancel
    print(f"{'phase':50} {'seconds':>8}")
    print(f"{'submit (launch --slurm returns)':50} {t_submit - t0:8.2f}")
    print(f"{'queue (submitted -> job starts; sacct, 1 s resolution)':50} {max(0.0, start - t_submit):8.2f}")
    print(f"{'start-up (job starts -> all 4 workers up)':50} {workers - start:8.2f}")
    print(f"{'rendezvous, build, first step (-> first step done)':50} {first - workers:8.2f}")
    print(f"{'total: launch --slurm -> first step':50} {first - t0:8.2f}")
    print(f"{'preemption: USR2 -> emergency checkpoint committed':50} {commit - t_sig:8.2f}")
    print(f"{'launch cancel after the commit -> CANCELLED (stays)':50} {cancelled:8.2f}")


if __name__ == "__main__":
    main()

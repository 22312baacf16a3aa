"""Recovery from a killed worker, printed as a table (not a test):

    .venv/bin/python bench/bench_recovery.py [--repeats 3]

A 2-process CPU run with `--max-restarts 1` and a checkpoint every 20 steps; once step 30 is logged, this script
SIGKILLs rank 1. The time from the kill to the first step after the restart is split, from the restarted rank 0's
`ready` event (events.jsonl) and its first step:
  detect + restart   kill -> the new worker process starts (the agent notices, stops the survivors, re-rendezvous,
                     spawns)
  start-up           process start -> process group joined (Python and torch imports, worker rendezvous)
  checkpoint load    reading and loading the newest committed checkpoint (model 9.0 M parameters + AdamW state)
  first step         from there to the end of the first step (DDP, loader start, one step)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = str(Path(sys.executable).parent / "launch")
RECIPE = """\
seed: 0
model: {_target_: launcher.zoo.models.MLP, in_features: 256, hidden: 2048, out_features: 16, depth: 3}
data: {train: {_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 100000, num_features: 256,
       num_classes: 16}, batch_size: 64, num_workers: 1}
trainer: {max_steps: 60, log_every_steps: 1, device: cpu}
checkpoint: {every_steps: 20, keep: 2}
"""


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def last_step(run_dir: Path) -> int:
    try:
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(rows[-1])["step"] if rows else 0
    except (OSError, ValueError, IndexError):
        return 0


def once(tmp: Path) -> dict[str, float]:
    recipe = tmp / "r.yaml"
    recipe.write_text(RECIPE)
    run_dir = tmp / f"run-{time.monotonic_ns()}"
    proc = subprocess.Popen([LAUNCH, str(recipe), "--gpus", "2", "--max-restarts", "1", "--run-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    while last_step(run_dir) < 30:
        if proc.poll() is not None:
            sys.exit(proc.stderr.read())
        time.sleep(0.05)
    log1 = (run_dir / "logs" / "rank1.log").read_text()
    pid = int(re.findall(r"worker start: rank 1 .* pid (\d+)", log1)[-1])
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        sys.exit(err)
    ev = events(run_dir)
    ready = next(e for e in ev if e["event"] == "ready" and e["restart"] == 1)
    first = next(e for e in ev if e["event"] == "first_step" and e["time"] > ready["time"])
    loaded = ready["group_joined"] + ready["load_s"]
    return {"detect + restart": ready["process_start"] - t_kill,
            "start-up": ready["group_joined"] - ready["process_start"],
            "checkpoint load": ready["load_s"],
            "first step": first["time"] - loaded,
            "kill -> first step after restart": first["time"] - t_kill}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    runs = [once(tmp) for _ in range(args.repeats)]
    print(f"recovery from a SIGKILLed rank (2 CPU processes, --max-restarts 1), median of {args.repeats}:\n")
    print(f"| {'phase':<34} | {'seconds':>8} |")
    print(f"|{'-' * 36}|{'-' * 10}|")
    for key in runs[0]:
        print(f"| {key:<34} | {statistics.median(r[key] for r in runs):8.2f} |")


if __name__ == "__main__":
    main()

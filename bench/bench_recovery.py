"""Recovery from a killed worker, printed as a table (not a test):

    .venv/bin/python bench/bench_recovery.py [--repeats 3] [--num-workers 1] [--fresh]

A 2-process CPU run with `--max-restarts 1`, `data.num_workers` loader workers per rank (default 1) and a
checkpoint every 20 steps; once step 30 is logged, this script SIGKILLs rank 1. The time from the kill to the first
step after the restart is split by phase, from the agent's `group_stop` / `group_stopped` events and the restarted
rank 0's `ready` and `first_step` events (events.jsonl):
  detect             kill -> the agent stops the group (it polls its workers every 0.1 s)
  survivors' exit    -> every surviving rank (and its loader workers) has exited
  restart / spawn    -> the new rank 0 process starts (re-rendezvous of the agents, the fork from the node's
                        fork server, or a new interpreter with launch.preload_workers=false)
  worker start-up    -> process group joined (worker rendezvous; with a fresh interpreter also Python and torch
                        imports)
  resume load        reading and loading the newest committed checkpoint (model 9.0 M parameters + AdamW state)
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
sys.path.insert(0, str(ROOT))
from launcher import procs  # noqa: E402

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


def alive(pid: int) -> bool:
    fields = procs.stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def once(tmp: Path, num_workers: int, fresh: bool) -> dict[str, float]:
    recipe = tmp / "r.yaml"
    recipe.write_text(RECIPE)
    run_dir = tmp / f"run-{time.monotonic_ns()}"
    proc = subprocess.Popen([LAUNCH, str(recipe), "--gpus", "2", "--max-restarts", "1", "--run-dir", str(run_dir),
                             f"data.num_workers={num_workers}", f"launch.preload_workers={str(not fresh).lower()}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    while last_step(run_dir) < 30:
        if proc.poll() is not None:
            sys.exit(proc.stderr.read())
        time.sleep(0.05)
    pids = {rank: int(re.findall(rf"worker start: rank {rank} .* pid (\d+)",
                                 (run_dir / "logs" / f"rank{rank}.log").read_text())[-1]) for rank in (0, 1)}
    t_kill = time.time()
    os.kill(pids[1], signal.SIGKILL)
    while alive(pids[0]) and proc.poll() is None:  # the survivor's exit, seen from outside
        time.sleep(0.005)
    t_survivor_gone = time.time()
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        sys.exit(err)
    ev = events(run_dir)
    ready = next(e for e in ev if e["event"] == "ready" and e["restart"] == 1)
    first = next(e for e in ev if e["event"] == "first_step" and e["time"] > ready["time"])
    loaded = ready["group_joined"] + ready["load_s"]
    stop = next((e for e in ev if e["event"] == "group_stop"), None)
    stopped = next((e for e in ev if e["event"] == "group_stopped"), None)
    if stop and stopped:
        phases = {"detect": stop["time"] - t_kill, "survivors' exit": stopped["time"] - stop["time"]}
    else:  # a launcher without the agent's events: the survivor's exit as this script saw it
        phases = {"detect + survivors' exit": t_survivor_gone - t_kill}
        stopped = {"time": t_survivor_gone}
    return {**phases,
            "restart / spawn": ready["process_start"] - stopped["time"],
            "worker start-up": ready["group_joined"] - ready["process_start"],
            "resume load": ready["load_s"],
            "first step": first["time"] - loaded,
            "kill -> first step after restart": first["time"] - t_kill}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-workers", type=int, default=1, help="data.num_workers: loader workers per rank")
    ap.add_argument("--fresh", action="store_true",
                    help="launch.preload_workers=false: every rank a fresh interpreter, as torchrun starts them")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    runs = [once(tmp, args.num_workers, args.fresh) for _ in range(args.repeats)]
    how = "fresh interpreters" if args.fresh else "forked from the fork server"
    print(f"recovery from a SIGKILLed rank (2 CPU processes {how}, data.num_workers={args.num_workers}, "
          f"--max-restarts 1), median of {args.repeats}:\n")
    print(f"| {'phase':<34} | {'seconds':>8} |")
    print(f"|{'-' * 36}|{'-' * 10}|")
    for key in runs[0]:
        print(f"| {key:<34} | {statistics.median(r[key] for r in runs):8.2f} |")


if __name__ == "__main__":
    main()

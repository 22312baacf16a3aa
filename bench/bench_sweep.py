"""`launch sweep`, measured on real trials (each an ordinary `launch` run of one CPU process), printed as tables
(not a test):

    .venv/bin/python bench/bench_sweep.py [--trials 16] [--seeds 3] [--parallel 2]

1. Controller overhead per trial: how long a slot stands empty between two trials, from a trial's last step
   (its train_end event) to the next trial's start on that slot, and what a trial costs from start to end.
2. On a task with a known optimum (bench/sweep_task.py: the loss is f(x, y) + 1/sqrt(step), f's minimum 0):
   the best value after N trials for tpe against random, the median over seeds.
3. Pruning: tpe with and without the median pruner, same seeds: the best value and the trial-steps run; the share
   of trial-steps pruning saves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = str(Path(sys.executable).parent / "launch")

RECIPE = """\
seed: {seed}
model: {{_target_: sweep_task.Bowl}}
data:
  train: {{_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 4096}}
  batch_size: 8
  num_workers: 0
loss: {{_target_: sweep_task.MeanOutput}}
optimizer: {{_target_: torch.optim.SGD, lr: 0.0}}
trainer: {{max_steps: {steps}, log_every_steps: 5, grad_clip_norm: null}}
checkpoint: {{every_steps: 1000, at_end: false}}
logging: {{tensorboard: false, grad_norm: false}}
sweep:
  metric: train/loss
  sampler: {sampler}
  pruner: {pruner}
  pruner_args: {pruner_args}
  min_steps: 20
  trials: {trials}
  parallel: {parallel}
  seed: {seed}
  params:
    model.x: {{type: float, low: -1.0, high: 1.0}}
    model.y: {{type: float, low: -1.0, high: 1.0}}
"""


def sweep(where: Path, name: str, **fields: object) -> tuple[float, list[dict]]:
    recipe = where / f"{name}.yaml"
    recipe.write_text(RECIPE.format(**fields))
    env = {**__import__("os").environ, "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT}"}
    t = time.perf_counter()
    r = subprocess.run([LAUNCH, "sweep", str(recipe), "--dir", str(where / name), "--gpus", "1"], cwd=where, env=env,
                       capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"sweep {name} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return wall, json.loads((where / name / "sweep.json").read_text())["trials"]


def events(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "events.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        results: dict[str, list[tuple[float, int, float]]] = {}
        gaps: list[float] = []
        starts: list[float] = []
        costs: list[float] = []
        PARALLEL[0] = a.parallel
        for sampler, pruner in (("random", "none"), ("tpe", "none"), ("tpe", "median")):
            for seed in range(a.seeds):
                name = f"{sampler}-{pruner}-{seed}"
                wall, rows = sweep(where, name, seed=seed, sampler=sampler, pruner=pruner, trials=a.trials,
                                   parallel=a.parallel, steps=a.steps,
                                   pruner_args="{n_startup_trials: 4}" if pruner != "none" else "null")
                done = [r for r in rows if r["state"] == "COMPLETE"]
                best = min(r["value"] for r in done) - a.steps ** -0.5  # f at the best trial
                steps = sum(r["steps"] or 0 for r in rows)
                results.setdefault(f"{sampler}+{pruner}", []).append((best, steps, wall))
                if pruner == "none":
                    g, st, c = slot_gaps(rows)
                    gaps += g
                    starts += st
                    costs += c
    print("controller overhead per trial (local, 1 process per trial, "
          f"{a.parallel} at a time, {len(costs)} trials)")
    ends, asks = [g[0] for g in gaps], [g[1] for g in gaps]
    total = [a_ + b for a_, b in gaps]
    print(f"  a trial's last step to the next trial's start on that slot: median {statistics.median(total):.2f} s, "
          f"max {max(total):.2f} s")
    print(f"    the trial's own exit (teardown, launch exits) until the controller sees it: median "
          f"{statistics.median(ends):.2f} s")
    print(f"    the controller: record, ask, start the next: median {statistics.median(asks):.3f} s")
    print(f"  launch: a trial's start to its first step (process, torch, process group): median "
          f"{statistics.median(starts):.2f} s")
    print(f"  a trial's first step to its last ({a.steps} steps): median {statistics.median(costs):.2f} s")
    print()
    print(f"best f(x, y) after {a.trials} trials (optimum 0), median over {a.seeds} seeds; trial-steps run")
    print(f"  {'sampler':16} {'best f':>9} {'trial-steps':>12} {'wall s':>8}")
    for key, vals in results.items():
        print(f"  {key:16} {statistics.median(v[0] for v in vals):9.4f} "
              f"{statistics.median(v[1] for v in vals):12.0f} {statistics.median(v[2] for v in vals):8.1f}")
    plain = statistics.median(v[1] for v in results["tpe+none"])
    pruned = statistics.median(v[1] for v in results["tpe+median"])
    print(f"  pruning (median, from step 20) saves {1 - pruned / plain:.0%} of the trial-steps")


def slot_gaps(rows: list[dict]) -> tuple[list[float], list[float], list[float]]:
    """Per trial after the first `parallel`: (the controller's part: the previous trial's last step on that slot to
    this trial's start, as the controller started it; launch's part: that start to this trial's first step); and
    every trial's first step to its last. Trials in start order, each taking the slot that freed first."""
    spans = []
    for r in rows:
        ev = events(r["run_dir"])
        first = next(e["time"] for e in ev if e["event"] == "first_step")
        end = next(e["time"] for e in reversed(ev) if e["event"] in ("train_end", "stopped"))
        spans.append((r["started"], first, end, r["exited"]))
    spans.sort()
    free: list[tuple[float, float]] = []
    controller, starting = [], []
    for started, first, end, exited in spans:
        if len(free) >= PARALLEL[0]:
            earliest = min(free)
            free.remove(earliest)
            controller.append((earliest[1] - earliest[0], started - earliest[1]))
            starting.append(first - started)
        free.append((end, exited))
    return controller, starting, [e - f for _, f, e, _ in spans]


PARALLEL = [2]


if __name__ == "__main__":
    main()

"""Launcher overhead, printed as a table (not a test):

    .venv/bin/python bench/bench_launch.py [--repeats 10] [--steps 1500] [--device auto|cpu|cuda] [--gpus N]

1. steps/s of the built-in trainer vs a hand-written DDP loop (same model/data/optimizer, 2 CPU processes, or N
   GPUs with NCCL on both sides when --device picks CUDA: the loop chooses its device as the trainer does);
   target ratio >= 0.97. The loop runs under plain torchrun (what a user has without the launcher) and as a
   script under `launch` (the same process set-up as the trainer: the ratio to it is the built-in loop's cost).
   Rate = steps between the first and last metrics rows / time between them; data in memory and num_workers=0
   on every side, so the loader workers do not add noise on a small machine.
2. wall time of `launch --help` and `launch --dry-run` (target < 0.5 s each).
3. time from starting the command to the first finished training step: `launch` vs plain torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LAUNCH = str(Path(PY).parent / "launch")


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def steady_rate(metrics: Path) -> float:
    r = rows(metrics)
    return (r[-1]["step"] - r[0]["step"]) / (r[-1]["time"] - r[0]["time"])


def first_step_s(out: Path, t0: float) -> float:
    return next(e["time"] for e in rows(out / "events.jsonl") if e["event"] == "first_step") - t0


def run(cmd: list[str], env: dict | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")


def attempt(fn, steps: int) -> tuple[float, float]:
    """One measured run; a crash is retried once (a gloo teardown abort is rare but not ours to hide)."""
    try:
        return fn(steps)
    except SystemExit as e:
        print(f"(retrying once after: {str(e).splitlines()[0]})", file=sys.stderr)
        return fn(steps)


DEVICE, PROCS = "cpu", "2"  # set by main(): the device both sides use, and processes per side


def trainer_once(steps: int) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    t0 = time.time()
    run([LAUNCH, "bench/trainer.yaml", "--gpus", PROCS, "--run-dir", str(out), f"trainer.max_steps={steps}",
         f"trainer.device={DEVICE}"])
    return steady_rate(out / "metrics.jsonl"), first_step_s(out, t0)


def baseline_once(steps: int) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", PROCS, "bench/ddp_baseline.py",
         str(out), str(steps), DEVICE], env=env)
    return steady_rate(out / "metrics.jsonl"), first_step_s(out, t0)


def baseline_launched_once(steps: int) -> tuple[float, float]:
    """The hand-written loop run by `launch` as the user's own script: the same process set-up as the trainer's
    ranks (so the ratio to it is the built-in loop's own cost)."""
    out = Path(tempfile.mkdtemp(prefix="bench-baseline-launched-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    run([LAUNCH, "bench/ddp_baseline.py", "--gpus", PROCS, "--run-dir", str(out / "run"), "--", str(out), str(steps),
         DEVICE], env=env)
    return steady_rate(out / "metrics.jsonl"), first_step_s(out, t0)


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(cmd)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CUDA when this torch sees a GPU (NCCL on both sides), else the CPU (gloo)")
    ap.add_argument("--gpus", type=int, default=None, help="processes per side (default: every GPU, or 2 on the CPU)")
    a = ap.parse_args()
    global DEVICE, PROCS
    import torch
    DEVICE = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
    PROCS = str(a.gpus or (torch.cuda.device_count() if DEVICE == "cuda" else 2))
    where = f"{PROCS} {'GPU' if DEVICE == 'cuda' else 'CPU'} ranks"
    ours, base, base_l = [], [], []
    arms = [(ours, trainer_once), (base, baseline_once), (base_l, baseline_launched_once)]
    for i in range(a.repeats):  # interleaved, rotating who goes first, so drift hits every arm alike
        for out, fn in arms[i % 3:] + arms[:i % 3]:
            time.sleep(1.0)
            out.append(attempt(fn, a.steps))
    rate_o, rate_b, rate_l = (statistics.median(r for r, _ in arm) for arm in (ours, base, base_l))
    ratios = sorted(o[0] / b[0] for o, b in zip(ours, base))
    ratios_l = sorted(o[0] / b[0] for o, b in zip(ours, base_l))
    ratio, ratio_l = statistics.median(ratios), statistics.median(ratios_l)
    first_o = statistics.median(f for _, f in ours)
    first_b = statistics.median(f for _, f in base)
    help_s = wall([LAUNCH, "--help"], 5)
    dry_s = wall([LAUNCH, "recipes/quickstart.yaml", "--gpus", "2", "--dry-run"], 5)
    print(f"{'measure':52} {'launcher':>10} {'reference':>10} {'ratio':>7} target")
    print(f"{'steps/s, MLP 3x512, batch 128/rank, ' + where:52} {rate_o:10.1f} {rate_b:10.1f} "
          f"{ratio:7.3f} >= 0.97 (vs hand-written DDP under torchrun)")
    print(f"{'  the same, hand-written DDP run by launch':52} {rate_o:10.1f} {rate_l:10.1f} "
          f"{ratio_l:7.3f} (the built-in loop's own cost)")
    print(f"{'start to first finished step (s)':52} {first_o:10.2f} {first_b:10.2f} {first_o / first_b:7.3f} "
          f"(vs plain torchrun)")
    print(f"{'launch --help (s)':52} {help_s:10.3f} {'':>10} {'':>7} < 0.5")
    print(f"{'launch --dry-run (s)':52} {dry_s:10.3f} {'':>10} {'':>7} < 0.5")
    print(f"(median of {a.repeats} runs of {a.steps} steps each, ratio = median of per-pair ratios; "
          f"help/dry-run median of 5)")
    print(f"per-pair steps/s ratios vs torchrun: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"per-pair steps/s ratios vs launch:   {', '.join(f'{r:.3f}' for r in ratios_l)} (the spread is this "
          f"machine's run-to-run noise)")


if __name__ == "__main__":
    main()

"""Training-feature costs, printed as a table (not a test):

    .venv/bin/python bench/bench_training.py [--repeats 3] [--steps 400]

1. Monitoring: steps/s of bench/trainer.yaml (2 CPU processes) with every metric on (TensorBoard, W&B offline
   when installed, gradient norm, data wait, peak memory, progress every 10 steps) vs off (no sinks, no gradient
   norm; metrics.jsonl stays, the rate is read from it). Target: under 2% slower. Runs alternate on/off so drift in
   the machine's speed hits both alike; the median of the repeats is shown.
2. Precision: samples/s of fp32 vs bf16 autocast on this CPU, for the MLP of bench/trainer.yaml and the
   character-level transformer of recipes/charlm.yaml.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = str(Path(sys.executable).parent / "launch")


def steady(metrics: Path) -> tuple[float, float]:
    """(steps/s, samples/s) between the first and the last metrics row (start-up and compile time excluded)."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    first, last = rows[0], rows[-1]
    dt = last["time"] - first["time"]
    steps = last["step"] - first["step"]
    per_step = statistics.median(r["samples_per_s"] for r in rows[1:]) if len(rows) > 1 else 0.0
    return steps / dt, per_step


def run(recipe: str, *overrides: str) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="bench-training-"))
    cmd = [LAUNCH, recipe, "--gpus", "2", "--run-dir", str(out), "checkpoint.every_minutes=null",
           "checkpoint.at_end=false", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=None)
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return steady(out / "metrics.jsonl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args()

    common = [f"trainer.max_steps={args.steps}", "trainer.log_every_steps=10", "logging.progress=lines"]
    on = ["logging.tensorboard=true", "logging.grad_norm=true"]
    if importlib.util.find_spec("wandb"):
        on += ["logging.wandb=true", "logging.wandb_mode=offline"]
    off = ["logging.tensorboard=false", "logging.grad_norm=false", "logging.wandb=false"]
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.repeats):
        for name, extra in (("off", off), ("on", on)):
            rates[name].append(run("bench/trainer.yaml", *common, *extra)[0])
    on_s, off_s = statistics.median(rates["on"]), statistics.median(rates["off"])
    cost = (off_s - on_s) / off_s * 100

    precision: list[tuple[str, str, float, float]] = []
    models = (("MLP 64-512x3-10, batch 128", "bench/trainer.yaml", []),
              ("char transformer 2x128, batch 32x64", "recipes/charlm.yaml", ["data.num_workers=0"]))
    for label, recipe, extra in models:
        got = {}
        for prec in ("fp32", "bf16"):
            got[prec] = statistics.median(
                run(recipe, f"trainer.max_steps={args.steps // 4}", "trainer.log_every_steps=10",
                    f"trainer.precision={prec}", "logging.tensorboard=false", *extra)[1]
                for _ in range(max(args.repeats - 1, 1)))
        precision.append((label, recipe, got["fp32"], got["bf16"]))

    print(f"\nMonitoring cost (bench/trainer.yaml, 2 CPU processes, {args.steps} steps, log every 10, median of "
          f"{args.repeats})")
    print(f"| {'metrics':<54} | {'steps/s':>8} |")
    print(f"|{'-' * 56}|{'-' * 10}|")
    print(f"| {'off (metrics.jsonl only)':<54} | {off_s:>8.1f} |")
    sinks = "TensorBoard, W&B offline" if "logging.wandb=true" in on else "TensorBoard"
    print(f"| {'on (' + sinks + ', grad norm, data wait, memory)':<54} | {on_s:>8.1f} |")
    print(f"| {'cost (target < 2%)':<54} | {cost:>7.2f}% |")
    print("\nPrecision on this CPU (2 processes, samples/s, median)")
    print(f"| {'model':<38} | {'fp32':>9} | {'bf16':>9} | {'bf16/fp32':>9} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    for label, _, fp32, bf16 in precision:
        print(f"| {label:<38} | {fp32:>9.0f} | {bf16:>9.0f} | {bf16 / fp32:>9.2f} |")


if __name__ == "__main__":
    main()

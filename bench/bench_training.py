"""Training-feature costs, printed as a table (not a test):

    .venv/bin/python bench/bench_training.py [--repeats 3] [--steps 400]

1. Monitoring: steps/s of bench/trainer.yaml (2 CPU processes) with every metric on (TensorBoard, W&B offline
   when installed, gradient norm, data wait, peak memory, progress every 10 steps) vs off (no sinks, no gradient
   norm; metrics.jsonl stays, the rate is read from it). Target: under 2% slower. Runs come in back-to-back on/off
   pairs, in alternating order; the cost is the median over the pairs, so drift in the machine's speed cancels.
2. Precision: samples/s of fp32 vs bf16 autocast on this CPU, for the MLP of bench/trainer.yaml and the
   character-level transformer of recipes/charlm.yaml.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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


def rank0_work_ms(repeats: int = 200) -> dict[str, float]:
    """Milliseconds rank 0 spends on monitoring per log step, measured in this process on the bench model: the
    gradient norm, the sinks' writes of one log row (11 scalars), and the peak-memory query."""
    import time

    import torch
    from omegaconf import OmegaConf

    from launcher import recipe
    from launcher.monitor import Sinks, peak_memory_gib
    from launcher.zoo.models import MLP

    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(1)  # as each training process runs (torchrun sets OMP_NUM_THREADS=1)
    model = MLP(in_features=64, hidden=512, out_features=10, depth=3)
    model(torch.randn(128, 64)).square().mean().backward()
    grads = [p.grad for p in model.parameters()]

    def per_call(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats * 1e3

    out = {"gradient norm": per_call(lambda: float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))))}
    out["peak memory"] = per_call(lambda: peak_memory_gib(torch.device("cpu")))
    row = {k: 1.0 for k in ("train/loss", "train/epoch", "perf/samples_per_s", "perf/step_time_s", "train/lr",
                            "perf/data_wait_s", "train/grad_norm", "perf/peak_memory_gib", "val/loss", "x", "y")}
    with tempfile.TemporaryDirectory() as d:
        cfg = OmegaConf.structured(recipe.Recipe)
        cfg.run.name = "bench"
        sinks_on = [("TensorBoard", {"tensorboard": True})]
        if importlib.util.find_spec("wandb"):
            sinks_on.append(("W&B offline", {"tensorboard": False, "wandb": True, "wandb_mode": "offline"}))
        for label, settings in sinks_on:
            for k, v in settings.items():
                cfg.logging[k] = v
            sinks = Sinks(cfg, d)
            step = iter(range(1, 10**9))
            out[label] = per_call(lambda: sinks.scalars(next(step), row))
            sinks.close()
    return out


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
    costs = []
    for i in range(args.repeats):
        pair = (("off", off), ("on", on)) if i % 2 == 0 else (("on", on), ("off", off))  # alternate the order
        for name, extra in pair:
            rates[name].append(run("bench/trainer.yaml", *common, *extra)[0])
        costs.append((rates["off"][-1] - rates["on"][-1]) / rates["off"][-1] * 100)
    on_s, off_s = statistics.median(rates["on"]), statistics.median(rates["off"])
    cost = statistics.median(costs)  # of back-to-back pairs: slow drift of the machine's speed cancels

    work = rank0_work_ms()
    step_ms = 1e3 / off_s

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
    print(f"| {'cost, median of the pairs (target < 2%)':<54} | {cost:>7.2f}% |")
    print(f"(pairs: {', '.join(f'{c:+.1f}%' for c in costs)})")
    print(f"\nRank 0's monitoring work per log step, measured in-process (a log step every 10 steps of "
          f"{step_ms:.1f} ms)")
    print(f"| {'work':<20} | {'ms per log step':>15} | {'share of 10 steps':>17} |")
    print(f"|{'-' * 22}|{'-' * 17}|{'-' * 19}|")
    for label, ms in work.items():
        print(f"| {label:<20} | {ms:>15.3f} | {ms / (10 * step_ms) * 100:>16.2f}% |")
    total = sum(work.values())
    print(f"| {'all':<20} | {total:>15.3f} | {total / (10 * step_ms) * 100:>16.2f}% |")
    print("\nPrecision on this CPU (2 processes, samples/s, median)")
    print(f"| {'model':<38} | {'fp32':>9} | {'bf16':>9} | {'bf16/fp32':>9} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    for label, _, fp32, bf16 in precision:
        print(f"| {label:<38} | {fp32:>9.0f} | {bf16:>9.0f} | {bf16 / fp32:>9.2f} |")


if __name__ == "__main__":
    main()

"""Time of `launch doctor` on each shipped recipe, per check, printed as a table (not a test):

    .venv/bin/python bench/bench_doctor.py [--gpus 2] [--recipes recipes/*.yaml]

Target: the whole doctor (start to exit, every check) under 2 minutes per recipe on this machine. Each run is the
real command with the recipe's own process layout at --gpus ranks (CPU ranks without a GPU), in a temporary run
directory; a row per recipe gives each check's seconds (the slowest rank's) from its doctor.json, the wall time,
and the results.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = str(Path(sys.executable).parent / "launch")
TARGET_S = 120.0


def run(recipe: str, gpus: int, where: str) -> tuple[float, int, dict]:
    run_dir = os.path.join(where, Path(recipe).stem)
    t = time.perf_counter()
    r = subprocess.run([LAUNCH, "doctor", recipe, "--gpus", str(gpus), "--run-dir", run_dir], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t
    path = os.path.join(run_dir, "doctor.json")
    report = json.load(open(path)) if os.path.exists(path) else {"results": []}
    if r.returncode not in (0, 1):
        print(f"# {recipe}: exit {r.returncode}\n{r.stderr[-2000:]}", file=sys.stderr)
    return wall, r.returncode, report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--recipes", nargs="*", default=sorted(glob.glob(str(ROOT / "recipes" / "*.yaml"))))
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as where:
        for recipe in a.recipes:
            wall, rc, report = run(recipe, a.gpus, where)
            rows.append((Path(recipe).name, wall, rc, report["results"]))
    checks = []
    for _, _, _, results in rows:
        checks += [r["check"] for r in results if r["check"] not in checks]
    head = f"{'recipe':22} {'wall s':>7} {'exit':>4}  " + " ".join(f"{c[:11]:>11}" for c in checks)
    print(head)
    for name, wall, rc, results in rows:
        by = {r["check"]: r for r in results}
        cells = [f"{by[c]['seconds']:6.1f} {by[c]['status'][:4]:4}" if c in by else f"{'-':>11}" for c in checks]
        print(f"{name:22} {wall:7.1f} {rc:4}  " + " ".join(f"{c:>11}" for c in cells))
    slowest = max(w for _, w, _, _ in rows)
    print(f"(seconds per check: the slowest rank's; target: the whole doctor under {TARGET_S:.0f} s per recipe; "
          f"slowest here {slowest:.1f} s: {'met' if slowest < TARGET_S else 'NOT met'})")


if __name__ == "__main__":
    main()

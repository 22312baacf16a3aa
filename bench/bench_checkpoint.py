"""Checkpoint save/load speed, printed as a table (not a test):

    .venv/bin/python bench/bench_checkpoint.py [--gb 1.0] [--s3-gb 0.25] [--repeats 3]

2 CPU ranks, a model + AdamW state of about --gb GB. Compares the launcher's sharded save (sync, and async with
its training stall), a torch.save of the full state on rank 0, and the disk's sequential write speed with fsync
(dd) as the physical limit; then the same launcher save/load against an S3 endpoint (moto's server, in memory,
on 127.0.0.1). Targets: sync save within 1.5x of the disk limit; async stall < 10% of the sync save; faster than
torch.save on rank 0. Local numbers are the median of --repeats runs (a VM's disk varies from run to run), the
dd limit measured before each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def dd_gbps(directory: str, gb: float) -> float:
    path = os.path.join(directory, "dd.bin")
    count = int(gb * 1000)
    r = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}", "conv=fsync"],
                       capture_output=True, text=True)
    os.remove(path)
    m = re.search(r"copied, ([\d.]+) s", r.stderr)
    return count * 1.048576e6 / 1e9 / float(m.group(1))


def worker(directory: str, gb: float, endpoint: str | None = None, env: dict | None = None) -> dict:
    out = os.path.join(tempfile.mkdtemp(), "result.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "bench" / "ckpt_worker.py"), out, directory, str(gb)] + ([endpoint] if endpoint else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if r.returncode != 0:
        sys.exit(f"bench: checkpoint worker failed:\n{r.stderr[-3000:]}")
    return json.load(open(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--s3-gb", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-ckpt-", dir=str(ROOT / "bench"))
    try:
        disks, runs = [], []
        for i in range(a.repeats):
            disks.append(dd_gbps(tmp, a.gb))
            runs.append(worker(os.path.join(tmp, f"ckpt{i}"), a.gb))
            shutil.rmtree(os.path.join(tmp, f"ckpt{i}"), ignore_errors=True)
        disk = statistics.median(disks)
        local = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        from s3 import S3Server
        with S3Server() as server:
            server.make_bucket("bench")
            remote = worker("s3://bench/ckpt", a.s3_gb, server.endpoint, server.env())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gb = local["state_gb"]
    rows = [
        ("disk sequential write, dd conv=fsync", gb / disk, None, disk),
        ("launcher save, sync (2 ranks, sharded, committed)", local["sync_save_s"], None, None),
        ("launcher save, async: training stall (first save)", local["async_first_stall_s"], None, None),
        ("launcher save, async: training stall (later saves)", local["async_stall_s"], None, None),
        ("launcher save, async: until committed", local["async_total_s"], None, None),
        ("launcher load (2 ranks)", local["load_s"], None, None),
        ("torch.save of full state on rank 0 (+fsync)", local["torch_save_s"], None, None),
        ("torch.load of that file", local["torch_load_s"], None, None),
    ]
    print(f"state: {gb:.2f} GB (model + AdamW moments), 2 CPU ranks; local: median of {a.repeats} runs "
          f"(dd {', '.join(f'{d:.2f}' for d in disks)} GB/s)")
    print(f"{'operation':52} {'seconds':>8} {'GB/s':>7}")
    for name, s, _, rate in rows:
        print(f"{name:52} {s:8.2f} {(rate or gb / s):7.2f}")
    sgb = remote["state_gb"]
    print(f"{'S3 endpoint (moto, 127.0.0.1): launcher save, sync':52} {remote['sync_save_s']:8.2f} "
          f"{sgb / remote['sync_save_s']:7.2f}   ({sgb:.2f} GB)")
    print(f"{'S3 endpoint: async stall':52} {remote['async_stall_s']:8.2f}")
    print(f"{'S3 endpoint: launcher load':52} {remote['load_s']:8.2f} {sgb / remote['load_s']:7.2f}")
    print()
    print(f"sync save / disk limit: {local['sync_save_s'] / (gb / disk):.2f}x (target <= 1.5x)")
    print(f"async stall / sync save: {100 * local['async_stall_s'] / local['sync_save_s']:.1f}% (target < 10%)")
    print(f"sync save vs torch.save on rank 0: {local['torch_save_s'] / local['sync_save_s']:.2f}x faster "
          f"(target > 1)")


if __name__ == "__main__":
    main()

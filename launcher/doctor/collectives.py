"""An all-reduce over every rank, checked: each rank sends rank+1, so every element of the sum must be
world x (world+1) / 2. It names a rank that sent a wrong value, one that received a wrong sum, and one that arrived
late, and measures the bus bandwidth (the rate NCCL's tests report: 2 (n-1)/n of the bytes over the time)."""

from __future__ import annotations

import time

import torch
import torch.distributed as tdist

from .. import dist, faults
from ..dist import RankInfo
from .report import FAIL, PASS, WARN, Result

LATE_S = 1.0  # a rank that reaches the first collective this much after the first rank is named as late


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(info: RankInfo, device: torch.device, mib: int = 64, repeats: int = 5) -> Result:
    t_start = time.perf_counter()
    world = info.world_size
    if faults.active("doctor.late", 0, info.rank):
        time.sleep(2 * LATE_S)
    arrived = time.time()
    arrivals = dist.gather_objects(arrived)  # the first collective: it waits for the last rank
    n = mib * 2**20 // 4
    x = torch.full((n,), float(info.rank + 1), dtype=torch.float32, device=device)
    if faults.active("doctor.wrong_input", 0, info.rank):
        x[0] += 1
    sent = float(x[0])
    expected = world * (world + 1) / 2
    times = []
    for i in range(repeats + 1):  # the first one warms up (connections, buffers)
        y = x.clone()
        _sync(device)
        t = time.perf_counter()
        if world > 1:
            tdist.all_reduce(y)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    if faults.active("doctor.wrong_sum", 0, info.rank):
        y[n // 2] += 1
    wrong = int((y != expected).sum())
    reports = dist.gather_objects({"rank": info.rank, "host": info.host, "sent": sent, "wrong": wrong,
                                   "seconds": sorted(times)[len(times) // 2]})
    seconds = round(time.perf_counter() - t_start, 2)
    bad_senders = [r for r in reports if r["sent"] != r["rank"] + 1]
    bad_receivers = [r for r in reports if r["wrong"]]
    late = [(r, a - min(arrivals)) for r, a in enumerate(arrivals) if a - min(arrivals) > LATE_S]
    median = max(r["seconds"] for r in reports)
    bus = 2 * (world - 1) / world * n * 4 / median / 1e9 if world > 1 and median > 0 else 0.0
    figure = f"{world} ranks, {mib} MiB all-reduce in {median * 1e3:.1f} ms, bus {bus:.2f} GB/s"
    details = {"ranks": reports, "bus_gb_s": bus, "arrival_lag_s": [a - min(arrivals) for a in arrivals]}
    if bad_senders:
        named = ", ".join(f"rank {r['rank']} ({r['host']}) sent {r['sent']:g} for {r['rank'] + 1:g}"
                          for r in bad_senders)
        return Result("collectives", FAIL, figure, f"{named}: its data was corrupt before the collective (its "
                      f"memory or device); run it again, and exclude that node if it repeats", details, seconds)
    if bad_receivers:
        named = ", ".join(f"rank {r['rank']} ({r['host']}): {r['wrong']} wrong elements" for r in bad_receivers)
        return Result("collectives", FAIL, figure, f"wrong sums received on {named} (expected {expected:g} "
                      f"everywhere): a faulty network path, NIC or GPU on that node; exclude it (SLURM: "
                      f"--exclude) and run the doctor again", details, seconds)
    if late:
        named = ", ".join(f"rank {r} {lag:.1f} s" for r, lag in late)
        return Result("collectives", WARN, figure, f"ranks reached the first collective late ({named} after the "
                      f"first): a slow start on that node (imports from a slow file system, a busy CPU); every "
                      f"step waits for the slowest rank", details, seconds)
    return Result("collectives", PASS, figure, "", details, seconds)

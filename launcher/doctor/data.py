"""The data check: how fast the recipe's loader delivers batches, how much of a training step waits for them, the
setting to use, and whether every sample can be read.

    launch doctor recipes/quickstart.yaml --gpus 2 --only data

On every rank, in this order:
  1. training steps with the recipe's loader setting, as the trainer takes them (the model in DDP, its optimizer,
     precision and loss), the waiting measured as the trainer measures it: perf_counter around next();
  2. the loader alone, in batches/s, for num_workers 0, 1, 2, 4, ... up to the CPUs this rank may use (further
     when reading a sample leaves the CPU idle: it waits on I/O), pin_memory off and on with CUDA (on the CPU it
     does not apply); a few seconds each, persistent workers off, the workers shut down after each;
  3. training steps with the setting those timings make look best: a loader worker that shares its rank's CPUs
     overlaps nothing, so a setting is recommended only when its steps are measured to be shorter;
  4. the samples, read in the main process: every one once (index i on rank i % world) when that fits in what is
     left of the time budget, else a random subset (a fixed seed). A sample that raises is named with its index
     and error, and so is one whose structure (types, dtypes, shapes, keys, lengths) differs from the others'; with
     a data.collate_fn, variable-length samples are legitimate and only types, keys and dtypes count.

Collective, and no rank raises or waits alone: in the steps the ranks agree after each next() and each forward
(a small all-reduce on a CPU group), so a batch or forward that raises on one rank stops every rank there; the
ranks then meet in all_gather_object calls on every path, and each computes the same verdict from what was
gathered.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.distributed as tdist
from omegaconf import DictConfig

from .. import dist, hardware
from ..dist import RankInfo
from ..recipe import instantiate
from ..trainer.setup import to_device
from . import samples
from .steps import Stepper, _close, _iter, _loader
from .samples import BUDGET_S, MIN_SCAN_S, SHOWN, error_text as _error  # noqa: F401
from .report import FAIL, PASS, WARN, Result

log = logging.getLogger("launcher")

PROBE_S = 2.0  # the loader alone, per setting
PROBES_S = 14.0  # all the settings together
STEPS_S = 2.0  # training steps with the recipe's setting
WAITING = 0.3  # a step that waits this share of its time for data: the loader is the bottleneck
WAIT_FLOOR_S = 1e-3  # ... unless it waits less than this per step (collation and queues, not worth a worker)
TIE = 1.1  # settings within this factor of the best step time count as equally good
MAX_WORKERS = 16


# ----------------------------------------------------------------------------------------------- loader timings

def _probe(cfg: DictConfig, dataset: Any, info: RankInfo, device: torch.device, workers: int, pin: bool,
           epoch: int, seconds: float) -> dict[str, Any]:
    """Batches/s of the loader alone (with the copy to the GPU, where pinning shows). The clock starts at batch
    `workers` of each epoch (the first round comes out of workers that started together), epochs follow until
    `seconds` are spent."""
    out: dict[str, Any] = {"num_workers": workers, "pin_memory": pin, "batches_per_s": None, "startup_s": None,
                           "error": None}
    timed, spent, t_start = 0, 0.0, time.perf_counter()
    try:
        loader = _loader(cfg, dataset, info, workers, pin)
        start_at = min(workers, max(len(loader) - 2, 0))
        while time.perf_counter() - t_start < seconds:
            loader.sampler.set_epoch(epoch)
            epoch += 1
            t0 = time.perf_counter()
            it = _iter(loader)
            clock = now = None
            try:
                for i, batch in enumerate(it):
                    if device.type == "cuda":
                        to_device(batch, device)
                        torch.cuda.synchronize(device)
                    now = time.perf_counter()
                    if i == 0 and out["startup_s"] is None:
                        out["startup_s"] = now - t0
                    if i == start_at:
                        clock = now
                    elif i > start_at:
                        timed += 1
                    if now - t_start > seconds and timed >= 2:
                        break
            finally:
                _close(it)
            if clock is not None and now is not None:
                spent += now - clock
            if clock is None or len(loader) < 2:
                break
    except Exception as e:
        out["error"] = _error(e)
    if timed and spent > 0:
        out["batches_per_s"] = timed / spent
    return out


def _candidates(cpus: int, io_bound: bool, recipe_workers: int) -> list[int]:
    """0, 1, 2, 4, ... up to the CPUs (8 times as many when loading waits on I/O), at most MAX_WORKERS, and the
    recipe's own number."""
    bound = min(MAX_WORKERS, 8 * cpus if io_bound else cpus)
    return sorted({0, recipe_workers} | {2**k for k in range(int(math.log2(max(bound, 1))) + 1)})


def _sample_time(dataset: Any, info: RankInfo, seconds: float = 0.5, most: int = 16) -> tuple[float, float]:
    """Seconds per sample read in this process, and the share of that spent on the CPU (low: it waits for I/O)."""
    n, reads = len(dataset), 0
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(info.rank, n, info.world_size):
        try:
            dataset[i]
        except Exception:  # the scan names it
            pass
        reads += 1
        if reads >= most or time.perf_counter() - wall > seconds:
            break
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return (wall / reads if reads else 0.0), (min(1.0, cpu / wall) if wall > 0 else 1.0)


def _measure(cfg: DictConfig, info: RankInfo, device: torch.device, stepper: Stepper) -> tuple[dict[str, Any], Any]:
    """What this rank measures before the ranks first meet: its dataset, the recipe's setting in training steps
    (collective), then the loader alone for each setting. Never raises: a failure is part of the report."""
    mine: dict[str, Any] = {"rank": info.rank, "host": info.host, "error": None, "probes": []}
    workers, pin = _recipe_setting(cfg, device)
    per_sample = cpu_share = 0.0
    try:
        dataset = instantiate(cfg.data.train, key="data.train")
        mine["samples"] = len(dataset)
        per_sample, cpu_share = _sample_time(dataset, info)
    except Exception as e:
        mine["error"], dataset = _error(e), None
    mine["steps"] = steps = stepper.run(dataset, workers, pin, STEPS_S)  # on every rank, whatever failed
    if dataset is None:
        return mine, None
    io_bound = cpu_share < 0.5 and per_sample * int(cfg.data.batch_size) > WAIT_FLOOR_S
    cpus = hardware.threads_per_process(info.local_world_size)
    mine.update(per_sample_s=per_sample, cpu_share=cpu_share, io_bound=io_bound, cpus=cpus)
    pins = [False, True] if device.type == "cuda" else [False]
    t_probes, last = time.perf_counter(), 0.0
    for w in _candidates(cpus, io_bound, workers):
        if w > workers and time.perf_counter() - t_probes > PROBES_S:
            break
        for p in pins:
            probe = _probe(cfg, dataset, info, device, w, p, len(mine["probes"]), PROBE_S)
            mine["probes"].append(probe)
            if info.is_main:
                log.info("doctor data: num_workers=%d pin_memory=%s: %s batches/s%s", w, p,
                         f"{probe['batches_per_s']:.1f}" if probe["batches_per_s"] else "-",
                         f" ({probe['error']})" if probe["error"] else "")
            if probe["error"]:  # a sample that raises raises in every setting: the scan names it
                return mine, dataset
        best = max((q["batches_per_s"] or 0.0) for q in mine["probes"] if q["num_workers"] == w)
        enough = steps["compute_s"] is not None and best > 0 and 1 / best < steps["compute_s"] / 2
        if w > workers and (enough or (w >= 2 and best < 1.15 * last)):
            break  # more workers would not shorten a step: the loader keeps up, or stopped gaining
        last = best
    return mine, dataset


def _recipe_setting(cfg: DictConfig, device: torch.device) -> tuple[int, bool]:
    cuda = device.type == "cuda"
    return int(cfg.data.num_workers), cuda if cfg.data.pin_memory is None else bool(cfg.data.pin_memory) and cuda


def _rates(everyone: list[dict[str, Any]]) -> dict[tuple[int, bool], float]:
    """Batches/s of the loader alone for each setting every rank timed: the slowest rank's."""
    probes = [m["probes"] for m in everyone]
    common = set.intersection(*({(q["num_workers"], q["pin_memory"]) for q in rank if q["batches_per_s"]}
                                for rank in probes))
    return {s: min(q["batches_per_s"] for rank in probes for q in rank if (q["num_workers"], q["pin_memory"]) == s)
            for s in sorted(common)}


def _step_model(rates: dict[tuple[int, bool], float], compute: float) -> Any:
    """A step's expected time on a setting: loading adds to the step without workers, overlaps it with them."""
    return lambda s: 1 / rates[s] + compute if s[0] == 0 else max(1 / rates[s], compute)


def _candidate(cfg: DictConfig, device: torch.device, everyone: list[dict[str, Any]]) -> tuple[int, bool] | None:
    """The other setting to try in training steps: the one expected to make the shortest step (the fewest workers
    among those within TIE of it), None when nothing else was timed or something failed. The same on every rank
    (it reads what was gathered). Only expected: a worker that shares its rank's CPUs overlaps nothing, so the
    steps decide."""
    if any(m["error"] or m["steps"]["error"] or m["steps"]["compute_s"] is None or
           any(q["error"] for q in m["probes"]) for m in everyone):
        return None
    recipe = _recipe_setting(cfg, device)
    rates = _rates(everyone)
    others = [s for s in rates if s != recipe]
    if not others:
        return None
    expected = _step_model(rates, max(m["steps"]["compute_s"] for m in everyone))
    fastest = min(map(expected, others))
    return min((s for s in others if expected(s) <= TIE * fastest), key=lambda s: (s[0], s[1] != recipe[1]))


def check(cfg: DictConfig, info: RankInfo, device: torch.device, spec: dict[str, Any], name: str) -> list[Result]:
    """The data result (collective: every rank calls it, all get the same)."""
    t0 = time.perf_counter()
    many = tdist.is_initialized() and tdist.get_world_size() > 1
    group = tdist.new_group(backend="gloo") if many and tdist.get_backend() != "gloo" else None  # CPU agreements
    stepper = Stepper(cfg, info, device, group)
    mine, dataset = _measure(cfg, info, device, stepper)
    mine["elapsed_s"] = time.perf_counter() - t0
    everyone = dist.gather_objects(mine)
    candidate = _candidate(cfg, device, everyone)
    tried = stepper.run(dataset, *candidate, STEPS_S) if candidate is not None else None
    elapsed = max(dist.gather_objects(time.perf_counter() - t0)) if candidate is not None else None
    stepper = None  # the model and its DDP go before the scan
    loose = bool(cfg.data.collate_fn)
    plan = None
    if all(m["error"] is None for m in everyone) and len({m["samples"] for m in everyone}) == 1:
        plan = samples.plan(everyone, info.world_size, int(cfg.seed), elapsed)
    found = None
    if plan is not None and dataset is not None:
        indices = (list(range(info.rank, plan["of"], info.world_size)) if plan["indices"] is None
                   else plan["indices"][info.rank::info.world_size])
        found = {**samples.scan(dataset, indices, loose, plan["seconds"]), "rank": info.rank, "host": info.host}
    findings = dist.gather_objects({"scan": found, "tried": tried})
    if group is not None:
        tdist.destroy_process_group(group)
    result = _verdict(cfg, device, everyone, plan, findings, loose)
    result.seconds = round(time.perf_counter() - t0, 2)
    return [result]


def _setting(w: int, p: bool, cuda: bool) -> str:
    return f"num_workers={w}" + (f", pin_memory={'true' if p else 'false'}" if cuda else "")


def _verdict(cfg: DictConfig, device: torch.device, everyone: list[dict[str, Any]], plan: dict[str, Any] | None,
             findings: list[dict[str, Any] | None], loose: bool) -> Result:
    broken = [m for m in everyone if m["error"]]
    if broken:
        return Result("data", FAIL, "data.train does not build", "; ".join(f"rank {m['rank']}: {m['error']}"
                      for m in broken[:SHOWN]), {"ranks": everyone})
    sizes = sorted({m["samples"] for m in everyone})
    if len(sizes) > 1:
        return Result("data", FAIL, f"data.train has {' or '.join(map(str, sizes))} samples", "the ranks build "
                      "datasets of different lengths, so their samplers disagree: build it from the recipe alone "
                      "(no per-process randomness, no files listed in a different order)", {"ranks": everyone})
    if sizes == [0]:
        return Result("data", FAIL, "data.train has no samples", "its __len__ is 0: check the dataset's path and "
                      "arguments", {"ranks": everyone})
    assert plan is not None
    scans = [f["scan"] for f in findings if f["scan"] is not None]
    tried = [f["tried"] for f in findings if f["tried"] is not None]
    read = sum(f["read"] for f in scans)
    details: dict[str, Any] = {"scan": {"mode": plan["mode"], "read": read, "of": plan["of"],
                                        "shapes_compared": not loose},
                               "ranks": [{k: v for k, v in m.items() if k != "probes"} for m in everyone]}
    failed = samples.verdict(scans, read, plan, loose, details["scan"])
    if failed is not None:
        return Result("data", FAIL, *failed, details)
    if plan["mode"] == "all" and read >= plan["of"]:
        scanned = f"read {read} samples"
    elif plan["mode"] == "all":
        scanned = f"read {read} of {plan['of']} samples (the time limit, {plan['seconds']:.0f} s, came first)"
    else:
        scanned = (f"read {read} of {plan['of']} samples (a random subset: all would take about "
                   f"{plan['all_s']:.0f} s per rank)")
    status, figure, advice = _loader_verdict(cfg, device, everyone, tried, scanned, plan["mode"] == "all" and
                                             read >= plan["of"], details)
    if loose and status != FAIL:
        figure += " (data.collate_fn set: shapes and lengths not compared)"
    return Result("data", status, figure, advice, details)


def _steps_of(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One loader setting's training steps over the ranks: the longest step and the largest waiting (DDP makes
    every rank wait for the slowest); None when a rank could not time them."""
    if not runs or any(r["error"] or not r["step_s"] for r in runs):
        return None
    return {"num_workers": runs[0]["num_workers"], "pin_memory": runs[0]["pin_memory"],
            "step_s": max(r["step_s"] for r in runs), "wait_s": max(r["wait_s"] for r in runs),
            "waiting_share": max(r["wait_s"] / r["step_s"] for r in runs),
            "compute_s": max((r["compute_s"] or 0.0) for r in runs)}


def _loader_verdict(cfg: DictConfig, device: torch.device, everyone: list[dict[str, Any]],
                    tried: list[dict[str, Any]], scanned: str, read_all: bool,
                    details: dict[str, Any]) -> tuple[str, str, str]:
    """(status, figure, advice) from the loader timings and the training steps: the recipe's setting and, when
    another was expected to be faster, that one, each measured in steps."""
    cuda = device.type == "cuda"
    recipe = _recipe_setting(cfg, device)
    runs = [m["steps"] for m in everyone]
    failed = next((q for m in everyone for q in m["probes"] if q["error"]), None)
    failed = failed or next((r for r in runs + tried if r["error"] and r["in_loader"]), None)
    if failed:
        where = ("every sample reads fine alone, so batching them (data.collate_fn, or torch's) or a loader worker "
                 "fails" if read_all else f"the samples the scan read were fine ({scanned}): the one that fails is "
                 f"among the others, or batching them (data.collate_fn, or torch's) fails")
        return FAIL, f"the loader raised at {_setting(failed['num_workers'], failed['pin_memory'], cuda)}", \
            f"{failed['error']}; {where}"
    rates = _rates(everyone)
    details["settings"] = [{"num_workers": w, "pin_memory": p, "batches_per_s": r} for (w, p), r in rates.items()]
    if not rates:
        return WARN, f"the loader could not be timed; {scanned}", \
            "too few batches per rank to time (data.batch_size against the dataset's size)"
    fastest = max(rates, key=lambda s: rates[s])
    mine, other = _steps_of(runs), _steps_of(tried)
    cpus = min(m["cpus"] for m in everyone)
    details.update(steps=mine, tried=other, cpus_per_rank=cpus)
    figure = (f"{rates[fastest]:.0f} batches/s at {_setting(*fastest, cuda)} (best), "
              + (f"waiting {mine['waiting_share']:.0%} of a step at the recipe's {_setting(*recipe, cuda)}" if mine
                 else "waiting share unknown")
              + f"; {scanned}, all fine" + ("" if cuda else "; pin_memory does not apply on the CPU"))
    if mine is None:
        error = next((r["error"] for r in runs if r["error"]), None) or "too few batches for a step after the first"
        return WARN, figure, f"a training step could not be timed ({error}); the overfit check says more"
    better = other is not None and other["step_s"] * TIE <= mine["step_s"]
    rec = (other["num_workers"], other["pin_memory"]) if better else recipe
    details.update(waiting_share=mine["waiting_share"], recommended={"num_workers": rec[0], "pin_memory": rec[1]}
                   if cuda else {"num_workers": rec[0]})
    change = ""
    if better:
        change = (f"set data.num_workers={rec[0]}" + (f" and data.pin_memory={'true' if rec[1] else 'false'}"
                  if cuda and rec[1] != recipe[1] else "") + f": a step takes {other['step_s'] * 1e3:.1f} ms instead "
                  f"of {mine['step_s'] * 1e3:.1f}, {other['waiting_share']:.0%} of it waiting")
    if mine["waiting_share"] <= WAITING or mine["wait_s"] <= WAIT_FLOOR_S:
        return PASS, figure, change
    advice = (f"the loader is the bottleneck: at {_setting(*recipe, cuda)} a step waits {mine['waiting_share']:.0%} "
              f"of its time for data ({mine['wait_s'] * 1e3:.1f} ms of {mine['step_s'] * 1e3:.1f} ms); "
              + (change or "no other setting tried does better"))
    io_bound = any(m["io_bound"] for m in everyone)
    if better and io_bound and rec[0] > cpus:
        advice += (f" (reading a sample uses {min(m['cpu_share'] for m in everyone):.0%} of a CPU: it waits on I/O, "
                   f"so more workers than this rank's {cpus} CPU{'s' if cpus != 1 else ''} help)")
    after = other if better else mine
    if after["waiting_share"] > WAITING:
        per = max(m["per_sample_s"] for m in everyone)
        reading = per * int(cfg.data.batch_size)
        if reading < after["wait_s"] / 2:
            advice += (f"; reading a batch takes {reading * 1e3:.2f} ms of the {after['wait_s'] * 1e3:.1f} ms "
                       f"waited: the rest is the loader's own work (collating, passing batches from the workers), "
                       f"which larger batches (data.batch_size) spread over more samples")
        elif io_bound:
            advice += (f"; even so a sample waits {per * 1e3:.1f} ms for its data: more workers still, a faster "
                       f"store, or a local or cached copy of the data")
        else:
            advice += (f"; even so a sample takes {per * 1e3:.1f} ms to read: make __getitem__ cheaper (decode or "
                       f"preprocess ahead of time, cache), or give each rank more CPUs")
    return WARN, figure, advice

"""What every rank of `launch doctor` runs: the checks in order on the real process group, each rank's results
gathered on rank 0, which writes them to RUN_DIR/results.json for the command to print.

The command passes what to run in LAUNCHER_DOCTOR (a JSON object: checks, probe id, overfit steps and target)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from typing import Any

import torch
import torch.distributed as tdist
from omegaconf import DictConfig

from .. import dist, monitor
from ..files import write_atomic
from ..recipe import instantiate
from . import collectives, overfit, storage
from .report import FAIL, PASS, SKIP, WARN, Result

log = logging.getLogger("launcher")
ENV = "LAUNCHER_DOCTOR"
RESULTS = "results.json"
_ORDER = {PASS: 0, SKIP: 1, WARN: 2, FAIL: 3}


def checkpoint_bytes(cfg: DictConfig) -> int | None:
    """About how large one checkpoint is: the parameters and, for Adam-like optimizers, two moments each (one
    for momentum SGD), from the model built on the meta device (no memory, no weights)."""
    try:
        with torch.device("meta"):
            model = instantiate(cfg.model, key="model")
    except Exception:  # a model that cannot be built on meta: no estimate
        return None
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    target = str(cfg.optimizer.get("_target_", "")).lower()
    moments = 1 if target.endswith("sgd") and cfg.optimizer.get("momentum") else 0 if target.endswith("sgd") else 2
    return params * (1 + moments)


def merge(per_rank: list[list[dict[str, Any]]]) -> list[Result]:
    """One result per check: the same on every rank, or the worst, saying which ranks differ."""
    out = []
    for i, first in enumerate(per_rank[0]):
        results = [Result.from_dict(rank[i]) for rank in per_rank]
        worst = max(results, key=lambda r: _ORDER[r.status])
        others = [r for r, res in enumerate(results) if res.status != worst.status]
        if others and worst.status != PASS:
            worst.details["ranks_fine"] = others
        worst.seconds = max(r.seconds for r in results)
        out.append(worst)
    return out


def run(cfg: DictConfig, run_dir: str) -> None:
    monitor.quiet_console()  # the command prints the table; every rank's log keeps the details
    spec = json.loads(os.environ[ENV])
    checks: list[str] = spec["checks"]
    device = dist.choose_device(cfg.trainer.device)
    info = dist.init(device)
    results: list[Result] = []
    if "overfit" in checks or "finite" in checks:
        fit, finite = overfit.check(cfg, info, device, steps=int(spec.get("overfit_steps", 200)),
                                    target=float(spec.get("overfit_target", 0.2)))
        results += [r for r in (fit, finite) if r.check in checks]
    for name, module in (("memory", "memory"), ("batch_size", "memory"), ("data", "data")):
        if name in checks:  # each module's check(cfg, info, device, spec) -> list of results, collective
            mod = importlib.import_module(f"{__package__}.{module}")
            results += [r for r in mod.check(cfg, info, device, spec, name) if r.check in checks]
    if "collectives" in checks:
        results.append(collectives.check(info, device))
    if "storage" in checks:
        existed = storage.existing_part(cfg)
        dist.barrier()  # every rank has seen what existed before any creates a directory
        t = time.perf_counter()
        results.append(storage.check(cfg, info, spec["probe_id"], checkpoint_bytes(cfg)))
        dist.barrier()
        if info.is_main:
            storage.cleanup(cfg, spec["probe_id"], existed)
        results[-1].seconds = round(time.perf_counter() - t, 2)
    mine = [r.to_dict() for r in results]
    gathered: list[Any] = [None] * info.world_size
    if tdist.is_initialized() and info.world_size > 1:
        tdist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if info.is_main:
        write_atomic(os.path.join(run_dir, RESULTS), json.dumps([r.to_dict() for r in merge(gathered)]))
        for r in merge(gathered):
            log.info("doctor: %s %s: %s %s", r.check, r.status, r.figure, r.advice)
    dist.barrier()

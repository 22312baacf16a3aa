"""The data check's sample scan: every sample (or a seeded random subset, when all would not fit in the time
budget) read in the main process, each one that raises named with its index and error, and each whose structure
(types, dtypes, shapes, keys, lengths) differs from the most common one named with the difference."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

BUDGET_S = 30.0  # the whole check, per rank
SHOWN = 5  # failing samples named in the advice
MIN_SCAN_S = 2.0  # the sample scan gets what is left of the budget, and at least this


def error_text(e: BaseException) -> str:
    """'Type: message' in one line; for an error re-raised from a loader worker, the original one."""
    lines = str(e).strip().splitlines() or [""]
    line = lines[-1] if "Original Traceback" in str(e) else lines[0]
    name = type(e).__name__
    line = line[len(name) + 2:] if line.startswith(name + ": ") else line
    return f"{name}: {line[:300]}"


def signature(sample: Any, loose: bool) -> tuple:
    """A sample's structure: types, dtypes, shapes, mapping keys, tuple lengths (list lengths and shapes not when
    `loose`, for samples that a collate_fn batches at variable length)."""
    if isinstance(sample, torch.Tensor):
        return ("tensor", str(sample.dtype).replace("torch.", ""), None if loose else tuple(sample.shape))
    if isinstance(sample, np.ndarray):
        return ("ndarray", str(sample.dtype), None if loose else tuple(sample.shape))
    if isinstance(sample, Mapping):
        items = sorted(sample.items(), key=lambda kv: str(kv[0]))
        return ("dict", tuple((str(k), signature(v, loose)) for k, v in items))
    if isinstance(sample, tuple):  # a record: its length is part of its structure
        return ("tuple", tuple(signature(v, loose) for v in sample))
    if isinstance(sample, list):
        kinds = tuple(sorted({signature(v, loose) for v in sample}, key=repr))
        return ("list", None if loose else len(sample), kinds[:4])
    if isinstance(sample, np.generic):
        return ("scalar", str(sample.dtype))
    return (type(sample).__name__,)


def render(sig: tuple) -> str:
    kind = sig[0]
    if kind in ("tensor", "ndarray"):
        return f"{kind} {sig[1]}" + (f" {list(sig[2])}" if sig[2] is not None else "")
    if kind == "dict":
        return "{" + ", ".join(f"{k}: {render(v)}" for k, v in sig[1]) + "}"
    if kind == "tuple":
        return "(" + ", ".join(render(v) for v in sig[1]) + ("," if len(sig[1]) == 1 else "") + ")"
    if kind == "list":
        return "list" + (f" of {sig[1]}" if sig[1] is not None else "") + " [" + " | ".join(map(render, sig[2])) + "]"
    if kind == "scalar":
        return f"numpy {sig[1]}"
    return kind


def difference(sig: tuple, ref: tuple, path: str = "sample") -> str:
    """Where `sig` first differs from `ref`, in words."""
    if sig[0] != ref[0]:
        return f"{path} is {render(sig)}, not {render(ref)}"
    kind = sig[0]
    if kind in ("tensor", "ndarray"):
        if sig[1] != ref[1]:
            return f"{path} has dtype {sig[1]}, not {ref[1]}"
        return f"{path} has shape {list(sig[2])}, not {list(ref[2])}"
    if kind == "dict":
        keys, ref_keys = [k for k, _ in sig[1]], [k for k, _ in ref[1]]
        if keys != ref_keys:
            missing, extra = [k for k in ref_keys if k not in keys], [k for k in keys if k not in ref_keys]
            return f"{path} " + "; ".join(([f"lacks key {', '.join(map(repr, missing))}"] if missing else []) +
                                          ([f"has extra key {', '.join(map(repr, extra))}"] if extra else []))
        for (k, v), (_, r) in zip(sig[1], ref[1]):
            if v != r:
                return difference(v, r, f"{path}[{k!r}]")
    if kind == "tuple":
        if len(sig[1]) != len(ref[1]):
            return f"{path} has {len(sig[1])} elements, not {len(ref[1])}"
        for i, (v, r) in enumerate(zip(sig[1], ref[1])):
            if v != r:
                return difference(v, r, f"{path}[{i}]")
    if kind == "list" and sig[1] != ref[1]:
        return f"{path} has {sig[1]} elements, not {ref[1]}"
    return f"{path} is {render(sig)}, not {render(ref)}"


def scan(dataset: Any, indices: list[int], loose: bool, seconds: float) -> dict[str, Any]:
    """Read `indices` in this process: the errors (index, 'Type: message') and each distinct structure with its
    count and first indices. Stops after `seconds`, whatever the estimate said."""
    errors: list[tuple[int, str]] = []
    sigs: dict[tuple, list[Any]] = {}
    read, n_errors, t0 = 0, 0, time.perf_counter()
    for i in indices:
        if time.perf_counter() - t0 > seconds:
            break
        read += 1
        try:
            sample = dataset[i]
        except Exception as e:
            n_errors += 1
            if len(errors) < SHOWN:
                errors.append((i, error_text(e)))
            continue
        entry = sigs.setdefault(signature(sample, loose), [0, []])
        entry[0] += 1
        if len(entry[1]) < SHOWN:
            entry[1].append(i)
    return {"read": read, "n_errors": n_errors, "errors": errors, "sigs": [(s, c, ix) for s, (c, ix) in sigs.items()]}


def plan(everyone: list[dict[str, Any]], world: int, seed: int, elapsed: float | None) -> dict[str, Any]:
    """What to read, the same on every rank: all samples when they fit in what is left of the budget (the
    slowest rank's time per sample and the latest rank's clock), else a random subset of as many as fit."""
    n = everyone[0]["samples"]
    per_sample = max(m["per_sample_s"] for m in everyone)
    elapsed = elapsed if elapsed is not None else max(m["elapsed_s"] for m in everyone)
    seconds = max(MIN_SCAN_S, BUDGET_S - elapsed - 0.5)
    fit = int(seconds / per_sample) if per_sample > 0 else n
    if math.ceil(n / world) <= fit:
        return {"mode": "all", "indices": None, "seconds": 2 * seconds, "of": n}
    k = min(n, max(world, fit * world))
    return {"mode": "random", "indices": sorted(random.Random(seed).sample(range(n), k)), "seconds": seconds, "of": n,
            "all_s": n * per_sample / world}


# ----------------------------------------------------------------------------------------------- the check

def verdict(scans: list[dict[str, Any]], read: int, plan: dict[str, Any], loose: bool,
             details: dict[str, Any]) -> tuple[str, str] | None:
    """The failing samples, gathered from every rank, as (figure, advice); None when all are fine. A structure
    differs from the most common one (the lowest index's among equals)."""
    errors = sorted(e for f in scans for e in f["errors"])
    n_errors = sum(f["n_errors"] for f in scans)
    counts: dict[tuple, list[Any]] = {}
    for f in scans:
        for sig, c, ix in f["sigs"]:
            entry = counts.setdefault(sig, [0, []])
            entry[0] += c
            entry[1] = sorted(entry[1] + ix)[:SHOWN]
    odd: list[tuple[int, str]] = []
    n_odd = 0
    if len(counts) > 1:
        ref = max(counts, key=lambda s: (counts[s][0], -counts[s][1][0]))
        for sig, (c, ix) in counts.items():
            if sig != ref:
                n_odd += c
                odd += [(i, f"{difference(sig, ref)} like {counts[ref][0]} others") for i in ix]
        odd.sort()
        details["structure"] = render(ref)
    details.update(errors=[list(e) for e in errors], n_errors=n_errors, different=[list(o) for o in odd],
                   n_different=n_odd)
    if not n_errors and not n_odd:
        return None
    problems = [f"index {i}: {why}" for i, why in errors[:SHOWN] + odd[:SHOWN]]
    more = n_errors + n_odd - len(problems)
    what = ([f"{n_errors} raise{'s' if n_errors == 1 else ''}"] if n_errors else []) + \
        ([f"{n_odd} differ{'s' if n_odd == 1 else ''} in structure"] if n_odd else [])
    sampled = "" if plan["mode"] == "all" else f" (a random subset of {plan['of']})"
    figure = f"{read} samples read{sampled}: {', '.join(what)}"
    advice = "; ".join(problems) + (f"; and {more} more" if more > 0 else "")
    failing = [f for f in scans if f["n_errors"]]
    if n_errors > 1 and len(failing) < len(scans) and all(f["n_errors"] == f["read"] for f in failing):
        # every sample fails on some ranks, none on the others: those nodes' data, not the samples
        advice += (f"; all on rank{'s' if len(failing) > 1 else ''} " + ", ".join(f"{f['rank']} (host {f['host']})"
                   for f in failing) + ", none on the others: check that node's copy of the data, or its mount")
    else:
        advice += ": fix or filter them in the dataset"
    if n_odd and not loose:
        advice += " (for samples of variable length, set data.collate_fn to batch them)"
    return figure, advice

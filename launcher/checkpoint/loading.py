"""The read half of resume: which checkpoint to load (rank 0 decides), whether it fits the model, and optimizer
state to load into without DCP's template step."""

from __future__ import annotations

from typing import Any

import torch

from . import dcp_io, layout
from .storage import Storage


def choose(storage: Storage, mode: str) -> dict[str, Any]:
    """The checkpoint `mode` (auto, never, or a step folder's path) asks for, as plain data for a broadcast:
    path (None: start fresh), storage_root, skipped [(path, why)], error (None or why nothing can be loaded) and
    refused (step folders whose metadata was refused: never counted nor removed by retention)."""
    out: dict[str, Any] = {"path": None, "skipped": [], "error": None, "storage_root": storage.root, "refused": []}
    newest, _ = layout.newest_committed(storage)
    mixing = (f"{storage.root} already has committed checkpoints (newest: step {newest.step}) that this run "
              f"would mix with its own; point checkpoint.dir at a new directory (`launch ckpt ls` lists them), or "
              f"remove them") if newest is not None else None
    if mode == "never":
        out["error"] = f"resume=never: {mixing}" if mixing else None
        return out
    if mode == "auto":
        found, skipped = dcp_io.newest_usable(storage)
        out["refused"] = [s.name for s in skipped if s.refused]
        out["skipped"] = [(s.path, s.problem + (f"; the folder is left in place, and a save at step {s.step} will "
                                                f"stop with an error until it is moved away" if s.refused else ""))
                          for s in skipped]
        if found is not None:
            out["path"] = found.path
        return out
    root, _, name = mode.rstrip("/").rpartition("/")
    named = Storage(root or ".", storage.endpoint_url)
    try:
        info = layout.inspect(named, name)
    except ValueError:
        out["error"] = f"resume: {mode} is not a checkpoint folder (step-<N>)"
        return out
    problem = dcp_io.unusable(named, info)
    if problem:
        out["error"] = f"resume: {mode} cannot be used: {problem}"
        return out
    if named.root == storage.root and newest is not None and newest.step > info.step:
        out["error"] = (f"resume: {mode} is older than the newest checkpoint beside it (step {newest.step}); to "
                        f"branch from it, keep resume={mode} and point checkpoint.dir at a new directory, so no "
                        f"committed checkpoint is overwritten")
        return out
    out["path"], out["storage_root"] = info.path, named.root
    return out


def shape_problems(meta: Any, model_sd: dict[str, torch.Tensor]) -> list[str]:
    """How the checkpoint's model tensors (its DCP metadata) differ from the model's: missing, extra, reshaped."""
    entries = meta.state_dict_metadata
    problems = []
    for fqn, tensor in model_sd.items():
        saved = entries.get(f"model.{fqn}")
        if saved is None:
            problems.append(f"parameter '{fqn}' is not in the checkpoint")
        elif hasattr(saved, "size") and tuple(saved.size) != tuple(tensor.shape):
            problems.append(f"parameter '{fqn}' has shape {list(saved.size)} in the checkpoint and "
                            f"{list(tensor.shape)} in the model")
    extra = sorted(k[len("model."):] for k in entries if k.startswith("model.") and k[len("model."):] not in model_sd)
    if extra:
        problems.append(f"the checkpoint has parameters the model lacks: {', '.join(extra[:5])}"
                        f"{' ...' if len(extra) > 5 else ''}")
    return problems


def empty_optimizer_state(optimizer: torch.optim.Optimizer | None, meta: Any, model_sd: dict[str, Any]) -> None:
    """Give an optimizer that has no state yet uninitialised state tensors shaped as the checkpoint's, to load
    into. Without them DCP makes its own template by running a full optimizer step on zero gradients: a gradient
    for every parameter and all the optimizer's arithmetic, which took most of a resume on the CPU. A parameter the
    model's state_dict does not name once (shared, or empty) leaves the job to DCP's way."""
    if optimizer is None or optimizer.state:
        return
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    saved: dict[str, dict[str, Any]] = {}
    for key, entry in meta.state_dict_metadata.items():
        if key.startswith("optim.state."):
            fqn, _, name = key[len("optim.state."):].rpartition(".")
            saved.setdefault(fqn, {})[name] = entry
    fqn_of: dict[int, str | None] = {}
    for fqn, t in model_sd.items():
        if isinstance(t, torch.Tensor) and t.numel():
            fqn_of[t.data_ptr()] = None if t.data_ptr() in fqn_of else fqn
    state: dict[torch.Tensor, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            fqn = fqn_of.get(p.data_ptr()) if p.numel() else None
            if fqn is None:
                return
            entries: dict[str, Any] = {}
            for name, entry in saved.get(fqn, {}).items():
                if not isinstance(entry, TensorStorageMetadata):
                    entries[name] = 0  # a plain value, replaced by the load
                elif len(entry.size) == 0:  # a step count: on the CPU, as optimizers keep it by default
                    entries[name] = torch.zeros((), dtype=entry.properties.dtype)
                else:
                    entries[name] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype, device=p.device)
            if entries:
                state[p] = entries
    optimizer.state.update(state)

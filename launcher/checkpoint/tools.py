"""`launch ckpt ls DIR` and `launch ckpt export CKPT OUT [--format pt|safetensors]`."""

from __future__ import annotations

import sys
from typing import Any

from . import layout
from .storage import Storage
from ..errors import UsageError
from ..files import temporary_path


def ls(directory: str, endpoint_url: str | None = None, out=sys.stdout) -> int:
    """Print every step folder: step, epoch, sample offset, size, world size, committed or why not; mark the latest."""
    storage = Storage(directory, endpoint_url)
    found = layout.scan(storage)
    if not found:
        print(f"no checkpoints in {storage.root}", file=out)
        return 0
    from . import dcp_io  # its metadata is read as resume reads it: a refused checkpoint is never the latest
    for c in found:
        if c.committed:
            refused = dcp_io.refusal(storage, c.path)
            if refused:
                c.problem, c.refused = refused, True
    latest = next((c.name for c in found if c.committed), None)
    print(f"{'step':>10} {'epoch':>6} {'offset':>8} {'world':>6} {'size':>10}  state", file=out)
    for c in found:
        m = c.manifest or {}
        state = ("committed" + (", latest" if c.name == latest else "")) if c.committed else \
            f"{'REFUSED' if c.refused else 'NOT COMMITTED'}: {c.problem}"
        print(f"{c.step:>10} {m.get('epoch', '-'):>6} {m.get('sample_offset', '-'):>8} {m.get('world_size', '-'):>6} "
              f"{_mb(c.size):>10}  {state}", file=out)
    print(f"checkpoint dir: {storage.root}", file=out)
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def export(ckpt: str, out: str, endpoint_url: str | None = None, fmt: str | None = None) -> int:
    """Write the model's state_dict from a committed checkpoint as one file: `torch.load(out, weights_only=True)`
    reads a .pt (the default), `safetensors.torch.load_file` a .safetensors (`fmt`, or an out name ending in
    .safetensors). `ckpt` is a step folder, or a checkpoint directory: its newest committed checkpoint, as
    `resume: auto` picks it (damaged or refused newer ones passed over with a warning). No process group needed."""
    fmt = fmt or ("safetensors" if out.endswith(".safetensors") else "pt")
    if fmt == "safetensors":
        safetensors_module()
    import torch

    from . import dcp_io

    storage, info = _exportable(ckpt, endpoint_url)
    model = dcp_io.model_state(storage, info.path)
    with temporary_path(out) as tmp:
        if fmt == "safetensors":
            with open(tmp, "wb") as f:
                f.write(safetensors_bytes(model))
        else:
            torch.save(model, tmp)
    n = sum(v.numel() for v in model.values())
    print(f"exported {len(model)} tensors ({n} values) from {info.path} (step {info.step}) to {out} ({fmt})")
    return 0


def _exportable(ckpt: str, endpoint_url: str | None) -> tuple[Storage, layout.CheckpointInfo]:
    """The committed checkpoint `ckpt` names (a step folder, or a directory's newest), with its storage."""
    from . import dcp_io

    root, _, name = ckpt.rstrip("/").rpartition("/")
    storage = Storage(root or ".", endpoint_url)
    try:
        info = layout.inspect(storage, name)
    except ValueError:
        info = None
    if info is not None:
        problem = dcp_io.unusable(storage, info)
        if problem:
            raise UsageError(f"{ckpt} cannot be exported: {problem}")
        return storage, info
    directory = Storage(ckpt, endpoint_url)
    found, skipped = dcp_io.newest_usable(directory)
    for s in skipped:
        print(f"launch ckpt export: skipped {s.path}: {s.problem}", file=sys.stderr)
    if found is None:
        why = f" ({len(skipped)} step folder(s) passed over, see above)" if skipped else ""
        raise UsageError(f"{ckpt} is neither a checkpoint folder (step-<N>) nor a directory with a committed "
                         f"checkpoint{why}; `launch ckpt ls DIR` lists them")
    return directory, found


def safetensors_module() -> Any:
    """safetensors.torch, or a UsageError saying how to install it (it is an optional extra)."""
    try:
        import safetensors.torch
    except ImportError:
        raise UsageError("the safetensors format needs the safetensors package: pip install 'launcher[safetensors]'") \
            from None
    return safetensors.torch


def safetensors_bytes(state: dict[str, Any]) -> bytes:
    """`state` as a safetensors file. safetensors refuses tensors that share storage (tied weights) or do not
    cover their storage contiguously: those are written as copies, each name keeping its own values."""
    import torch

    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        storage = value.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or not value.is_contiguous() or value.numel() * value.element_size() != storage.nbytes():
            value = value.clone(memory_format=torch.contiguous_format)
        if value.numel():
            seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value.detach().cpu()
    return safetensors_module().save(tensors, metadata={"format": "pt"})

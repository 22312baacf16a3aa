"""`launch ckpt ls DIR` and `launch ckpt export CKPT OUT`."""

from __future__ import annotations

import os
import sys

from . import layout
from .storage import Storage
from ..errors import UsageError


def ls(directory: str, endpoint_url: str | None = None, out=sys.stdout) -> int:
    """Print every step folder: step, epoch, sample offset, size, world size, committed or why not; mark the latest."""
    storage = Storage(directory, endpoint_url)
    found = layout.scan(storage)
    if not found:
        print(f"no checkpoints in {storage.root}", file=out)
        return 0
    latest = next((c.name for c in found if c.committed), None)
    print(f"{'step':>10} {'epoch':>6} {'offset':>8} {'world':>6} {'size':>10}  state", file=out)
    for c in found:
        m = c.manifest or {}
        state = ("committed" + (", latest" if c.name == latest else "")) if c.committed else \
            f"NOT COMMITTED: {c.problem}"
        print(f"{c.step:>10} {m.get('epoch', '-'):>6} {m.get('sample_offset', '-'):>8} {m.get('world_size', '-'):>6} "
              f"{_mb(c.size):>10}  {state}", file=out)
    print(f"checkpoint dir: {storage.root}", file=out)
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def export(ckpt: str, out: str, endpoint_url: str | None = None) -> int:
    """Write the model's state_dict from a committed checkpoint as one file that
    `torch.load(out, weights_only=True)` reads; no process group needed."""
    root, _, name = ckpt.rstrip("/").rpartition("/")
    storage = Storage(root or ".", endpoint_url)
    try:
        info = layout.inspect(storage, name)
    except ValueError:
        raise UsageError(f"{ckpt} is not a checkpoint folder (step-<N>); `launch ckpt ls DIR` lists them") from None
    if not info.committed:
        raise UsageError(f"{ckpt} cannot be exported: {info.problem}")
    import torch

    from . import dcp_io

    model = dcp_io.model_state(storage, info.path)
    tmp = f"{out}.tmp{os.getpid()}"
    torch.save(model, tmp)
    os.replace(tmp, out)
    n = sum(v.numel() for v in model.values())
    print(f"exported {len(model)} tensors ({n} values) from {info.path} (step {info.step}) to {out}")
    return 0

"""Random number generator state as plain JSON (no pickles): python, numpy, torch CPU, and the CUDA generator of
this rank's training device only.

The CUDA part is {"cuda_device": {"index": i, "count": n, "state": <base64>}}: the generator of cuda:i, saved
while n devices were visible. Checkpoints written before hold {"cuda": [<base64>, ...]}, every visible device's
state; both are read. Nothing here touches CUDA unless the training device is a CUDA device.
"""

from __future__ import annotations

import base64
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger("launcher")


@dataclass(frozen=True)
class CudaLayout:
    """Which CUDA device a rank trains on (`index`) and how many its process sees (`count`)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"cuda:{self.index} of {self.count} visible GPU{'s' if self.count != 1 else ''}"


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (torch's seeds every CUDA device too): what `capture` saves and
    `restore` brings back, seeded from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def current_layout(device: torch.device) -> CudaLayout | None:
    """This rank's CUDA layout, or None when it trains on another device (then CUDA is not asked anything)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return CudaLayout(index, torch.cuda.device_count())


def cuda_record(state: str, layout: CudaLayout) -> dict[str, Any]:
    """The saved form of one device's generator state (base64) and the layout it was taken in."""
    return {"index": layout.index, "count": layout.count, "state": state}


def capture(device: torch.device) -> dict[str, Any]:
    """This process's RNG streams: python, numpy, torch CPU and, on a CUDA training device, that device's."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    layout = current_layout(device)
    if layout is not None:
        out["cuda_device"] = cuda_record(_b64(torch.cuda.get_rng_state(layout.index)), layout)
    return out


def plan_cuda_restore(saved: dict[str, Any], current: CudaLayout | None, rank: int) -> tuple[str | None, str | None]:
    """What to put into this rank's CUDA generator from the saved RNG record, and a warning when the saved state
    cannot be put back exactly as it was taken: (base64 state or None, warning or None). Pure: asks CUDA nothing.

    A new-format state is this rank's own, so it is restored onto this rank's device whatever its index; a changed
    layout is still reported. An old-format list is usable only when as many devices are visible as then (the
    rank's device is the one at its index); otherwise which entry was this rank's is unknown."""
    where = f"rank {rank}: CUDA RNG state"
    now = str(current) if current is not None else "cpu (no CUDA device)"
    record = saved.get("cuda_device")
    if record is not None:
        then = CudaLayout(int(record["index"]), int(record["count"]))
        if current is None:
            return None, f"{where} not restored: saved from {then}, this rank now runs on {now}"
        if then != current:
            return record["state"], (f"{where} saved from {then} was restored onto {now}: the GPU layout changed "
                                     f"since the save, so this rank's random stream continues on another device")
        return record["state"], None
    states = saved.get("cuda")
    if states is not None:
        then_old = f"all {len(states)} visible GPUs (an older checkpoint, which does not record this rank's device)"
        if current is None:
            return None, f"{where} not restored: saved from {then_old}, this rank now runs on {now}"
        if len(states) != current.count or current.index >= len(states):
            return None, (f"{where} not restored: saved from {then_old}, this rank now runs on {now}, so which "
                          f"saved state was this rank's is unknown; the device keeps its seeded state")
        return states[current.index], None
    if current is not None:
        return None, (f"{where} not restored: the checkpoint holds none (saved on cpu), this rank now runs on {now}; "
                      f"the device keeps its seeded state")
    return None, None


def restore(state: dict[str, Any], device: torch.device, rank: int) -> None:
    """Put the saved streams back; the CUDA one goes to this rank's device, with a warning when it cannot be exact."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(state["torch"]))
    layout = current_layout(device)
    cuda_state, warning = plan_cuda_restore(state, layout, rank)
    if warning:
        log.warning("resume: %s", warning)
    if cuda_state is not None and layout is not None:
        torch.cuda.set_rng_state(_tensor(cuda_state), layout.index)

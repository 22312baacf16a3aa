"""The model's DistributedDataParallel wrapper, and its gradient-bucket layout as a checkpoint state.

DDP lays its buckets out again after the first backward of each process, in the order gradients became ready. A
resumed process would otherwise take its first step with the initial layout where the interrupted run had already
switched; over more than 2 ranks an all-reduce adds each gradient in an order that depends on where it sits in its
bucket, and the resumed run would drift by an ulp. Building DDP from the saved layout (which the rebuild then
reproduces) makes resume bitwise exact.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

log = logging.getLogger("launcher")


def _ddp_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters DDP reduces, in DDP's order (the indices of its bucket layout)."""
    seen: set[int] = set()
    out = []
    for _, m in module.named_modules():
        for _, p in m.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@contextlib.contextmanager
def fixed_bucket_layout(layout: list[list[int]] | None) -> Iterator[None]:
    """Build DDP with this gradient bucket layout instead of its first-step one. A layout that does not fit the
    model is ignored."""
    original = tdist._compute_bucket_assignment_by_size

    def assign(tensors: list[torch.Tensor], limits: list[int], *args: Any, **kwargs: Any) -> Any:
        if layout is None or sorted(i for b in layout for i in b) != list(range(len(tensors))):
            return original(tensors, limits, *args, **kwargs)
        return [list(b) for b in reversed(layout)], [max(limits)] * len(layout)  # DDP reverses the bucket list

    tdist._compute_bucket_assignment_by_size = assign
    try:
        yield
    finally:
        tdist._compute_bucket_assignment_by_size = original


class DDPModel:
    """The DDP module around `model` (compiled in place when `compile_options` is not None), kept in checkpoints
    as its bucket layout ("ddp_buckets"). `model` stays the plain module, so checkpoints keep its parameter names.

    A resume hands it the saved layout (`load_state_dict`) before `build()`; `trained` is set once a backward has
    run in this process or the run resumed past step 0: from then on the layout is final and read once."""

    def __init__(self, model: torch.nn.Module, device: torch.device, compile_options: dict | None,
                 is_main: bool = False) -> None:
        self.model, self.device, self.compile_options, self.is_main = model, device, compile_options, is_main
        self.module: DDP | None = None
        self.trained = False
        self._saved: list[list[int]] | None = None
        self._layout: list[list[int]] | None = None

    def build(self) -> None:
        """Wrap the model, laying the buckets out as the checkpoint it resumed from had them."""
        with fixed_bucket_layout(self._saved):
            self.module = self._wrap()

    def rebuild(self) -> None:
        """DDP reduces the parameters that were trainable when it was built: a new set (an unfreeze) needs a new
        DDP, and the old one's gradient hooks go with it (this object holds the only reference to it)."""
        self.module = None
        gc.collect()
        self._layout = None
        self.module = self._wrap()

    def _wrap(self) -> DDP:
        # Compiling the DDP module lets dynamo split the graph at gradient-bucket boundaries (communication
        # overlaps the backward).
        ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.compile_options is not None:
            ddp.compile(**self.compile_options)
            if self.is_main:
                log.info("torch.compile: the DDP model compiles on its first step (%s)",
                         ", ".join(f"{k}={v}" for k, v in self.compile_options.items()) or "default options")
        return ddp

    def state_dict(self) -> list[list[int]]:
        """DDP's gradient buckets as lists of parameter indices, as the next step will use them (collective)."""
        if self._layout is not None:
            return self._layout
        assert self.module is not None, "DDPModel.build() first"
        self.module.reducer._rebuild_buckets()  # what the next forward would do: rebuild after the first backward
        index = {id(p): i for i, p in enumerate(_ddp_parameters(self.model))}
        layout = [[index[id(p)] for p in b.parameters()] for b in self.module.reducer._get_zeros_like_grad_buckets()]
        if self.trained:
            self._layout = layout
        return layout

    def load_state_dict(self, layout: list[list[int]]) -> None:
        self._saved = layout

"""The training loop's decisions as plain functions of counters: accumulation groups, when to log and validate,
early stopping's bookkeeping, and where a checkpoint resumes. No process group, no device: unit-tested as is."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, NamedTuple

from ..checkpoint.checkpointer import Position


class Group(NamedTuple):
    """One optimizer step's micro-batches, `size` of them, taken from the loader only as they are used: taking a
    group ahead would move a main-process loader's random augmentation (num_workers=0) relative to the model's
    own random draws (dropout), and every loss after it."""
    micro_batches: Iterator[Any]
    size: int


_END = object()


def accumulation_groups(n_batches: int, accum: int) -> list[int]:
    """The sizes of an epoch's accumulation groups: `accum` micro-batches each, the last one shorter when
    `n_batches` is not a multiple of it (it still takes an optimizer step, on the mean of its own losses)."""
    return [min(accum, n_batches - start) for start in range(0, n_batches, accum)]


def grouped(batches: Iterable[Any], n_batches: int, accum: int) -> Iterator[Group]:
    """An epoch's `n_batches` batches as accumulation groups, each to be used up before the next is asked for."""
    it = iter(batches)
    for size in accumulation_groups(n_batches, accum):
        yield Group(itertools.islice(it, size), size)
    if next(it, _END) is not _END:  # the loader's end (a loader with workers shuts them down here)
        raise RuntimeError(f"the training loader gave more batches than its length ({n_batches})")


def log_due(step: int, every: int, done: bool, epoch_end: bool) -> bool:
    """A log step: every `every` steps, the last step of an epoch and the last of training."""
    return step % every == 0 or done or epoch_end


def validation_due(step: int, epoch: int, epoch_end: bool, every_steps: int | None,
                   every_epochs: int | None) -> bool:
    """Validation follows every `every_steps`-th step and the last step of every `every_epochs`-th epoch."""
    if every_steps and step % every_steps == 0:
        return True
    return bool(epoch_end and every_epochs and (epoch + 1) % every_epochs == 0)


def track_best(watch: dict[str, Any], value: float, step: int, mode: str, patience: int | None) -> bool:
    """Note one validation's value of the monitored metric in `watch` (best, best_step, since_best): True when it
    has not improved (lower in min mode, higher in max) for `patience` validations."""
    best = watch["best"]
    if best is None or (value < best if mode == "min" else value > best):
        watch.update(best=value, best_step=step, since_best=0)
    else:
        watch["since_best"] += 1
    return patience is not None and watch["since_best"] >= patience


def epoch_position(step: int, epoch: int, epoch_start: int, batches: int, n_batches: int | None,
                   samples_per_batch: int) -> Position:
    """Where training resumes after `batches` of an epoch that began at global sample `epoch_start` (non-zero
    after a resume) and has `n_batches` (None: not at its end): an ended epoch resumes at the next one's start."""
    if n_batches is not None and batches >= n_batches:
        return Position(step, epoch + 1, 0)
    return Position(step, epoch, epoch_start + batches * samples_per_batch)


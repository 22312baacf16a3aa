"""DataLoaders from the recipe, and the resumable distributed sampler.

The sampler's order is a function of (seed, epoch) only, so a run that resumes at a global sample offset sees
exactly the samples an uninterrupted run would, on any world size. Loader worker seeds differ per rank and
worker: each rank's loader draws them from a generator seeded by (seed, rank), and every worker seeds python's and
numpy's generators from its own torch seed (torch seeds only its own).

Random augmentation in loader workers is reproducible per sample: before a worker loads sample i of epoch e it
seeds python's, numpy's and torch's generators from (seed, e, i). A sample's random draws are then the same on any
rank, worker count or world size, and after a resume mid-epoch, where a worker's own stream (which no checkpoint
can hold) would have moved on differently. In the main process (num_workers=0) nothing is reseeded: the rank's
own streams are in every checkpoint.
"""

from __future__ import annotations

import math
import random
import signal
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import imports
from .dist import RankInfo, rank_info


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, rank, epoch, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> 1)


class DistributedSampler(torch.utils.data.DistributedSampler):
    """torch's DistributedSampler plus a resume position: a global sample offset within the epoch.

    The epoch's global order is a permutation of (seed, epoch), padded as torch pads it (or cut, with drop_last)
    to a multiple of the world size and dealt round-robin to the ranks. After `set_epoch(e, start=k)` the first k
    samples of that padded order are skipped: on the same world size that is exactly where an uninterrupted run
    would be. On another world size the rest may not split evenly; then ranks get one sample more or less, as long
    as that leaves every rank the same number of batches (`batch_size` tells), else the rest is padded from its
    start. With start=0 it yields exactly what torch's DistributedSampler yields.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, batch_size: int | None = None) -> None:
        info = rank_info()
        super().__init__(dataset, num_replicas=info.world_size if num_replicas is None else num_replicas,
                         rank=info.rank if rank is None else rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.batch_size = batch_size
        self.start = 0
        self._own: list[int] | None = None
        self.with_epoch = False  # yield (epoch, index) pairs, for SeededSamples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Begin `epoch`, skipping the first `start` samples of its global order (already trained on)."""
        if not 0 <= start <= self.total_size:
            raise ValueError(f"sampler start offset {start} is outside the epoch (0..{self.total_size})")
        self.epoch = epoch
        self.start = start
        self._own = None

    def global_order(self) -> list[int]:
        """This epoch's order over all ranks, padded or cut to a multiple of the world size."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            return order[: self.total_size]
        pad = self.total_size - n
        return order + (order * math.ceil(pad / n))[:pad] if pad > 0 else order

    def _mine(self) -> list[int]:
        if self._own is not None:
            return self._own
        rest = self.global_order()[self.start:]
        world = self.num_replicas
        if len(rest) % world:
            if self.drop_last:
                rest = rest[: len(rest) - len(rest) % world]
            else:
                counts = [len(rest[r::world]) for r in range(world)]
                even_batches = self.batch_size and len({math.ceil(c / self.batch_size) for c in counts}) == 1
                if not even_batches:
                    extra = world - len(rest) % world
                    rest = rest + (rest * math.ceil(extra / len(rest)))[:extra]
        self._own = rest[self.rank::world]
        return self._own

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self) -> Iterator[Any]:
        if self.with_epoch:
            return iter([(self.epoch, i) for i in self._mine()])
        return iter(self._mine())


_M64 = (1 << 64) - 1


def _mix(base: int, index: int) -> int:
    """A 63-bit seed for sample `index` from an epoch's base seed (splitmix64's finaliser; about a microsecond)."""
    z = (base + (index + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1


class SeededSamples(Dataset):
    """A training dataset as loader workers see it: given (epoch, index), seed python, numpy and torch from
    (seed, epoch, index), then return dataset[index]. Attributes of the dataset read through."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self._bases: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        epoch, index = key
        if torch.utils.data.get_worker_info() is not None:
            base = self._bases.get(epoch)
            if base is None:
                base = self._bases[epoch] = derive_seed(self.seed, epoch)
            s = _mix(base, index)
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            torch.default_generator.manual_seed(s)
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "dataset":  # not set yet while unpickling in a worker
            raise AttributeError(name)
        return getattr(self.dataset, name)


def seed_loader_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: python and numpy streams from this worker's own torch seed. Loader workers
    ignore SIGUSR2: SLURM signals every process of the job ahead of preemption, and a worker that died of it
    would take the rank down before its emergency checkpoint."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _collate_and_pin(data_cfg: Any, pin_memory: bool) -> tuple[dict[str, Any], bool]:
    """DataLoader settings shared by the training and validation loaders: the collate_fn, and whether to pin."""
    kwargs: dict[str, Any] = {}
    if data_cfg.collate_fn:
        kwargs["collate_fn"] = imports.locate(data_cfg.collate_fn)
    return kwargs, pin_memory if data_cfg.pin_memory is None else bool(data_cfg.pin_memory)


def build_loader(data_cfg: Any, dataset: Dataset, *, seed: int, info: RankInfo | None = None,
                 pin_memory: bool = False) -> DataLoader:
    """The per-rank DataLoader for a recipe's `data` section, with the launcher's DistributedSampler."""
    info = info or rank_info()
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=bool(data_cfg.shuffle), seed=seed, drop_last=bool(data_cfg.drop_last),
                                 batch_size=int(data_cfg.batch_size))
    workers = int(data_cfg.num_workers)
    kwargs, pin = _collate_and_pin(data_cfg, pin_memory)
    if workers > 0:
        kwargs["persistent_workers"] = bool(data_cfg.persistent_workers)
        if data_cfg.prefetch_factor is not None:
            kwargs["prefetch_factor"] = int(data_cfg.prefetch_factor)
        sampler.with_epoch = True
        dataset = SeededSamples(dataset, seed)
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, info.rank))
    return DataLoader(dataset, batch_size=int(data_cfg.batch_size), sampler=sampler, num_workers=workers,
                      pin_memory=pin, drop_last=bool(data_cfg.drop_last), worker_init_fn=seed_loader_worker,
                      generator=generator, **kwargs)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation order: rank r takes samples r, r + world, r + 2 world, ... of the dataset, in order. No sample is
    padded or repeated, so sums over ranks count each sample once (ranks may differ by one sample)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        self.n, self.world, self.rank = len(dataset), num_replicas, rank  # type: ignore[arg-type]

    def __iter__(self) -> Any:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def build_eval_loader(data_cfg: Any, dataset: Dataset, *, info: RankInfo | None = None,
                      pin_memory: bool = False) -> DataLoader:
    """The per-rank DataLoader for validation: this rank's disjoint share, in order, in full."""
    info = info or rank_info()
    kwargs, pin = _collate_and_pin(data_cfg, pin_memory)
    return DataLoader(dataset, batch_size=int(data_cfg.val_batch_size or data_cfg.batch_size),
                      sampler=ShardSampler(dataset, info.world_size, info.rank), num_workers=int(data_cfg.num_workers),
                      pin_memory=pin, worker_init_fn=seed_loader_worker, **kwargs)


def distributed_sampler(dataset: Dataset, *, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False) -> DistributedSampler:
    """Public API for your own scripts: this rank's sampler; call `set_epoch(epoch)` every epoch."""
    return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)

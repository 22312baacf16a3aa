"""DataLoaders from the recipe, and the resumable distributed sampler.

The sampler's order is a function of (seed, epoch) only, so a run that resumes at a global sample offset sees
exactly the samples an uninterrupted run would, on any world size. Loader worker seeds differ per rank and
worker: each rank's loader draws them from a generator seeded by (seed, rank, epoch), and every worker seeds
python's and numpy's generators from its own torch seed (torch seeds only its own).
"""

from __future__ import annotations

import math
import random
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

    The epoch's global order is a permutation of (seed, epoch). After `set_epoch(e, start=k)`, the samples
    order[k:] are dealt round-robin to the ranks, padded (or truncated with drop_last) so every rank gets the
    same count. With start=0 it matches torch's DistributedSampler exactly.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        info = rank_info()
        super().__init__(dataset, num_replicas=info.world_size if num_replicas is None else num_replicas,
                         rank=info.rank if rank is None else rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0
        self._resize()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Begin `epoch`, skipping the first `start` samples of its global order (already trained on)."""
        total = len(self.dataset)  # type: ignore[arg-type]
        if not 0 <= start <= total:
            raise ValueError(f"sampler start offset {start} is outside the epoch (0..{total})")
        self.epoch = epoch
        self.start = start
        self._resize()

    def _resize(self) -> None:
        remaining = len(self.dataset) - self.start  # type: ignore[arg-type]
        if self.drop_last:
            self.num_samples = remaining // self.num_replicas
        else:
            self.num_samples = math.ceil(remaining / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def global_order(self) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g).tolist()
        return list(range(n))

    def __iter__(self) -> Iterator[int]:
        indices = self.global_order()[self.start:]
        if self.drop_last:
            indices = indices[: self.total_size]
        elif indices:
            pad = self.total_size - len(indices)
            indices += (indices * math.ceil(pad / len(indices)))[:pad]
        own = indices[self.rank: self.total_size: self.num_replicas]
        assert len(own) == self.num_samples
        return iter(own)


def seed_loader_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: python and numpy streams from this worker's own torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(data_cfg: Any, dataset: Dataset, *, seed: int, info: RankInfo | None = None,
                 pin_memory: bool = False) -> DataLoader:
    """The per-rank DataLoader for a recipe's `data` section, with the launcher's DistributedSampler."""
    info = info or rank_info()
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=bool(data_cfg.shuffle), seed=seed, drop_last=bool(data_cfg.drop_last))
    workers = int(data_cfg.num_workers)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs["persistent_workers"] = bool(data_cfg.persistent_workers)
        if data_cfg.prefetch_factor is not None:
            kwargs["prefetch_factor"] = int(data_cfg.prefetch_factor)
    if data_cfg.collate_fn:
        kwargs["collate_fn"] = imports.locate(data_cfg.collate_fn)
    pin = pin_memory if data_cfg.pin_memory is None else bool(data_cfg.pin_memory)
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, info.rank))
    return DataLoader(dataset, batch_size=int(data_cfg.batch_size), sampler=sampler, num_workers=workers,
                      pin_memory=pin, drop_last=bool(data_cfg.drop_last), worker_init_fn=seed_loader_worker,
                      generator=generator, **kwargs)


def distributed_sampler(dataset: Dataset, *, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False) -> DistributedSampler:
    """Public API for your own scripts: this rank's sampler; call `set_epoch(epoch)` every epoch."""
    return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)

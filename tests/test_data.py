"""The training DataLoader as the trainer builds it from a recipe (real loader worker processes): the DataLoader
knobs reach the loader, and random draws in loader workers are a function of (seed, epoch, sample), the same on
any rank, worker count or world size and after a resume mid-epoch."""

from __future__ import annotations

import socket

import pytest
import torch

from conftest import write_recipe

from launcher import recipe
from launcher.data import build_loader
from launcher.dist import RankInfo

# A recipe of its own, not conftest.BASE: a dataset that returns its random draws, no model to speak of.
RECIPE = """\
seed: 3
model: {_target_: torch.nn.Identity}
data:
  train: {_target_: components.DrawsDataset, n: 24}
  batch_size: 4
  num_workers: 2
trainer: {max_epochs: 2}
"""


def _data_cfg(tmp_path, *overrides: str):
    return recipe.load(write_recipe(tmp_path, base=RECIPE, name="recipe.yaml"), list(overrides)).cfg


def _info(rank: int, world: int) -> RankInfo:
    return RankInfo(rank=rank, local_rank=rank, world_size=world, local_world_size=world, node_rank=0,
                    restart_count=0, host=socket.gethostname())


def _draws(cfg, world: int, epoch: int, start: int = 0) -> dict[int, tuple[float, ...]]:
    """sample index -> its draws, over all ranks of a world of `world`."""
    from components import DrawsDataset
    out: dict[int, tuple[float, ...]] = {}
    for rank in range(world):
        loader = build_loader(cfg.data, DrawsDataset(cfg.data.train.n), seed=cfg.seed, info=_info(rank, world))
        loader.sampler.set_epoch(epoch, start=start)
        for batch in loader:
            for row in batch.tolist():
                out[int(row[0])] = tuple(row[1:])
    return out


def test_worker_draws_are_a_function_of_seed_epoch_and_sample(tmp_path):
    cfg = _data_cfg(tmp_path)
    one = _draws(cfg, world=1, epoch=0)
    assert sorted(one) == list(range(24))
    assert len({v for v in one.values()}) == 24, "two samples got the same random draws"
    assert _draws(_data_cfg(tmp_path, "data.num_workers=1"), world=2, epoch=0) == one, \
        "a sample's draws changed with the world size or the number of workers"
    # a resume 8 samples into the epoch: the rest of the epoch draws what the uninterrupted epoch drew
    rest = _draws(_data_cfg(tmp_path, "data.persistent_workers=true"), world=2, epoch=0, start=8)
    assert len(rest) == 16 and rest == {i: one[i] for i in rest}
    later = _draws(cfg, world=1, epoch=1)
    assert all(later[i] != one[i] for i in one), "the draws repeat from one epoch to the next"
    other_seed = _draws(_data_cfg(tmp_path, "seed=4"), world=1, epoch=0)
    assert all(other_seed[i] != one[i] for i in one), "the draws do not depend on the recipe's seed"


def test_main_process_loading_keeps_the_ranks_own_stream(tmp_path):
    """With num_workers=0 the dataset draws from the rank's own generators (saved in every checkpoint)."""
    cfg = _data_cfg(tmp_path, "data.num_workers=0", "data.shuffle=false")
    from components import DrawsDataset
    loader = build_loader(cfg.data, DrawsDataset(24), seed=cfg.seed, info=_info(0, 1))
    torch.manual_seed(11)
    first = next(iter(loader))[:, 3]  # the torch draws
    torch.manual_seed(11)
    assert torch.equal(next(iter(loader))[:, 3], first)
    torch.manual_seed(12)
    assert not torch.equal(next(iter(loader))[:, 3], first)


@pytest.mark.filterwarnings("ignore:.pin_memory. argument is set as true")
@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_knobs_reach_the_loader(tmp_path, workers):
    knobs = [f"data.num_workers={workers}", "data.pin_memory=true", "data.drop_last=true",
             "data.collate_fn=components.tagging_collate"]
    if workers:
        knobs += ["data.persistent_workers=true", "data.prefetch_factor=3"]
    cfg = _data_cfg(tmp_path, *knobs, "data.train.n=26")
    from components import DrawsDataset
    loader = build_loader(cfg.data, DrawsDataset(26), seed=cfg.seed, info=_info(0, 1))
    assert loader.num_workers == workers and loader.pin_memory and loader.drop_last
    if workers:
        assert loader.persistent_workers and loader.prefetch_factor == 3
    batches = list(loader)
    assert len(batches) == 6, "drop_last did not drop the short last batch (26 samples, batches of 4)"
    for x, tag in batches:  # the recipe's collate_fn built every batch
        assert x.shape == (4, 4) and tag.tolist() == [7] * 4

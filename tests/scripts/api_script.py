"""A script that uses the launcher's small public API instead of raw torch.distributed calls."""

import sys

import torch

import launcher

info = launcher.init()
dataset = torch.utils.data.TensorDataset(torch.arange(20).float())
sampler = launcher.distributed_sampler(dataset, shuffle=False)
sampler.set_epoch(0)
mine = [int(dataset[i][0]) for i in sampler]
print(f"api script rank {info.rank}/{info.world_size} local {info.local_rank} device {launcher.choose_device()} "
      f"samples {mine} argv {sys.argv[1:]}", flush=True)
if "--fail" in sys.argv and info.rank == 1:
    raise ValueError("api script failure on purpose")
launcher.teardown()

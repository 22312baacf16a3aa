"""A plain torchrun-style DDP script that knows nothing of the launcher; `launch` runs it unchanged:

    launch recipes/scripts/plain_ddp.py --gpus 2 -- --steps 20
    launch recipes/own_script.yaml
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
print(f"plain script rank {rank} of {world} local_rank {os.environ['LOCAL_RANK']} steps {args.steps}", flush=True)
torch.manual_seed(0)
model = DDP(torch.nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data))
for step, (x, y) in zip(range(args.steps), loader):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"plain script rank {rank} finished {args.steps} steps", flush=True)
dist.barrier()  # every rank done before any leaves: gloo can abort if a peer exits mid-teardown
dist.destroy_process_group()

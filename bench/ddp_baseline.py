"""A hand-written DDP loop, the yardstick for the built-in trainer (same model, data, loader and optimizer).

    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/ddp_baseline.py OUT_DIR STEPS
Writes OUT_DIR/metrics.jsonl (step, time) every LOG steps and OUT_DIR/events.jsonl (first_step) like the trainer.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from launcher.zoo.datasets import SyntheticClassification
from launcher.zoo.models import MLP

out, steps = sys.argv[1], int(sys.argv[2])
LOG = 25
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(MLP(in_features=64, hidden=512, out_features=10, depth=3))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss_fn = torch.nn.CrossEntropyLoss()
data = SyntheticClassification(num_samples=16384, num_features=64, num_classes=10)
sampler = DistributedSampler(data, seed=0)
loader = DataLoader(data, batch_size=128, sampler=sampler, num_workers=0)
step, epoch, running = 0, 0, torch.zeros(())
metrics = open(os.path.join(out, "metrics.jsonl"), "a") if rank == 0 else None
while step < steps:
    sampler.set_epoch(epoch)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.detach()
        step += 1
        if step == 1 and rank == 0:
            with open(os.path.join(out, "events.jsonl"), "a") as f:
                f.write(json.dumps({"event": "first_step", "time": time.time()}) + "\n")
        if step % LOG == 0:
            dist.all_reduce(running)
            if metrics:
                metrics.write(json.dumps({"step": step, "loss": float(running) / LOG / 2, "time": time.time()}) + "\n")
                metrics.flush()
            running.zero_()
        if step >= steps:
            break
    epoch += 1
dist.barrier()
dist.destroy_process_group()

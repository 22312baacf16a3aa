"""A hand-written DDP loop, the yardstick for the built-in trainer (same model, data, loader and optimizer).

    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/ddp_baseline.py OUT_DIR STEPS [DEVICE]
Writes OUT_DIR/metrics.jsonl (step, time) every LOG steps and OUT_DIR/events.jsonl (first_step) like the trainer.
DEVICE (auto, cuda or cpu) is chosen as the trainer chooses: cuda:LOCAL_RANK with NCCL when CUDA is there and
wanted, else the CPU with gloo, so a GPU comparison is NCCL against NCCL.
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
wanted = sys.argv[3] if len(sys.argv) > 3 else "auto"
LOG = 25
cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(MLP(in_features=64, hidden=512, out_features=10, depth=3).to(device),
            device_ids=[device.index] if cuda else None)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss_fn = torch.nn.CrossEntropyLoss()
data = SyntheticClassification(num_samples=16384, num_features=64, num_classes=10)
sampler = DistributedSampler(data, seed=0)
loader = DataLoader(data, batch_size=128, sampler=sampler, num_workers=0, pin_memory=cuda)
step, epoch, running = 0, 0, torch.zeros((), device=device)
metrics = open(os.path.join(out, "metrics.jsonl"), "a") if rank == 0 else None
while step < steps:
    sampler.set_epoch(epoch)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
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

"""One rank of bench_checkpoint.py (run under torchrun): times saving and loading a model + AdamW state.

    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/ckpt_worker.py OUT_JSON DIR GB [ENDPOINT]
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from launcher.checkpoint.checkpointer import Checkpointer, Position
from launcher.recipe import Recipe

out, directory, gb = sys.argv[1], sys.argv[2], float(sys.argv[3])
endpoint = sys.argv[4] if len(sys.argv) > 4 else None
remote = "://" in directory
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
width = 4096
n_layers = max(1, round(gb * 1e9 / 12 / (width * width)))  # params + two AdamW moments, float32
model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(n_layers)])
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
for p in model.parameters():
    p.grad = torch.zeros_like(p)
opt.step()
state_bytes = sum(p.numel() * 4 * 3 for p in model.parameters())

cfg = OmegaConf.structured(Recipe)
cfg.checkpoint.dir, cfg.checkpoint.endpoint_url, cfg.checkpoint.keep = directory, endpoint, 0
cfg.checkpoint.every_minutes = None
results: dict = {"state_gb": state_bytes / 1e9, "layers": n_layers}


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


ck = Checkpointer(cfg, "/tmp", model, opt)
results["sync_save_s"] = timed(lambda: ck.save(Position(1, 0, 0), "bench"))
cfg.checkpoint.async_ = True
ck_async = Checkpointer(cfg, "/tmp", model, opt)
stall = {}


def async_save(step: int) -> None:
    t0 = time.perf_counter()
    ck_async.save(Position(step, 0, 0), "bench")
    stall["s"] = time.perf_counter() - t0
    ck_async.wait()


timed(lambda: async_save(2))  # the first async save allocates the staging buffers
results["async_first_stall_s"] = stall["s"]
results["async_total_s"] = timed(lambda: async_save(3))
results["async_stall_s"] = stall["s"]
model2 = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(n_layers)])
opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-4)
cfg.checkpoint.async_ = False
loader = Checkpointer(cfg, "/tmp", model2, opt2)
results["load_s"] = timed(lambda: loader.resume("auto"))
assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))

if not remote:  # what the DDP tutorial, Lightning and Accelerate do by default: one torch.save on rank 0
    path = os.path.join(directory, "torch_save.pt")

    def save_rank0() -> None:
        if rank == 0:
            with open(path, "wb") as f:
                torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())

    results["torch_save_s"] = timed(save_rank0)
    results["torch_load_s"] = timed(lambda: torch.load(path, weights_only=True))
if rank == 0:
    with open(out, "w") as f:
        json.dump(results, f)
dist.destroy_process_group()

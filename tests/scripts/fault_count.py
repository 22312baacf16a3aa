"""Trains a small MLP on one process and writes the minor page faults per step, after a warm-up, to
ARGV[1]-rank<RANK>.txt: a step that gets its freed memory back from the OS faults its pages in again."""

import os
import resource
import sys

import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 10))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))


def steps(n: int) -> None:
    for _ in range(n):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


steps(30)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(100)
per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100
with open(f"{sys.argv[1]}-rank{os.environ['RANK']}.txt", "w") as f:
    f.write(f"{per_step}\n")

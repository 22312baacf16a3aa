"""A task with a known optimum for bench/bench_sweep.py: the recorded train/loss of a run is
f(x, y) + 1 / sqrt(step), with f = (x - 0.3)^2 + (y + 0.2)^2 (its minimum 0 at x = 0.3, y = -0.2), so a
sampler's best value after N trials measures how close it got, and the loss falls over the run as a real one does
(a pruner can tell a bad trial early). Each step takes `step_s` seconds. `x` and `y` are the model's arguments,
so a sweep searches model.x and model.y."""

from __future__ import annotations

import time

import torch
from torch import nn


class Bowl(nn.Module):
    def __init__(self, x: float = 0.0, y: float = 0.0, step_s: float = 0.02) -> None:
        super().__init__()
        self.step_s = step_s  # stands in for a real step's work, so a pruner has time to act
        self.value = (x - 0.3) ** 2 + (y + 0.2) ** 2
        self.w = nn.Parameter(torch.zeros(()))  # trained toward nothing: the loss is what the arguments make it
        self.calls = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.step_s)
        return (self.w * 0.0 + self.value + self.calls ** -0.5).expand(inputs.shape[0])


class MeanOutput(nn.Module):
    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.mean()

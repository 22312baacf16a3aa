"""Losses for shapes torch's own do not take directly."""

from __future__ import annotations

import torch
from torch import nn


class SequenceCrossEntropy(nn.Module):
    """Cross-entropy over (batch, seq, vocab) logits and (batch, seq) targets."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

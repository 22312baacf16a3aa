"""The trainer's own state that checkpoints keep beside the tensors, each an object with `state_dict()` and
`load_state_dict()` (plain JSON data): early stopping's watch over the monitored metric, and the unfreeze."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from .. import finetune as ft
from .decisions import track_best

log = logging.getLogger("launcher")


class EarlyStopping:
    """trainer.monitor's best value so far, the step it came at and the validations since ("monitor" in a
    checkpoint); `update` says when trainer.early_stop_patience validations passed without improvement."""

    def __init__(self, monitor: str, mode: str, patience: int | None) -> None:
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.watch: dict[str, Any] = {"best": None, "best_step": None, "since_best": 0}
        self.stopped = False

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Note one validation's metrics; True (and `stopped`) when training should stop."""
        if self.monitor not in metrics:
            raise ValueError(f"trainer.monitor is {self.monitor}, but validation gave only {sorted(metrics)}")
        if track_best(self.watch, metrics[self.monitor], step, self.mode, self.patience):
            log.warning("early stopping at step %d: %s has not improved for %d validations (best %.4f at step %d)",
                        step, self.monitor, self.watch["since_best"], self.watch["best"], self.watch["best_step"])
            self.stopped = True
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return dict(self.watch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.watch.update(state)


class Unfreeze:
    """finetune.freeze and finetune.unfreeze_after_epochs: the frozen parameters and whether they were made
    trainable ("unfrozen" in a checkpoint). A checkpoint written after the unfreeze holds optimizer state for those
    parameters, so loading it unfreezes first (states load before the tensors)."""

    def __init__(self, model: torch.nn.Module, cfg: DictConfig, is_main: bool = False) -> None:
        self.model, self.is_main = model, is_main
        self.frozen = ft.frozen_names(model, list(cfg.freeze))
        ft.set_trainable(model, self.frozen, False)
        self.after_epochs: int | None = cfg.unfreeze_after_epochs
        self.done = False

    def due(self, epoch: int) -> bool:
        return self.after_epochs is not None and not self.done and epoch >= self.after_epochs

    def apply(self, why: str) -> None:
        """Make the frozen parameters trainable (before the DDP model exists, or followed by its rebuild)."""
        ft.set_trainable(self.model, self.frozen, True)
        self.done = True
        if self.is_main:
            log.info("unfroze %d parameter tensors (%s); parameters by module:\n%s", len(self.frozen), why,
                     ft.parameter_table(self.model))

    def state_dict(self) -> bool:
        return self.done

    def load_state_dict(self, done: bool) -> None:
        if done and not self.done:
            self.apply("the checkpoint was written after it")

"""The built-in trainer, in pieces: `setup` builds what a rank trains with (model, optimizer, precision, loss,
loaders), `ddp` wraps the model, `state` holds what checkpoints keep besides the tensors, `decisions` are the
loop's pure decisions, `validation` evaluates, and `loop` is the Trainer that runs them step by step."""

from .decisions import Group, accumulation_groups, epoch_position, grouped, log_due, track_best, validation_due
from .loop import Trainer, train

__all__ = ["Group", "Trainer", "accumulation_groups", "epoch_position", "grouped", "log_due", "track_best", "train",
           "validation_due"]

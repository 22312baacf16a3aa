"""The training loop's decisions in this process, without ranks: accumulation groups, when to log and validate,
early stopping, and where a checkpoint resumes; and the state objects checkpoints keep besides the tensors."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from launcher.checkpoint.checkpointer import Position
from launcher.trainer import accumulation_groups, epoch_position, grouped, log_due, track_best, validation_due
from launcher.trainer.state import EarlyStopping


@pytest.mark.parametrize("n_batches, accum, sizes", [
    (16, 1, [1] * 16),
    (16, 2, [2] * 8),
    (16, 3, [3, 3, 3, 3, 3, 1]),  # the last group of the epoch is the one micro-batch left
    (17, 4, [4, 4, 4, 4, 1]),
    (2, 5, [2]),  # an epoch shorter than one group is one short group
    (0, 3, []),
])
def test_an_epoch_splits_into_groups_of_accum_and_a_short_last_one(n_batches, accum, sizes):
    assert accumulation_groups(n_batches, accum) == sizes
    assert sum(sizes) == n_batches


def test_groups_take_their_micro_batches_from_the_loader_only_as_they_are_used():
    taken: list[int] = []

    def loader():
        for i in range(7):
            taken.append(i)
            yield i

    used = []
    for group in grouped(loader(), 7, 3):
        for batch in group.micro_batches:
            assert taken[-1] == batch  # nothing drawn ahead of the micro-batch in use
            used.append((group.size, batch))
    assert used == [(3, 0), (3, 1), (3, 2), (3, 3), (3, 4), (3, 5), (1, 6)]


def test_a_loader_that_gives_more_batches_than_its_length_is_an_error():
    with pytest.raises(RuntimeError, match=r"more batches than its length \(4\)"):
        for group in grouped(iter(range(5)), 4, 2):
            list(group.micro_batches)


def test_a_log_step_every_n_steps_at_each_epoch_end_and_at_the_last_step():
    assert [s for s in range(1, 13) if log_due(s, 5, done=False, epoch_end=False)] == [5, 10]
    assert log_due(7, 5, done=False, epoch_end=True)  # the short last group of an epoch is logged
    assert log_due(7, 5, done=True, epoch_end=False)  # and so is the step training ends at
    assert log_due(3, 1, done=False, epoch_end=False)


def test_validation_is_due_by_steps():
    due = [s for s in range(1, 25) if validation_due(s, 0, False, every_steps=6, every_epochs=None)]
    assert due == [6, 12, 18, 24]
    assert validation_due(6, 0, False, every_steps=6, every_epochs=2)  # both set: either one


def test_validation_is_due_at_the_end_of_every_nth_epoch():
    ends = [e for e in range(6) if validation_due(100 + e, e, True, every_steps=None, every_epochs=2)]
    assert ends == [1, 3, 5]  # epochs are counted from 0: after the 2nd, 4th and 6th
    assert not validation_due(101, 1, False, every_steps=None, every_epochs=2)  # only at the epoch's last step
    assert not validation_due(6, 0, True, every_steps=None, every_epochs=None)


def watch() -> dict:
    return {"best": None, "best_step": None, "since_best": 0}


def test_early_stop_in_min_mode_after_patience_validations_without_a_lower_value():
    w = watch()
    stops = [track_best(w, v, step, "min", patience=2)
             for step, v in [(2, 1.0), (4, 0.8), (6, 0.9), (8, 0.7), (10, 0.7), (12, 0.75)]]
    assert stops == [False, False, False, False, False, True]  # an equal value is no improvement
    assert w == {"best": 0.7, "best_step": 8, "since_best": 2}


def test_early_stop_in_max_mode_after_patience_validations_without_a_higher_value():
    w = watch()
    stops = [track_best(w, v, step, "max", patience=3) for step, v in [(1, 0.5), (2, 0.6), (3, 0.4), (4, 0.6),
                                                                        (5, 0.1)]]
    assert stops == [False, False, False, False, True]
    assert w == {"best": 0.6, "best_step": 2, "since_best": 3}


def test_without_patience_the_best_is_tracked_and_training_never_stops():
    w = watch()
    assert not any(track_best(w, v, step, "min", patience=None) for step, v in enumerate([3.0, 4.0, 5.0, 6.0]))
    assert w == {"best": 3.0, "best_step": 0, "since_best": 3}


def test_a_resumed_watch_carries_its_count_on():
    w = {"best": 0.5, "best_step": 10, "since_best": 1}  # as a checkpoint's "monitor" state restores it
    assert track_best(w, 0.6, 14, "min", patience=2)


def test_the_position_mid_epoch_counts_global_samples_from_where_the_epoch_began():
    # 2 ranks x batch 16: each batch a rank steps is 32 samples of the epoch's global order
    assert epoch_position(7, 0, 0, 7, 16, 32) == Position(7, 0, 224)
    # an epoch resumed at sample 224 that stepped 3 more batches
    assert epoch_position(10, 0, 224, 3, 9, 32) == Position(10, 0, 320)


def test_the_position_at_an_epochs_end_is_the_next_epochs_start():
    assert epoch_position(16, 0, 0, 16, 16, 32) == Position(16, 1, 0)
    assert epoch_position(25, 1, 224, 9, 9, 32) == Position(25, 2, 0)  # also after a mid-epoch resume
    # between epochs (or before the first step of an attempt) the epoch's own start
    assert epoch_position(25, 2, 0, 0, None, 32) == Position(25, 2, 0)
    assert epoch_position(7, 0, 224, 0, None, 32) == Position(7, 0, 224)


# ------------------------------------------------------------------ the trainer's state objects, in one process
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)


def test_early_stopping_state_round_trips_and_stops_after_patience():
    es = EarlyStopping("val/loss", "min", patience=2)
    assert [es.update({"val/loss": v}, step) for step, v in [(1, 1.0), (2, 1.1), (3, 1.2)]] == [False, False, True]
    assert es.stopped
    again = EarlyStopping("val/loss", "min", patience=2)
    again.load_state_dict(json.loads(json.dumps(es.state_dict())))  # through JSON, as a checkpoint keeps it
    assert again.watch == {"best": 1.0, "best_step": 1, "since_best": 2} and not again.stopped
    with pytest.raises(ValueError, match=r"trainer.monitor is val/accuracy, but validation gave only \['val/loss'\]"):
        EarlyStopping("val/accuracy", "max", None).update({"val/loss": 0.3}, 5)


def test_unfreeze_freezes_by_glob_is_due_at_its_epoch_and_a_checkpoint_written_after_it_unfreezes():
    from launcher.trainer.state import Unfreeze
    cfg = OmegaConf.create({"freeze": ["backbone.*"], "unfreeze_after_epochs": 2})
    model = Tiny()
    u = Unfreeze(model, cfg)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["backbone.weight", "backbone.bias"]
    assert [u.due(e) for e in range(4)] == [False, False, True, True] and u.state_dict() is False
    resumed_model = Tiny()
    resumed = Unfreeze(resumed_model, cfg)
    resumed.load_state_dict(True)
    assert all(p.requires_grad for p in resumed_model.parameters()) and resumed.state_dict() is True
    assert not resumed.due(5)  # done once, never again
    kept = Unfreeze(Tiny(), cfg)
    kept.load_state_dict(False)
    assert kept.frozen and not any(p.requires_grad for n, p in kept.model.named_parameters() if n in kept.frozen)


class Recorder:
    """A checkpoint state that records what the model held when its state was handed back."""

    def __init__(self, model: nn.Module, value: object) -> None:
        self.model, self.value, self.loaded, self.weight_at_load = model, value, None, None

    def state_dict(self) -> object:
        return self.value

    def load_state_dict(self, state: object) -> None:
        self.loaded = state
        self.weight_at_load = self.model.head.weight.detach().clone()


def _cfg(tmp_path):
    from launcher import recipe
    path = tmp_path / "r.yaml"
    path.write_text("model: {_target_: torch.nn.Identity}\ndata: {train: {_target_: torch.nn.Identity}}\n"
                    "trainer: {max_steps: 1}\n")
    return recipe.load(str(path), [f"checkpoint.dir={tmp_path / 'ckpt'}"]).cfg


def test_checkpoint_states_are_saved_by_name_and_handed_back_before_the_tensors_load(tmp_path):
    from launcher.checkpoint.checkpointer import Checkpointer
    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    model = Tiny()
    saved = Recorder(model, {"layout": [[1, 0]], "flag": True})
    ckpt = Checkpointer(cfg, str(tmp_path), model, torch.optim.SGD(model.parameters(), lr=0.1),
                        {"mine": saved, "absent": None})
    assert ckpt.save(Position(step=3), "test")
    state = json.loads(next((tmp_path / "ckpt").glob("step-*/train_state.json")).read_text())
    assert state["mine"] == {"layout": [[1, 0]], "flag": True} and "absent" not in state

    torch.manual_seed(1)
    other = Tiny()
    back = Recorder(other, None)
    before = other.head.weight.detach().clone()
    untouched = Recorder(other, "mine alone")
    pos = Checkpointer(cfg, str(tmp_path), other, torch.optim.SGD(other.parameters(), lr=0.1),
                       {"mine": back, "not-in-it": untouched}).resume("auto")
    assert pos == Position(3, 0, 0)
    assert back.loaded == {"layout": [[1, 0]], "flag": True}
    assert torch.equal(back.weight_at_load, before)  # handed back before the tensors loaded
    assert torch.equal(other.head.weight, model.head.weight)  # and then the tensors loaded
    assert untouched.loaded is None  # a state the checkpoint lacks is left alone


def test_a_checkpoint_from_before_states_hands_its_extras_back(tmp_path):
    from launcher.checkpoint.checkpointer import Checkpointer
    cfg = _cfg(tmp_path)
    model = Tiny()
    assert Checkpointer(cfg, str(tmp_path), model, torch.optim.SGD(model.parameters(), lr=0.1)).save(
        Position(step=2), "test")
    folder = next((tmp_path / "ckpt").glob("step-*"))
    state = json.loads((folder / "train_state.json").read_text())
    state["extras"] = {"monitor": {"best": 0.25, "best_step": 2, "since_best": 0}}  # the earlier format
    (folder / "train_state.json").write_text(json.dumps(state))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["train_state.json"] = (folder / "train_state.json").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    es = EarlyStopping("val/loss", "min", None)
    Checkpointer(cfg, str(tmp_path), model, torch.optim.SGD(model.parameters(), lr=0.1),
                 {"monitor": es}).resume("auto")
    assert es.watch == {"best": 0.25, "best_step": 2, "since_best": 0}


def test_a_state_that_is_not_plain_data_or_takes_a_reserved_name_is_refused_naming_it(tmp_path):
    from launcher.checkpoint.checkpointer import Checkpointer, CheckpointError
    cfg = _cfg(tmp_path)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="may not be named step"):
        Checkpointer(cfg, str(tmp_path), model, opt, {"step": Recorder(model, 1)})
    ckpt = Checkpointer(cfg, str(tmp_path), model, opt, {"odd": Recorder(model, {"t": torch.zeros(1)})})
    with pytest.raises(CheckpointError, match="the odd state is not plain data"):
        ckpt.save(Position(step=1), "test")
    assert not list((tmp_path / "ckpt").glob("step-*/manifest.json"))  # nothing committed

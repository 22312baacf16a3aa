"""The training loop's decisions in this process, without ranks: accumulation groups, when to log and validate,
early stopping, and where a checkpoint resumes."""

from __future__ import annotations

import pytest

from launcher.checkpoint.checkpointer import Position
from launcher.trainer import accumulation_groups, epoch_position, grouped, log_due, track_best, validation_due


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
    w = {"best": 0.5, "best_step": 10, "since_best": 1}  # as a checkpoint's extras["monitor"] restores it
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

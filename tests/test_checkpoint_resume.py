"""Resuming with the real `launch` command and 1-3 gloo ranks, beyond the same run picking up where it stopped
(test_checkpoint): on another world size, with an incompatible model, retention and an explicit `resume=`, and
3 ranks resuming bit for bit."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import launch, launch_env, run_launch, write_recipe
from test_checkpoint import RECIPE, final_params, losses

PROBE = """\
seed: 1
model: {_target_: components.EnvIndexProbe}
data: {train: {_target_: components.IndexDataset, n: 192}, batch_size: 16, num_workers: 2}
trainer: {max_epochs: 2, log_every_steps: 1}
checkpoint: {keep: 0}
"""


# each storage once: the reshard and the data position do not depend on where the checkpoint lies
@pytest.mark.parametrize("store_kind,world", [("local", 1), ("s3", 3)], indirect=["store_kind"])
def test_resume_on_another_world_size_sees_each_sample_once(tmp_path, store, world):
    recipe = write_recipe(tmp_path, base=PROBE, name="probe.yaml")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    # 192 samples / (16 x 2) = 6 steps per epoch; stop (and save) at step 8 = epoch 1, sample 64
    launch(tmp_path, recipe, "trainer.max_steps=8", store=store, env={"PROBE_OUT": str(first)})
    r, _ = launch(tmp_path, recipe, gpus=world, store=store, env={"PROBE_OUT": str(second)})
    assert "resume: from" in r.stdout and "step 8, epoch 1, sample 64 of the epoch" in r.stdout
    assert f"written by 2 ranks and this run has {world}" in r.stdout + r.stderr
    assert "not bitwise equal" in r.stdout + r.stderr
    before = []
    for k in (0, 1):
        batches = (first / f"indices-rank{k}.txt").read_text().splitlines()
        assert len(batches) == 8
        before += [int(v) for b in batches[6:] for v in b.split(",")]  # epoch 1 before the stop
    after = [int(v) for k in range(world) for b in (second / f"indices-rank{k}.txt").read_text().splitlines()
             for v in b.split(",")]
    assert len(before) == 64
    assert sorted(before + after) == list(range(192)), "a sample of the interrupted epoch was repeated or skipped"


@pytest.mark.parametrize("store_kind", ["s3"], indirect=True)  # the check reads metadata through the storage
def test_incompatible_model_names_parameter_and_shapes(tmp_path, store):
    recipe = write_recipe(tmp_path, *RECIPE)
    launch(tmp_path, recipe, "trainer.max_steps=4", store=store)
    r, _ = launch(tmp_path, recipe, "trainer.max_steps=8", "model.hidden=24", store=store, expect=1)
    assert "parameter 'net.0.weight' has shape [16, 32] in the checkpoint and [24, 32] in the model" in r.stderr
    listing = run_launch("ckpt", "ls", store.url("run"), cwd=tmp_path, env=launch_env(**store.env)).stdout
    assert re.search(r"4 .*committed, latest", listing), "the failed resume must leave the checkpoint intact"


def test_retention_and_explicit_resume(tmp_path):
    recipe = write_recipe(tmp_path, *RECIPE, "checkpoint.keep=2", name="r.yaml")
    ckpt = tmp_path / "ck"
    launch(tmp_path, recipe, f"checkpoint.dir={ckpt}", "trainer.max_steps=16")
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000012", "step-000000016"]
    r, _ = launch(tmp_path, recipe, f"checkpoint.dir={ckpt}", "trainer.max_steps=20")
    assert f"resume: from {ckpt}/step-000000016: step 16" in r.stdout
    # the checkpoint resumed from survives until a newer one commits; then retention drops the oldest
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000016", "step-000000020"]
    # branching from an older checkpoint into the same directory would overwrite newer committed ones: refused
    r, _ = launch(tmp_path, recipe, f"checkpoint.dir={ckpt}", "trainer.max_steps=24", f"resume={ckpt}/step-000000016",
                  expect=1)
    assert "older than the newest checkpoint beside it (step 20)" in r.stderr, r.stderr
    r, _ = launch(tmp_path, recipe, f"checkpoint.dir={ckpt}", "trainer.max_steps=24", "resume=never", expect=1)
    assert "already has committed checkpoints (newest: step 20)" in r.stderr
    # ... and allowed into a new directory
    r, _ = launch(tmp_path, recipe, f"checkpoint.dir={tmp_path / 'branch'}", "trainer.max_steps=24",
                  f"resume={ckpt}/step-000000016")
    assert f"resume: from {ckpt}/step-000000016: step 16" in r.stdout
    assert sorted(p.name for p in (tmp_path / "branch").iterdir()) == ["step-000000020", "step-000000024"]
    r, _ = launch(tmp_path, recipe, f"checkpoint.dir={ckpt}", "trainer.max_steps=20", f"resume={ckpt}/step-000000004",
                  expect=1)
    assert "cannot be used" in r.stderr and "does not exist" in r.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000016", "step-000000020"], "nothing was lost"


def test_three_ranks_resume_bitwise(tmp_path):
    """Over more than 2 ranks an all-reduce's summation order depends on where each gradient sits in DDP's buckets:
    the resumed process must lay them out as the uninterrupted one did for its final parameters to match bit for
    bit."""
    from conftest import Store
    store = Store("local", tmp_path, None)
    recipe = write_recipe(tmp_path, *RECIPE)
    args = ["trainer.max_steps=12", "data.num_workers=0", "checkpoint.every_steps=4"]
    _, ref = launch(tmp_path, recipe, *args, run="ref", gpus=3, store=store)
    kill = {"KILL_AT_STEP": "7", "KILL_RANK": "2", "KILL_MARKER": str(tmp_path / "killed")}
    r, _ = launch(tmp_path, recipe, *args, gpus=3, store=store, env=kill, expect=1)
    assert "killed by signal SIGKILL" in r.stderr, r.stderr
    r, run_dir = launch(tmp_path, recipe, *args, gpus=3, store=store, env=kill)
    assert "resume: from" in r.stdout and "step 4," in r.stdout, r.stdout
    got, want = losses(run_dir), losses(ref)
    assert got == want, "per-step losses differ from the uninterrupted run"
    params, ref_params = final_params(tmp_path, store, "run", 12), final_params(tmp_path, store, "ref", 12)
    for k in ref_params:
        assert torch.equal(params[k], ref_params[k]), \
            f"final parameter {k} differs by {(params[k] - ref_params[k]).abs().max():.3g}"

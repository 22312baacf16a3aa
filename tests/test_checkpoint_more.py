"""More checkpoint behaviour with the real `launch` command and 2-3 gloo ranks: resuming on another world size,
an incompatible model, credentials kept out of every file, retention and explicit resume, bitwise resume over 3
ranks. (A file of its own, so the test workers share the checkpoint tests.)"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import launch_env, run_launch
from test_checkpoint import RECIPE, final_params, launch, losses


# each storage once: the reshard and the data position do not depend on where the checkpoint lies
@pytest.mark.parametrize("store_kind,world", [("local", 1), ("s3", 3)], indirect=["store_kind"])
def test_resume_on_another_world_size_sees_each_sample_once(tmp_path, store, world):
    recipe = tmp_path / "probe.yaml"
    recipe.write_text("""\
seed: 1
model: {_target_: components.EnvIndexProbe}
data: {train: {_target_: components.IndexDataset, n: 192}, batch_size: 16, num_workers: 2}
trainer: {max_epochs: 2, log_every_steps: 1}
checkpoint: {keep: 0}
""")
    common = ["--run-dir", str(tmp_path / "run"), f"checkpoint.dir={store.url('run')}"]
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    # 192 samples / (16 x 2) = 6 steps per epoch; stop (and save) at step 8 = epoch 1, sample 64
    r = run_launch(str(recipe), "--gpus", "2", *common, "trainer.max_steps=8", cwd=tmp_path,
                   env=launch_env(PROBE_OUT=str(first), **store.env))
    assert r.returncode == 0, r.stderr
    r = run_launch(str(recipe), "--gpus", str(world), *common, cwd=tmp_path,
                   env=launch_env(PROBE_OUT=str(second), **store.env))
    assert r.returncode == 0, r.stderr
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
    r = launch(tmp_path, store, "run", "trainer.max_steps=4")
    assert r.returncode == 0, r.stderr
    r = launch(tmp_path, store, "run", "trainer.max_steps=8", "model.hidden=24")
    assert r.returncode == 1
    assert "parameter 'net.0.weight' has shape [16, 32] in the checkpoint and [24, 32] in the model" in r.stderr
    listing = run_launch("ckpt", "ls", store.url("run"), cwd=tmp_path, env=launch_env(**store.env)).stdout
    assert re.search(r"4 .*committed, latest", listing), "the failed resume must leave the checkpoint intact"


def test_credentials_never_written(tmp_path, s3_server):
    from conftest import Store
    store = Store("s3", tmp_path, s3_server)
    secret = "Sekr3tKeyForThisTestOnly9"
    r = launch(tmp_path, store, "run", "trainer.max_steps=4", env={"AWS_SECRET_ACCESS_KEY": secret})
    assert r.returncode == 0, r.stderr
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), f"the secret key leaked into {path}"
    fs = store._fs()
    for key in fs.find(store.url("run")):
        assert secret.encode() not in fs.cat_file(key), f"the secret key leaked into {key}"
    assert secret not in r.stdout + r.stderr


def test_retention_and_explicit_resume(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("keep: 0", "keep: 2"))
    ckpt = tmp_path / "ck"
    common = [str(recipe), "--gpus", "2", "--run-dir", str(tmp_path / "run"), f"checkpoint.dir={ckpt}"]
    r = run_launch(*common, "trainer.max_steps=16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000012", "step-000000016"]
    r = run_launch(*common, "trainer.max_steps=20", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resume: from {ckpt}/step-000000016: step 16" in r.stdout
    # the checkpoint resumed from survives until a newer one commits; then retention drops the oldest
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000016", "step-000000020"]
    # branching from an older checkpoint into the same directory would overwrite newer committed ones: refused
    r = run_launch(*common, "trainer.max_steps=24", f"resume={ckpt}/step-000000016", cwd=tmp_path)
    assert r.returncode == 1 and "older than the newest checkpoint beside it (step 20)" in r.stderr, r.stderr
    r = run_launch(*common, "trainer.max_steps=24", "resume=never", cwd=tmp_path)
    assert r.returncode == 1 and "already has committed checkpoints (newest: step 20)" in r.stderr
    # ... and allowed into a new directory
    r = run_launch(*common[:-1], f"checkpoint.dir={tmp_path / 'branch'}", "trainer.max_steps=24",
                   f"resume={ckpt}/step-000000016", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resume: from {ckpt}/step-000000016: step 16" in r.stdout
    assert sorted(p.name for p in (tmp_path / "branch").iterdir()) == ["step-000000020", "step-000000024"]
    r = run_launch(*common, "trainer.max_steps=20", f"resume={ckpt}/step-000000004", cwd=tmp_path)
    assert r.returncode == 1 and "cannot be used" in r.stderr and "does not exist" in r.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000016", "step-000000020"], "nothing was lost"


def test_three_ranks_resume_bitwise(tmp_path):
    """Over more than 2 ranks an all-reduce's summation order depends on where each gradient sits in DDP's buckets:
    the resumed process must lay them out as the uninterrupted one did for its final parameters to match bit for
    bit."""
    from conftest import Store
    store = Store("local", tmp_path, None)
    args = ["trainer.max_steps=12", "data.num_workers=0", "checkpoint.every_steps=4"]
    ref = launch(tmp_path, store, "ref", *args, gpus=3)
    assert ref.returncode == 0, ref.stderr
    kill = {"KILL_AT_STEP": "7", "KILL_RANK": "2", "KILL_MARKER": str(tmp_path / "killed")}
    r = launch(tmp_path, store, "run", *args, env=kill, gpus=3)
    assert r.returncode == 1 and "killed by signal SIGKILL" in r.stderr, r.stderr
    r = launch(tmp_path, store, "run", *args, env=kill, gpus=3)
    assert r.returncode == 0, r.stderr
    assert "resume: from" in r.stdout and "step 4," in r.stdout, r.stdout
    got, want = losses(tmp_path / "run"), losses(tmp_path / "ref")
    assert got == want, "per-step losses differ from the uninterrupted run"
    params, ref_params = final_params(tmp_path, store, "run", 12), final_params(tmp_path, store, "ref", 12)
    for k in ref_params:
        assert torch.equal(params[k], ref_params[k]), \
            f"final parameter {k} differs by {(params[k] - ref_params[k]).abs().max():.3g}"



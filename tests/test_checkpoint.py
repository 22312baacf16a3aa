"""Checkpoints end to end with the real `launch` command, 2 gloo ranks, loader workers, on local disk and on a real
S3 endpoint (moto's server on 127.0.0.1): exact resume after SIGKILL, a kill during the write, damage, async saves,
a restarted group, stop requests. Resuming elsewhere (another world size, another model, an explicit checkpoint):
test_checkpoint_resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_params, launch, launch_env, run_launch, write_recipe

STEPS = 28  # 256 samples / (16 per rank x 2 ranks) = 8 steps per epoch: three and a half epochs
# conftest.BASE with these changes
RECIPE = ("seed=7", "model.dropout=0.2",
          "data.train={_target_: components.AugmentedClassification, num_samples: 256}",  # draws in loader workers
          "data.num_workers=2", "optimizer={_target_: torch.optim.AdamW, lr: 1.0e-2}",
          "lr_scheduler={_target_: torch.optim.lr_scheduler.StepLR, step_size: 5, gamma: 0.7}",
          f"trainer.max_steps={STEPS}")


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a kill and after the resume) must have logged the same value."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["step"] in out:
            assert out[row["step"]] == row["loss"], f"step {row['step']} logged two different losses"
        out[row["step"]] = row["loss"]
    return out


def final_params(tmp_path: Path, store, run: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    """The model of a checkpoint: on S3 through the real `launch ckpt export`, locally read in this process."""
    if store.kind == "local":
        return checkpoint_params(f"{store.url(run)}/step-{step:09d}")
    out = tmp_path / f"{run}-final.pt"
    r = run_launch("ckpt", "export", f"{store.url(run)}/step-{step:09d}", str(out), cwd=tmp_path,
                   env=launch_env(**store.env))
    assert r.returncode == 0, r.stderr
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """One uninterrupted run (on local disk; the storage does not change the numbers): the yardstick every resumed
    run must match bit for bit."""
    from conftest import Store
    tmp = tmp_path_factory.mktemp("ref")
    store = Store("local", tmp, None)
    _, run_dir = launch(tmp, write_recipe(tmp, *RECIPE), run="ref", store=store)
    return losses(run_dir), final_params(tmp, store, "ref")


def assert_matches(reference, tmp_path, store, run):
    ref_losses, ref_params = reference
    got = losses(tmp_path / run)
    assert sorted(got) == list(range(1, STEPS + 1))
    diff = [s for s in got if got[s] != ref_losses[s]]
    assert not diff, f"per-step losses differ from the uninterrupted run at steps {diff[:5]}"
    params = final_params(tmp_path, store, run)
    assert params.keys() == ref_params.keys()
    for k in params:
        assert torch.equal(params[k], ref_params[k]), f"final parameter {k} differs"


def test_sigkill_mid_epoch_then_relaunch_resumes_exactly(tmp_path, store, reference):
    recipe = write_recipe(tmp_path, *RECIPE)
    kill = {"KILL_AT_STEP": "14", "KILL_RANK": "1", "KILL_MARKER": str(tmp_path / "killed")}
    r, _ = launch(tmp_path, recipe, store=store, env=kill, expect=1)
    assert "killed by signal SIGKILL" in r.stderr, r.stderr
    r, _ = launch(tmp_path, recipe, store=store, env=kill)  # the same command again
    assert re.search(r"resume: from \S+step-000000012: step 12, epoch 1, sample 128 of the epoch", r.stdout), r.stdout
    assert_matches(reference, tmp_path, store, "run")


def test_kill_during_checkpoint_write_falls_back_to_previous(tmp_path, store, reference):
    # keep=1: the only committed checkpoint must survive the failed write of its successor
    recipe = write_recipe(tmp_path, *RECIPE)
    launch(tmp_path, recipe, "checkpoint.keep=1", store=store, env={"LAUNCHER_FAULT": "save.after_shards:8:1"},
           expect=1)
    listing = run_launch("ckpt", "ls", store.url("run"), cwd=tmp_path, env=launch_env(**store.env)).stdout
    assert re.search(r"8 .*NOT COMMITTED: \S+manifest.json is missing", listing), listing
    assert re.search(r"4 .*committed, latest", listing), listing
    r, _ = launch(tmp_path, recipe, "checkpoint.keep=1", store=store)
    assert re.search(r"resume: skipped \S+step-000000008: \S+manifest.json is missing", r.stdout + r.stderr)
    assert "resume: from" in r.stdout and "step-000000004: step 4" in r.stdout
    assert_matches(reference, tmp_path, store, "run")


def test_damaged_newest_checkpoints_fall_back_with_warnings(tmp_path, store):
    recipe = write_recipe(tmp_path, *RECIPE)
    launch(tmp_path, recipe, "trainer.max_steps=16", store=store)
    shard = f"{store.url('run')}/step-000000016/__1_0.distcp"
    store.truncate(shard)
    store.remove(f"{store.url('run')}/step-000000012/manifest.json")
    r, _ = launch(tmp_path, recipe, "trainer.max_steps=20", store=store)
    out = r.stdout + r.stderr
    assert re.search(r"skipped \S+step-000000016: \S+__1_0.distcp has \d+ bytes, the manifest says \d+", out), out
    assert re.search(r"skipped \S+step-000000012: \S+manifest.json is missing", out), out
    assert "step-000000008: step 8" in out


LOCAL_ONLY = pytest.mark.parametrize("store_kind", ["local"], indirect=True)  # the storage plays no part in it


def test_async_save_resumes_exactly(tmp_path, store, reference):
    recipe = write_recipe(tmp_path, *RECIPE)
    kill = {"KILL_AT_STEP": "14", "KILL_RANK": "0", "KILL_MARKER": str(tmp_path / "killed")}
    _, run_dir = launch(tmp_path, recipe, "checkpoint.async=true", store=store, env=kill, expect=1)
    assert "saving in the background" in (run_dir / "logs" / "rank0.log").read_text()
    r, _ = launch(tmp_path, recipe, "checkpoint.async=true", store=store, env=kill)
    assert re.search(r"resume: from \S+step-0000000(08|12): step", r.stdout), r.stdout
    assert_matches(reference, tmp_path, store, "run")


@LOCAL_ONLY
def test_killed_worker_restarts_group_and_resumes_exactly(tmp_path, store, reference):
    kill = {"KILL_AT_STEP": "14", "KILL_RANK": "1", "KILL_MARKER": str(tmp_path / "killed")}
    r, run_dir = launch(tmp_path, write_recipe(tmp_path, *RECIPE), "--max-restarts", "1", store=store, env=kill)
    assert (tmp_path / "killed").exists(), "the rank was never killed"
    log1 = (run_dir / "logs" / "rank1.log").read_text()
    assert "restart 0" in log1 and "restart 1" in log1, log1[-2000:]
    assert re.search(r"resume: from \S+step-000000012: step 12", r.stdout), r.stdout
    assert_matches(reference, tmp_path, store, "run")


@LOCAL_ONLY
def test_preemptible_ranks_agree_on_a_stop_at_the_next_step_with_deterministic_kernels(tmp_path, store):
    """Under SLURM (LAUNCHER_PREEMPTIBLE) the ranks agree on a stop request after every step, on a CPU side group
    of their own (no GPU synchronisation under NCCL): SIGUSR2 on rank 1 during step 10 stops both after step 10,
    not at the log step 12. trainer.deterministic switches deterministic kernels on and says so."""
    _, run_dir = launch(tmp_path, write_recipe(tmp_path, *RECIPE), "trainer.log_every_steps=3",
                        "trainer.deterministic=true", store=store,
                        env={"USR2_AT_STEP": "10", "USR2_RANK": "1", "LAUNCHER_PREEMPTIBLE": "1"})
    assert json.loads((run_dir / "preempted.json").read_text())["step"] == 10
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "stop requested: checkpointing at step 10" in log, log[-2000:]
        assert "deterministic kernels: torch.use_deterministic_algorithms(True)" in log, log[:3000]


@LOCAL_ONLY
def test_stop_request_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, store, reference):
    """SIGUSR2 reaches rank 1 only, during step 10. The ranks agree on it at the next log step (12, with
    log_every_steps=3), write one committed checkpoint there and leave preempted.json; the relaunch resumes from it
    and ends with the uninterrupted run's parameters."""
    recipe = write_recipe(tmp_path, *RECIPE)
    _, run_dir = launch(tmp_path, recipe, "trainer.log_every_steps=3", store=store,
                        env={"USR2_AT_STEP": "10", "USR2_RANK": "1"})
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["step"] == 12, marker
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "stop requested: checkpointing at step 12" in log, log[-2000:]
    assert "received SIGUSR2" in (run_dir / "logs" / "rank1.log").read_text()
    r, _ = launch(tmp_path, recipe, "trainer.log_every_steps=3", store=store)
    assert re.search(r"resume: from \S+step-000000012: step 12", r.stdout), r.stdout
    params = final_params(tmp_path, store, "run")
    for k, v in reference[1].items():
        assert torch.equal(params[k], v), f"final parameter {k} differs from the uninterrupted run"

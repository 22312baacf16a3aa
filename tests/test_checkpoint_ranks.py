"""The Checkpointer on real gloo process groups in processes of this test: a 2-rank checkpoint loaded into 1 and
3 ranks holds exactly the model and optimizer the 2 ranks had (each rank wrote about half of it), and a background
save has at most one save in flight and commits only after every rank's shard is on disk. The resharding runs
against local disk and the S3 endpoint."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from s3 import free_port

RECIPE = """\
seed: 3
model: {_target_: torch.nn.Identity}
data: {train: {_target_: launcher.zoo.datasets.SyntheticClassification}, batch_size: 4}
trainer: {max_steps: 10}
checkpoint: {keep: 0}
"""


def _rank_main(rank: int, world: int, port: int, env: dict, fn, *args) -> None:
    """One rank: join a gloo group, run fn(rank, *args), leave the group and exit. fn's objects (a DDP model among
    them) are gone before the group is destroyed, as in a training run."""
    import faulthandler
    faulthandler.enable(all_threads=True)  # a crash shows where every thread stood
    faulthandler.dump_traceback_later(50, exit=False)  # a hang shows where each rank stands
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        tdist.destroy_process_group()
    # Leave as a launcher worker does, without the interpreter's finalization: after gloo and DDP were used, that
    # aborts the process now and then ("terminate called without an active exception", no Python frame left).
    from launcher.worker import exit_now
    exit_now(0)


def _spawn(fn, world: int, *args, env: dict | None = None, timeout: float = 60) -> None:
    """Run fn(rank, *args) on each rank of a `world`-process gloo group; a rank's exception fails the test, and
    so does a hang (a collective that never completes)."""
    ctx = mp.start_processes(_rank_main, args=(world, free_port(), env or {}, fn, *args), nprocs=world, start_method="spawn",
                             join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"{fn.__name__} on {world} ranks did not finish in {timeout:.0f} s (a hang)")


def _cfg(tmp: str, ckpt: str, *overrides: str):
    from launcher import recipe
    from launcher.files import write_atomic
    path = Path(tmp) / "recipe.yaml"
    write_atomic(str(path), RECIPE)  # every rank writes it: none may read another's half-written file
    return recipe.load(str(path), [f"checkpoint.dir={ckpt}", *overrides]).cfg


def _model() -> nn.Module:
    torch.manual_seed(0)  # layers of unequal size, so the ranks' shares differ in what they hold
    return nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 3))


def _parts(tmp: str, ckpt: str, *overrides: str):
    from launcher.checkpoint.checkpointer import Checkpointer
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler, Checkpointer(_cfg(tmp, ckpt, *overrides), tmp, model, optimizer,
                                                    {"scheduler": scheduler})


def _train_and_save(rank: int, tmp: str, url: str) -> None:
    from launcher.checkpoint.checkpointer import Position
    model, optimizer, scheduler, ckpt = _parts(tmp, url)
    ddp = nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):  # ranks see different data; DDP keeps their models equal
        ddp(torch.randn(8, 12, generator=g)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    assert ckpt.save(Position(step=3, epoch=0, sample_offset=48), "test")
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}, Path(tmp) / "saved.pt")


def _assert_same_state(model, optimizer, scheduler, saved: dict, who: str) -> None:
    for k, v in saved["model"].items():
        assert torch.equal(model.state_dict()[k], v), f"{who}: parameter {k} differs from the saved one"
    got, want = optimizer.state_dict(), saved["optim"]
    assert got["state"].keys() == want["state"].keys(), f"{who}: optimizer state covers other parameters"
    for i, entry in want["state"].items():
        for name, v in entry.items():
            assert torch.equal(torch.as_tensor(got["state"][i][name]), torch.as_tensor(v)), \
                f"{who}: optimizer state {name} of parameter {i} differs from the saved one"
    assert [g["lr"] for g in got["param_groups"]] == [g["lr"] for g in want["param_groups"]], who
    assert scheduler.state_dict() == saved["scheduler"], who


def _resume(optimizer, ckpt):
    """ckpt.resume('auto'), checking that it ran no optimizer step: the optimizer's state is made to load into,
    not computed (a step on zero gradients, DCP's own way, costs the optimizer's arithmetic over the model)."""
    steps = []
    hook = optimizer.register_step_pre_hook(lambda *args: steps.append(1))
    pos = ckpt.resume("auto")
    hook.remove()
    assert not steps, "resuming ran an optimizer step"
    return pos


def _load_and_compare(rank: int, tmp: str, url: str) -> None:
    model, optimizer, scheduler, ckpt = _parts(tmp, url)
    pos = _resume(optimizer, ckpt)
    assert (pos.step, pos.sample_offset) == (3, 48)
    _assert_same_state(model, optimizer, scheduler, torch.load(Path(tmp) / "saved.pt", weights_only=True),
                       f"rank {rank} of {tdist.get_world_size()}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the 1-rank load runs without a group
def test_two_rank_checkpoint_loads_into_one_and_three_ranks_with_equal_values(tmp_path, store, monkeypatch):
    url = store.url("run")
    _spawn(_train_and_save, 2, str(tmp_path), url, env=store.env)
    manifest = json.loads(store._fs().cat_file(f"{url}/step-000000003/manifest.json"))
    shards = [manifest["files"][f"__{r}_0.distcp"] for r in (0, 1)]
    assert min(shards) > 0.3 * sum(shards), f"the ranks did not split the replicated state: shard bytes {shards}"
    # one rank, in this process (no process group), then three
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in store.env.items():
        monkeypatch.setenv(k, v)
    model, optimizer, scheduler, ckpt = _parts(str(tmp_path), url)
    assert _resume(optimizer, ckpt).step == 3
    _assert_same_state(model, optimizer, scheduler, torch.load(tmp_path / "saved.pt", weights_only=True), "1 rank")
    _spawn(_load_and_compare, 3, str(tmp_path), url, env=store.env)


# ------------------------------------------------------------------------------------------ background saves

def _async_saves(rank: int, tmp: str) -> None:
    """Two saves back to back; rank 1 writes its shard slowly. Every rank records when each of its writes and
    commits started and ended (wall clock, comparable across these processes)."""
    from launcher.checkpoint import checkpointer as ck
    events: list[tuple[str, int, float]] = []
    real_writer, real_commit = ck.dcp_io.writer, ck.Checkpointer._commit

    def writer(storage, path, *a, **kw):
        w = real_writer(storage, path, *a, **kw)
        step, write_data = int(path.rsplit("-", 1)[1]), w.write_data

        def slow_write(plan, planner):
            events.append(("write-start", step, time.time()))
            if rank == 1:
                time.sleep(1.0)
            out = write_data(plan, planner)
            out.wait()
            events.append(("write-end", step, time.time()))
            return out
        w.write_data = slow_write
        return w

    def commit(self, name, path, per_rank, train_state, *a, **kw):
        events.append(("commit-start", train_state["step"], time.time()))
        real_commit(self, name, path, per_rank, train_state, *a, **kw)
        events.append(("commit-end", train_state["step"], time.time()))

    ck.dcp_io.writer, ck.Checkpointer._commit = writer, commit
    model, optimizer, scheduler, ckpt = _parts(tmp, str(Path(tmp) / "ckpt"), "checkpoint.async=true")
    model(torch.randn(2, 12)).sum().backward()
    optimizer.step()
    manifest = Path(tmp) / "ckpt" / "step-000000001" / "manifest.json"
    assert ckpt.save(ck.Position(step=1), "test")
    returned = time.time()
    seen_early = manifest.exists()
    optimizer.step()  # training goes on while the write runs
    assert ckpt.save(ck.Position(step=2), "test")
    ckpt.wait()
    Path(tmp, f"events-{rank}.json").write_text(json.dumps({"events": events, "returned_at": returned,
                                                             "manifest_seen_early": seen_early}))


def test_background_saves_one_at_a_time_committed_after_every_shard(tmp_path):
    _spawn(_async_saves, 2, str(tmp_path))
    runs = [json.loads((tmp_path / f"events-{r}.json").read_text()) for r in (0, 1)]
    when = {(r, kind, step): t for r, run in enumerate(runs) for kind, step, t in run["events"]}
    for r in (0, 1):
        assert runs[r]["returned_at"] < when[(1, "write-end", 1)], \
            f"rank {r}'s save blocked training until rank 1's slow write ended"
    assert not runs[0]["manifest_seen_early"] and not runs[1]["manifest_seen_early"]
    for step in (1, 2):
        last_shard = max(when[(r, "write-end", step)] for r in (0, 1))
        # rank 0 commits (writes the manifest) only once every rank's shard is written and synced
        assert when[(0, "commit-start", step)] >= last_shard, f"step {step} was committed before rank 1's shard"
        manifest = tmp_path / "ckpt" / f"step-{step:09d}" / "manifest.json"
        assert manifest.stat().st_mtime >= last_shard, f"step {step}'s manifest predates rank 1's shard"
    for r in (0, 1):  # at most one save in flight: the second write starts after the first committed
        assert when[(r, "write-start", 2)] >= when[(r, "commit-end", 1)], f"rank {r} had two saves in flight"

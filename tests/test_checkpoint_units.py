"""Checkpoint pieces that need no process group: safe metadata loading, layout checks, the resumable sampler."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launcher.checkpoint import dcp_io, layout
from launcher.checkpoint.storage import Storage
from launcher.data import DistributedSampler


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/launcher-pwned",))


def test_metadata_reader_refuses_arbitrary_objects():
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        dcp_io.read_metadata(io.BytesIO(pickle.dumps(_Evil())))


def test_metadata_reader_reads_real_dcp_metadata(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.ones(3, 2, dtype=torch.bfloat16)}}, checkpoint_id=str(tmp_path), no_dist=True)
        meta = dcp_io.metadata(Storage(str(tmp_path.parent)), str(tmp_path))
    entry = meta.state_dict_metadata["model.w"]
    assert tuple(entry.size) == (3, 2) and entry.properties.dtype == torch.bfloat16


def test_inspect_reports_missing_and_short_files(tmp_path):
    step = tmp_path / "step-000000004"
    step.mkdir()
    (step / "a.bin").write_bytes(b"x" * 10)
    storage = Storage(str(tmp_path))
    assert "manifest.json is missing" in layout.inspect(storage, step.name).problem
    (step / "manifest.json").write_text(json.dumps({"format": 1, "files": {"a.bin": 10, "b.bin": 3}}))
    assert "b.bin is missing" in layout.inspect(storage, step.name).problem
    (step / "b.bin").write_bytes(b"yy")
    assert "b.bin has 2 bytes, the manifest says 3" in layout.inspect(storage, step.name).problem
    (step / "b.bin").write_bytes(b"yyy")
    info = layout.inspect(storage, step.name)
    assert info.committed and info.step == 4
    (step / "manifest.json").write_text("{not json")
    assert "unreadable" in layout.inspect(storage, step.name).problem


def test_storage_keeps_urls_intact():
    # a URL must never go through pathlib (which turns s3://b into s3:/b)
    s = Storage.__new__(Storage)
    s.root, s._fs = "s3://bucket/prefix", object()
    assert s.join("step-000000001", "manifest.json") == "s3://bucket/prefix/step-000000001/manifest.json"


@pytest.mark.parametrize("n, world, batch, start", [(64, 2, 8, 0), (64, 2, 8, 16), (63, 2, 8, 0), (63, 2, 8, 20)])
def test_sampler_resume_on_same_world_matches_uninterrupted(n, world, batch, start):
    data = list(range(n))
    for rank in range(world):
        full = DistributedSampler(data, num_replicas=world, rank=rank, seed=3, batch_size=batch)
        full.set_epoch(2)
        resumed = DistributedSampler(data, num_replicas=world, rank=rank, seed=3, batch_size=batch)
        resumed.set_epoch(2, start=start)
        assert list(resumed) == list(full)[start // world:]


def test_sampler_start_zero_equals_torch():
    data = list(range(50))
    for rank in range(3):
        ours = DistributedSampler(data, num_replicas=3, rank=rank, seed=1)
        ref = torch.utils.data.DistributedSampler(data, num_replicas=3, rank=rank, seed=1)
        ours.set_epoch(4)
        ref.set_epoch(4)
        assert list(ours) == list(ref) and len(ours) == len(ref)


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_sampler_resume_on_other_world_covers_rest_once(new_world):
    n, old_world, batch, start = 96, 2, 8, 32
    data = list(range(n))
    order = DistributedSampler(data, num_replicas=old_world, rank=0, seed=5).global_order()
    rest = []
    lengths = set()
    for rank in range(new_world):
        s = DistributedSampler(data, num_replicas=new_world, rank=rank, seed=5, batch_size=batch)
        s.set_epoch(0, start=start)
        rest += list(s)
        lengths.add(-(-len(s) // batch))
    assert sorted(order[:start] + rest) == list(range(n))
    assert len(lengths) == 1, "ranks would run different numbers of batches"


class _RunsCode:
    """Unpickling this would run a shell command (what a crafted checkpoint entry could do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_load_planner_reads_plain_entries_and_refuses_objects(tmp_path):
    import io
    import pickle

    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from launcher.checkpoint.dcp_io import SafeLoadPlanner

    def item(fqn: str) -> ReadItem:
        index = MetadataIndex(fqn)
        return ReadItem(LoadItemType.BYTE_IO, index, torch.Size([]), index, torch.Size([]), torch.Size([]))

    def saved(obj) -> io.BytesIO:
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return buf

    planner = SafeLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    planner.load_bytes(item("optim.param_groups.0.betas"), saved((0.9, 0.999)))
    assert planner.state_dict["optim.param_groups.0.betas"] == (0.9, 0.999)
    marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError, match=r"'optim.param_groups.0.lr' holds an object that is not plain"):
        planner.load_bytes(item("optim.param_groups.0.lr"), saved(_RunsCode(str(marker))))
    assert not marker.exists(), "loading a checkpoint entry ran code"

"""Checkpointing follows the training device, not torch.cuda.is_available(): with trainer.device=cpu on a GPU host
(is_available made to say True) nothing in launcher/checkpoint calls CUDA, and a real async save and load round
trip works. The CUDA paths (this rank's generator only, the device of the staging and writer threads, pinned
staging buffers that DCP does not copy again) are checked on the CPU with recorders in place of torch.cuda."""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import write_recipe

from launcher.checkpoint import dcp_io, rng
from launcher.checkpoint.rng import CudaLayout
from launcher.checkpoint.storage import Storage

# A recipe of its own, not conftest.BASE: the tests build the model and optimizer themselves; the recipe gives the
# checkpoint section.
RECIPE = """\
seed: 3
model: {_target_: torch.nn.Identity}
data: {train: {_target_: launcher.zoo.datasets.SyntheticClassification}, batch_size: 4}
trainer: {max_steps: 10, device: cpu}
checkpoint: {keep: 0}
"""
CPU = torch.device("cpu")
CHECKPOINT_CODE = str(Path(dcp_io.__file__).parent)

# torch.cuda functions that talk to a GPU. is_available (counts devices) and is_initialized (a flag) are recorded
# too, and only checkpoint code is barred from them: torch's own seeding and DCP's writer ask them.
_GPU_CALLS = ("set_device", "synchronize", "current_stream", "default_stream", "current_device", "device_count",
              "get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all", "init",
              "Event", "stream", "device")


class CudaRecorder:
    """Stands in for torch.cuda: records each call (name, args, calling file, thread) and answers with fakes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int = 4) -> None:
        self.calls: list[tuple[str, tuple, str, str]] = []
        self.count = count
        self.rng: dict[int, torch.Tensor] = {}
        self.events: list[FakeEvent] = []
        recorder = self

        def record(name: str, fake: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                recorder.calls.append((name, args, sys._getframe(1).f_code.co_filename,
                                       threading.current_thread().name))
                return fake(*args, **kwargs)
            return call

        fakes = {"is_available": lambda: True, "is_initialized": lambda: False, "device_count": lambda: self.count,
                 "get_rng_state": lambda d="cuda": self.rng.get(int(d), torch.arange(16, dtype=torch.uint8)),
                 "set_rng_state": lambda s, d="cuda": self.rng.__setitem__(int(d), s.clone()),
                 "current_stream": lambda d=None: ("stream", d), "Event": lambda *a, **k: self._event()}
        for name in ("is_available", "is_initialized", *_GPU_CALLS):
            monkeypatch.setattr(torch.cuda, name, record(name, fakes.get(name, lambda *a, **k: None)))

        def pin_memory(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            recorder.calls.append(("Tensor.pin_memory", (), sys._getframe(1).f_code.co_filename,
                                   threading.current_thread().name))
            return t  # this CPU-only torch cannot pin
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)

    def _event(self) -> FakeEvent:
        self.events.append(FakeEvent(self))
        return self.events[-1]

    def gpu_calls(self) -> list[tuple[str, tuple, str, str]]:
        return [c for c in self.calls if c[0] not in ("is_available", "is_initialized")]

    def from_checkpoint_code(self) -> list[tuple[str, tuple, str, str]]:
        return [c for c in self.calls if c[2].startswith(CHECKPOINT_CODE)]


class FakeEvent:
    def __init__(self, recorder: CudaRecorder) -> None:
        self.recorder = recorder
        self.recorded_on: Any = None
        self.synchronized_in: str | None = None

    def record(self, stream: Any = None) -> None:
        self.recorded_on = stream

    def synchronize(self) -> None:
        self.synchronized_in = threading.current_thread().name
        self.recorder.calls.append(("Event.synchronize", (), __file__, self.synchronized_in))


def _cfg(tmp: Path, *overrides: str) -> Any:
    from launcher import recipe
    path = write_recipe(tmp, base=RECIPE, name="recipe.yaml")
    return recipe.load(path, [f"checkpoint.dir={tmp / 'ckpt'}", *overrides]).cfg


def _parts(tmp: Path, *overrides: str, device: torch.device = CPU) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    from launcher.checkpoint.checkpointer import Checkpointer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, Checkpointer(_cfg(tmp, *overrides), str(tmp), model, optimizer, device=device)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return [obj] if isinstance(obj, torch.Tensor) else []


# ------------------------------------------------------------------------------------ the device decides, on CPU

def test_cpu_device_never_calls_cuda_on_a_gpu_host_and_async_round_trip_works(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as dcp_fs
    from launcher.checkpoint.checkpointer import Position

    cuda = CudaRecorder(monkeypatch)
    written: list[int] = []
    real_write_item = dcp_fs._write_item

    def write_item(transforms, stream, data, *args, **kwargs):
        if isinstance(data, torch.Tensor):
            written.append(data.data_ptr())
        return real_write_item(transforms, stream, data, *args, **kwargs)
    monkeypatch.setattr(dcp_fs, "_write_item", write_item)

    model, optimizer, ckpt = _parts(tmp_path, "checkpoint.async=true")
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert ckpt.save(Position(step=1), "test")
    after_save = torch.rand(4), random.random()  # what the resumed run must draw next
    ckpt.wait()
    buffers = {t.data_ptr() for t in _tensors(ckpt._stager._buffers)}
    assert written and set(written) <= buffers, "DCP copied the staged buffers again instead of writing them"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training went on: a second async save stages into the same buffers
    assert ckpt.save(Position(step=2), "test")
    ckpt.wait()
    assert {t.data_ptr() for t in _tensors(ckpt._stager._buffers)} == buffers

    model2, optimizer2, loader = _parts(tmp_path, "checkpoint.dir=" + str(tmp_path / "other"))
    pos = loader.resume(str(tmp_path / "ckpt" / "step-000000001"))
    assert pos is not None and pos.step == 1
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in saved.items())
    assert optimizer2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    got = torch.rand(4), random.random()
    assert torch.equal(got[0], after_save[0]) and got[1] == after_save[1], "the RNG streams were not restored"
    assert not cuda.gpu_calls(), f"trainer.device=cpu touched the GPU: {cuda.gpu_calls()}"
    assert not cuda.from_checkpoint_code(), f"launcher/checkpoint asked CUDA: {cuda.from_checkpoint_code()}"
    record = json.loads((tmp_path / "ckpt" / "step-000000001" / "rank0.json").read_text())["rng"]
    assert "cuda_device" not in record and "cuda" not in record


def test_resume_restores_the_rng_streams_on_cpu(tmp_path):
    from launcher.checkpoint.checkpointer import Position
    model, optimizer, ckpt = _parts(tmp_path)
    assert ckpt.save(Position(step=1), "test")
    expected = torch.rand(4), random.random()
    torch.rand(100)  # the streams move on
    random.random()
    _, _, loader = _parts(tmp_path, "checkpoint.dir=" + str(tmp_path / "other"))
    loader.resume(str(tmp_path / "ckpt" / "step-000000001"))
    got = torch.rand(4), random.random()
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_rng_capture_restore_round_trip_on_cpu():
    import numpy as np
    state = json.loads(json.dumps(rng.capture(CPU)))  # plain JSON
    assert set(state) == {"python", "numpy", "torch"}
    want = random.random(), np.random.rand(), torch.rand(3)
    rng.restore(state, CPU, rank=0)
    got = random.random(), np.random.rand(), torch.rand(3)
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


# ---------------------------------------------------------------------------------- CUDA paths, with fake CUDA

def test_capture_saves_only_this_ranks_device_with_its_layout(monkeypatch):
    cuda = CudaRecorder(monkeypatch, count=4)
    cuda.rng[2] = torch.full((16,), 7, dtype=torch.uint8)
    state = rng.capture(torch.device("cuda", 2))
    assert "cuda" not in state
    record = state["cuda_device"]
    assert (record["index"], record["count"]) == (2, 4)
    assert rng._tensor(record["state"]).tolist() == [7] * 16
    assert [c[:2] for c in cuda.gpu_calls() if c[0].endswith("rng_state")] == [("get_rng_state", (2,))], \
        "captured other devices' generators"


def test_restore_puts_the_state_on_this_ranks_device(monkeypatch, caplog):
    cuda = CudaRecorder(monkeypatch, count=4)
    saved = {**rng.capture(CPU), "cuda_device": rng.cuda_record(rng._b64(torch.full((16,), 5, dtype=torch.uint8)),
                                                                 CudaLayout(1, 4))}
    with caplog.at_level(logging.WARNING, logger="launcher"):
        rng.restore(saved, torch.device("cuda", 1), rank=1)
    assert not caplog.records
    assert [c[0] for c in cuda.gpu_calls() if "rng" in c[0]] == ["set_rng_state"]
    assert cuda.rng[1].tolist() == [5] * 16 and set(cuda.rng) == {1}


def test_restore_onto_another_gpu_split_warns_with_both_layouts(monkeypatch, caplog):
    cuda = CudaRecorder(monkeypatch, count=2)
    saved = {**rng.capture(CPU), "cuda_device": rng.cuda_record(rng._b64(torch.ones(16, dtype=torch.uint8)),
                                                                 CudaLayout(3, 4))}
    with caplog.at_level(logging.WARNING, logger="launcher"):
        rng.restore(saved, torch.device("cuda", 1), rank=3)
    assert cuda.rng[1].tolist() == [1] * 16, "the rank's own state goes onto its device"
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning == ("resume: rank 3: CUDA RNG state saved from cuda:3 of 4 visible GPUs was restored onto cuda:1 "
                       "of 2 visible GPUs: the GPU layout changed since the save, so this rank's random stream "
                       "continues on another device")


def test_restore_on_cpu_of_a_gpu_checkpoint_warns_and_asks_cuda_nothing(monkeypatch, caplog):
    cuda = CudaRecorder(monkeypatch)
    saved = {**rng.capture(CPU), "cuda_device": {"index": 1, "count": 8, "state": rng._b64(torch.ones(16))}}
    with caplog.at_level(logging.WARNING, logger="launcher"):
        rng.restore(saved, CPU, rank=5)
    assert [r.getMessage() for r in caplog.records] == [
        "resume: rank 5: CUDA RNG state not restored: saved from cuda:1 of 8 visible GPUs, this rank now runs on "
        "cpu (no CUDA device)"]
    assert not cuda.calls


def test_old_format_with_every_devices_state_is_still_read(monkeypatch, caplog):
    cuda = CudaRecorder(monkeypatch, count=3)
    states = [rng._b64(torch.full((16,), i, dtype=torch.uint8)) for i in range(3)]
    old = {**rng.capture(CPU), "cuda": states}
    with caplog.at_level(logging.WARNING, logger="launcher"):
        rng.restore(old, torch.device("cuda", 2), rank=2)
    assert not caplog.records
    assert set(cuda.rng) == {2} and cuda.rng[2].tolist() == [2] * 16


@pytest.mark.parametrize("saved, current, state, warning", [
    ({"cuda_device": {"index": 0, "count": 2, "state": "S"}}, CudaLayout(0, 2), "S", None),
    ({"cuda_device": {"index": 0, "count": 2, "state": "S"}}, CudaLayout(1, 2), "S",
     "rank 7: CUDA RNG state saved from cuda:0 of 2 visible GPUs was restored onto cuda:1 of 2 visible GPUs"),
    ({"cuda_device": {"index": 0, "count": 1, "state": "S"}}, None, None,
     "rank 7: CUDA RNG state not restored: saved from cuda:0 of 1 visible GPU, this rank now runs on cpu"),
    ({"cuda": ["A", "B"]}, CudaLayout(1, 2), "B", None),
    ({"cuda": ["A", "B"]}, CudaLayout(1, 4), None,
     "rank 7: CUDA RNG state not restored: saved from all 2 visible GPUs (an older checkpoint, which does not "
     "record this rank's device), this rank now runs on cuda:1 of 4 visible GPUs, so which saved state was this "
     "rank's is unknown"),
    ({"cuda": ["A", "B"]}, None, None, "rank 7: CUDA RNG state not restored: saved from all 2 visible GPUs"),
    ({}, CudaLayout(0, 8), None, "rank 7: CUDA RNG state not restored: the checkpoint holds none (saved on cpu), "
                                 "this rank now runs on cuda:0 of 8 visible GPUs"),
    ({}, None, None, None),
])
def test_plan_cuda_restore(saved, current, state, warning):
    got_state, got_warning = rng.plan_cuda_restore(saved, current, rank=7)
    assert got_state == state
    assert (got_warning is None) if warning is None else got_warning.startswith(warning)


def test_cuda_staging_pins_once_records_on_the_devices_stream_and_waits_on_that_device(monkeypatch):
    cuda = CudaRecorder(monkeypatch)
    dev = torch.device("cuda", 3)
    stager = dcp_io.ReusingStager(dev)
    state = {"model": {"w": torch.randn(4, 3), "b": torch.randn(3)}, "optim": {"step": torch.tensor(2.0)}}
    staged = stager.stage(state).result(timeout=10)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(staged), _tensors(state)))
    [event] = cuda.events
    assert event.recorded_on == ("stream", dev), "the copies' event must be recorded on the training device's stream"
    staging = [c for c in cuda.calls if c[3] == "checkpoint-staging"]
    assert [c[:2] for c in staging] == [("set_device", (dev,)), ("Event.synchronize", ())], \
        "the staging thread must select the training device before its first CUDA call"
    pinned = len([c for c in cuda.calls if c[0] == "Tensor.pin_memory"])
    assert pinned == 2  # the 0-dim step count is made as a plain tensor by DCP's helper
    buffers = [t.data_ptr() for t in _tensors(stager._buffers)]
    stager.stage(state).result(timeout=10)
    assert [t.data_ptr() for t in _tensors(stager._buffers)] == buffers
    assert len([c for c in cuda.calls if c[0] == "Tensor.pin_memory"]) == pinned, "the buffers were pinned again"
    stager.synchronize_staging()
    assert cuda.calls[-1][:2] == ("synchronize", (dev,))


def test_cpu_staging_asks_cuda_nothing(monkeypatch):
    cuda = CudaRecorder(monkeypatch)
    staged = dcp_io.ReusingStager(CPU).stage({"w": torch.ones(2)})
    assert isinstance(staged, dict) and torch.equal(staged["w"], torch.ones(2))
    dcp_io.ReusingStager(CPU).synchronize_staging()
    assert not cuda.calls


@pytest.mark.parametrize("device, staged, copy_ahead", [
    (CPU, False, 0), (CPU, True, 0), (torch.device("cuda", 1), True, 0), (torch.device("cuda", 1), False, 10_000_000)])
def test_writer_copies_ahead_through_cuda_only_for_a_sync_save_from_cuda(tmp_path, device, staged, copy_ahead):
    w = dcp_io.writer(Storage(str(tmp_path)), str(tmp_path / "step-000000001"), device=device, staged=staged)
    assert w.per_thread_copy_ahead == copy_ahead
    assert w.device == device


def test_dcp_writer_thread_runs_on_the_training_device(tmp_path, monkeypatch):
    import warnings

    import torch.distributed.checkpoint as dcp
    calls: list[tuple[Any, str]] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((d, threading.current_thread().name)))
    dev = torch.device("cuda", 2)
    writer = dcp_io.writer(Storage(str(tmp_path)), str(tmp_path / "step-000000001"), device=dev, staged=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        future = dcp.async_save({"model": {"w": torch.ones(3)}}, storage_writer=writer,
                                async_stager=dcp_io.ReusingStager(CPU))
        future.result(timeout=30)
    threads = {name for d, name in calls if d == dev}
    assert any(name.startswith("AsyncCheckpointExecutor") for name in threads), calls
    assert threading.current_thread().name not in threads

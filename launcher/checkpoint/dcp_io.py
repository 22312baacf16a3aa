"""torch.distributed.checkpoint readers and writers for a Storage, with a metadata reader that unpickles nothing
but DCP's own metadata classes (DCP's stock reader runs `pickle.load` on `.metadata`), and a load planner that reads
non-tensor entries (the optimizer's param_groups) with `torch.load(weights_only=True)` (DCP's stock planner uses
weights_only=False). Tensor data is raw storage, never unpickled."""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import Future
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.staging import AsyncStager

from .storage import Storage

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,  # every class of DCP's metadata module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex", "tuple", "list", "dict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, set())
        if module in _ALLOWED and (allowed is None or name in allowed):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never "
                                     f"needs; refusing to load it")


def read_metadata(stream: Any) -> Metadata:
    return _MetadataUnpickler(stream).load()


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that a non-tensor entry is read with weights_only=True: plain Python
    data (numbers, strings, tuples, lists, dicts) loads, any other object is refused instead of run."""

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"checkpoint entry '{read_item.dest_index.fqn}' holds an object that is "
                                         f"not plain data; refusing to load it ({str(e).splitlines()[0][:200]})") \
                from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DCP's own planner uses
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _SafeMetadataMixin:
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)  # type: ignore[attr-defined]
        with self.fs.create_stream(path, "rb") as f:  # type: ignore[attr-defined]
            metadata = read_metadata(f)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata


class SafeFileSystemReader(_SafeMetadataMixin, FileSystemReader):
    pass


def writer(storage: Storage, path: str, thread_count: int = 1, cache_staging: bool = False) -> Any:
    """A DCP writer: local files are fsynced; `cache_staging` keeps async staging buffers for the next save."""
    if storage.remote:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        return FsspecWriter(path, sync_files=False, thread_count=thread_count, overwrite=True, **storage.fs_kwargs)
    return FileSystemWriter(path, sync_files=True, thread_count=thread_count, overwrite=True,
                            cache_staged_state_dict=cache_staging and torch.cuda.is_available())


class ReusingStager(AsyncStager):
    """Async-save staging into host buffers that are allocated once and reused by every later save (DCP's own
    cache pins memory, which needs CUDA). A copy is what makes training safe to go on while the write runs.

    On the CPU the copy is done when stage() returns. From CUDA the copies into pinned memory are queued on the
    current stream and stage() returns a future that completes when they have landed: training goes on at once
    (its next kernels on that stream run after the copies, so they cannot change what is copied), and the
    writer thread waits for the future before it reads a byte."""

    _synchronize_after_execute = False

    def __init__(self) -> None:
        self._buffers: Any = None
        self._keys: Any = None

    def stage(self, state_dict: Any) -> Any:
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        keys = _structure(state_dict)
        if self._buffers is None or keys != self._keys:
            self._buffers = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
            self._keys = keys
        cuda = torch.cuda.is_available()
        staged = _copy_state_dict(state_dict, self._buffers, non_blocking=cuda)
        if not cuda:
            return staged
        event = torch.cuda.Event()
        event.record()
        future: Future = Future()

        def landed() -> None:
            try:
                event.synchronize()
                future.set_result(staged)
            except BaseException as e:  # surfaces in the writer, which fails the save
                future.set_exception(e)
        threading.Thread(target=landed, name="checkpoint-staging", daemon=True).start()
        return future

    def synchronize_staging(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def close(self) -> None:
        self._buffers = None


def _structure(obj: Any) -> Any:
    if isinstance(obj, dict):
        return tuple((k, _structure(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return tuple(_structure(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape), obj.dtype, obj.device.type)
    return type(obj).__name__


def reader(storage: Storage, path: str) -> Any:
    if storage.remote:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        class SafeFsspecReader(_SafeMetadataMixin, FsspecReader):
            pass
        return SafeFsspecReader(path, **storage.fs_kwargs)
    return SafeFileSystemReader(path)


def metadata(storage: Storage, path: str) -> Metadata:
    """The DCP metadata of a checkpoint folder (tensor names, shapes, dtypes), read safely."""
    import io
    return read_metadata(io.BytesIO(storage.read_bytes(storage.sub(path, ".metadata"))))


def model_state(storage: Storage, path: str) -> dict[str, torch.Tensor]:
    """The model's full state_dict from a checkpoint folder, as CPU tensors, read in this process alone."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = metadata(storage, path)
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
        dcp.load(state, storage_reader=reader(storage, path), planner=SafeLoadPlanner(), no_dist=True)
    return {k[len("model."):]: v for k, v in state.items()}

"""torch.distributed.checkpoint readers and writers for a Storage, with a metadata reader that unpickles nothing
but DCP's own metadata classes (DCP's stock reader runs `pickle.load` on `.metadata`) and refuses data files outside
the step folder, and a load planner that reads non-tensor entries (the optimizer's param_groups) with
`torch.load(weights_only=True)` (DCP's stock planner uses weights_only=False). Tensor data is raw storage, never
unpickled."""

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

# Exactly the (module, name) pairs DCP's `.metadata` pickle refers to (found with pickletools.dis over the files this
# torch writes), and nothing else: no dotted names (protocol 4 resolves `os.system` under a module through its
# attributes) and no functions but the one layout lookup. torch dtypes are allowed by value, see _MetadataUnpickler.
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # a lookup in a table of torch.layout values
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath"}),  # StorageMeta.checkpoint_id
    "pathlib._local": frozenset({"PosixPath", "PurePosixPath"}),  # the same classes, as Python 3.13+ names them
    "collections": frozenset({"OrderedDict"}),
}


class MetadataRefused(pickle.UnpicklingError):
    """A `.metadata` file that is not plain DCP metadata: it names another Python global, or its storage entries
    point outside the step folder. Nothing in it was run."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, stream: Any, source: str) -> None:
        super().__init__(stream)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        dtype = vars(torch).get(name) if module == "torch" else None  # no module __getattr__, no dotted names
        if isinstance(dtype, torch.dtype):
            return dtype
        raise MetadataRefused(f"{self.source} refers to the Python global {module}.{name}, which DCP metadata "
                              f"never holds; refusing to load it (nothing in it was run). The file is crafted or "
                              f"foreign: use another checkpoint, and do not trust this one")

    def persistent_load(self, pid: Any) -> Any:
        raise MetadataRefused(f"{self.source} holds a persistent reference, which DCP metadata never holds; "
                              f"refusing to load it")


def read_metadata(stream: Any, source: str = "checkpoint metadata") -> Metadata:
    """DCP metadata from `stream` (the file `source`), unpickling only DCP's own classes; raises MetadataRefused
    for anything else, or when a storage entry's file lies outside the step folder."""
    try:
        meta = _MetadataUnpickler(stream, source).load()
    except (MetadataRefused, OSError):
        raise
    except Exception as e:  # a pickle that is not what DCP writes: wrong arguments, truncated, not a pickle
        raise MetadataRefused(f"{source} is not DCP metadata ({type(e).__name__}: {str(e)[:200]}); refusing to "
                              f"load it") from None
    if not isinstance(meta, Metadata):
        raise MetadataRefused(f"{source} holds a {type(meta).__name__}, not DCP metadata; refusing to load it")
    if not isinstance(meta.storage_data, dict):
        raise MetadataRefused(f"{source} has no table of data files; refusing to load it")
    for item in meta.storage_data.values():
        rel = getattr(item, "relative_path", None)
        problem = _outside(rel)
        if problem:
            raise MetadataRefused(f"{source} names the data file {rel!r}, which {problem}; refusing to load it")
    return meta


def _outside(rel: Any) -> str | None:
    """Why a storage entry's relative path would leave the step folder, or None when it stays inside."""
    if not isinstance(rel, str) or not rel:
        return "is not a file name"
    if "\\" in rel or "\0" in rel or ":" in rel:
        return "is not a plain relative path"
    if rel.startswith("/"):
        return "is an absolute path"
    if ".." in rel.split("/"):
        return "leaves the step folder (a '..' component)"
    return None


def newest_usable(storage: Storage) -> tuple[Any, list[Any]]:
    """`layout.newest_committed`, passing over checkpoints whose metadata is refused too: what `resume: auto`,
    a checkpoint directory given to `finetune.init_from` and `launch ckpt export` take."""
    from . import layout
    return layout.newest_committed(storage, check=lambda c: refusal(storage, c.path))


def unusable(storage: Storage, info: Any) -> str | None:
    """Why the step folder `info` cannot be read (not committed, or its metadata refused), or None."""
    return info.problem if not info.committed else refusal(storage, info.path)


def refusal(storage: Storage, path: str) -> str | None:
    """Why the checkpoint folder `path`'s metadata is refused (a crafted global, a path out of the folder), or None
    when it reads as plain DCP metadata. Storage errors propagate: they say nothing about the file."""
    try:
        metadata(storage, path)
    except MetadataRefused as e:
        return str(e)
    return None


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
            metadata = read_metadata(f, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata


class SafeFileSystemReader(_SafeMetadataMixin, FileSystemReader):
    pass


def use_device(device: torch.device) -> None:
    """Make `device` the current CUDA device of the calling thread (a no-op off CUDA). A new thread starts on
    cuda:0, and its first CUDA call would open a context there: every rank's threads would crowd GPU 0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


class _OnDevice:
    """A DCP writer that makes its training device current in whichever thread DCP runs it (DCP's async writer
    thread among them) before it does any work. `storage_meta` is the first call `dcp.save` makes on a writer."""

    def __init__(self, *args: Any, device: torch.device, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device = device

    def storage_meta(self, *args: Any, **kwargs: Any) -> Any:
        use_device(self.device)
        return super().storage_meta(*args, **kwargs)  # type: ignore[misc]

    def write_data(self, *args: Any, **kwargs: Any) -> Any:
        use_device(self.device)
        return super().write_data(*args, **kwargs)  # type: ignore[misc]


class _DeviceFileSystemWriter(_OnDevice, FileSystemWriter):
    pass


def writer(storage: Storage, path: str, *, device: torch.device, staged: bool = False, thread_count: int = 1) -> Any:
    """A DCP writer for `path` that runs on the training `device`; local files are fsynced.

    `staged`: the state is already in host memory (an async save's pinned staging buffers), and is written from
    those buffers as they are. DCP's copy-ahead loader (copies to the host through a CUDA stream, chosen whenever
    CUDA is available) is used only for a synchronous save from a CUDA device: for staged buffers, or when training
    off CUDA on a GPU host, it would copy nothing and only open streams on the GPU. The writer never stages (an
    async save passes our stager, so DCP does not copy the staged buffers again)."""
    copy_ahead: dict[str, Any] = {} if device.type == "cuda" and not staged else {"per_thread_copy_ahead": 0}
    if storage.remote:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        class _DeviceFsspecWriter(_OnDevice, FsspecWriter):
            pass
        return _DeviceFsspecWriter(path, sync_files=False, thread_count=thread_count, overwrite=True,
                                   device=device, **copy_ahead, **storage.fs_kwargs)
    return _DeviceFileSystemWriter(path, sync_files=True, thread_count=thread_count, overwrite=True, device=device,
                                   **copy_ahead)


class ReusingStager(AsyncStager):
    """Async-save staging into host buffers that are allocated once and reused by every later save (pinned when
    training on CUDA, so the copies from the GPU run asynchronously). A copy is what makes training safe to go on
    while the write runs.

    Off CUDA the copy is done when stage() returns, and CUDA is never asked anything. From a CUDA `device` the
    copies into pinned memory are queued on that device's current stream and stage() returns a future that
    completes when they have landed: training goes on at once (its next kernels on that stream run after the
    copies, so they cannot change what is copied), and the writer thread waits for the future before it reads a
    byte. The thread that waits for the copies runs on `device`."""

    _synchronize_after_execute = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._buffers: Any = None
        self._keys: Any = None

    def stage(self, state_dict: Any) -> Any:
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        keys = _structure(state_dict)
        if self._buffers is None or keys != self._keys:
            self._buffers = _create_cpu_state_dict(state_dict, pin_memory=self._cuda)
            self._keys = keys
        staged = _copy_state_dict(state_dict, self._buffers, non_blocking=self._cuda)
        if not self._cuda:
            return staged
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        future: Future = Future()

        def landed() -> None:
            try:
                use_device(self.device)
                event.synchronize()
                future.set_result(staged)
            except BaseException as e:  # surfaces in the writer, which fails the save
                future.set_exception(e)
        threading.Thread(target=landed, name="checkpoint-staging", daemon=True).start()
        return future

    def synchronize_staging(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

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
    source = storage.sub(path, ".metadata")
    return read_metadata(io.BytesIO(storage.read_bytes(source)), source)


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

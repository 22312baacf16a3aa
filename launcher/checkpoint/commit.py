"""The commit half of a save, run by rank 0, and what the ranks tell each other about it.

Rank 0 checks that every file the DCP metadata names is there and long enough, writes train_state.json and then
manifest.json last: only then is the checkpoint committed. Retention runs after a commit and never touches a
checkpoint newer than the committed one. Save failures are sorted here into those worth retrying and those that
will not go away by themselves.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from typing import Any

import torch.distributed as tdist
from torch.distributed.checkpoint.api import CheckpointException

from .. import __version__
from . import layout
from .storage import Storage

log = logging.getLogger("launcher")


def verify_and_write_manifest(storage: Storage, name: str, path: str, reports: list[dict], train_state: dict,
                              metadata: Any, world_size: int, recipe_hash: str) -> dict[str, Any]:
    """Commit checkpoint `name` at `path` when every rank reported success and every file is in place:
    {"problem": None, "bytes": total size} on success, else {"problem": what is wrong, "bytes": 0}."""
    bad = [r["problem"] for r in reports if r["problem"]]
    if bad:
        return {"problem": "; ".join(bad), "bytes": 0}
    needed: dict[str, int] = {".metadata": 1}
    for item in metadata.storage_data.values():  # every shard file, and how far into it data must reach
        rel = str(item.relative_path)
        needed[rel] = max(needed.get(rel, 0), int(item.offset) + int(item.length))
    for r in range(world_size):
        needed[layout.rank_file(r)] = 1
    try:
        storage.write_text(storage.sub(path, layout.TRAIN_STATE), json.dumps(train_state))
        needed[layout.TRAIN_STATE] = 1
        files = storage.list_files(path)
        for fname, minimum in sorted(needed.items()):
            if fname not in files:
                return {"problem": f"{storage.sub(path, fname)} is missing after the write", "bytes": 0}
            if files[fname] < minimum:
                return {"problem": f"{storage.sub(path, fname)} has {files[fname]} bytes, its data reaches byte "
                                   f"{minimum}", "bytes": 0}
        sizes = {f: files[f] for f in needed}
        manifest = {"format": layout.FORMAT, "step": train_state["step"], "epoch": train_state["epoch"],
                    "sample_offset": train_state["sample_offset"], "world_size": world_size,
                    "recipe_hash": recipe_hash, "launcher_version": __version__, "created": time.time(),
                    "metrics": train_state.get("metrics") or {}, "files": sizes}
        storage.write_text(storage.sub(path, layout.MANIFEST), json.dumps(manifest, indent=1))
    except OSError as e:
        return {"problem": f"writing {name} failed: {e}", "bytes": 0}
    return {"problem": None, "bytes": sum(sizes.values())}


def retain(storage: Storage, keep: int, keep_best: int, monitor: str, mode: str, refused: set[str]) -> None:
    """Keep the newest `keep` committed checkpoints (and the `keep_best` best by `monitor`); drop older ones and
    unfinished folders older than them. Folders in `refused` are never counted nor removed."""
    if keep <= 0:
        return
    found = [c for c in layout.scan(storage) if c.name not in refused]
    committed = [c for c in found if c.committed]
    if not committed:
        return
    kept = {c.name for c in committed[:keep]}
    if keep_best:  # and the k best by the monitored metric, among those that have it
        scored = [c for c in committed if monitor in (c.manifest or {}).get("metrics", {})]
        scored.sort(key=lambda c: c.manifest["metrics"][monitor], reverse=mode == "max")  # type: ignore[index]
        kept |= {c.name for c in scored[:keep_best]}
    newest = committed[0].step
    for c in found:
        if c.name in kept or c.step >= newest:
            continue
        storage.remove_tree(c.path)
        log.info("checkpoint %s removed (%s)", c.path, "retention: keep %d" % keep if c.committed else "never committed")


_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def failures(e: BaseException) -> list[tuple[int | None, BaseException]]:
    """(rank, exception) for each rank's failure inside DCP's CheckpointException, else the error itself."""
    if isinstance(e, CheckpointException):
        out = []
        for rank, failure in sorted(e.failures.items()):
            exc = failure[0] if isinstance(failure, tuple) else failure
            out.append((rank, exc))
        return out
    return [(None, e)]


def first_failure(e: BaseException) -> str:
    rank, exc = failures(e)[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"rank {rank}: {type(exc).__name__}: {text}" if rank is not None else text


def permanent(e: BaseException) -> bool:
    """A failure retrying cannot fix: a full disk, a quota, a refused permission, a read-only file system."""
    for _, exc in failures(e):
        while exc is not None:
            if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
                return True
            exc = exc.__cause__ or exc.__context__
    return False


def broadcast(obj: Any, group: Any) -> Any:
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, group=group)
    return box[0]

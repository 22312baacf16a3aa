"""Local files that readers see either as before or whole: a temporary name beside the target, then `os.replace`.

Standard library only, so the torch-free submit path (cli, recipe, backends.slurm) can import it. Remote (fsspec)
paths do not come here: `checkpoint.storage.Storage.write_text` uses a single PUT for those.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# In a run directory: {"reason": ...}, left by `launch sweep` (pruning a trial, or stopping); the trainer's rank 0
# reads it at log steps, and every rank stops at that step with a committed checkpoint.
STOP_REQUEST = "stop-request.json"


@contextlib.contextmanager
def temporary_path(path: str) -> Iterator[str]:
    """A temporary name in `path`'s directory for the caller to write; renamed onto `path` when the block ends,
    removed when it raises. For writers that want a file name (`torch.save`); `write_atomic` for plain data."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str, data: str | bytes, *, fsync: bool = False) -> None:
    """Write `data` to `path` through a temporary name: text in text mode (the platform's default encoding, as
    `open(path, "w")`), bytes as they are. `fsync` makes the file and the rename durable (the file is synced
    before the rename, its directory after it) for files that must survive a machine crash, such as checkpoint
    markers; without it the rename is atomic but may be lost in a crash."""
    with temporary_path(path) as tmp:
        with open(tmp, "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    if fsync:
        _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    """Make a rename in directory `path` durable; best effort (some file systems cannot sync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tail_lines(path: str, n: int, max_bytes: int = 16384) -> list[str]:
    """The last n lines of a text file, read from its last max_bytes ([] when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []

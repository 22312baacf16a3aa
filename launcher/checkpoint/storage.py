"""Where checkpoints live: a local directory, or any fsspec URL (`s3://bucket/prefix`). No torch import here.

A path containing `://` goes through fsspec (imported only then); anything else through `os`. Paths stay strings:
`pathlib.Path("s3://b/k")` would turn the URL into `s3:/b/k`. S3 credentials come from the standard AWS chain
(environment, profile, instance role) and are never written anywhere by the launcher; an S3-compatible endpoint
(MinIO, Ceph, moto) comes from `checkpoint.endpoint_url` or the AWS_ENDPOINT_URL(_S3) environment variables.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from typing import Any

from ..files import write_atomic


def is_url(path: str) -> bool:
    return "://" in path


class Storage:
    """A tiny file-system interface over a root directory or URL."""

    def __init__(self, root: str, endpoint_url: str | None = None) -> None:
        self.root = root.rstrip("/") if is_url(root) else os.path.abspath(root)
        self.endpoint_url = endpoint_url
        self._fs: Any = None
        if is_url(self.root):
            import fsspec

            kwargs: dict[str, Any] = {}
            protocol = self.root.split("://", 1)[0]
            if protocol in ("s3", "s3a"):
                endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                if endpoint:
                    kwargs["endpoint_url"] = endpoint
                kwargs["skip_instance_cache"] = True
            self._fs, _ = fsspec.url_to_fs(self.root, **kwargs)
            self.fs_kwargs = kwargs
        else:
            self.fs_kwargs = {}

    @property
    def remote(self) -> bool:
        return self._fs is not None

    def join(self, *parts: str) -> str:
        if self.remote:
            return posixpath.join(self.root, *parts)
        return os.path.join(self.root, *parts)

    def sub(self, path: str, *parts: str) -> str:
        """`path` (under this storage) joined with more parts."""
        if self.remote:
            return posixpath.join(path, *parts)
        return os.path.join(path, *parts)

    def _strip(self, path: str) -> str:
        return path.split("://", 1)[1] if is_url(path) else path

    def _invalidate(self, path: str | None = None) -> None:
        if self.remote:
            self._fs.invalidate_cache(self._strip(path) if path else None)

    # ------------------------------------------------------------------ reading
    def list_dirs(self) -> list[str]:
        """Names of the entries directly under the root (empty when the root does not exist)."""
        if not self.remote:
            if not os.path.isdir(self.root):
                return []
            return sorted(os.listdir(self.root))
        self._invalidate()
        try:
            entries = self._fs.ls(self._strip(self.root), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def list_files(self, directory: str) -> dict[str, int]:
        """name -> size of the files in a directory (hidden ones such as DCP's .metadata included)."""
        if not self.remote:
            if not os.path.isdir(directory):
                return {}
            return {n: os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
                    if os.path.isfile(os.path.join(directory, n))}
        self._invalidate(directory)
        try:
            entries = self._fs.ls(self._strip(directory), detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries
                if e.get("type") != "directory"}

    def read_bytes(self, path: str) -> bytes:
        if not self.remote:
            with open(path, "rb") as f:
                return f.read()
        return self._fs.cat_file(self._strip(path))

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    def is_dir(self, path: str) -> bool:
        if not self.remote:
            return os.path.isdir(path)
        self._invalidate(path)
        try:
            return bool(self._fs.isdir(self._strip(path)))
        except FileNotFoundError:
            return False

    # ------------------------------------------------------------------ writing
    def makedirs(self, path: str) -> None:
        if not self.remote:
            os.makedirs(path, exist_ok=True)
        # object stores have no directories

    def write_text(self, path: str, text: str) -> None:
        """Write a small file so that readers see either nothing or all of it (tmp + fsync + rename locally;
        a single PUT on object stores)."""
        data = text.encode("utf-8")
        if not self.remote:
            write_atomic(path, data, fsync=True)
            return
        self._fs.pipe_file(self._strip(path), data)
        self._invalidate(path)

    def write_bytes(self, path: str, data: bytes, part_size: int | None = None) -> None:
        """Write a file as a checkpoint shard is written: a stream (on object stores in parts of `part_size`
        bytes, a multipart upload once the data is larger)."""
        if not self.remote:
            write_atomic(path, data)
            return
        kwargs = {"block_size": part_size} if part_size else {}
        with self._fs.open(self._strip(path), "wb", **kwargs) as f:
            f.write(data)
        self._invalidate(path)

    def remove_tree(self, path: str) -> None:
        if not self.remote:
            shutil.rmtree(path, ignore_errors=True)
            return
        try:
            self._fs.rm(self._strip(path), recursive=True)
        except FileNotFoundError:
            pass
        self._invalidate(path)

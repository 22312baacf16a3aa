"""The checkpoint directory, tried before a run depends on it: every rank writes a small object, rank 0 also one
larger than the multipart threshold, each is read back and checksummed, listed and deleted. Then the estimated
size of the checkpoints to keep against the free space, where that can be known (a local file system).

Every operation has a deadline, so an endpoint that does not answer is named instead of hanging the doctor; the
probe folder (`.doctor-<id>` in the checkpoint directory) is removed, and a directory the doctor had to create is
removed again."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from typing import Any, Callable

from omegaconf import DictConfig

from ..checkpoint.storage import Storage
from ..dist import RankInfo
from .report import FAIL, PASS, WARN, Result

PART = 5 * 2**20  # S3's smallest part: the large probe (PART + 1 MiB) goes up in two parts
DEADLINE_S = 30.0


def _timed(what: str, fn: Callable[[], Any], deadline: float) -> Any:
    """fn() in a daemon thread, waited for `deadline` seconds: one that never answers is left behind (and does not
    hold the rank's exit, as a thread pool's worker would)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=call, name="doctor-storage", daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        raise TimeoutError(f"{what}: no answer within {deadline:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _first_existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check(cfg: DictConfig, info: RankInfo, probe_id: str, estimate_bytes: int | None,
          deadline: float = DEADLINE_S) -> Result:
    t0 = time.perf_counter()
    root = str(cfg.checkpoint.dir)
    endpoint = cfg.checkpoint.endpoint_url
    op = "connect"
    try:
        storage = _timed(f"opening {root}", lambda: Storage(root, endpoint), deadline)
        probe = storage.join(f".doctor-{probe_id}")
        objects = {storage.sub(probe, f"rank{info.rank}-small"): os.urandom(4096)}
        if info.rank == 0:
            objects[storage.sub(probe, "rank0-large")] = os.urandom(PART + 2**20)
        op = f"create {probe}"
        _timed(op, lambda: storage.makedirs(probe), deadline)
        for path, data in objects.items():
            op = f"write {path} ({len(data)} bytes{', multipart' if storage.remote and len(data) > PART else ''})"
            _timed(op, lambda: storage.write_bytes(path, data, part_size=PART), deadline)
        for path, data in objects.items():
            op = f"read back {path}"
            back = _timed(op, lambda: storage.read_bytes(path), deadline)
            if hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
                return Result("storage", FAIL, f"{path}: {len(back)} bytes read, {len(data)} written",
                              f"what {root} returned differs from what was written (checksum): a faulty cache or "
                              f"gateway in front of it; checkpoints there would not load", seconds=_s(t0))
        op = f"list {probe}"
        listed = _timed(op, lambda: storage.list_files(probe), deadline)
        mine = {os.path.basename(p.rstrip("/")) for p in objects}
        if not mine <= set(listed):
            return Result("storage", FAIL, f"listing {probe} lacks {sorted(mine - set(listed))}",
                          f"objects just written to {root} are not listed: resume finds checkpoints by listing, "
                          f"so it would not see them", seconds=_s(t0))
        op = f"delete {probe}"
        for path in objects:
            _timed(f"delete {path}", lambda: _remove(storage, path), deadline)
        left = _timed(op, lambda: storage.list_files(probe), deadline)
        if mine & set(left):
            return Result("storage", FAIL, f"could not delete {sorted(mine & set(left))} in {probe}",
                          f"delete is refused in {root}: checkpoint retention (checkpoint.keep) could not remove old "
                          f"checkpoints; allow deletes, or set checkpoint.keep=0 and clean up by hand",
                          seconds=_s(t0))
    except Exception as e:  # the storage's own error says what was refused
        return Result("storage", FAIL, f"{op}: {type(e).__name__}" if not isinstance(e, TimeoutError) else str(e),
                      f"rank {info.rank} on {info.host} could not {op} in checkpoint.dir={root}: "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400] +
                      ". Checkpoints need write, read, list and delete there: fix the permissions, the bucket or "
                      "the endpoint (checkpoint.endpoint_url), or point checkpoint.dir elsewhere",
                      {"operation": op, "rank": info.rank, "host": info.host}, _s(t0))
    return _space(storage, root, estimate_bytes, int(cfg.checkpoint.keep), int(cfg.checkpoint.keep_best), t0)


def _remove(storage: Storage, path: str) -> None:
    if storage.remote:
        storage._fs.rm_file(storage._strip(path))
    else:
        os.remove(path)


def existing_part(cfg: DictConfig) -> str | None:
    """Before the check: the part of a local checkpoint directory that exists (None on object stores)."""
    root = str(cfg.checkpoint.dir)
    return None if "://" in root else _first_existing(os.path.abspath(root))


def cleanup(cfg: DictConfig, probe_id: str, existed: str | None, deadline: float = DEADLINE_S) -> None:
    """After every rank's check (rank 0): remove the probe folder and the directories the doctor had to create,
    from the checkpoint directory up to the part that existed before. Best effort: the check reported problems."""
    root = str(cfg.checkpoint.dir)
    try:
        storage = _timed(f"opening {root}", lambda: Storage(root, cfg.checkpoint.endpoint_url), deadline)
        _timed("cleanup", lambda: storage.remove_tree(storage.join(f".doctor-{probe_id}")), deadline)
    except Exception:
        return
    if existed is None:
        return
    path = os.path.abspath(root)
    while path != existed and path.startswith(existed) and os.path.dirname(path) != path:
        try:
            os.rmdir(path)
        except OSError:
            return
        path = os.path.dirname(path)


def _space(storage: Storage, root: str, estimate: int | None, keep: int, keep_best: int, t0: float) -> Result:
    figure = "write, read back, list, delete: ok"
    if estimate is None or storage.remote:
        return Result("storage", PASS, figure + (f"; a checkpoint is about {_gb(estimate)}" if estimate else ""),
                      seconds=_s(t0), details={"estimate_bytes": estimate})
    free = shutil.disk_usage(_first_existing(storage.root)).free
    kept = (keep + keep_best + 1) if keep > 0 else None  # +1: the one being written
    figure += f"; a checkpoint is about {_gb(estimate)}, {_gb(free)} free"
    details = {"estimate_bytes": estimate, "free_bytes": free}
    if free < estimate:
        return Result("storage", FAIL, figure, f"{root} has room for no checkpoint: free space, or point "
                      f"checkpoint.dir elsewhere", details, _s(t0))
    if kept is not None and free < estimate * kept:
        return Result("storage", WARN, figure, f"{kept} checkpoints (checkpoint.keep={keep}, keep_best="
                      f"{keep_best}, plus the one being written) need {_gb(estimate * kept)}: lower checkpoint.keep "
                      f"or free space", details, _s(t0))
    if kept is None:
        return Result("storage", WARN if free < estimate * 10 else PASS, figure,
                      "checkpoint.keep=0 keeps every checkpoint: the disk fills as the run goes on"
                      if free < estimate * 10 else "", details, _s(t0))
    return Result("storage", PASS, figure, "", details, _s(t0))


def _gb(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _s(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)

"""What a committed checkpoint looks like on storage, and how readers find one. No torch import here.

    <checkpoint dir>/step-000000120/
        __0_0.distcp, __1_0.distcp, .metadata     torch.distributed.checkpoint: model + optimizer, one file per rank
        rank0.json, rank1.json                     per-rank state: RNG streams (python, numpy, torch, its GPU's)
        train_state.json                           step, epoch, global sample offset, recipe hash, and each state
                                                   as JSON (LR scheduler, grad scaler, the trainer's own)
        manifest.json                              written last, by rank 0, after every file above was verified

A step folder without a valid manifest, or whose files do not match the sizes the manifest lists, does not exist
for readers: it is an unfinished save (a kill during the write) or a damaged one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .storage import Storage

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
FORMAT = 1
_STEP = re.compile(r"^step-(\d+)$")


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


def rank_file(rank: int) -> str:
    return f"rank{rank}.json"


@dataclass
class CheckpointInfo:
    """One step folder as found on storage."""

    name: str
    path: str
    step: int
    manifest: dict[str, Any] | None = None
    problem: str | None = None  # why it is not usable; None for a committed checkpoint
    refused: bool = False  # committed, but its contents were refused (see newest_committed's `check`)
    files: dict[str, int] = field(default_factory=dict)

    @property
    def committed(self) -> bool:
        return self.problem is None and self.manifest is not None

    @property
    def size(self) -> int:
        return sum(self.files.values())


def inspect(storage: Storage, name: str) -> CheckpointInfo:
    """Read one step folder's manifest and check every file it lists is there with its size."""
    m = _STEP.match(name)
    if not m:
        raise ValueError(f"{name} is not a step folder")
    path = storage.join(name)
    info = CheckpointInfo(name=name, path=path, step=int(m.group(1)))
    info.files = storage.list_files(path)
    if not info.files:
        info.problem = f"{path} does not exist or is empty"
        return info
    if MANIFEST not in info.files:
        info.problem = f"{storage.join(name, MANIFEST)} is missing (an unfinished save)"
        return info
    try:
        manifest = json.loads(storage.read_text(storage.join(name, MANIFEST)))
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError("unknown manifest format")
    except (ValueError, OSError) as e:
        info.problem = f"{storage.join(name, MANIFEST)} is unreadable: {e}"
        return info
    info.manifest = manifest
    for fname, size in sorted(manifest["files"].items()):
        actual = info.files.get(fname)
        if actual is None:
            info.problem = f"{storage.join(name, fname)} is missing"
            break
        if actual != size:
            info.problem = f"{storage.join(name, fname)} has {actual} bytes, the manifest says {size} (truncated?)"
            break
    return info


def scan(storage: Storage) -> list[CheckpointInfo]:
    """Every step folder under the checkpoint directory, newest first, committed or not."""
    names = [n for n in storage.list_dirs() if _STEP.match(n)]
    found = [inspect(storage, n) for n in names]
    return sorted(found, key=lambda c: c.step, reverse=True)


def newest_committed(storage: Storage, check: Callable[[CheckpointInfo], str | None] | None = None
                     ) -> tuple[CheckpointInfo | None, list[CheckpointInfo]]:
    """The newest committed checkpoint, and the newer step folders passed over (each with its problem).

    `check` may refuse a committed one (say why, or None): it is passed over like a damaged one, with `refused`
    set; nothing is removed."""
    skipped = []
    for info in scan(storage):
        if info.committed and check is not None:
            refused = check(info)
            if refused:
                info.problem, info.refused = refused, True
        if info.committed:
            return info, skipped
        skipped.append(info)
    return None, skipped

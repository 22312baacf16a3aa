"""The process plan: what a backend will start, described without importing torch (printed by --dry-run)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

DEVICE_ENV = "LAUNCHER_DEVICE"  # the plan's device (cuda or cpu) in every rank's environment: dist.choose_device


@dataclass
class Plan:
    """Everything needed to start (or to show) one job."""

    backend: str
    nodes: int
    procs_per_node: int
    device: str  # "cuda" or "cpu": the job's one device decision, which every rank follows (DEVICE_ENV)
    dist_backend: str  # "nccl" or "gloo"
    rdzv_backend: str
    rdzv_endpoint: str
    run_id: str
    run_dir: str
    max_restarts: int
    rdzv_timeout_s: int
    node_rank: int | None = None  # fixed node rank (static rendezvous); None: assigned by the c10d rendezvous
    entrypoint: list[str] = field(default_factory=lambda: [sys.executable])
    preload_workers: bool = False  # ranks forked from a fork server that imported torch (launcher.preload)
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["world_size"] = self.world_size
        d.pop("notes")
        return d

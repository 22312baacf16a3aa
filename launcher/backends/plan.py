"""What every backend shares: the options the command line adds to a recipe, the interface of a plan, and the local
backend's process plan. All of it without importing torch (printed by --dry-run)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

DEVICE_ENV = "LAUNCHER_DEVICE"  # the plan's device (cuda or cpu) in every rank's environment: dist.choose_device


@dataclass(frozen=True)
class Options:
    """What the command line adds to the recipe; each backend reads the fields it knows."""

    rdzv_endpoint: str | None = None  # local: HOST:PORT of a multi-node rendezvous (--rdzv-endpoint)
    node_rank: int | None = None  # local: this node's fixed rank, a static rendezvous (--node-rank)
    recipe_path: str = ""  # slurm: the recipe named in the header of --emit-sbatch's script
    emit_sbatch: bool = False  # slurm: print a standalone sbatch script instead of submitting (--emit-sbatch)
    wait: bool = False  # slurm: wait until the job ends; exit 0 if it completed (--wait)


class BackendPlan(Protocol):
    """What `backend.plan(cfg, run_dir, options)` returns and `backend.run(plan)` carries out."""

    def to_dict(self) -> dict[str, Any]:
        """How the run is launched, for launch.json."""
        ...

    def describe(self) -> str:
        """What --dry-run prints after the resolved recipe: what would start, saying that nothing did."""
        ...


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
    name: str = ""  # run.name, for the console (not in launch.json)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["world_size"] = self.world_size
        d.pop("notes")
        d.pop("name")
        return d

    def describe(self) -> str:
        import yaml

        notes = "".join(f"# {note}\n" for note in self.notes)
        return ("# process plan (nothing was started)\n" + yaml.safe_dump({"plan": self.to_dict()}, sort_keys=False)
                + notes)

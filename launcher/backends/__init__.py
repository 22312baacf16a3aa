"""Backends turn a validated recipe into processes behind one small interface: `plan(cfg, run_dir, options)` (a
`plan.BackendPlan`: `to_dict()` for launch.json, `describe()` for --dry-run; nothing starts) then `run(plan)`, the
exit code for `launch`.

`local` runs torchrun's agent in this process; `slurm` submits a job whose tasks each run `local`
(`slurm_node`, inside the job).
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("local", "slurm")  # the recipe's `backend`


def get(name: str) -> ModuleType:
    """The backend module for a recipe's `backend` (imported when asked for: the other one's imports are not paid)."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; the backends are {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")

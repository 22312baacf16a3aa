"""`launch status RUN_DIR` and `launch cancel RUN_DIR`: what a run is doing, from its run directory. No torch."""

from __future__ import annotations

import json
import os
import subprocess
import time

from .errors import UsageError
from .files import write_atomic


def _launch_info(run_dir: str) -> dict:
    path = os.path.join(run_dir, "launch.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{run_dir} is not a run directory (no launch.json)") from None


def _last_row(path: str) -> dict | None:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def status(run_dir: str) -> int:
    info = _launch_info(run_dir)
    print(f"run:        {os.path.abspath(run_dir)}")
    if info.get("backend") == "slurm" and info.get("job_id"):
        from .backends.slurm_state import job_state
        print(f"SLURM job:  {info['job_id']}: {job_state(info['job_id'])}")
    else:
        print(f"backend:    {info.get('backend', 'local')} on {info.get('host', '?')}, started {info.get('started_at')}")
    row = _last_row(os.path.join(run_dir, "metrics.jsonl"))
    if row:
        ago = time.time() - row.get("time", time.time())
        print(f"progress:   step {row['step']}, epoch {row['epoch']}, loss {row['loss']:.4f} ({ago:.0f} s ago)")
    else:
        print("progress:   no step recorded yet")
    try:
        import yaml
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        ckpt_dir = (cfg.get("checkpoint") or {}).get("dir") or os.path.join(run_dir, "checkpoints")
        from .checkpoint import layout
        from .checkpoint.storage import Storage
        newest, _ = layout.newest_committed(Storage(ckpt_dir, (cfg.get("checkpoint") or {}).get("endpoint_url")))
        print(f"checkpoint: {f'step {newest.step} at {newest.path}' if newest else 'none committed'}")
    except OSError as e:
        print(f"checkpoint: cannot read ({e})")
    logs = os.path.join(run_dir, "logs")
    print(f"logs:       {logs}/rank<r>.log" + (f" and {info['slurm_logs']}/" if info.get("slurm_logs") else ""))
    return 0


def cancel(run_dir: str) -> int:
    info = _launch_info(run_dir)
    if info.get("backend") != "slurm" or not info.get("job_id"):
        raise UsageError(f"{run_dir} is not a SLURM run; stop a local run with Ctrl-C in its terminal")
    # First the marker: a job that is checkpointing for a preemption reads it before it requeues itself, so the
    # cancel wins even when scancel comes between the checkpoint and the requeue (backends.slurm_node._cancelled).
    from .backends.slurm_state import CANCEL_MARKER
    marker = os.path.join(run_dir, CANCEL_MARKER)
    write_atomic(marker, json.dumps({"job_id": str(info["job_id"]), "time": time.time()}))
    r = subprocess.run(["scancel", str(info["job_id"])], capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"scancel {info['job_id']} failed: {r.stderr.strip()}")
    print(f"cancelled SLURM job {info['job_id']}")
    return 0

"""What SLURM says about a job (squeue, then sacct), and the marker `launch cancel` leaves. Both sides read them: the
login node (`launch status`, `launch cancel`, `--wait`) and the job itself (a cancelled job never requeues itself)."""

from __future__ import annotations

import subprocess
import time

from ..errors import LauncherError

CANCEL_MARKER = "cancelled.json"  # {"job_id": ...}: left in the run directory by `launch cancel` before scancel

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def job_state(job_id: str) -> str:
    """The job's state: squeue while it is known there, else sacct; UNKNOWN when neither answers."""
    r = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip().splitlines()[0]
    r = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip().splitlines()[-1].split()[0]
    return "UNKNOWN"


def wait_state(job_id: str, wanted: set[str], timeout_s: float, settle_s: float = 10) -> str:
    """The first state in `wanted` that holds for `settle_s`: while a job requeues itself, SLURM can report the
    ending allocation (FAILED, CANCELLED) for a moment before the job is pending again."""
    deadline = time.time() + timeout_s
    seen: tuple[str, float] | None = None
    while time.time() < deadline:
        state = job_state(job_id)
        if state in wanted:
            if seen is None or seen[0] != state:
                seen = (state, time.time())
            if time.time() - seen[1] >= settle_s:
                return state
        else:
            seen = None
        time.sleep(1)
    raise LauncherError(f"SLURM job {job_id} is still {job_state(job_id)} after {timeout_s:.0f} s; it keeps running")

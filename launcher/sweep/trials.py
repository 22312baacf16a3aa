"""How a trial runs: an ordinary `launch` of the recipe with the trial's values as overrides, in the trial's own run
directory, on this machine (a child process on its share of the GPUs and CPUs) or as a SLURM job.

Locally every trial gets a slot: its own GPUs (CUDA_VISIBLE_DEVICES; never two trials on one GPU) or, without
GPUs, its own CPUs (the trial's `launch` runs on that CPU set, and gives each rank its share of it as
OMP_NUM_THREADS). A trial runs in a session of its own, so a Ctrl-C meant for the controller reaches the controller
alone (which then asks each trial to checkpoint and stop), and every process of the trial dies with the
controller (launcher.sweep.guard, PR_SET_PDEATHSIG): a controller killed outright leaves no trial running
unwatched, and the next controller resumes each from its own checkpoint. A SLURM trial is a job of its own and
outlives the controller; the next controller finds it by the job id in the trial's launch.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from .. import hardware
from ..files import tail_lines


@dataclass
class Slot:
    index: int
    gpus: list[int] | None  # GPU indices (CUDA_VISIBLE_DEVICES), None on a machine without GPUs
    cpus: list[int] | None  # the CPU set (None: no affinity, as where sched_setaffinity is missing)

    def describe(self) -> str:
        if self.gpus is not None:
            return f"GPUs {','.join(map(str, self.gpus))}"
        return f"CPUs {','.join(map(str, self.cpus))}" if self.cpus else "the machine"


def local_slots(parallel: int, procs: int) -> tuple[list[Slot], list[str]]:
    """Up to `parallel` slots for trials of `procs` processes each, and notes on what was narrowed."""
    notes = []
    gpus = hardware.visible_gpu_count()
    if gpus:
        fit = gpus // procs
        if fit == 0:
            return [], [f"a trial needs {procs} GPUs and {gpus} are visible"]
        if fit < parallel:
            notes.append(f"sweep.parallel={parallel}, but {gpus} GPUs hold {fit} trial{'s' if fit != 1 else ''} of "
                         f"{procs} GPU{'s' if procs != 1 else ''} at once: running {fit} at a time")
        visible = _visible_gpu_ids(gpus)
        n = min(parallel, fit)
        return [Slot(i, visible[i * procs:(i + 1) * procs], None) for i in range(n)], notes
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return [Slot(i, None, None) for i in range(parallel)], notes
    if len(cpus) < parallel:
        notes.append(f"sweep.parallel={parallel} trials share {len(cpus)} CPUs: trials share CPUs")
        return [Slot(i, None, [cpus[i % len(cpus)]]) for i in range(parallel)], notes
    share = len(cpus) // parallel
    return [Slot(i, None, cpus[i * share:(i + 1) * share]) for i in range(parallel)], notes


def _visible_gpu_ids(count: int) -> list[int]:
    """The indices a child's CUDA_VISIBLE_DEVICES may name: as this process sees them (0..count-1 renumbered by
    the driver within any CUDA_VISIBLE_DEVICES of ours), kept as our own list when we have one."""
    ours = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ours:
        ids = [x.strip() for x in ours.split(",") if x.strip()]
        if len(ids) >= count and all(x.isdigit() for x in ids):
            return [int(x) for x in ids[:count]]
    return list(range(count))


class LocalTrial:
    """A trial's `launch` as a child of the controller."""

    def __init__(self, number: int, run_dir: str, argv: list[str], slot: Slot) -> None:
        self.number, self.run_dir, self.slot = number, run_dir, slot
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)  # the trial's launch sets it from its own CPU set
        if slot.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slot.gpus))
        os.makedirs(run_dir, exist_ok=True)
        self.out_path = os.path.join(run_dir, "sweep-launch.log")
        out = open(self.out_path, "ab")
        cpus = slot.cpus

        def child() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        guard = [sys.executable, "-m", "launcher.sweep.guard", str(os.getpid())]  # ends the trial with us
        self.proc = subprocess.Popen(guard + argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, preexec_fn=child)
        out.close()
        self.started = time.time()

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        """Every process of the trial, now: the guard SIGKILLs all it started (ranks in sessions of their own too)."""
        try:
            os.kill(self.proc.pid, signal.SIGUSR1)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()

    def output_tail(self, n: int = 20) -> list[str]:
        return tail_lines(self.out_path, n)


class SlurmTrial:
    """A trial submitted as a SLURM job (`launch ... --slurm`), followed by its job id."""

    SETTLE_S = 10.0  # a final state must hold this long: a job that requeues itself passes through one

    def __init__(self, number: int, run_dir: str, job_id: str) -> None:
        self.number, self.run_dir, self.job_id = number, run_dir, job_id
        self.out_path = os.path.join(run_dir, "sweep-launch.log")
        self.state = "PENDING"
        self._final_since: float | None = None
        self.started = time.time()

    @classmethod
    def submit(cls, number: int, run_dir: str, argv: list[str]) -> "SlurmTrial":
        os.makedirs(run_dir, exist_ok=True)
        out_path = os.path.join(run_dir, "sweep-launch.log")
        with open(out_path, "ab") as out:
            r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300)
        job_id = job_id_of(run_dir)
        if r.returncode != 0 or job_id is None:
            raise RuntimeError(f"the trial's submission failed (exit {r.returncode}): "
                               f"{' | '.join(tail_lines(out_path, 3))}")
        return cls(number, run_dir, job_id)

    def poll(self) -> int | None:
        from ..backends.slurm_state import FINAL, job_state

        self.state = job_state(self.job_id)
        if self.state not in FINAL:
            self._final_since = None
            return None
        now = time.time()
        if self._final_since is None:
            self._final_since = now
        if now - self._final_since < self.SETTLE_S:
            return None
        return 0 if self.state == "COMPLETED" else 1

    def kill(self) -> None:
        subprocess.run(["scancel", self.job_id], capture_output=True)

    def output_tail(self, n: int = 20) -> list[str]:
        return tail_lines(self.out_path, n)


def job_id_of(run_dir: str) -> str | None:
    try:
        with open(os.path.join(run_dir, "launch.json")) as f:
            job = json.load(f).get("job_id")
    except (OSError, ValueError):
        return None
    return str(job) if job else None


def failure(run_dir: str, rc: int | None, out_tail: list[str], since: float = 0.0) -> dict[str, Any]:
    """Why a trial failed: the first failed rank, its error and log (failure.json, which the agent writes, when it
    is not older than `since`), else the exit code and the last lines `launch` printed."""
    path = os.path.join(run_dir, "failure.json")
    try:
        if os.path.getmtime(path) < since - 1:
            raise OSError("an earlier attempt's")
        with open(path) as f:
            data = json.load(f)
        first = data["ranks"][0]
        return {"rank": first.get("rank"), "host": first.get("host"), "error": first.get("error") or first.get("how"),
                "how": first.get("how"), "log": first.get("log"), "exit": rc}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    lines = [ln for ln in out_tail if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return {"rank": None, "host": None, "error": (errors or lines or [f"exit {rc}"])[-1].strip()[:300],
            "log": os.path.join(run_dir, "sweep-launch.log"), "exit": rc}


def launch_argv() -> list[str]:
    return [sys.executable, "-m", "launcher"]

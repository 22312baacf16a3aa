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
from typing import Any, Mapping

from .. import hardware
from ..files import tail_lines


@dataclass
class Slot:
    index: int
    gpus: list[str] | None  # the trial's GPUs as its visibility variable names them; None on a machine without GPUs
    cpus: list[int] | None  # the CPU set (None: no affinity, as where sched_setaffinity is missing)
    gpu_var: str = "CUDA_VISIBLE_DEVICES"  # the variable that narrows the trial's GPUs (HIP_VISIBLE_DEVICES on ROCm)

    def describe(self) -> str:
        cpus = f"CPUs {_ranges(self.cpus)}" if self.cpus else ""
        if self.gpus is not None:
            return f"GPUs {','.join(self.gpus)}" + (f" and {cpus}" if cpus else "")
        return cpus or "the machine"


def _ranges(cpus: list[int]) -> str:
    """0,1,2,3,6 as 0-3,6."""
    out, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def local_slots(parallel: int, procs: int, gpus: int | None = None, cpus: list[int] | None = None,
                environ: Mapping[str, str] | None = None) -> tuple[list[Slot], list[str]]:
    """Up to `parallel` slots for trials of `procs` processes each, and notes on what was narrowed.

    With GPUs every slot holds `procs` GPUs of its own, never shared, and fewer trials run at once when the GPUs
    cannot hold `parallel` of them; each slot also gets its share of the CPUs, so that the ranks of trials side by
    side do not each take the whole machine's threads. Without GPUs a slot is its share of the CPUs. `gpus`, `cpus`
    and `environ` are what this process sees (the visible GPU count, its CPU affinity, its environment) unless
    given."""
    env = os.environ if environ is None else environ
    notes = []
    gpus = hardware.visible_gpu_count(environ=env) if gpus is None else gpus
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:
            cpus = []
    if gpus:
        fit = gpus // procs
        if fit == 0:
            return [], [f"a trial needs {procs} GPUs and {gpus} are visible"]
        if fit < parallel:
            hold = f"{gpus} GPUs hold" if gpus != 1 else "1 GPU holds"
            notes.append(f"sweep.parallel={parallel}, but {hold} {fit} trial{'s' if fit != 1 else ''} of "
                         f"{procs} GPU{'s' if procs != 1 else ''} at once: running {fit} at a time")
        var, visible = gpu_ids(gpus, env)
        n = min(parallel, fit)
        shares = _cpu_shares(cpus, n) if len(cpus) >= n else [None] * n
        return [Slot(i, visible[i * procs:(i + 1) * procs], shares[i], var) for i in range(n)], notes
    if not cpus:
        return [Slot(i, None, None) for i in range(parallel)], notes
    if len(cpus) < parallel:
        notes.append(f"sweep.parallel={parallel} trials share {len(cpus)} CPUs: trials share CPUs")
        return [Slot(i, None, [cpus[i % len(cpus)]]) for i in range(parallel)], notes
    return [Slot(i, None, share) for i, share in enumerate(_cpu_shares(cpus, parallel))], notes


def _cpu_shares(cpus: list[int], n: int) -> list[list[int]]:
    share = len(cpus) // n
    return [cpus[i * share:(i + 1) * share] for i in range(n)]


def gpu_ids(count: int, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """The variable that narrows a child's GPUs, and the `count` entries it may name, as this process sees them.

    A child inherits our environment, and its list replaces ours: so it must name GPUs as ours does. When we are
    narrowed already (SLURM's CUDA_VISIBLE_DEVICES=2,3, or GPU UUIDs, or MIG instances), the entries are ours,
    copied as they are; otherwise the indices 0..count-1. On ROCm the child's list goes into HIP_VISIBLE_DEVICES
    when that narrowed us (beneath any ROCR_VISIBLE_DEVICES, which the child inherits as it is)."""
    var = "CUDA_VISIBLE_DEVICES"
    if not hardware.nvidia_gpu_count() and environ.get("HIP_VISIBLE_DEVICES") is not None:
        var = "HIP_VISIBLE_DEVICES"
    ours = environ.get(var)
    if ours is not None:
        ids = hardware.visible_ids(ours)
        if len(ids) >= count:
            return var, ids[:count]
    return var, [str(i) for i in range(count)]


class LocalTrial:
    """A trial's `launch` as a child of the controller."""

    def __init__(self, number: int, run_dir: str, argv: list[str], slot: Slot) -> None:
        self.number, self.run_dir, self.slot = number, run_dir, slot
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)  # the trial's launch sets it from its own CPU set
        if slot.gpus is not None:
            env[slot.gpu_var] = ",".join(slot.gpus)
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

"""Inside a SLURM job: each node's task (one per node) checks the allocation against the recipe, takes the
preemption signals from its first moment, runs this node's processes through the local backend (torchrun's agent)
with a static rendezvous at the allocation's first node and its node rank from SLURM_NODEID, and requeues the job
after a preemption checkpoint. The job is submitted by `backends.slurm`, which starts each task as

    python -m launcher.backends.slurm RUN_DIR                # --emit-sbatch's script (node_main)
    python -m submitit.core._submit FOLDER                   # --slurm: submitit unpickles and calls NodeTask

Preemption and time limits: SLURM sends SIGUSR2 `slurm.signal_grace_s` before the end to every process of the job
(a preemption without a user signal sends SIGTERM instead; the node tasks and workers take both as a stop request).
Workers agree on it at the next step boundary, write one committed checkpoint and leave `preempted.json`; the first
node's task then requeues the job (at most `slurm.max_requeues` times, never once it is cancelled) and the requeued
job resumes by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from .. import procs, recipe
from ..errors import LauncherError, UsageError
from . import local, nodelist
from .plan import Options
from .slurm_state import CANCEL_MARKER, job_state


@dataclass
class SlurmEnv:
    """What SLURM tells this task about its job, from the environment it starts the task with."""

    job_id: str
    node_id: int
    nnodes: int
    ntasks_per_node: int
    nodelist: str
    restart_count: int

    @classmethod
    def from_environ(cls) -> "SlurmEnv":
        env = os.environ
        if "SLURM_JOB_ID" not in env:
            raise LauncherError("not inside a SLURM allocation (SLURM_JOB_ID is not set)")
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        return cls(job_id=env["SLURM_JOB_ID"], node_id=int(env.get("SLURM_NODEID", "0")),
                   nnodes=int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES", "1")),
                   ntasks_per_node=int(per_node.split("(")[0].split(",")[0]),
                   nodelist=env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""),
                   restart_count=int(env.get("SLURM_RESTART_COUNT", "0")))


def check_allocation(env: SlurmEnv, cfg: Any) -> None:
    """Fail fast, naming the numbers, when the allocation does not match the recipe."""
    problems = []
    if env.nnodes != cfg.launch.nodes:
        problems.append(f"the allocation has {env.nnodes} node(s) but the recipe asks for launch.nodes="
                        f"{cfg.launch.nodes}")
    if env.ntasks_per_node != 1:
        problems.append(f"SLURM started {env.ntasks_per_node} tasks per node; the launcher needs exactly 1 "
                        f"(--ntasks-per-node=1): each node's task starts its {cfg.launch.gpus_per_node or 1} "
                        f"processes itself")
    if problems:
        raise UsageError("; ".join(problems))


def _forward_to_children(signum: int) -> None:
    """Pass a signal on to this process's workers, in case SLURM signalled only the task: its children, and the
    children of its fork server (launch.preload_workers) instead of the server itself, which ignores it."""
    me = os.getpid()
    children = procs.children_by_parent()
    workers: list[int] = []
    for pid in children.get(me, []):
        workers += children.get(pid, []) if _is_fork_server(pid) else [pid]
    for pid in workers:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def _is_fork_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.forkserver" in f.read()
    except OSError:
        return False


_REQUEUED = threading.Event()  # set just before this task requeues the job: SLURM's SIGTERM is then the expected end
_STOP_SIGNALS = {signal.SIGUSR2, signal.SIGTERM}


def hold_preemption_signal(run_dir: str, env: SlurmEnv) -> None:
    """Take SIGUSR2 and SIGTERM for this node's task and its workers, however early they come.

    By default both kill, and a worker needs a few seconds (importing torch) before its handler is in place.
    So the signals are blocked here (and by the stub that started this task), before any worker exists: a blocked
    signal stays pending across fork and exec; each worker unblocks SIGUSR2 once its handler is installed
    (`dist.StopRequest.install`) and takes SIGTERM in a thread that tells SLURM's from the agent's
    (`dist.StopRequest.take_slurm_sigterm`). A thread of this task receives the signals meant for it: SIGTERM
    comes from SLURM (a preemption without a user signal, scancel), as nothing in the job sends it to this task;
    either asks for a stop. It leaves a file that workers started later read (the signal came before they existed),
    then passes SIGUSR2 on to the workers in case SLURM signalled only this task (its SIGTERM reaches every process
    of the step). torch's agent never sees SIGTERM, so it does not tear the workers down before they checkpoint.
    """
    stop_file = os.path.join(run_dir, "slurm", f"stop-requested-{env.job_id}-{env.restart_count}")
    os.environ["LAUNCHER_STOP_FILE"] = stop_file  # read by dist.StopRequest.install
    os.environ["LAUNCHER_PREEMPTIBLE"] = "1"

    def on_signal(signum: int) -> None:
        if signum == signal.SIGTERM and _REQUEUED.is_set():
            _cancel_again_if_asked(env.job_id, run_dir)
            os._exit(0)  # SLURM ends this allocation once the requeue is accepted: the expected end, not a failure
        print(f"launch: received {signal.Signals(signum).name}: the workers checkpoint and stop", flush=True)
        os.makedirs(os.path.dirname(stop_file), exist_ok=True)
        with open(stop_file, "a"):
            pass
        if signum == signal.SIGUSR2:  # SLURM's SIGTERM reaches every process of the step itself
            _forward_to_children(signum)

    def receive() -> None:
        while True:
            on_signal(signal.sigwait(_STOP_SIGNALS))

    # The handlers replace submitit's instant requeue (SIGUSR2) and its bypass (SIGTERM); they run only if a thread
    # started before this one takes a signal.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda s, f: on_signal(s))
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # threads started from here on inherit the mask
    threading.Thread(target=receive, name="launcher-preemption-signal", daemon=True).start()


def node_main(run_dir: str) -> int:
    """One node's task: rendezvous at the first node, run this node's processes, requeue after preemption."""
    env = SlurmEnv.from_environ()
    hold_preemption_signal(run_dir, env)
    cfg = recipe.load_resolved(os.path.join(run_dir, "config.yaml"))
    if not (cfg.script.path or cfg.script.module):  # the built-in trainer checkpoints on SLURM's SIGTERM too
        os.environ["LAUNCHER_STOP_ON_SIGTERM"] = "1"  # read by dist.StopRequest.take_slurm_sigterm
    check_allocation(env, cfg)
    hosts = nodelist.hostnames(env.nodelist)
    head, port = hosts[0], nodelist.port_for_job(env.job_id)
    plan = local.plan(cfg, run_dir, Options(rdzv_endpoint=f"{head}:{port}", node_rank=env.node_id),
                      run_id=f"slurm-{env.job_id}")
    print(f"launch: SLURM job {env.job_id} node {env.node_id}/{env.nnodes} ({hosts[env.node_id]}), rendezvous "
          f"{head}:{port}, {plan.procs_per_node} processes, restart {env.restart_count}", flush=True)
    rc = local.start(plan)
    if env.node_id == 0:
        rc = _maybe_requeue(env, cfg, run_dir, rc)
    return rc


def _maybe_requeue(env: SlurmEnv, cfg: Any, run_dir: str, rc: int) -> int:
    path = os.path.join(run_dir, "preempted.json")
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return rc
    if marker.get("job_id") != env.job_id or str(marker.get("restart")) != str(env.restart_count):
        return rc  # left by an earlier allocation
    cancelled = _cancelled(env.job_id, run_dir)
    if cancelled:
        print(f"launch: checkpointed at step {marker['step']}; not requeued: job {env.job_id} {cancelled}",
              flush=True)
        return 0
    if env.restart_count >= cfg.slurm.max_requeues:
        print(f"launch: checkpointed at step {marker['step']} but not requeued: slurm.max_requeues="
              f"{cfg.slurm.max_requeues} reached; relaunch to continue", flush=True)
        return 1
    print(f"launch: checkpointed at step {marker['step']}; requeueing job {env.job_id} "
          f"(requeue {env.restart_count + 1} of {cfg.slurm.max_requeues})", flush=True)
    _REQUEUED.set()  # from now on SLURM's SIGTERM ends this task quietly (hold_preemption_signal)
    r = subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"launch: scontrol requeue failed: {r.stderr.strip()}", flush=True)
        return 1
    _cancel_again_if_asked(env.job_id, run_dir)
    time.sleep(60)  # SLURM ends this allocation now; do not report success before it does
    return 0


def _cancelled(job_id: str, run_dir: str, state: bool = True) -> str | None:
    """Why the job must not requeue itself, or None. A cancel must win: `scontrol requeue` takes back even a
    cancelled job, and a scancel sent while the job checkpoints for a preemption would otherwise be undone."""
    try:
        with open(os.path.join(run_dir, CANCEL_MARKER)) as f:
            if str(json.load(f).get("job_id")) == str(job_id):
                return "was cancelled (launch cancel)"
    except (OSError, ValueError, AttributeError):
        pass
    if state:
        now = job_state(job_id)  # RUNNING while this task runs, unless the job was cancelled (or is ending)
        if now not in ("RUNNING", "UNKNOWN"):  # UNKNOWN: squeue and sacct did not answer; requeue as asked
            return f"is {now}, not RUNNING: cancelled or ending"
    return None


def _cancel_again_if_asked(job_id: str, run_dir: str) -> None:
    """After the requeue: a `launch cancel` that came between the check and the requeue cancels the requeued job."""
    if _cancelled(job_id, run_dir, state=False):
        subprocess.run(["scancel", job_id], capture_output=True)
        print(f"launch: job {job_id} was cancelled while it requeued: cancelled again", flush=True)


class NodeTask:
    """The callable submitit runs in every task."""

    def __call__(self, run_dir: str) -> int:
        rc = node_main(run_dir)
        if rc != 0:
            raise LauncherError(f"node task exited with code {rc}; see {os.path.join(run_dir, 'logs')}")
        return rc


def main(argv: list[str]) -> int:
    """`python -m launcher.backends.slurm RUN_DIR`: one node's task, started by --emit-sbatch's script."""
    if len(argv) != 1:
        raise SystemExit("usage: python -m launcher.backends.slurm RUN_DIR")
    try:
        return node_main(argv[0])
    except LauncherError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return e.exit_code

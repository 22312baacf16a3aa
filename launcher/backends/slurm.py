"""The SLURM backend: a job through submitit with one task per node; each task runs the local backend (torchrun's
agent) with a static rendezvous at the allocation's first node and its node rank from SLURM_NODEID.

    launch recipe.yaml --nodes 2 --gpus 8 --slurm            # submit (prints job id, logs, follow/cancel commands)
    launch recipe.yaml --nodes 2 --gpus 8 --slurm --dry-run  # the sbatch script that would be submitted
    launch recipe.yaml --nodes 2 --gpus 8 --emit-sbatch      # a standalone sbatch script (srun + torchrun)
    python -m launcher.backends.slurm RUN_DIR                # what each node's task runs (inside an allocation)

Preemption and time limits: SLURM sends SIGUSR2 `slurm.signal_grace_s` before the end to every process of the job
(a preemption without a user signal sends SIGTERM instead; the node tasks and workers take both as a stop request).
Workers agree on it at the next step boundary, write one committed checkpoint and leave `preempted.json`; the first
node's task then requeues the job (at most `slurm.max_requeues` times, never once it is cancelled) and the requeued
job resumes by itself. The batch shell survives a signal that reaches it too and passes it on (see `relay_signals`).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from .. import procs, recipe
from ..errors import LauncherError, UsageError
from ..files import write_atomic
from . import local, nodelist

SUBMIT_DIR = "slurm"  # under the run directory: submitit's pickles and the tasks' stdout/stderr


# ----------------------------------------------------------------------------------------------- submit side

def _sbatch_parameters(cfg: Any) -> dict[str, Any]:
    """The recipe's slurm section as submitit SlurmExecutor parameters (one table, neutral names -> sbatch)."""
    s = cfg.slurm
    procs = cfg.launch.gpus_per_node or 1
    params: dict[str, Any] = {
        "job_name": f"launch-{cfg.run.name}",
        "nodes": int(cfg.launch.nodes),
        "ntasks_per_node": 1,  # one torchrun agent per node; it starts the node's processes itself
        "cpus_per_task": int(s.cpus_per_task or 2 * procs),
        "time": int(s.time_min),
        "signal_delay_s": int(s.signal_grace_s),
        "setup": list(s.setup),
        "additional_parameters": {"requeue": True, **dict(s.extra_sbatch or {})},
    }
    gpus = _gpus_per_node(cfg)
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if s[key] is not None:
            params[key] = str(s[key])
    if s.exclusive:
        params["exclusive"] = True
    return params


# sbatch options that already ask for GPUs: then the launcher adds no --gpus-per-node of its own.
_GPU_OPTIONS = {"gpus", "gpus-per-node", "gpus-per-task", "gpus-per-socket", "gpus-per-job"}


def _asks_for_gpus(extra: Any) -> bool:
    for key, value in dict(extra or {}).items():
        name = str(key).lower().replace("_", "-")
        if name in _GPU_OPTIONS or (name == "gres" and "gpu" in str(value).lower()):
            return True
    return False


def partition_has_gpus(partition: str | None) -> tuple[str, bool] | None:
    """(partition name, whether any of its nodes has a GPU) from sinfo's GRES column; the default partition when
    `partition` is None. None when sinfo is not there or does not answer (a laptop), or does not know the
    partition (sbatch then says so itself)."""
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    found: dict[str, bool] = {}
    default = None
    for line in r.stdout.splitlines():
        name, _, gres = line.strip().partition("|")
        if name.endswith("*"):
            name = default = name[:-1]
        if name:
            found[name] = found.get(name, False) or "gpu" in gres.lower()
    name = partition if partition is not None else default
    return (name, found[name]) if name in found else None


def _gpus_per_node(cfg: Any) -> int | None:
    """How many GPUs per node to ask for: none with trainer.device=cpu, none when slurm.extra_sbatch asks already,
    none on a partition without GPUs with trainer.device=auto (the processes run on the CPU, as the local backend
    does without CUDA); trainer.device=cuda there is refused."""
    if cfg.trainer.device == "cpu" or _asks_for_gpus(cfg.slurm.extra_sbatch):
        return None
    procs = int(cfg.launch.gpus_per_node or 1)
    known = partition_has_gpus(cfg.slurm.partition)
    if known is not None and not known[1]:
        if cfg.trainer.device == "cuda":
            raise UsageError(f"partition {known[0]} has no GPUs: set trainer.device=cpu, or pick a GPU partition "
                             f"(slurm.partition)")
        print(f"launch: partition {known[0]} has no GPUs: the job runs {procs} CPU process{'es' if procs != 1 else ''}"
              f" per node with gloo", file=sys.stderr)
        return None
    return procs


# SLURM may signal a task at any moment, even while its interpreter starts. Each node's task therefore starts
# through this stub, which blocks SIGUSR2 and SIGTERM and execs the real interpreter: the mask survives exec, so a
# signal waits (pending) until the node task takes it (see hold_preemption_signal) instead of killing the task.
_HOLD_SIGNALS = ("import os,signal,sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGTERM}); "
                 "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def held_python() -> str:
    """The shell command that starts each node's task: this Python, with SIGUSR2 and SIGTERM blocked from its first
    moment."""
    return f"{shlex.quote(sys.executable)} -S -c {shlex.quote(_HOLD_SIGNALS)}"


def relay_signals(srun_line: str) -> list[str]:
    """The batch script's last lines: srun in the background and a shell that survives the preemption signals
    that reach it and passes them on to the node tasks as SIGUSR2. `scancel --full`, `--signal=B:USR2@...` and a
    signal to the whole job reach the batch shell too, and bash dies of SIGUSR2 and SIGTERM by default, which ended
    the job (FAILED, 0:12) before any rank could checkpoint. A trap runs only once a foreground command ends, but it
    interrupts `wait`: hence `&`, then waiting until srun has really ended, with its exit code."""
    return ["# Preemption signals that reach this shell (scancel --full, --signal=B:USR2@...) must not end the job:",
            "# the shell passes them on to the node tasks as SIGUSR2 and keeps waiting for srun.",
            "trap 'kill -USR2 \"$launch_srun\" 2>/dev/null' USR2 TERM",
            f"{srun_line} &",
            "launch_srun=$!",
            "launch_rc=0; wait \"$launch_srun\" || launch_rc=$?",
            "while kill -0 \"$launch_srun\" 2>/dev/null; do launch_rc=0; wait \"$launch_srun\" || launch_rc=$?; done",
            "exit \"$launch_rc\""]


# SLURM 22.05 to 23.02 do not pass the job's --cpus-per-task on to the steps srun starts, so each node's task (and
# every rank it starts) would be bound to one CPU. srun is told again, only when the job asked for CPUs per task.
SRUN_CPUS = "${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}"


def _with_relay(script: str) -> str:
    """submitit's batch script with its srun line given the job's CPUs per task (SRUN_CPUS) and run through
    `relay_signals`."""
    lines = script.split("\n")
    at = [i for i, line in enumerate(lines) if line.startswith("srun ")]
    if len(at) != 1:
        raise LauncherError("submitit's batch script does not have the one srun line the launcher expects; "
                            "use --emit-sbatch, or the submitit version in constraints.txt")
    srun = f"srun {SRUN_CPUS} {lines[at[0]][len('srun '):]}"
    return "\n".join(lines[:at[0]] + relay_signals(srun) + lines[at[0] + 1:])


def _executor(cfg: Any, run_dir: str) -> Any:
    import submitit

    class Executor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # submitit refuses to be built where srun is missing: --dry-run on a laptop
            return 2

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return _with_relay(super()._make_submission_file_text(command, uid))

    ex = Executor(folder=os.path.join(run_dir, SUBMIT_DIR, "%j"),
                  max_num_timeout=int(cfg.slurm.max_requeues), python=held_python())
    ex.update_parameters(**_sbatch_parameters(cfg))
    return ex


def sbatch_script(cfg: Any, run_dir: str) -> str:
    """Exactly the sbatch script `submit` hands to sbatch (submitit writes the same text)."""
    ex = _executor(cfg, run_dir)
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


def standalone_sbatch(cfg: Any, run_dir: str, recipe_path: str) -> str:
    """A plain sbatch script for sites that prefer sbatch: srun starts one task per node, each running the
    launcher's node task (torchrun's agent with the static rendezvous), the same code path `--slurm` uses."""
    params = _sbatch_parameters(cfg)
    flags = {"job-name": params["job_name"], "nodes": params["nodes"], "ntasks-per-node": 1,
             "cpus-per-task": params["cpus_per_task"], "time": params["time"],
             "signal": f"USR2@{params['signal_delay_s']}", "requeue": True, "open-mode": "append",
             "output": os.path.join(run_dir, SUBMIT_DIR, "%j_sbatch.out")}
    for key in ("partition", "account", "qos", "constraint", "mem", "exclusive", "gpus_per_node"):
        if key in params:
            flags[key.replace("_", "-")] = params[key]
    for key, value in params["additional_parameters"].items():
        flags[key.replace("_", "-")] = value
    lines = ["#!/bin/bash", f"# Generated by: launch {recipe_path} --emit-sbatch", "# Submit with: sbatch THIS_FILE",
             ""]
    for key in sorted(flags):
        value = flags[key]
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}")
    lines += ["", "set -eo pipefail"] + list(params["setup"])
    lines += ["", "# One task per node, started with SIGUSR2 and SIGTERM blocked until it can take them. Each finds the",
              "# first node (scontrol show hostnames), derives the port from the job id, takes its node rank from",
              "# SLURM_NODEID (expanded by each task, not here), runs torchrun's agent, and after a preemption signal",
              "# the first node's task requeues the job."]
    lines += relay_signals(f"srun --kill-on-bad-exit=1 {SRUN_CPUS} --unbuffered {held_python()} -m "
                           f"launcher.backends.slurm {shlex.quote(run_dir)}") + [""]
    return "\n".join(lines)


def submit(cfg: Any, run_dir: str, wait: bool = False) -> int:
    """Submit the job; print its id, logs and the commands to follow and cancel it."""
    ex = _executor(cfg, run_dir)
    try:
        job = ex.submit(NodeTask(), run_dir)
    except Exception as e:  # submitit raises with sbatch's own output in the message
        text = str(e)
        lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
        raise UsageError(f"sbatch refused the job: {lines[-1] if lines else text.strip()}") from None
    info = {"backend": "slurm", "job_id": job.job_id, "submitted_at": time.time(),
            "slurm_logs": os.path.join(run_dir, SUBMIT_DIR, job.job_id)}
    _update_launch_json(run_dir, info)
    print(f"launch: submitted SLURM job {job.job_id} ({cfg.launch.nodes} nodes x "
          f"{cfg.launch.gpus_per_node or 1} processes)", file=sys.stderr)
    print(f"  logs:    {os.path.join(run_dir, 'logs')}/rank<r>.log and {info['slurm_logs']}/", file=sys.stderr)
    print(f"  follow:  launch status {run_dir}    (or: tail -f {os.path.join(run_dir, 'logs', 'rank0.log')})",
          file=sys.stderr)
    print(f"  cancel:  launch cancel {run_dir}    (or: scancel {job.job_id})", file=sys.stderr)
    if wait:
        return wait_for(job.job_id, run_dir)
    return 0


def _update_launch_json(run_dir: str, info: dict) -> None:
    path = os.path.join(run_dir, "launch.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data.update(info)
    data.setdefault("job_ids", [])
    if info.get("job_id") and info["job_id"] not in data["job_ids"]:
        data["job_ids"].append(info["job_id"])
    write_atomic(path, json.dumps(data, indent=2))


def job_state(job_id: str) -> str:
    """The job's state: squeue while it is known there, else sacct; UNKNOWN when neither answers."""
    r = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip().splitlines()[0]
    r = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip().splitlines()[-1].split()[0]
    return "UNKNOWN"


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


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


def wait_for(job_id: str, run_dir: str, timeout_s: float = 3600) -> int:
    state = wait_state(job_id, FINAL, timeout_s)
    print(f"launch: SLURM job {job_id} ended: {state}", file=sys.stderr)
    return 0 if state == "COMPLETED" else 1


# ----------------------------------------------------------------------------------------------- inside the job

@dataclass
class SlurmEnv:
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
    plan = local.plan(cfg, run_dir, rdzv_endpoint=f"{head}:{port}", node_rank=env.node_id,
                      run_id=f"slurm-{env.job_id}")
    print(f"launch: SLURM job {env.job_id} node {env.node_id}/{env.nnodes} ({hosts[env.node_id]}), rendezvous "
          f"{head}:{port}, {plan.procs_per_node} processes, restart {env.restart_count}", flush=True)
    rc = local.run(plan)
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


CANCEL_MARKER = "cancelled.json"  # {"job_id": ...}: left in the run directory by `launch cancel` before scancel


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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m launcher.backends.slurm RUN_DIR")
    try:
        sys.exit(node_main(sys.argv[1]))
    except LauncherError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)

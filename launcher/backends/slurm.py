"""The SLURM backend, the login node's side: a job through submitit with one task per node; each task runs the
local backend (torchrun's agent) inside the job (`backends.slurm_node`).

    launch recipe.yaml --nodes 2 --gpus 8 --slurm            # submit (prints job id, logs, follow/cancel commands)
    launch recipe.yaml --nodes 2 --gpus 8 --slurm --dry-run  # the sbatch script that would be submitted
    launch recipe.yaml --nodes 2 --gpus 8 --emit-sbatch      # a standalone sbatch script (srun + torchrun)
    python -m launcher.backends.slurm RUN_DIR                # what each node's task runs (inside an allocation)

`plan(cfg, run_dir, options)` then `run(plan)`, as every backend. The batch script's shell survives a preemption
signal that reaches it and passes it on to the node tasks (see `relay_signals`); how the tasks take it, checkpoint
and requeue the job is `backends.slurm_node`'s.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from .. import recipe
from ..errors import LauncherError, UsageError
from ..files import write_atomic
from . import slurm_node
from .plan import Options
from .slurm_node import NodeTask  # submitit's pickles of earlier submissions name launcher.backends.slurm.NodeTask
from .slurm_state import FINAL, wait_state

SUBMIT_DIR = "slurm"  # under the run directory: submitit's pickles and the tasks' stdout/stderr


# ----------------------------------------------------------------------------------------------- the interface

@dataclass
class SlurmPlan:
    """A job to submit (or, with `options.emit_sbatch`, a standalone sbatch script to print). Its sbatch parameters,
    which ask sinfo about the partition, are worked out only when a script is written or submitted."""

    cfg: Any
    run_dir: str
    options: Options

    def to_dict(self) -> dict[str, Any]:
        procs = self.cfg.launch.gpus_per_node or 1
        return {"backend": "slurm", "nodes": self.cfg.launch.nodes, "procs_per_node": procs,
                "world_size": self.cfg.launch.nodes * procs}

    def describe(self) -> str:
        return ("# sbatch script that would be submitted (nothing was submitted)\n"
                + recipe.redact(sbatch_script(self.cfg, self.run_dir)) + "\n")


def plan(cfg: Any, run_dir: str, options: Options | None = None) -> SlurmPlan:
    """The job for this recipe; UsageError when the run directory cannot go into the job's command line."""
    problem = recipe.script_value_problem("--run-dir", run_dir)
    if problem:
        raise UsageError(problem)
    return SlurmPlan(cfg, run_dir, options or Options())


def run(p: SlurmPlan) -> int:
    """Submit the job (and with `options.wait` wait for its end), or print the standalone script."""
    if p.options.emit_sbatch:
        print(standalone_sbatch(p.cfg, p.run_dir, p.options.recipe_path))
        print(f"launch: wrote {os.path.join(p.run_dir, 'config.yaml')}; the script runs it", file=sys.stderr)
        return 0
    return submit(p.cfg, p.run_dir, wait=p.options.wait)


# ----------------------------------------------------------------------------------------------- sbatch

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
# signal waits (pending) until the node task takes it (slurm_node.hold_preemption_signal) instead of killing it.
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


@functools.cache
def _executor_class() -> type:
    import submitit

    class LauncherExecutor(submitit.SlurmExecutor):
        """submitit's SlurmExecutor with the launcher's batch script: its srun line run through `_with_relay`.

        The only place that touches submitit's private `_make_submission_file_text` (and `_submitit_command_str`):
        submitit has no public way to wrap the srun line (`setup`, `teardown` and `srun_args` only add lines
        before or after it, or arguments to it), and the relay needs srun in the background between a trap and a
        wait. `submit` writes the script through the override, `script()` gives --dry-run the same text.
        tests/golden/sbatch_dry_run.txt holds the whole script and test_slurm_submit.py::
        test_dry_run_prints_the_sbatch_script_and_submits_nothing compares it in full, so a submitit release that
        writes it differently fails there first (constraints.txt pins the tested submitit)."""

        @classmethod
        def affinity(cls) -> int:  # submitit refuses to be built where srun is missing: --dry-run on a laptop
            return 2

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return _with_relay(super()._make_submission_file_text(command, uid))

        def script(self) -> str:
            """The batch script a submit hands to sbatch."""
            return self._make_submission_file_text(self._submitit_command_str, "dry-run")

    return LauncherExecutor


def _executor(cfg: Any, run_dir: str) -> Any:
    ex = _executor_class()(folder=os.path.join(run_dir, SUBMIT_DIR, "%j"),
                           max_num_timeout=int(cfg.slurm.max_requeues), python=held_python())
    ex.update_parameters(**_sbatch_parameters(cfg))
    return ex


def sbatch_script(cfg: Any, run_dir: str) -> str:
    """Exactly the sbatch script `submit` hands to sbatch (submitit writes the same text)."""
    return _executor(cfg, run_dir).script()


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


# ----------------------------------------------------------------------------------------------- submit, follow

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


def wait_for(job_id: str, run_dir: str, timeout_s: float = 3600) -> int:
    state = wait_state(job_id, FINAL, timeout_s)
    print(f"launch: SLURM job {job_id} ended: {state}", file=sys.stderr)
    return 0 if state == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(slurm_node.main(sys.argv[1:]))

"""The `launch sweep` command.

    launch sweep RECIPE [--dir DIR] [--nodes N --gpus G] [--slurm] [--sweep FILE] [--dry-run] [key=value ...]
    launch sweep status DIR

Exit codes: 0 the sweep ran its trials (at least one COMPLETE), 1 it did not (every trial failed, or
sweep.max_failures stopped it), 2 bad input (every problem together, nothing started), 128+N stopped by signal N
(the running trials checkpointed; the same command resumes them).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from typing import Any

from ..errors import RecipeError, UsageError

# What must stay the same for a sweep directory to be continued (trials, parallel, max_failures may change).
FIXED = ("metric", "mode", "objective", "sampler", "params")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hyperparameter search over a recipe (the recipe's `sweep` section), each trial an ordinary "
                    "launch run with its own run directory, checkpoints and exact resume. Running the same command "
                    "on the same --dir continues the sweep.",
        epilog="also: launch sweep status DIR   (one row per trial, best first)\n"
               "exit codes: 0 done, 1 no trial completed (or sweep.max_failures reached), 2 bad input, "
               "128+N stopped by signal N")
    p.add_argument("recipe", help="the recipe YAML (with a sweep section, or --sweep FILE)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every trial")
    p.add_argument("--dir", help="the sweep directory (default: sweep.dir, else sweeps/<run.name>)")
    p.add_argument("--sweep", dest="sweep_file", help="a YAML file with the sweep section (replaces the recipe's)")
    p.add_argument("--nodes", type=int, help="nodes per trial (launch.nodes; several need --slurm)")
    p.add_argument("--gpus", type=int, help="processes per node of each trial (launch.gpus_per_node)")
    p.add_argument("--slurm", action="store_true", help="every trial a SLURM job (the controller stays here)")
    p.add_argument("--controller-job", action="store_true",
                   help="with --slurm: run the controller itself as a small requeueable SLURM job (1 CPU), which "
                        "requeues itself on SLURM's signal and follows its trials again")
    p.add_argument("--dry-run", action="store_true", help="print the space, the trials and (grid) their list; "
                   "start nothing")
    return p


def main(argv: list[str]) -> int:
    if argv and argv[0] == "status":
        return status(argv[1:])
    a = _parser().parse_intermixed_args(argv)
    from .. import recipe
    from . import spec as spec_mod

    flags = []
    if a.nodes is not None:
        flags.append(f"launch.nodes={a.nodes}")
    if a.gpus is not None:
        flags.append(f"launch.gpus_per_node={a.gpus}")
    if a.slurm:
        flags.append("backend=slurm")
    if not os.path.isfile(a.recipe):
        raise UsageError(f"recipe not found: {a.recipe}")
    recipe_path = os.path.abspath(a.recipe)
    overrides = [*a.overrides, *flags]
    cfg = recipe.load(recipe_path, overrides).cfg
    spec = spec_mod.read(cfg, recipe_path, overrides, a.sweep_file)
    problems = []
    slurm = cfg.backend == "slurm"
    if not slurm and int(cfg.launch.nodes) > 1:
        problems.append(f"launch.nodes={cfg.launch.nodes}: a sweep on this machine runs single-node trials; "
                        f"give --slurm for trials of several nodes")
    from . import study as study_mod
    problems += study_mod.args_problem(spec)
    if problems:
        raise RecipeError(problems)
    sweep_dir = os.path.abspath(a.dir or cfg.sweep.dir or os.path.join("sweeps", cfg.run.name))
    name = os.path.basename(sweep_dir.rstrip("/")) or "sweep"
    if a.controller_job and not slurm:
        raise UsageError("--controller-job runs the controller as a SLURM job: give --slurm too")
    if a.controller_job and os.environ.get(CONTROLLER_ENV) != "1":
        script = controller_script(cfg, sweep_dir, name, [a.recipe, *[x for x in argv if x != a.recipe]])
        if a.dry_run:
            print(script, end="")
            return 0
        return submit_controller(script, sweep_dir, name)
    if a.dry_run:
        print(describe(spec, sweep_dir, slurm))
        return 0
    _check_same_sweep(spec, sweep_dir)
    from .controller import Controller
    from .. import hardware

    procs = int(cfg.launch.gpus_per_node or hardware.visible_gpu_count() or 1)
    ctl = Controller(recipe_path=recipe_path, overrides=list(a.overrides), flags=_trial_flags(a), cfg=cfg,
                     spec=spec, sweep_dir=sweep_dir, name=name, slurm=slurm, procs=procs)
    code = ctl.run()
    print(_status_text(sweep_dir), end="")
    return code


CONTROLLER_ENV = "LAUNCHER_SWEEP_CONTROLLER_JOB"  # set in the controller's own SLURM job


def controller_script(cfg: Any, sweep_dir: str, name: str, argv: list[str]) -> str:
    """The sbatch script of the controller's job: one task on one CPU, requeueable, signalled (USR2, to the
    controller itself: the shell execs it) signal_grace_s before its time limit. Every value on a line of its own
    and shell-quoted; one with a line break is refused (exit 2)."""
    import shlex

    from ..recipe import script_value_problem

    problems = [p for p in (script_value_problem(f"argument {i}", v) for i, v in enumerate(argv)) if p]
    problems += [p for p in (script_value_problem(k, v) for k, v in (("--dir", sweep_dir), ("the working directory",
                 os.getcwd()), ("the Python interpreter's path", sys.executable))) if p]
    if problems:
        raise RecipeError(problems)
    s = cfg.slurm
    lines = ["#!/bin/bash", f"#SBATCH --job-name={shlex.quote('sweep-' + name)}",
             f"#SBATCH --output={shlex.quote(os.path.join(sweep_dir, 'controller-%j.log'))}",
             "#SBATCH --open-mode=append", "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=1", "#SBATCH --requeue",
             f"#SBATCH --signal=B:USR2@{int(s.signal_grace_s)}", f"#SBATCH --time={int(s.time_min)}"]
    lines += [f"#SBATCH --{k}={shlex.quote(str(v))}" for k, v in (("partition", s.partition), ("account", s.account),
                                                                 ("qos", s.qos)) if v]
    lines += [str(x) for x in (s.setup or [])]
    lines += [f"export {CONTROLLER_ENV}=1", f"cd {shlex.quote(os.getcwd())}",
              "exec " + " ".join(shlex.quote(x) for x in [sys.executable, "-m", "launcher", "sweep", *argv,
                                                          "--dir", sweep_dir])]
    return "\n".join(lines) + "\n"


def submit_controller(script: str, sweep_dir: str, name: str) -> int:
    import subprocess

    from ..files import write_atomic

    os.makedirs(sweep_dir, exist_ok=True)
    r = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"sbatch refused the controller's job: {r.stderr.strip()}")
    job = r.stdout.strip().split(";")[0]
    write_atomic(os.path.join(sweep_dir, "controller-job.json"), json.dumps({"job_id": job}))
    print(f"launch sweep: the controller of sweep {name} is SLURM job {job} "
          f"(log: {os.path.join(sweep_dir, f'controller-{job}.log')}); follow it with "
          f"launch sweep status {sweep_dir}", file=sys.stderr)
    return 0


def _trial_flags(a: argparse.Namespace) -> list[str]:
    out = []
    if a.nodes is not None:
        out += ["--nodes", str(a.nodes)]
    if a.gpus is not None:
        out += ["--gpus", str(a.gpus)]
    return out


def describe(spec: Any, sweep_dir: str, slurm: bool) -> str:
    lines = [f"# sweep in {sweep_dir}: {spec.trials} trials, {spec.parallel} at a time "
             f"({'SLURM jobs' if slurm else 'on this machine'})",
             f"# {spec.mode} {spec.metric} ({spec.objective} value); sampler {spec.sampler}, pruner {spec.pruner}"
             f"{f' from step {spec.min_steps}' if spec.pruner != 'none' and spec.min_steps else ''}"]
    lines += [f"  {p.key}: {p.describe()}" for p in spec.params]
    if spec.sampler == "grid":
        from .spec import override
        lines.append(f"# the grid: {len(spec.grid())} combinations")
        lines += [f"  {i:4d}  " + " ".join(override(k, v) for k, v in combo.items())
                  for i, combo in enumerate(spec.grid()[:spec.trials])]
    return "\n".join(lines)


def _check_same_sweep(spec: Any, sweep_dir: str) -> None:
    """The first start writes DIR/sweep.yaml, the resolved sweep (its space, metric, sampler, ...); a later start
    must search the same (trials, parallel, max_failures and the rest may change)."""
    from dataclasses import asdict

    import yaml

    from ..files import write_atomic

    path = os.path.join(sweep_dir, "sweep.yaml")
    resolved = json.loads(json.dumps(asdict(spec), default=str))
    mine = {k: resolved[k] for k in FIXED}
    try:
        with open(path) as f:
            theirs = yaml.safe_load(f)
    except FileNotFoundError:
        os.makedirs(sweep_dir, exist_ok=True)
        write_atomic(path, "# the sweep in this directory, resolved (launch sweep writes it at its first start)\n"
                     + yaml.safe_dump(resolved, sort_keys=False))
        return
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path} is unreadable ({e}); it records what the sweep in {sweep_dir} searches") from None
    differ = [k for k in FIXED if not isinstance(theirs, dict) or theirs.get(k) != mine.get(k)]
    if differ:
        raise RecipeError([f"{sweep_dir} holds a sweep with another {k} ({json.dumps(theirs.get(k))}; this command: "
                           f"{json.dumps(mine.get(k))}); continue it with the same sweep or give another --dir"
                           for k in differ])


# ----------------------------------------------------------------------------------------------- status

def status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="launch sweep status", description="One row per trial of a sweep, best first "
                                "(also in DIR/trials.csv).")
    p.add_argument("dir")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.dir, "sweep.json")):
        raise UsageError(f"{a.dir} is not a sweep directory (no sweep.json); `launch sweep RECIPE --dir {a.dir}` "
                         f"starts one")
    print(_status_text(a.dir), end="")
    return 0


def controller_alive(sweep_dir: str) -> bool:
    try:
        with open(os.path.join(sweep_dir, "controller.lock")) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            return False
    except FileNotFoundError:
        return False


def _status_text(sweep_dir: str) -> str:
    from .records import last_step, table

    try:
        with open(os.path.join(sweep_dir, "sweep.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return ""
    alive = controller_alive(sweep_dir)
    for r in data.get("trials", []):
        if r["state"] in ("RUNNING", "WAITING", "PREEMPTED"):
            r["steps"] = last_step(r["run_dir"])
    counts: dict[str, int] = {}
    for r in data.get("trials", []):
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    head = (f"sweep {data.get('name')} ({sweep_dir}): {len(data.get('trials', []))} of {data.get('trials_wanted')} "
            f"trials ({', '.join(f'{n} {s}' for s, n in counts.items())}); {data.get('mode')} {data.get('metric')}; "
            f"controller {'running' if alive else 'not running'}\n")
    best = os.path.join(sweep_dir, "best.yaml")
    tail = f"best: {best}\n" if os.path.exists(best) else ""
    return head + table(data, alive) + tail


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

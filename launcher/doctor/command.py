"""The `launch doctor` command: check the recipe, start the ranks the recipe would train with (the same
backend, the same process layout), print what they found as a table, write RUN_DIR/doctor.json, and exit 0 when
every check passed (warnings included), 1 when one failed, 2 for a recipe that does not load. No torch import here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid

from .. import __version__
from ..errors import RecipeError, UsageError
from .report import CHECKS, EXIT_BAD_RECIPE, FAIL, PASS, SKIP, Result, exit_code, parse_size, table, write_json

RANK_CHECKS = tuple(c for c in CHECKS if c not in ("recipe", "slurm"))
NEEDS_TRAINER = ("overfit", "finite", "memory", "batch_size", "data")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch doctor", description="Preflight checks on the recipe's own process "
                                "layout: " + ", ".join(CHECKS) + ". Exit 0: all passed; 1: a check failed; 2: a bad "
                                "recipe.")
    p.add_argument("recipe", help="the recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, as for launch")
    p.add_argument("--nodes", type=int, help="nodes (launch.nodes)")
    p.add_argument("--gpus", type=int, help="processes per node (launch.gpus_per_node)")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous, for several nodes (as for launch)")
    p.add_argument("--run-dir", help="the run directory (default: the recipe's); doctor.json goes there")
    p.add_argument("--only", help="comma-separated checks to run: " + ",".join(CHECKS))
    p.add_argument("--slurm", action="store_true", help="check the recipe's SLURM job against the cluster "
                   "(sbatch --test-only) from a login node")
    p.add_argument("--memory-budget", help="memory per rank the batch-size probe may use on the CPU, e.g. 8G "
                   "(default: the machine's or the SLURM allocation's memory per rank)")
    p.add_argument("--overfit-steps", type=int, default=200, help="most steps on the fixed batch (default 200)")
    p.add_argument("--overfit-target", type=float, default=0.2,
                   help="the loss must fall to this fraction of its first value (default 0.2)")
    return p


def _selected(only: str | None) -> list[str]:
    if not only:
        return list(CHECKS)
    wanted = [c.strip() for c in only.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CHECKS]
    if unknown:
        raise UsageError(f"--only: unknown check {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")
    return [c for c in CHECKS if c in wanted]


def main(argv: list[str]) -> int:
    from .. import recipe
    from ..backends import local
    from ..backends.plan import Options

    a = _parser().parse_intermixed_args(argv)
    checks = _selected(a.only)
    if a.memory_budget is not None:
        try:
            parse_size(a.memory_budget)
        except ValueError as e:
            raise UsageError(str(e)) from None
    flags = [f"launch.nodes={a.nodes}"] * (a.nodes is not None) + [f"launch.gpus_per_node={a.gpus}"] * (a.gpus is not None)
    if a.slurm:  # validated as a submission: every value bound for the sbatch script on one line of its own
        flags.append("backend=slurm")
    t0 = time.perf_counter()
    try:
        cfg = recipe.load(a.recipe, [*a.overrides, *flags]).cfg
    except RecipeError as e:
        print(table([Result("recipe", FAIL, "does not load", "every problem is listed below")]))
        print(f"\n{e}")
        print(f"launch doctor: {a.recipe} does not load; nothing was started", file=sys.stderr)
        return EXIT_BAD_RECIPE
    results = [Result("recipe", PASS, "loads and validates", seconds=round(time.perf_counter() - t0, 2))]
    run_dir = os.path.abspath(a.run_dir or cfg.run.dir or os.path.join("runs", cfg.run.name))
    ranked = [c for c in checks if c in RANK_CHECKS]
    if cfg.script.path or cfg.script.module:
        results += [Result(c, SKIP, "", "the recipe runs its own script; this check needs the built-in trainer")
                    for c in ranked if c in NEEDS_TRAINER]
        ranked = [c for c in ranked if c not in NEEDS_TRAINER]
    if "slurm" in checks:
        from . import slurm as slurm_check
        found = slurm_check.check(cfg, submit=a.slurm or cfg.backend == "slurm")
        if found is not None:  # None: neither inside an allocation nor asked to check a submission
            results.append(found)
    if (a.slurm or cfg.backend == "slurm") and ranked and not os.environ.get("SLURM_JOB_ID"):
        results += [Result(c, SKIP, "", "run `launch doctor` inside the job's allocation (salloc, or srun on each "
                           "node) for the checks on its ranks") for c in ranked]
        ranked = []
    if ranked:
        results += _on_ranks(cfg, run_dir, ranked, a, local, Options, recipe)
    print(table(results))
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "doctor.json"), results, recipe=os.path.abspath(a.recipe),
               launcher_version=__version__, world_size=int(cfg.launch.nodes) * int(cfg.launch.gpus_per_node or 1),
               seconds=round(time.perf_counter() - t0, 2))
    from . import pictures
    drawn = pictures.write(os.path.join(run_dir, "doctor.png"), results)
    print(f"launch doctor: {os.path.join(run_dir, 'doctor.json')}" + (f", {drawn}" if drawn else ""), file=sys.stderr)
    return exit_code(results)


def _on_ranks(cfg, run_dir: str, checks: list[str], a: argparse.Namespace, local, Options, recipe) -> list[Result]:
    """Start the ranks in RUN_DIR/doctor (the doctor's own logs and config), with the checkpoint directory the run
    would use, and read their results."""
    doctor_dir = os.path.join(run_dir, "doctor")
    shutil.rmtree(doctor_dir, ignore_errors=True)  # the doctor's own: an earlier doctor's logs and results
    os.makedirs(os.path.join(doctor_dir, "logs"))
    cfg.checkpoint.dir = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    cfg.run.dir = doctor_dir
    cfg.launch.max_restarts = 0
    plan = local.plan(cfg, doctor_dir, Options(rdzv_endpoint=a.rdzv_endpoint))
    spec = {"checks": checks, "probe_id": uuid.uuid4().hex[:12], "overfit_steps": a.overfit_steps,
            "overfit_target": a.overfit_target, "memory_budget": a.memory_budget}
    plan.env["LAUNCHER_DOCTOR"] = json.dumps(spec)
    recipe.save(cfg, os.path.join(doctor_dir, "config.yaml"), extra={"launcher_version": __version__})
    print(f"launch doctor: {', '.join(checks)} on {plan.world_size} process{'es' if plan.world_size != 1 else ''} "
          f"({plan.nodes} node{'s' if plan.nodes != 1 else ''} x {plan.procs_per_node}, {plan.device}), logs in "
          f"{os.path.join(doctor_dir, 'logs')}", file=sys.stderr)
    rc = local.start(plan)
    path = os.path.join(doctor_dir, "results.json")
    if rc != 0 or not os.path.exists(path):
        return [Result("ranks", FAIL, f"exit code {rc}", f"a rank failed before the checks finished (the report "
                       f"above names it); its log is in {os.path.join(doctor_dir, 'logs')}")]
    with open(path) as f:
        return [Result.from_dict(d) for d in json.load(f)]

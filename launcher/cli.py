"""The `launch` command (also `python -m launcher`).

    launch RECIPE.yaml [--nodes N] [--gpus G] [--dry-run] [--run-dir DIR] [key=value ...]
    launch train.py --gpus 2 [-- SCRIPT ARGS]          # bring your own script, torchrun-style
    launch --explain                                    # every recipe key with its type and meaning

Exit codes: 0 done, 1 a rank failed, 2 bad input (nothing was started), 128+N stopped by signal N.
This module and everything it imports before the actual launch stay free of torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Sequence

from . import __version__, backends, procs
from .errors import LauncherError, UsageError
from .files import write_atomic

if TYPE_CHECKING:
    from .backends.plan import BackendPlan

HELP_EPILOG = """\
examples:
  launch recipes/quickstart.yaml --gpus 2
  launch recipes/digits.yaml --gpus 2 trainer.max_epochs=3 data.batch_size=64
  launch recipes/quickstart.yaml --dry-run
  launch my_train.py --gpus 2 -- --lr 0.1       (a plain torchrun-style script)
  launch recipe.yaml --nodes 2 --gpus 8 --rdzv-endpoint node1:29500   (on each of the 2 nodes)
  launch --explain                              (all recipe keys)
  launch doctor recipe.yaml --gpus 2            (preflight checks: overfit one batch, collectives, storage)
  launch sweep recipe.yaml --gpus 2             (hyperparameter search, the recipe's sweep section; each trial a run)
  launch sweep status sweeps/NAME               (one row per trial, best first)
  launch recipe.yaml --nodes 2 --gpus 8 --slurm                       (a SLURM job; --dry-run shows the sbatch script)
  launch status runs/NAME                       (SLURM state, progress, last checkpoint, logs)
  launch cancel runs/NAME
  launch ckpt ls runs/quickstart/checkpoints    (checkpoints: step, epoch, size, committed, latest)
  launch ckpt export runs/quickstart/checkpoints model.pt   (newest committed model; or model.safetensors)

exit codes: 0 done, 1 a rank failed, 2 bad input (nothing started), 128+N stopped by signal N
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP_EPILOG,
        description="Train a recipe (YAML) or a plain script with torchrun on this machine.")
    p.add_argument("recipe", nargs="?", help="recipe YAML, or a Python training script")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any recipe key")
    p.add_argument("--nodes", "--nnodes", dest="nodes", type=int, help="number of nodes (launch.nodes)")
    p.add_argument("--gpus", "--nproc-per-node", "--nproc_per_node", dest="gpus", type=int,
                   help="processes per node: one per GPU, or CPU processes without GPUs (launch.gpus_per_node)")
    p.add_argument("--run-dir", help="run directory (default: run.dir, else runs/<run.name>)")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", metavar="HOST:PORT",
                   help="rendezvous of a multi-node run: the same HOST:PORT on every node")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int,
                   help="fix this node's rank (static rendezvous); default: assigned by the rendezvous")
    p.add_argument("--max-restarts", type=int, help="restarts of a failed worker group (launch.max_restarts)")
    p.add_argument("-m", "--module", help="run this module as the training script (python -m MODULE)")
    p.add_argument("--slurm", action="store_true", help="submit to SLURM through submitit (backend: slurm)")
    p.add_argument("--emit-sbatch", action="store_true",
                   help="print a standalone sbatch script (srun + torchrun) for this recipe and submit nothing")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait until the job ends; exit 0 if it completed")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe and the process plan (or the sbatch script); start nothing")
    p.add_argument("--explain", action="store_true", help="list every recipe key with its type and meaning")
    p.add_argument("--version", action="version", version=f"launcher {__version__}")
    return p


def _split_script_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
    except LauncherError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # the reader went away (`launch --explain | head`): no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    if argv is None:  # the command: leave without the interpreter's teardown of torch (procs.exit_now)
        procs.exit_now(code)
    return code


def _ckpt(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="launch ckpt", description="Inspect and export checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    p_ls = sub.add_parser("ls", help="list checkpoints: step, epoch, size, world size, committed, latest")
    p_ls.add_argument("dir", help="checkpoint directory: a local path or s3://bucket/prefix")
    p_ex = sub.add_parser("export", help="write a committed checkpoint's model as one file (torch.load or safetensors)")
    p_ex.add_argument("ckpt", help="a checkpoint folder (.../step-<N>), or a checkpoint directory: its newest "
                                   "committed checkpoint, as resume: auto picks it")
    p_ex.add_argument("out", help="output file, e.g. model.pt or model.safetensors")
    p_ex.add_argument("--format", choices=("pt", "safetensors"),
                      help="pt: torch.load(out, weights_only=True) reads it; safetensors: needs "
                           "pip install 'launcher[safetensors]' (default: safetensors for a .safetensors out, else pt)")
    for sp in (p_ls, p_ex):
        sp.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS, or AWS_ENDPOINT_URL)")
    a = p.parse_args(argv)
    from .checkpoint import tools
    if a.cmd == "ls":
        return tools.ls(a.dir, a.endpoint_url)
    return tools.export(a.ckpt, a.out, a.endpoint_url, a.format)


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "ckpt":
        return _ckpt(argv[1:])
    if argv and argv[0] == "doctor":
        from .doctor.command import main as doctor
        return doctor(argv[1:])
    if argv and argv[0] == "sweep":
        from .sweep.command import main as sweep
        return sweep(argv[1:])
    if argv and argv[0] == "status":
        return _status(argv[1:])
    if argv and argv[0] == "cancel":
        return _cancel(argv[1:])
    own, script_args = _split_script_args(argv)
    args = _parser().parse_intermixed_args(own)
    from . import recipe

    if args.explain:
        rows = recipe.explain()
        widths = [max(len(row[i]) for row in rows) for i in (0, 1)]
        for key, tp, text in rows:
            print(f"{key:{widths[0]}} {tp:{widths[1]}} {text}")
        return 0

    defaults: dict = {}
    path = args.recipe
    if args.module:
        if path is not None:  # `launch -m pkg.train key=value`: the positional is an override
            args.overrides.insert(0, path)
            path = None
        defaults = {"script": {"module": args.module, "args": script_args},
                    "run": {"name": args.module.rsplit(".", 1)[-1]}}
    elif path is None:
        raise UsageError("name a recipe (launch RECIPE.yaml) or a script (launch train.py); see launch --help")
    elif path.endswith(".py"):
        if not os.path.isfile(path):
            raise UsageError(f"script not found: {path}")
        defaults = {"script": {"path": path, "args": script_args},
                    "run": {"name": os.path.splitext(os.path.basename(path))[0]}}
        path = None
    elif script_args:
        defaults = {"script": {"args": script_args}}

    flags = []
    if args.nodes is not None:
        flags.append(f"launch.nodes={args.nodes}")
    if args.gpus is not None:
        flags.append(f"launch.gpus_per_node={args.gpus}")
    if args.max_restarts is not None:
        flags.append(f"launch.max_restarts={args.max_restarts}")
    if args.slurm or args.emit_sbatch:
        flags.append("backend=slurm")
    loaded = recipe.load(path, [*args.overrides, *flags], defaults=defaults)
    cfg = loaded.cfg

    run_dir = os.path.abspath(args.run_dir or cfg.run.dir or os.path.join("runs", cfg.run.name))
    cfg.run.dir = run_dir

    from .backends.plan import Options

    backend = backends.get(cfg.backend)
    plan = backend.plan(cfg, run_dir, Options(rdzv_endpoint=args.rdzv_endpoint, node_rank=args.node_rank,
                                              recipe_path=args.recipe or "", emit_sbatch=args.emit_sbatch,
                                              wait=args.wait))
    if args.dry_run:
        print("# resolved recipe")
        print(recipe.to_yaml(cfg), end="")
        print(plan.describe(), end="")
        return 0

    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    recipe.save(cfg, os.path.join(run_dir, "config.yaml"), extra={"launcher_version": __version__})
    _write_launch_json(run_dir, plan, argv)
    return backend.run(plan)


def _status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="launch status", description="State, progress, checkpoint and logs of a run.")
    p.add_argument("run_dir")
    a = p.parse_args(argv)
    from .status import status
    return status(a.run_dir)


def _cancel(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="launch cancel", description="Cancel a run's SLURM job.")
    p.add_argument("run_dir")
    a = p.parse_args(argv)
    from .status import cancel
    return cancel(a.run_dir)


def _write_launch_json(run_dir: str, plan: BackendPlan, argv: list[str]) -> None:
    import socket

    from .recipe import redact

    info = {"launcher_version": __version__, "argv": [redact(a) for a in argv], "cwd": os.getcwd(),
            "host": socket.gethostname(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **plan.to_dict()}
    path = os.path.join(run_dir, "launch.json")
    write_atomic(path, json.dumps(info, indent=2))


if __name__ == "__main__":
    main()

"""What a sweep leaves in its directory, written by the controller alone: sweep.json (every trial: state, values,
metric, steps, run directory, failure), trials.csv (the same, one row per trial), best.yaml (the best trial's full
recipe, ready to launch), the pictures (Optuna's optimisation history, parallel coordinates and parameter
importances, with matplotlib), and each trial's TensorBoard hparams (its values beside its own metrics). Also the
status table `launch sweep status DIR` prints from sweep.json, which reads and never writes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from typing import Any

from ..files import tail_lines, write_atomic

STATE_NAMES = {"COMPLETE": "COMPLETE", "PRUNED": "PRUNED", "FAIL": "FAILED", "RUNNING": "RUNNING",
               "WAITING": "WAITING"}
ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "PREEMPTED": 2, "WAITING": 3, "FAILED": 4}


def last_step(run_dir: str) -> int | None:
    """The trial's latest logged step (metrics.jsonl's last row)."""
    for line in reversed(tail_lines(os.path.join(run_dir, "metrics.jsonl"), 20, 4096)):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def trial_rows(study: Any, controller: Any) -> list[dict[str, Any]]:
    """One row per trial, best first (then pruned, running, waiting, failed; by number within each)."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        run_dir = t.user_attrs.get("run_dir") or controller.run_dir(t.number)
        state = STATE_NAMES.get(t.state.name, t.state.name)
        handle = controller.running.get(t.number)
        if t.state == TrialState.RUNNING:
            slurm_state = getattr(handle, "state", None)
            if handle is None:
                state = "PREEMPTED"  # interrupted: the next controller resumes it
            elif slurm_state == "PENDING":
                from .study import last_event
                ev = last_event(run_dir, ("ready", "preempted"))
                state = "PREEMPTED" if ev is not None and ev.get("event") == "preempted" else "WAITING"
        value = t.value if t.state == TrialState.COMPLETE else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        failure = t.user_attrs.get("failure") or {}
        rows.append({"number": t.number, "state": state, "params": dict(t.params), "value": value,
                     "steps": last_step(run_dir), "run_dir": run_dir, "job_id": t.user_attrs.get("job_id"),
                     "started": t.user_attrs.get("attempt_started"), "exited": t.user_attrs.get("exited"),
                     "pruned_after": t.user_attrs.get("prune_step"), "error": failure.get("error"),
                     "failed_rank": failure.get("rank"), "log": failure.get("log")})
    spec = controller.spec
    sign = 1 if spec.mode == "min" else -1

    def key(r: dict[str, Any]) -> tuple:
        v = r["value"]
        return (ORDER.get(r["state"], 9), sign * v if isinstance(v, (int, float)) else 0.0, r["number"])

    return sorted(rows, key=key)


def write_all(study: Any, spec: Any, sweep_dir: str, name: str, controller: Any, final: bool = False) -> None:
    rows = trial_rows(study, controller)
    data = {"name": name, "metric": spec.metric, "mode": spec.mode, "objective": spec.objective,
            "sampler": spec.sampler, "pruner": spec.pruner, "trials_wanted": spec.trials,
            "params": [p.key for p in spec.params], "updated": time.time(), "trials": rows}
    write_atomic(os.path.join(sweep_dir, "sweep.json"), json.dumps(data, indent=2, default=str))
    write_atomic(os.path.join(sweep_dir, "trials.csv"), to_csv(rows, [p.key for p in spec.params], spec.metric))
    best = next((r for r in rows if r["state"] == "COMPLETE"), None)
    if best is not None and getattr(controller, "best_written", None) != best["number"]:
        write_best(controller, best, os.path.join(sweep_dir, "best.yaml"))
        controller.best_written = best["number"]
    if final:
        pictures(study, sweep_dir)


def to_csv(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["number", "state", *keys, metric, "steps", "run_dir", "error"])
    for r in rows:
        w.writerow([r["number"], r["state"], *(r["params"].get(k, "") for k in keys),
                    "" if r["value"] is None else r["value"], "" if r["steps"] is None else r["steps"], r["run_dir"],
                    r["error"] or ""])
    return out.getvalue()


def write_best(controller: Any, best: dict[str, Any], path: str) -> None:
    """best.yaml: the recipe as the best trial ran it (its values set, every interpolation followed), without the
    sweep section, in a run directory of its own (runs/<sweep>-best): `launch best.yaml --nodes 8 --gpus 8`."""
    import yaml

    from .. import recipe
    from .spec import override

    params = best["params"]
    loaded = recipe.load(controller.recipe_path, [*controller.overrides, *(override(k, v) for k, v in params.items())])
    data = recipe.public(loaded.cfg)
    data.pop("sweep", None)
    data["run"] = {**data.get("run", {}), "name": f"{controller.name}-best", "dir": None}
    head = (f"# the best trial of sweep {controller.name}: trial {best['number']}, {controller.spec.metric} "
            f"{best['value']:.6g} ({controller.spec.mode}), run {best['run_dir']}\n"
            + "".join(f"#   {override(k, v)}\n" for k, v in params.items()))
    write_atomic(path, head + yaml.safe_dump(data, sort_keys=False))


def pictures(study: Any, sweep_dir: str) -> list[str]:
    """Optuna's optimisation history, parallel coordinates and parameter importances, as PNG files; [] without
    matplotlib or with too few finished trials for a picture."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import warnings
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return []
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    made = []
    for name, draw in (("history", ovm.plot_optimization_history), ("parallel", ovm.plot_parallel_coordinate),
                       ("importances", ovm.plot_param_importances)):
        path = os.path.join(sweep_dir, f"{name}.png")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(path + ".tmp.png", dpi=80)
            os.replace(path + ".tmp.png", path)
            plt.close(fig)
            made.append(path)
        except Exception:  # too few trials for this picture (importances need two complete, ...)
            plt.close("all")
    return made


# ----------------------------------------------------------------------------------------------- TensorBoard

def _tb_dir(run_dir: str, cfg: Any) -> str | None:
    if cfg.logging.tensorboard is False:
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return os.path.join(run_dir, "tb")


def write_hparams_start(run_dir: str, params: dict[str, Any], spec: Any, cfg: Any) -> None:
    """The trial's values as TensorBoard hparams, in its own tb/ (beside the scalars its rank 0 writes there): the
    HParams dashboard then shows every trial's values against its metric."""
    where = _tb_dir(run_dir, cfg)
    if where is None:
        return
    from torch.utils.tensorboard.summary import hparams
    from torch.utils.tensorboard.writer import FileWriter

    values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
    exp, ssi, _ = hparams(values, {spec.metric: 0.0})
    w = FileWriter(where)
    for s in (exp, ssi):
        w.add_summary(s)
    w.close()


def write_hparams_end(run_dir: str, status: str) -> None:
    """The end of the trial's hparams session (success, failure, pruned shown as 'success'/'failure')."""
    where = os.path.join(run_dir, "tb")
    if not os.path.isdir(where):
        return
    try:
        from tensorboard.plugins.hparams import api_pb2, metadata
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from torch.utils.tensorboard.writer import FileWriter
    except ImportError:
        return
    codes = {"success": api_pb2.STATUS_SUCCESS, "failure": api_pb2.STATUS_FAILURE}  # pruned: unknown
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=codes.get(status, api_pb2.STATUS_UNKNOWN)),
        version=metadata.PLUGIN_DATA_VERSION)
    smd = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                 content=content.SerializeToString()))
    w = FileWriter(where)
    w.add_summary(Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=smd)]))
    w.close()


# ----------------------------------------------------------------------------------------------- the status table

def table(data: dict[str, Any], controller_alive: bool) -> str:
    keys = data.get("params", [])
    head = ["#", "state", *keys, data.get("metric", "value"), "steps", "run dir"]
    rows = []
    for r in data.get("trials", []):
        state = r["state"]
        if state in ("RUNNING", "WAITING") and not controller_alive:
            state = "PREEMPTED"
        v = r.get("value")
        extra = f"  {r['error']}" if state == "FAILED" and r.get("error") else ""
        rows.append([str(r["number"]), state, *(_fmt(r["params"].get(k)) for k in keys),
                     "" if v is None else f"{v:.6g}", "" if r.get("steps") is None else str(r["steps"]),
                     r.get("run_dir", "") + extra])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)

"""The sweep's Optuna study: its storage, the sampler and pruner a spec names, and the trial metrics read back from
a trial's run directory. Only the controller calls these (it alone writes the study).

Storage: `sweep.storage` when given (any Optuna URL: sqlite:///..., postgresql://...), else a journal file,
DIR/study.journal, appended by the controller alone (it holds DIR/controller.lock while it runs, so no two
controllers write one sweep, and no trial writes it at all: the journal never sees a second writer, on NFS or not).
A controller killed in the middle of an append leaves a last line without its newline; the next one cuts it off
before opening the study (the trial it described is asked again).

Samplers are made again before every ask, seeded with (sweep.seed, trial number): a sweep that was stopped and
started again samples trial N as it would have in one go (Optuna's samplers keep their history in the study,
their randomness in the sampler). TPE runs with constant_liar so parallel trials do not all sample the same point.
"""

from __future__ import annotations

import json
import os
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from .spec import Spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

JOURNAL = "study.journal"


def repair_journal(path: str) -> bool:
    """Cut a torn last line (no newline) off the journal; True when it did."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return False
            f.truncate(data.rfind(b"\n") + 1)
            return True
    except FileNotFoundError:
        return False


def storage(spec: Spec, sweep_dir: str) -> Any:
    if spec.storage:
        return spec.storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = os.path.join(sweep_dir, JOURNAL)
    repair_journal(path)
    return JournalStorage(JournalFileBackend(path))


def open_study(spec: Spec, sweep_dir: str, name: str, max_steps: int | None) -> optuna.Study:
    return optuna.create_study(study_name=name, storage=storage(spec, sweep_dir), load_if_exists=True,
                               direction="minimize" if spec.mode == "min" else "maximize",
                               sampler=sampler(spec, 0), pruner=pruner(spec, max_steps))


def distributions(spec: Spec) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for p in spec.params:
        if p.type == "choice":
            out[p.key] = CategoricalDistribution(list(p.values))
        elif p.type == "int":
            out[p.key] = IntDistribution(int(p.low or 0), int(p.high or 0), log=p.log, step=int(p.step or 1))
        else:
            out[p.key] = FloatDistribution(float(p.low or 0), float(p.high or 0), log=p.log, step=p.step)
    return out


def sampler(spec: Spec, number: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded for trial `number`."""
    seed = (spec.seed * 1_000_003 + number) % 2**31
    s = optuna.samplers
    extra = dict(spec.sampler_args)
    if spec.sampler == "grid":  # the controller enqueues every combination in order; each ask takes the next
        return s.RandomSampler(seed=seed, **extra)
    if spec.sampler == "random":
        return s.RandomSampler(seed=seed, **extra)
    if spec.sampler == "gp":
        return s.GPSampler(seed=seed, **extra)
    if spec.sampler == "cmaes":
        return s.CmaEsSampler(seed=seed, **extra)
    extra.setdefault("constant_liar", True)
    return s.TPESampler(seed=seed, **extra)


def pruner(spec: Spec, max_steps: int | None) -> optuna.pruners.BasePruner:
    p = optuna.pruners
    extra = dict(spec.pruner_args)
    if spec.pruner == "median":
        extra.setdefault("n_warmup_steps", spec.min_steps)
        return p.MedianPruner(**extra)
    if spec.pruner == "asha":
        extra.setdefault("min_resource", max(1, spec.min_steps))
        return p.SuccessiveHalvingPruner(**extra)
    if spec.pruner == "hyperband":
        extra.setdefault("min_resource", max(1, spec.min_steps))
        extra.setdefault("max_resource", max_steps or "auto")
        return p.HyperbandPruner(**extra)
    return p.NopPruner()


def args_problem(spec: Spec) -> list[str]:
    """sweep.sampler_args / pruner_args that the chosen Optuna class does not take (checked by making one)."""
    problems = []
    for what, make in (("sampler_args", lambda: sampler(spec, 0)), ("pruner_args", lambda: pruner(spec, 100))):
        try:
            make()
        except TypeError as e:
            problems.append(f"sweep.{what}: {e}")
        except ImportError as e:
            problems.append(f"sweep.sampler: {spec.sampler} needs a package that is not installed ({e}); "
                            f"pip install 'launcher[sweep]'")
        except ValueError as e:
            problems.append(f"sweep.{what}: {e}")
    return problems


# ----------------------------------------------------------------------------------------------- trial metrics

class MetricRows:
    """A trial's recorded values of the sweep's metric by step, read as its file grows: each call reads only what
    was appended since the last (the controller polls every trial several times a second). The latest row of a
    step wins: a resumed run logs the steps after its checkpoint again. A line still being written waits."""

    def __init__(self, run_dir: str, spec: Spec) -> None:
        name, self.key = spec.source
        self.path = os.path.join(run_dir, name)
        self.offset = 0
        self.rows: dict[int, float] = {}

    def read(self) -> dict[int, float]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.rows
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            v = row.get(self.key) if isinstance(row, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(row.get("step"), int):
                self.rows[row["step"]] = float(v)
        return self.rows


def metric_rows(run_dir: str, spec: Spec) -> dict[int, float]:
    """The trial's values of the metric by step, the whole file read once."""
    return MetricRows(run_dir, spec).read()


def objective(rows: dict[int, float], spec: Spec) -> float | None:
    """A trial's value: its last recorded value, or its best (sweep.objective)."""
    if not rows:
        return None
    if spec.objective == "best":
        return min(rows.values()) if spec.mode == "min" else max(rows.values())
    return rows[max(rows)]


def last_event(run_dir: str, names: tuple[str, ...] = ("train_end", "stopped", "preempted", "ready")) -> dict | None:
    """The run's last milestone among `names` (events.jsonl)."""
    found = None
    try:
        with open(os.path.join(run_dir, "events.jsonl")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("event") in names:
                    found = row
    except FileNotFoundError:
        pass
    return found

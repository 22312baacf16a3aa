"""A sweep's specification, read from the recipe's `sweep` section (or a file given with --sweep) and checked before
anything starts: the search space by recipe key, the metric, the sampler and pruner, how many trials and how many at
once. Every problem is collected and reported together (exit 2). No torch and no Optuna import here.

A parameter is one of
    {type: float, low, high, log: false, step: null}    a float in [low, high] (log scale; or on a grid of step)
    {type: int, low, high, log: false, step: 1}         an int in [low, high]
    {type: choice, values: [...]}                       one of the values (numbers, strings, booleans, null)
and its key is any recipe key a `key=value` override could set (`optimizer.lr`, `data.batch_size`, `model.depth`).
Each trial is the recipe loaded again with its values as overrides, so interpolations (`T_max:
${trainer.max_steps}`) follow the trial's values and the trial's recipe is validated like any other.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import RecipeError

# What a trial can record: metric name -> (file in the run directory, its key there). The trainer writes both files
# on rank 0 (metrics.jsonl every trainer.log_every_steps, validation.jsonl after each validation).
METRICS = {
    "train/loss": ("metrics.jsonl", "loss"),
    "train/lr": ("metrics.jsonl", "lr"),
    "train/grad_norm": ("metrics.jsonl", "grad_norm"),
    "perf/samples_per_s": ("metrics.jsonl", "samples_per_s"),
    "perf/step_time_s": ("metrics.jsonl", "step_time_s"),
    "perf/data_wait_s": ("metrics.jsonl", "data_wait_s"),
    "perf/peak_memory_gib": ("metrics.jsonl", "peak_memory_gib"),
    "val/loss": ("validation.jsonl", "val/loss"),
    "val/accuracy": ("validation.jsonl", "val/accuracy"),
}
DEFAULT_TRIALS = 20
GRID_LIMIT = 10_000  # combinations a grid may have


@dataclass(frozen=True)
class Param:
    key: str
    type: str  # float | int | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: tuple[Any, ...] = ()

    def grid(self) -> list[Any]:
        """The values this parameter takes on a grid."""
        if self.type == "choice":
            return list(self.values)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        assert self.step is not None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def describe(self) -> str:
        if self.type == "choice":
            return f"one of {list(self.values)}"
        scale = ", log" if self.log else ""
        step = f", step {self.step:g}" if self.step is not None else ""
        return f"{self.type} in [{self.low:g}, {self.high:g}]{scale}{step}"


@dataclass
class Spec:
    metric: str
    mode: str
    objective: str
    sampler: str
    pruner: str
    min_steps: int
    trials: int
    parallel: int
    max_failures: int
    retries: int
    seed: int
    storage: str | None
    params: list[Param] = field(default_factory=list)
    sampler_args: dict[str, Any] = field(default_factory=dict)
    pruner_args: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> tuple[str, str]:
        return METRICS[self.metric]

    def grid(self) -> list[dict[str, Any]]:
        """Every combination, in order (the grid sampler's space)."""
        keys = [p.key for p in self.params]
        return [dict(zip(keys, combo)) for combo in itertools.product(*(p.grid() for p in self.params))]

    def better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b


def read(cfg: DictConfig, recipe_path: str | None, overrides: list[str], extra_file: str | None = None) -> Spec:
    """The sweep of a loaded recipe (its `sweep` section, or `extra_file`'s), checked; RecipeError with every
    problem. `recipe_path` and `overrides` are how the recipe was loaded: each parameter's key is checked by loading
    it again with a value of that parameter set."""
    problems: list[str] = []
    section = OmegaConf.to_container(cfg.sweep, resolve=True)
    assert isinstance(section, dict)
    where = "sweep"
    if extra_file is not None:
        section, where = _read_file(extra_file, section, problems), extra_file
    params = _params(section.get("params"), where, problems)
    sampler = str(section.get("sampler", "tpe"))
    metric = str(section.get("metric"))
    if metric not in METRICS:
        problems.append(f"{where}.metric: '{metric}' is not a metric a trial records; the trainer records "
                        f"{', '.join(METRICS)}")
    elif METRICS[metric][0] == "validation.jsonl" and cfg.data.val is None:
        problems.append(f"{where}.metric: {metric} needs a validation set, and the recipe has none (data.val); "
                        f"set data.val or sweep on train/loss")
    if cfg.script.path or cfg.script.module:
        problems.append(f"{where}: a sweep runs the built-in trainer, whose metrics it reads; this recipe runs a "
                        f"script ({cfg.script.path or cfg.script.module})")
    for key in ("parallel", "max_failures"):
        if int(section.get(key, 1)) < 1:
            problems.append(f"{where}.{key}: {section.get(key)} must be at least 1")
    if int(section.get("retries", 0)) < 0:
        problems.append(f"{where}.retries: {section.get('retries')} must be 0 or more")
    if section.get("trials") is not None and int(section["trials"]) < 1:
        problems.append(f"{where}.trials: {section['trials']} must be at least 1")
    if int(section.get("min_steps", 0)) < 0:
        problems.append(f"{where}.min_steps: {section.get('min_steps')} must be 0 or more")
    if sampler == "grid":
        for p in params:
            if p.type == "float" and p.step is None:
                problems.append(f"{where}.params.{p.key}: a grid over a float range needs a step (e.g. step: 0.1), "
                                f"or give the values as {{type: choice, values: [...]}}")
            if p.log and p.type != "choice":
                problems.append(f"{where}.params.{p.key}: a grid cannot use log; list the values as a choice")
    problems.extend(_key_problems(params, recipe_path, overrides, where))
    if problems:
        raise RecipeError(problems)
    spec = Spec(metric=metric, mode=str(section.get("mode", "min")), objective=str(section.get("objective", "last")),
                sampler=sampler, pruner=str(section.get("pruner", "none")),
                min_steps=int(section.get("min_steps", 0)), trials=0, parallel=int(section.get("parallel", 1)),
                max_failures=int(section.get("max_failures", 3)), retries=int(section.get("retries", 2)),
                seed=int(section["seed"]) if section.get("seed") is not None else int(cfg.seed),
                storage=section.get("storage"), params=params, sampler_args=dict(section.get("sampler_args") or {}),
                pruner_args=dict(section.get("pruner_args") or {}))
    if sampler == "grid":
        size = len(spec.grid()) if _grid_size(params) <= GRID_LIMIT else None
        if size is None:
            raise RecipeError([f"{where}.params: the grid has {_grid_size(params)} combinations, more than "
                               f"{GRID_LIMIT}; use sampler random or tpe"])
        spec.trials = min(int(section["trials"]), size) if section.get("trials") is not None else size
    else:
        spec.trials = int(section["trials"]) if section.get("trials") is not None else DEFAULT_TRIALS
    return spec


def _grid_size(params: list[Param]) -> int:
    return math.prod(len(p.grid()) for p in params) if params else 0


def _read_file(path: str, section: dict, problems: list[str]) -> dict:
    """A sweep file: the section itself, or a document with a top-level `sweep:` (its keys replace the recipe's)."""
    from ..recipe.loading import read_yaml
    from ..recipe.schema import SweepSection
    from ..recipe.validation import check_tree

    if not os.path.isfile(path):
        problems.append(f"--sweep {path}: no such file")
        return section
    try:
        data, lines = read_yaml(path)
    except RecipeError as e:
        problems.extend(e.problems)
        return section
    data = data.get("sweep", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        problems.append(f"{path}: a sweep file holds the sweep section (metric, params, ...)")
        return section
    data = check_tree(SweepSection, data, "", lambda p: f"{path}:{lines.get(p, lines.get('sweep.' + p, '?'))}",
                      problems)
    return {**section, **data}


_PARAM_FIELDS = {"type", "low", "high", "log", "step", "values"}


def _params(raw: Any, where: str, problems: list[str]) -> list[Param]:
    if not raw:
        problems.append(f"{where}.params: no parameters to search; give at least one, e.g. "
                        f"optimizer.lr: {{type: float, low: 1.0e-5, high: 1.0e-1, log: true}}")
        return []
    out = []
    for key, spec in raw.items():
        at = f"{where}.params.{key}"
        if not isinstance(spec, dict):
            problems.append(f"{at}: a parameter is a mapping: {{type: float|int, low, high}} or "
                            f"{{type: choice, values: [...]}}, got {spec!r}")
            continue
        unknown = sorted(set(spec) - _PARAM_FIELDS)
        if unknown:
            problems.append(f"{at}: unknown field {', '.join(unknown)}; a parameter has "
                            f"{', '.join(sorted(_PARAM_FIELDS))}")
        kind = spec.get("type")
        if kind == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                problems.append(f"{at}.values: a choice needs a non-empty list of values, got {values!r}")
                continue
            if len({repr(v) for v in values}) != len(values):
                problems.append(f"{at}.values: {values} lists a value twice")
            bad = [v for v in values if not isinstance(v, (bool, int, float, str)) and v is not None]
            if bad:
                problems.append(f"{at}.values: a choice is among numbers, strings, booleans and null; {bad[0]!r} "
                                f"is none of them (sweep over a key inside it instead)")
                continue
            out.append(Param(str(key), "choice", values=tuple(values)))
            continue
        if kind not in ("float", "int"):
            problems.append(f"{at}.type: {kind!r} is not a parameter type; use float, int or choice")
            continue
        low, high, log, step = spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step")
        numbers = True
        for name, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                problems.append(f"{at}.{name}: a {kind} range needs a number, got {v!r}")
                numbers = False
            elif kind == "int" and not float(v).is_integer():
                problems.append(f"{at}.{name}: an int range needs whole numbers, got {v!r}")
                numbers = False
        if not numbers:
            continue
        assert low is not None and high is not None
        if low >= high:
            problems.append(f"{at}: low ({low}) must be below high ({high})")
            continue
        if log and low <= 0:
            problems.append(f"{at}: a log scale needs low > 0, got low {low}")
            continue
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
                problems.append(f"{at}.step: a step is a positive number, got {step!r}")
                continue
            if log:
                problems.append(f"{at}: Optuna takes a step or a log scale, not both")
                continue
            if kind == "int" and not float(step).is_integer():
                problems.append(f"{at}.step: an int range takes a whole step, got {step!r}")
                continue
        if kind == "int":
            out.append(Param(str(key), "int", int(low), int(high), log, int(step) if step is not None else None))
        else:
            out.append(Param(str(key), "float", float(low), float(high), log,
                             float(step) if step is not None else None))
    return out


def override(key: str, value: Any) -> str:
    """`key=value` as the command line takes it: the value in YAML's flow style, on one line."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    if text.endswith("\n...") or text.endswith("..."):
        text = text.rsplit("\n...", 1)[0].removesuffix("...").strip()
    return f"{key}={text}"


def probe_values(p: Param) -> list[Any]:
    """Values that stand for the parameter when its key is checked: both ends, or every choice."""
    if p.type == "choice":
        return list(p.values)
    return [p.low, p.high] if p.type == "float" else [int(p.low or 0), int(p.high or 0)]


def _key_problems(params: list[Param], recipe_path: str | None, overrides: list[str], where: str) -> list[str]:
    """Each parameter's key, checked by loading the recipe with each probe value of it set (an unknown key, a wrong
    type, a value the recipe refuses), and a key inside a component checked against what the component takes."""
    from .. import recipe

    problems = []
    for p in params:
        if p.key.startswith("sweep.") or p.key == "sweep":
            problems.append(f"{where}.params.{p.key}: a sweep cannot search over its own settings")
            continue
        for value in probe_values(p):
            try:
                loaded = recipe.load(recipe_path, [*overrides, override(p.key, value)])
            except RecipeError as e:
                problems.extend(f"{where}.params.{p.key} = {value!r}: {msg}" for msg in e.problems)
                break
        else:
            why = _component_key_problem(loaded.cfg, p.key)
            if why:
                problems.append(f"{where}.params.{p.key}: {why}")
    return problems


def _component_key_problem(cfg: DictConfig, key: str) -> str | None:
    """For a key inside a component (`optimizer.lrr`): None when the component's `_target_` takes that argument
    (or any keyword), else what it does take. Keys of schema sections were checked by the recipe's own validation."""
    import inspect

    from ..imports import locate
    from ..recipe.schema import COMPONENT_KEYS

    comp = next((c for c in sorted(COMPONENT_KEYS + ("data.val",), key=len, reverse=True)
                 if key.startswith(c + ".")), None)
    if comp is None:
        return None
    node = OmegaConf.select(cfg, comp)
    arg = key[len(comp) + 1:].split(".", 1)[0]
    if node is None or "_target_" not in node or arg.startswith("_"):
        return None
    try:
        target = locate(str(node["_target_"]))
        sig = inspect.signature(target)
    except Exception:  # the recipe's own check reports a target that does not import
        return None
    ps = sig.parameters.values()
    if any(q.kind is inspect.Parameter.VAR_KEYWORD for q in ps) or arg in sig.parameters:
        return None
    names = [q.name for q in ps if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
    import difflib
    close = difflib.get_close_matches(arg, names, n=1)
    hint = f"; did you mean '{comp}.{close[0]}'?" if close else ""
    return f"{node['_target_']} takes no argument '{arg}'{hint} It takes: {', '.join(names)}"

"""Recipe validation: types, unknown keys (with the valid ones and a close match), and the checks on values that
types alone cannot express, among them the allowed values of every choice field (read from its Literal in the
schema) and the values that go into a generated sbatch script. Every problem is returned as a message naming where
it came from (file:line or the override) and the key path; `load` collects them all. No torch import here.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Union

from omegaconf import DictConfig, OmegaConf

from .. import imports
from .schema import (COMPONENT_KEYS, Recipe, all_keys, choice_fields, field_path, field_types, key_aliases,
                     strip_optional, type_name)


# ----------------------------------------------------------------------------------------------- schema types

def _is_component(tp: Any) -> bool:
    return typing.get_origin(strip_optional(tp)) in (dict, Dict)


def _unknown_key(key: str, path: str, valid: list[str]) -> str:
    msg = f"unknown key '{path}'"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        msg += f"; did you mean '{path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{close[0]}'?"
    else:
        elsewhere = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key]
        if elsewhere:
            msg += f"; did you mean '{elsewhere[0]}'?"
    return msg + f" Valid keys here: {', '.join(valid)}"


def _type_problem(tp: Any, value: Any) -> str | None:
    """None when `value` fits the schema type `tp`, else what was expected."""
    if isinstance(value, str) and "${" in value:
        return None  # an interpolation, checked once resolved
    if value is None:
        return None if (typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)) else "a value, got null"
    tp = strip_optional(tp)
    got = f"{value!r} ({type(value).__name__})"
    if tp is Any:
        return None
    if typing.get_origin(tp) in (dict, Dict) or dataclasses.is_dataclass(tp):
        return None if isinstance(value, dict) else f"a mapping, got {got}"
    if typing.get_origin(tp) in (list, List):
        return None if isinstance(value, list) else f"a list, got {got}"
    if tp is bool:
        return None if isinstance(value, bool) else f"true or false, got {got}"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"an integer, got {got}"
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else f"a number, got {got}"
    if tp is str:
        return None if isinstance(value, (str, int, float)) and not isinstance(value, bool) else f"a string, got {got}"
    return None


def check_tree(cls: type, data: dict, prefix: str, where: Any, problems: list[str]) -> dict:
    """Check a raw mapping against a schema section; `where(path)` says where a key came from.
    Returns the mapping without the entries that have problems, so later checks can still run."""
    hints = field_types(cls)
    valid = [f.metadata.get("key", f.name) for f in dataclasses.fields(cls)]
    alias = key_aliases(cls)
    clean: dict = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        key = alias.get(key, key)
        if key not in hints:
            problems.append(f"{where(path)}: {_unknown_key(str(key), path, valid)}")
            continue
        tp = hints[key]
        bad = _type_problem(tp, value)
        if bad:
            problems.append(f"{where(path)}: {path}: expected {bad}")
            continue
        inner = strip_optional(tp)
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            value = check_tree(inner, value, path + ".", where, problems)
        clean[path.rsplit(".", 1)[-1]] = value  # recipe spelling; renamed to field names on merge
    return clean


def check_override(key: str, value: Any, problems: list[str], text: str) -> bool:
    """Check one override against the schema; False (and a problem recorded) when it does not fit."""
    before = len(problems)
    _check_override_path(key, value, problems, text)
    return len(problems) == before


def _check_override_path(key: str, value: Any, problems: list[str], text: str) -> None:
    cls: Any = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = field_types(cls)
        path = ".".join(parts[: i + 1])
        part = key_aliases(cls).get(part, part)
        if part not in hints:
            valid = [f.metadata.get("key", f.name) for f in dataclasses.fields(cls)]
            problems.append(f"override '{text}': {_unknown_key(part, path, valid)}")
            return
        tp = hints[part]
        if _is_component(tp) or strip_optional(tp) is Any:
            if i == len(parts) - 1:
                bad = _type_problem(tp, value)
                if bad:
                    problems.append(f"override '{text}': {path}: expected {bad}")
            return  # inside a component every key is the component's own
        if i == len(parts) - 1:
            bad = _type_problem(tp, value)
            if bad:
                problems.append(f"override '{text}': {path}: expected {bad}")
            return
        inner = strip_optional(tp)
        if not dataclasses.is_dataclass(inner):
            problems.append(f"override '{text}': '{path}' is a {type_name(tp)}, it has no key '{parts[i + 1]}'")
            return
        cls = inner


# ----------------------------------------------------------------------------------------------- values

def _either(values: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def semantic_problems(cfg: DictConfig, source: str, lines: dict[str, int]) -> list[str]:
    """Checks on values that types alone cannot express: the allowed values of the choice fields first, then limits
    and the settings that depend on each other. `lines` maps key paths to lines of `source`."""
    out: list[str] = []

    def at(key: str) -> str:
        return f"{source}:{lines[key]}" if key in lines else source

    def positive(key: str, allow_none: bool = True, minimum: int = 1) -> None:
        v = OmegaConf.select(cfg, key)
        if v is None and allow_none:
            return
        if v is None or v < minimum:
            out.append(f"{at(key)}: {key} must be >= {minimum}, got {v}")

    for key, values in choice_fields():
        value = OmegaConf.select(cfg, field_path(key))
        if value is not None and value not in values:
            out.append(f"{at(key)}: {key} must be {_either(values)}, got '{value}'")

    script = cfg.script
    if script.path and script.module:
        out.append(f"{at('script')}: set script.path or script.module, not both")
    if script.path and not Path(script.path).is_file():
        out.append(f"{at('script.path')}: script.path: no such file: {script.path}")
    if script.module and imports._find_spec(script.module) is None:
        out.append(f"{at('script.module')}: script.module: no module named '{script.module}'")
    if not (script.path or script.module):
        for key, what in (("model", "a model"), ("data.train", "a training dataset")):
            if OmegaConf.select(cfg, key) is None:
                out.append(f"{source}: {key} is missing: name {what} with _target_ (or set script.path to run "
                           f"your own training script)")
        if cfg.trainer.max_steps is None and cfg.trainer.max_epochs is None:
            out.append(f"{source}: set trainer.max_steps or trainer.max_epochs (or both); training needs a limit")
    for key in COMPONENT_KEYS:
        comp = OmegaConf.select(cfg, key)
        if comp is None:
            continue
        target = comp.get("_target_")
        if target is None:
            out.append(f"{at(key)}: {key} has no _target_: name the class or function, e.g. "
                       f"_target_: torch.optim.AdamW")
            continue
        problem = imports.check(target)
        if problem:
            out.append(f"{at(key + '._target_')}: {key}._target_: {problem}")
    if cfg.data.collate_fn:
        problem = imports.check(cfg.data.collate_fn)
        if problem:
            out.append(f"{at('data.collate_fn')}: data.collate_fn: {problem}")

    positive("seed", allow_none=False, minimum=0)
    positive("launch.nodes", allow_none=False)
    positive("launch.gpus_per_node")
    positive("launch.max_restarts", allow_none=False, minimum=0)
    positive("launch.rdzv_timeout_s")
    positive("launch.collective_timeout_s", allow_none=False)
    positive("checkpoint.retries", allow_none=False, minimum=0)
    positive("data.batch_size", allow_none=False)
    positive("data.num_workers", allow_none=False, minimum=0)
    positive("data.prefetch_factor")
    positive("trainer.max_steps")
    positive("trainer.max_epochs")
    positive("trainer.log_every_steps", allow_none=False)
    positive("trainer.grad_accum_steps", allow_none=False)
    positive("trainer.val_every_steps")
    positive("trainer.val_every_epochs")
    positive("trainer.early_stop_patience")
    positive("trainer.overfit_batches")
    positive("data.val_batch_size")
    positive("checkpoint.keep_best", allow_none=False, minimum=0)
    if cfg.data.val is None:
        for key, value in (("checkpoint.keep_best", cfg.checkpoint.keep_best),
                           ("trainer.early_stop_patience", cfg.trainer.early_stop_patience),
                           ("trainer.val_every_steps", cfg.trainer.val_every_steps)):
            if value:
                out.append(f"{at(key)}: {key} needs a validation set: add data.val: {{_target_: ...}}")
    for key, package, on in (("logging.tensorboard", "tensorboard", cfg.logging.tensorboard),
                             ("logging.wandb", "wandb", cfg.logging.wandb)):
        if on and importlib.util.find_spec(package) is None:
            out.append(f"{at(key)}: {key} is on but the {package} package is not installed: pip install {package} "
                       f"(or launcher[{package}]), or set {key}=false")
    positive("finetune.unfreeze_after_epochs")
    if cfg.finetune.unfreeze_after_epochs is not None and not cfg.finetune.freeze:
        out.append(f"{at('finetune.unfreeze_after_epochs')}: finetune.unfreeze_after_epochs needs finetune.freeze "
                   f"(there is nothing to unfreeze)")
    init_from = cfg.finetune.init_from
    if init_from and "://" not in init_from and not os.path.exists(init_from):
        out.append(f"{at('finetune.init_from')}: finetune.init_from: no such file or directory: {init_from} "
                   f"(relative to {os.getcwd()}); name a checkpoint folder, a checkpoint directory or a state-dict "
                   f"file")
    if cfg.data.prefetch_factor is not None and cfg.data.num_workers == 0:
        out.append(f"{at('data.prefetch_factor')}: data.prefetch_factor needs data.num_workers > 0")
    if cfg.trainer.grad_clip_norm is not None and cfg.trainer.grad_clip_norm <= 0:
        out.append(f"{at('trainer.grad_clip_norm')}: trainer.grad_clip_norm must be > 0, got "
                   f"{cfg.trainer.grad_clip_norm}")
    positive("checkpoint.every_steps")
    positive("checkpoint.keep", allow_none=False, minimum=0)
    if cfg.checkpoint.every_minutes is not None and cfg.checkpoint.every_minutes <= 0:
        out.append(f"{at('checkpoint.every_minutes')}: checkpoint.every_minutes must be > 0 (or null to turn the "
                   f"timer off), got {cfg.checkpoint.every_minutes}")
    if cfg.resume not in ("auto", "never") and "/" not in cfg.resume and not cfg.resume.startswith("step-"):
        out.append(f"{at('resume')}: resume must be auto, never, or the path of a checkpoint folder "
                   f"(.../step-<N>), got '{cfg.resume}'")
    positive("slurm.time_min", allow_none=False)
    positive("slurm.signal_grace_s", allow_none=False, minimum=0)
    positive("slurm.max_requeues", allow_none=False, minimum=0)
    positive("slurm.cpus_per_task")
    if cfg.backend == "slurm" and cfg.slurm.signal_grace_s >= cfg.slurm.time_min * 60:
        out.append(f"{at('slurm.signal_grace_s')}: slurm.signal_grace_s ({cfg.slurm.signal_grace_s}) must be "
                   f"shorter than the time limit slurm.time_min ({cfg.slurm.time_min} min)")
    if cfg.backend == "slurm":
        out.extend(_script_problems(cfg, at))
    return out


_SBATCH_OPTION = re.compile(r"[a-z][a-z0-9-]*")
_LINE_BREAKERS = re.compile(r"[\n\r\x00]")


def script_value_problem(key: str, value: Any) -> str | None:
    """Why `value` cannot go into one line of a generated sbatch script, or None. A line break would end the
    `#SBATCH` line (or the shell line) it is on: what follows would run as shell lines, and sbatch silently drops
    every `#SBATCH` line after the first command."""
    found = _LINE_BREAKERS.search(str(value))
    if found is None:
        return None
    char = {"\n": "a newline", "\r": "a carriage return", "\x00": "a NUL byte"}[found.group()]
    return (f"{key} holds {char}, and it goes into the generated sbatch script, where it would end the line and "
            f"run the rest as shell commands: {str(value)!r}. Give it on one line" +
            (" (several shell lines: one list entry each)" if key.startswith("slurm.setup") else ""))


def _script_problems(cfg: DictConfig, at: Any) -> list[str]:
    """Values that reach the sbatch scripts (`--slurm`, `--emit-sbatch`), each on one line of its own."""
    out = []
    s = cfg.slurm
    values: list[tuple[str, str, Any]] = [("run.name", "run.name", cfg.run.name), ("run.dir", "run.dir", cfg.run.dir)]
    values += [(f"slurm.{k}", f"slurm.{k}", s[k]) for k in ("partition", "account", "qos", "constraint", "mem")]
    values += [(f"slurm.setup[{i}]", "slurm.setup", line) for i, line in enumerate(s.setup)]
    for name, value in (s.extra_sbatch or {}).items():
        key = f"slurm.extra_sbatch.{name}"
        if not _SBATCH_OPTION.fullmatch(str(name).replace("_", "-")):
            out.append(f"{at(key)}: slurm.extra_sbatch: {str(name)!r} is not an sbatch option name (lower-case "
                       f"letters, digits and '-', starting with a letter, as in 'mail-type'); it would be written "
                       f"unquoted into the script")
        values.append((key, key, value))
    for key, line_key, value in values:
        problem = script_value_problem(key, value) if value is not None else None
        if problem:
            out.append(f"{at(line_key)}: {problem}")
    return out

"""Loading a recipe: YAML with line numbers, `key=value` overrides, the merge, and writing it back out.

Merge order, in one place (`load`): schema defaults <- recipe YAML <- command-line `key=value` overrides <- flags.
Every problem found is collected and raised together as one RecipeError naming the file, line and key path.
What is written or printed (`save`, `to_yaml`, `public`) keeps `${oc.env:...}` references unresolved and redacts
passwords in URLs. Nothing here imports torch: `launch --dry-run` and validation stay fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import RecipeError, UsageError
from ..files import write_atomic
from .schema import COMPONENT_KEYS, Recipe, field_path, field_types, key_aliases, strip_optional
from .validation import check_override, check_tree, semantic_problems


# ----------------------------------------------------------------------------------------------- YAML reading

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; recipes mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _line_map(text: str) -> dict[str, int]:
    """Dotted key path -> 1-based line in the YAML text."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[path] = k.start_mark.line + 1
                walk(v, path)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def read_yaml(path: str) -> tuple[dict, dict[str, int]]:
    """The mapping in a recipe file and the line of each dotted key in it (for the messages)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"recipe file not found: {path}" + ("" if p.parent.exists() else f" (no directory {p.parent})"))
    text = p.read_text()
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise RecipeError([f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe is a mapping of keys, found a {type(data).__name__}"])
    return data, _line_map(text)


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value) with YAML typing; raises ValueError with a message for the user."""
    if "=" not in text:
        raise ValueError(f"override '{text}' is not key=value (for example trainer.max_steps=100)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not _KEY.fullmatch(key):
        raise ValueError(f"override '{text}': '{key}' is not a dotted key path (for example data.batch_size=64)")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"override '{text}': the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return key, value


# ----------------------------------------------------------------------------------------------- recipe keys

def _keys_in(cls: type, data: Any) -> Any:
    """Rename recipe keys to schema field names, recursively."""
    if not isinstance(data, dict):
        return data
    hints, alias = field_types(cls), key_aliases(cls)
    out = {}
    for k, v in data.items():
        name = alias.get(k, k)
        inner = strip_optional(hints[name]) if name in hints else None
        out[name] = _keys_in(inner, v) if inner is not None and dataclasses.is_dataclass(inner) else v
    return out


def _keys_out(cls: type, data: Any) -> Any:
    """Field names back to recipe keys, for what users see (config.yaml, --dry-run)."""
    if not isinstance(data, dict):
        return data
    hints = field_types(cls)
    back = {v: k for k, v in key_aliases(cls).items()}
    out = {}
    for k, v in data.items():
        inner = strip_optional(hints[k]) if k in hints else None
        out[back.get(k, k)] = _keys_out(inner, v) if inner is not None and dataclasses.is_dataclass(inner) else v
    return out


# ----------------------------------------------------------------------------------------------- loading

@dataclass
class Loaded:
    """A validated, fully resolved recipe and where it came from."""

    cfg: DictConfig
    source: str  # recipe file, or a description for script-only launches

    @property
    def is_script(self) -> bool:
        return bool(self.cfg.script.path or self.cfg.script.module)


SAVED_BY = "launcher_version"  # the key `launch` adds to the config.yaml it saves in a run directory


def load(path: str | None, overrides: list[str] = (), *, defaults: dict | None = None) -> Loaded:
    """Read, merge, resolve and validate a recipe. Raises RecipeError with every problem found.

    `defaults` are recipe values the command line implies (a script launched directly); they sit between
    the schema and the recipe file. `overrides` are `key=value` strings, applied last.
    """
    problems: list[str] = []
    data: dict = {}
    lines: dict[str, int] = {}
    source = path or "command line"
    if path is not None:
        data, lines = read_yaml(path)
        if isinstance(data, dict):
            data.pop(SAVED_BY, None)  # a run's own config.yaml is a recipe too: `launch RUN_DIR/config.yaml`
        data = check_tree(Recipe, data, "", lambda p: f"{path}:{lines.get(p, '?')}", problems)

    parsed: list[tuple[str, Any, str]] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ValueError as e:
            problems.append(str(e))
            continue
        if check_override(key, value, problems, text):
            parsed.append((key, value, text))

    cfg = OmegaConf.structured(Recipe)
    for layer in (defaults or {}, data):
        try:
            cfg = _merge_layer(cfg, _keys_in(Recipe, layer))
        except OmegaConfBaseException as e:
            problems.append(f"{source}: {_omegaconf_message(e)}")
    for key, value, text in parsed:
        key = field_path(key)
        try:
            for comp in COMPONENT_KEYS:  # `lr_scheduler.step_size=5` with no scheduler yet starts one
                if key.startswith(comp + ".") and OmegaConf.select(cfg, comp) is None:
                    OmegaConf.update(cfg, comp, {}, merge=False)
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            problems.append(f"override '{text}': {_omegaconf_message(e)}")

    if not cfg.run.name:
        cfg.run.name = Path(path).stem if path else "run"
    if cfg.script.path and path and not Path(cfg.script.path).is_absolute() and not Path(cfg.script.path).exists():
        beside = Path(path).parent / cfg.script.path  # a script named relative to its recipe
        if beside.exists():
            cfg.script.path = str(beside)
    if cfg.script.path:
        cfg.script.path = os.path.abspath(cfg.script.path)
    if cfg.finetune.init_from and "://" not in cfg.finetune.init_from and os.path.exists(cfg.finetune.init_from):
        cfg.finetune.init_from = os.path.abspath(cfg.finetune.init_from)  # workers and SLURM jobs see the same file
    raw = OmegaConf.to_container(cfg, resolve=False)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise RecipeError(problems + [f"{source}: {_omegaconf_message(e)}"]) from None

    problems.extend(semantic_problems(cfg, source, lines))
    if problems:
        raise RecipeError(problems)
    _keep_env_references(cfg, raw)
    return Loaded(cfg=cfg, source=source)


_ABSENT = object()


def _merge_layer(cfg: DictConfig, layer: dict) -> DictConfig:
    """Merge a raw mapping; a component it gives whole replaces the one below, never merges into it."""
    for key in COMPONENT_KEYS:
        node: Any = layer
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            OmegaConf.update(cfg, key, None, merge=False)
    return OmegaConf.merge(cfg, layer)


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).split("\n")[0]
    return f"{key}: {msg}" if key else msg


# ----------------------------------------------------------------------------------------------- writing

def to_yaml(cfg: DictConfig) -> str:
    """The resolved recipe for printing (see `public`)."""
    return yaml.safe_dump(public(cfg), sort_keys=False)


def save(cfg: DictConfig, path: str, extra: dict | None = None) -> None:
    """Write the resolved recipe (plus `extra` top-level keys such as the launcher version), atomically.
    Environment references stay references (see `_keep_env_references`); the ranks read this file."""
    body = _keys_out(Recipe, OmegaConf.to_container(cfg, resolve=False))
    text = yaml.safe_dump({**(extra or {}), **body}, sort_keys=False)
    write_atomic(path, text)


def load_resolved(path: str) -> DictConfig:
    """Read a config.yaml written by `save` back into the typed schema (in workers)."""
    data, _ = read_yaml(path)
    data = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(Recipe)}}
    return _merge_layer(OmegaConf.structured(Recipe), _keys_in(Recipe, data))


# ----------------------------------------------------------------------------------------------- secrets

_ENV_REF = re.compile(r"\$\{\s*oc\.env\s*:")
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s:@]+):([^/\s@]+)@")


def _leaves(node: Any, path: tuple = ()) -> Any:
    """(path, value) for every string leaf of a plain container."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    elif isinstance(node, str):
        yield path, node


def _keep_env_references(cfg: DictConfig, raw: dict) -> None:
    """Put `${oc.env:NAME}` references back after validation, so that what the launcher writes and prints
    (config.yaml, --dry-run, W&B) holds the reference and never its value; each rank resolves it at run time, in
    its own environment (an sbatch job inherits the submitting shell's). An interpolation whose value holds a
    referenced value (`b: ${a}` with `a: ${oc.env:TOKEN}`) stays unresolved too."""
    resolved = dict(_leaves(OmegaConf.to_container(cfg, resolve=True)))
    refs = {path: text for path, text in _leaves(raw) if _ENV_REF.search(text)}
    values = [v for p in refs if isinstance(v := resolved.get(p), str) and len(v) >= 3]
    for path, text in _leaves(raw):
        if path not in refs and "${" in text and any(v in str(resolved.get(path, "")) for v in values):
            refs[path] = text
    for path, text in refs.items():
        node: Any = cfg
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = text


def redact(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`, for what is printed or sent elsewhere."""
    return _URL_CREDENTIALS.sub(r"\1\2:***@", text)


def public(cfg: DictConfig) -> dict:
    """The recipe as users and metric services see it: recipe key names, environment references unresolved,
    passwords in URLs redacted."""
    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return redact(node) if isinstance(node, str) else node
    return clean(_keys_out(Recipe, OmegaConf.to_container(cfg, resolve=False)))

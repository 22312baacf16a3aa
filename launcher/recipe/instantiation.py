"""Building user components from the recipe: `{_target_: pkg.module.Name, **kwargs}` -> the object.

The target is imported when it is built (in the workers), so this module imports no torch itself.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .. import imports


def instantiate(node: Any, *args: Any, key: str = "component", **kwargs: Any) -> Any:
    """Build `{_target_: path, **kw}`: nested mappings with a _target_ are built first (depth-first)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict) or "_target_" not in node:
        raise ValueError(f"{key}: expected a mapping with _target_, got {node!r}")
    spec = dict(node)
    target = spec.pop("_target_")
    built = {k: _build_nested(v, f"{key}.{k}") for k, v in spec.items()}
    fn = imports.locate(target)
    try:
        return fn(*args, **{**built, **kwargs})
    except TypeError as e:
        raise TypeError(f"{key}: calling {target}(...) failed: {e}. Check the keyword arguments under '{key}'.") \
            from e


def _build_nested(value: Any, key: str) -> Any:
    if isinstance(value, dict) and "_target_" in value:
        return instantiate(value, key=key)
    if isinstance(value, dict):
        return {k: _build_nested(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_build_nested(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value

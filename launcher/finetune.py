"""Fine-tuning: start from pretrained weights, freeze parameters by name, per-group learning rates, unfreeze later.

Pretrained weights come from a launcher checkpoint folder (or a checkpoint directory: its newest committed
checkpoint whose metadata is not refused, newer damaged or refused ones passed over with a warning), a file written
by `launch ckpt export`, a `.safetensors` file (as Hugging Face models ship; needs `launcher[safetensors]`), or any
`torch.save` file holding a state dict (also wrapped as {'state_dict': ...} or {'model': ...}, as Lightning and most
training scripts write it); local or on S3. Files are read with `weights_only=True` or safetensors: nothing is
unpickled but tensors and plain data, and a checkpoint's DCP metadata only through the launcher's allow-list.
"""

from __future__ import annotations

import fnmatch
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import layout
from .checkpoint.storage import Storage

log = logging.getLogger("launcher")

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")


# ----------------------------------------------------------------------------------------------- freezing

def frozen_names(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Names of the parameters matching any glob; a glob that matches nothing is an error."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"finetune.freeze: '{pattern}' matches no parameter of {type(model).__name__}; "
                             f"its parameters are named like {', '.join(names[:6])}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def set_trainable(model: torch.nn.Module, names: list[str], trainable: bool) -> None:
    wanted = set(names)
    for name, p in model.named_parameters():
        if name in wanted:
            p.requires_grad_(trainable)


def parameter_table(model: torch.nn.Module) -> str:
    """Trainable and frozen parameter counts per top-level module."""
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        counts = rows.setdefault(name.split(".")[0], [0, 0])
        counts[0 if p.requires_grad else 1] += p.numel()
    width = max([len(k) for k in rows] + [6])
    lines = [f"  {'module':<{width}} {'trainable':>12} {'frozen':>12}"]
    lines += [f"  {k:<{width}} {t:>12,} {f:>12,}" for k, (t, f) in rows.items()]
    return "\n".join(lines)


def param_groups(model: torch.nn.Module, lr_groups: dict[str, float], include_frozen: bool = False) -> list[Any]:
    """The parameters for the optimizer, as groups: one per glob of `lr_groups` (first match wins), then the rest
    (which keep the optimizer's lr). Without lr_groups, a plain list. Frozen parameters are left out, unless
    `include_frozen` (they will be unfrozen later; until then they have no gradient and the optimizer skips them)."""
    chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad or include_frozen]
    if not lr_groups:
        return [p for _, p in chosen]
    groups: list[dict[str, Any]] = [{"params": [], "lr": float(lr)} for lr in lr_groups.values()]
    rest: list[torch.nn.Parameter] = []
    for name, p in chosen:
        for group, pattern in zip(groups, lr_groups):
            if fnmatch.fnmatchcase(name, pattern):
                group["params"].append(p)
                break
        else:
            rest.append(p)
    for pattern, group in zip(lr_groups, groups):
        if not group["params"]:
            raise ValueError(f"finetune.lr_groups: '{pattern}' matches no trainable parameter")
        log.info("optimizer group %s: lr %g, %d tensors", pattern, group["lr"], len(group["params"]))
    return groups + ([{"params": rest}] if rest else [])


# ----------------------------------------------------------------------------------------------- initialising

class InitError(ValueError):
    """finetune.init_from cannot be used; the message names the source and what to change."""


@dataclass
class InitReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the source: keep their initialisation
    unexpected: list[str] = field(default_factory=list)  # in the source, not in the model: ignored
    mismatched: list[str] = field(default_factory=list)  # in both, different shapes: keep their initialisation

    def text(self) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        lines = [f"initialised from {self.source}: {len(self.loaded)} tensors loaded"]
        if self.missing:
            lines.append(f"  missing from the source (kept their initialisation): {names(self.missing)}")
        if self.mismatched:
            lines.append(f"  different shape (kept their initialisation): {names(self.mismatched)}")
        if self.unexpected:
            lines.append(f"  in the source but not in the model (ignored): {names(self.unexpected)}")
        return "\n".join(lines)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def read_source(spec: str, endpoint_url: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict at `spec` and a description of where it came from (which checkpoint, which entry)."""
    from .checkpoint import dcp_io

    spec = spec.rstrip("/")
    parent, _, name = spec.rpartition("/")
    as_dir = Storage(spec, endpoint_url)
    is_dir = as_dir.is_dir(as_dir.root)
    found, skipped = dcp_io.newest_usable(as_dir) if is_dir else (None, [])
    if found is not None:
        for info in skipped:
            log.warning("finetune.init_from: skipped %s: %s", info.path, info.problem)
        return _from_checkpoint(as_dir, found), f"{found.path} (step {found.step})"
    storage = Storage(parent or ".", endpoint_url)
    try:
        info = layout.inspect(storage, name)
    except ValueError:
        info = None
    if info is not None and info.files:
        problem = dcp_io.unusable(storage, info)
        if problem:
            raise InitError(f"finetune.init_from: {spec} is not a usable checkpoint: {problem}")
        return _from_checkpoint(storage, info), f"{info.path} (step {info.step})"
    if is_dir:
        passed = "".join(f"; passed over {s.path}: {s.problem}" for s in skipped)
        raise InitError(f"finetune.init_from: {spec} is a directory without a committed checkpoint (step-<N> "
                        f"folders) it can use; name a checkpoint folder, a checkpoint directory or a state-dict "
                        f"file{passed}")
    path = storage.join(name)
    try:
        data = storage.read_bytes(path)
    except (OSError, FileNotFoundError) as e:
        raise InitError(f"finetune.init_from: cannot read {spec}: {e}") from e
    if name.endswith(".safetensors") or _is_safetensors(data):
        return _unwrap(_from_safetensors(data, spec), spec)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal or a file that is not a torch.save archive
        raise InitError(f"finetune.init_from: {spec} cannot be loaded with torch.load(weights_only=True): "
                        f"{str(e).strip().splitlines()[0][:200]}. Save a plain state_dict (torch.save("
                        f"model.state_dict(), path)) or export a checkpoint with `launch ckpt export`") from e
    return _unwrap(obj, spec)


def _from_checkpoint(storage: Storage, info: layout.CheckpointInfo) -> dict[str, torch.Tensor]:
    from .checkpoint import dcp_io
    return dcp_io.model_state(storage, info.path)


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    return len(data) > 8 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8


def _from_safetensors(data: bytes, spec: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, parsed from bytes (so S3 works): a JSON header and raw data, no code."""
    try:
        from safetensors.torch import load
    except ImportError:
        raise InitError(f"finetune.init_from: {spec} is a safetensors file, which needs the safetensors package: "
                        f"pip install 'launcher[safetensors]'") from None
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own SafetensorError on a malformed header or size
        raise InitError(f"finetune.init_from: {spec} is not a readable safetensors file: "
                        f"{str(e).strip().splitlines()[0][:200]}") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in obj.items())


def _unwrap(obj: Any, spec: str) -> tuple[dict[str, torch.Tensor], str]:
    if _is_state_dict(obj):
        return obj, spec
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, dict):
                tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
                if tensors:
                    return tensors, f"{spec} (its '{key}' entry)"
        raise InitError(f"finetune.init_from: {spec} holds a dict with keys {sorted(map(str, obj))[:8]} but no "
                        f"state dict (name -> tensor) at the top or under {', '.join(_WRAPPERS)}")
    raise InitError(f"finetune.init_from: {spec} holds a {type(obj).__name__}, not a state dict (name -> tensor)")


def remap(state: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rewrite key prefixes: {'module.': ''} strips one, {'': 'backbone.'} adds one; the longest matching prefix
    of each key wins, keys that match none stay as they are."""
    if not key_map:
        return state
    prefixes = sorted(key_map, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        new = key if prefix is None else key_map[prefix] + key[len(prefix):]
        if new in out:
            raise InitError(f"finetune.init_key_map maps two source keys onto '{new}'")
        out[new] = value
    return out


def load_initial(model: torch.nn.Module, spec: str, key_map: dict[str, str] | None = None, strict: bool = True,
                 endpoint_url: str | None = None) -> InitReport:
    """Copy the pretrained tensors at `spec` into `model` (parameters and buffers, in place).

    strict: every tensor of the model must come from the source with its shape, and the source may hold nothing
    else; otherwise nothing is loaded and the error lists the differences. Non-strict: what matches by name and
    shape is loaded, the rest is reported. Matching nothing at all is an error either way."""
    source, where = read_source(spec, endpoint_url)
    source = remap(source, dict(key_map or {}))
    target = model.state_dict()
    report = InitReport(where)
    for key, tensor in target.items():
        if key not in source:
            report.missing.append(key)
        elif tuple(source[key].shape) != tuple(tensor.shape):
            report.mismatched.append(f"{key} {list(tensor.shape)} in the model, {list(source[key].shape)} in the "
                                     f"source")
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in source if k not in target]
    if not report.loaded:
        raise InitError(f"finetune.init_from: no tensor of {where} matches the model by name: the model's are "
                        f"named like {', '.join(list(target)[:4])}, the source's like {', '.join(list(source)[:4])}"
                        f". Map the prefixes with finetune.init_key_map, e.g. {{'module.': ''}}")
    if strict and not report.complete:
        raise InitError(f"finetune.init_from does not fit the model (finetune.init_strict is true; set it to false "
                        f"to load what fits):\n{report.text()}")
    with torch.no_grad():
        for key in report.loaded:
            target[key].copy_(source[key])
    return report

"""The recipe: a typed schema, loading, merging and validation, and `_target_` instantiation.

Merge order, in one place (`load`): schema defaults <- recipe YAML <- command-line `key=value` overrides <- flags.
Every problem found is collected and raised together as one RecipeError naming the file, line and key path.
Nothing here imports torch: `launch --dry-run` and validation stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import imports
from .errors import RecipeError, UsageError
from .files import write_atomic


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A schema field with its one-line documentation (shown by `launch --explain`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


Component = Optional[Dict[str, Any]]  # {_target_: pkg.module.Name, **kwargs}


@dataclass
class RunSection:
    name: str = doc("Run name; the run directory defaults to runs/<name>. Defaults to the recipe file's stem.", "")
    dir: Optional[str] = doc("Run directory (config.yaml, logs/, checkpoints). `--run-dir` overrides it.", None)


@dataclass
class LaunchSection:
    nodes: int = doc("Number of nodes (`--nodes`, `--nnodes`).", 1)
    gpus_per_node: Optional[int] = doc(
        "Processes per node: one per GPU, or CPU processes when no GPU is present (`--gpus`, `--nproc-per-node`). "
        "Default: every visible GPU, or 1 on the CPU.", None)
    max_restarts: int = doc("How many times the agent restarts a failed worker group on this node (`--max-restarts`); "
                            "training then resumes from the newest committed checkpoint.", 0)
    rdzv_timeout_s: Optional[int] = doc(
        "Seconds the nodes wait for each other at the rendezvous before the run fails, naming how many arrived. "
        "Default: 300 plus 1 per node.", None)
    collective_timeout_s: int = doc(
        "Seconds a collective (gradient all-reduce, barrier, checkpoint agreement) may wait for a rank before the "
        "run fails, naming the ranks that did not arrive and the step.", 600)
    keep_freed_memory: bool = doc(
        "Each rank keeps host memory it frees for reuse instead of handing it back to the OS after every step "
        "(glibc's malloc: allocations up to 32 MiB come from the heap, which is never trimmed). Faulting those pages "
        "in again cost up to a sixth of a small CPU training step. A rank's resident memory then stays at its peak. "
        "Off when GLIBC_TUNABLES or MALLOC_*_ variables already set malloc options, or another allocator is "
        "preloaded.", True)
    preload_workers: bool = doc(
        "Start the ranks from a fork server per node that has imported torch and the launcher once: a rank starts "
        "in tens of milliseconds instead of seconds, at launch and on every restart after a failure. false: a fresh "
        "interpreter per rank, as torchrun starts them (for a script that must change the environment before torch "
        "is imported).", True)


@dataclass
class ScriptSection:
    path: Optional[str] = doc("A plain training script to run on every rank with the torchrun environment set.", None)
    module: Optional[str] = doc("Like `path`, but a module run as `python -m MODULE`.", None)
    args: List[str] = doc("Arguments passed to the script.", factory=list)


@dataclass
class DataSection:
    train: Component = doc("The training dataset: {_target_: ..., **kwargs}; a map-style torch Dataset.", None)
    batch_size: int = doc("Samples per rank per step (the global batch is batch_size x world size).", 32)
    shuffle: bool = doc("Shuffle every epoch (the order depends on seed and epoch only).", True)
    num_workers: int = doc("DataLoader worker processes per rank.", 2)
    pin_memory: Optional[bool] = doc("Pin host memory for faster copies to the GPU. Default: on with CUDA.", None)
    drop_last: bool = doc("Drop each rank's last incomplete batch.", False)
    val: Component = doc("A validation dataset: {_target_: ..., **kwargs}; each rank evaluates a disjoint share "
                         "(no padding), and metrics are reduced over the true sample count.", None)
    val_batch_size: Optional[int] = doc("Validation batch size per rank. Default: batch_size.", None)
    persistent_workers: bool = doc("Keep DataLoader workers alive between epochs (when num_workers > 0).", True)
    prefetch_factor: Optional[int] = doc("Batches each worker loads ahead (needs num_workers > 0).", None)
    collate_fn: Optional[str] = doc("Import path of a collate function; default torch's.", None)


@dataclass
class TrainerSection:
    max_steps: Optional[int] = doc("Stop after this many optimizer steps.", None)
    max_epochs: Optional[int] = doc("Stop after this many epochs (whichever limit comes first).", None)
    log_every_steps: int = doc("Print and record progress every N steps.", 10)
    grad_clip_norm: Optional[float] = doc("Clip the global gradient norm to this value.", None)
    device: str = doc("auto (GPUs when the driver shows any, NVIDIA or AMD, else CPU: decided by the launcher, "
                      "followed by every rank), cuda or cpu.", "auto")
    precision: str = doc("fp32, bf16 (autocast) or fp16 (autocast with a gradient scaler, kept in checkpoints).",
                         "fp32")
    val_every_steps: Optional[int] = doc("Validate every N optimizer steps (needs data.val).", None)
    val_every_epochs: Optional[int] = doc("Validate at the end of every N epochs (needs data.val).", 1)
    monitor: str = doc("The validation metric that decides the best checkpoints and early stopping: val/loss, or "
                       "val/accuracy (classifiers: logits [N, C] and integer targets [N]).", "val/loss")
    monitor_mode: str = doc("min or max: whether a smaller or a larger `monitor` is better.", "min")
    early_stop_patience: Optional[int] = doc("Stop when `monitor` has not improved for this many validations.",
                                             None)
    grad_accum_steps: int = doc("Micro-batches per optimizer step; gradients are synchronised only on the last "
                                "(DDP no_sync). Effective batch = batch_size x world size x this.", 1)
    compile: bool = doc("Compile the DDP model with torch.compile (graphs split at DDP's gradient buckets, so "
                        "communication still overlaps the backward). Checkpoints keep the plain parameter names.",
                        False)
    compile_options: Optional[Dict[str, Any]] = doc("Keyword arguments for torch.compile, e.g. {mode: "
                                                    "max-autotune, backend: inductor, dynamic: false}.", None)
    channels_last: bool = doc("Convolutional models: keep the model and 4-D inputs in channels_last memory format "
                              "(faster convolutions with tensor cores and on recent CPUs).", False)
    deterministic: bool = doc(
        "Deterministic kernels: torch.use_deterministic_algorithms, cuDNN deterministic without autotuning, and "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8. On CUDA a resume repeats the interrupted run bit for bit only with this "
        "on; an operation without a deterministic kernel then fails naming itself. Slower on GPUs.", False)


@dataclass
class CheckpointSection:
    dir: Optional[str] = doc("Where checkpoints go: a local path or s3://bucket/prefix. Default <run dir>/checkpoints.",
                             None)
    every_steps: Optional[int] = doc("Save every N optimizer steps.", None)
    every_minutes: Optional[float] = doc("Save when this many minutes passed since the last save (checked at log "
                                         "steps).", 30.0)
    at_end: bool = doc("Save when training ends.", True)
    keep: int = doc("How many of the newest committed checkpoints to keep (0 keeps all).", 3)
    keep_best: int = doc("Also keep the k best checkpoints by trainer.monitor; a checkpoint is saved at every "
                         "validation when k > 0.", 0)
    async_: bool = field(default=False, metadata={
        "doc": "Save in the background: training goes on while shards are written; commit after they are durable.",
        "key": "async"})
    retries: int = doc("How many times a failed save is tried again (all ranks together, after 1, 2, 4... s) "
                       "before it counts as failed. A full disk or a refused permission is not retried.", 3)
    on_save_error: str = doc("What a failed periodic save does: 'stop' the run (exit 1) or 'continue' training with "
                             "a warning and try again at the next save. The previous committed checkpoint stays "
                             "intact either way; a failed save at the end of training or before a preemption "
                             "always stops.", "stop")
    endpoint_url: Optional[str] = doc("S3-compatible endpoint (MinIO, Ceph, moto); default AWS or AWS_ENDPOINT_URL.",
                                      None)


@dataclass
class SlurmSection:
    partition: Optional[str] = doc("Partition (sbatch --partition); default: the cluster's default.", None)
    account: Optional[str] = doc("Account to charge (--account).", None)
    qos: Optional[str] = doc("Quality of service (--qos).", None)
    time_min: int = doc("Time limit in minutes (--time); the job is signalled signal_grace_s before it.", 60)
    constraint: Optional[str] = doc("Node features (--constraint).", None)
    mem: Optional[str] = doc("Memory per node, e.g. 64G (--mem).", None)
    cpus_per_task: Optional[int] = doc("CPUs for each node's task (--cpus-per-task, to sbatch and srun); default: "
                                       "2 per process. Each process gets OMP_NUM_THREADS=its share.", None)
    exclusive: bool = doc("Whole nodes only (--exclusive).", False)
    signal_grace_s: int = doc("Seconds before the time limit at which SLURM sends USR2 (checkpoint, requeue).", 120)
    max_requeues: int = doc("How many times the job requeues itself after preemption or a time limit.", 3)
    extra_sbatch: Optional[Dict[str, Any]] = doc("More sbatch options, {option: value}, e.g. {gres: 'gpu:8'}.",
                                                 None)
    setup: List[str] = doc("Shell lines run before the job (module load, source venv/bin/activate).",
                           factory=list)


@dataclass
class FinetuneSection:
    freeze: List[str] = doc("Parameter names to freeze, as globs (e.g. 'backbone.*'); a table of trainable and frozen "
                            "parameters per top-level module is printed at start.", factory=list)
    lr_groups: Optional[Dict[str, float]] = doc(
        "Learning rates by parameter-name glob, e.g. {'backbone.*': 1.0e-4}; the first matching glob wins, other "
        "parameters keep the optimizer's lr.", None)
    unfreeze_after_epochs: Optional[int] = doc(
        "Make the frozen parameters trainable from this epoch on (0-based: 2 trains epochs 0 and 1 frozen); they "
        "join the optimizer with their lr_groups rate.", None)
    init_from: Optional[str] = doc(
        "Pretrained weights to start from (not applied when the run resumes from its own checkpoint): a checkpoint "
        "folder, a checkpoint directory (its newest committed checkpoint), or a torch.save file with a state dict "
        "(also under 'state_dict' or 'model'), local or s3://.", None)
    init_key_map: Optional[Dict[str, str]] = doc(
        "Rewrite key prefixes of init_from before matching: {'module.': ''} strips one, {'': 'backbone.'} adds one.",
        None)
    init_strict: bool = doc("Every model tensor must come from init_from with its shape, and nothing else may be "
                            "there. false: load what matches, report the missing, unexpected and reshaped keys.",
                            True)


@dataclass
class LoggingSection:
    tensorboard: Optional[bool] = doc("Write TensorBoard event files to <run dir>/tb (rank 0). Default: on "
                                      "when the tensorboard package is installed.", None)
    wandb: bool = doc("Log to Weights & Biases (rank 0; needs the wandb package). The run id is kept in "
                      "<run dir>/wandb-run-id, so resumes and requeues continue the same W&B run.", False)
    wandb_project: Optional[str] = doc("W&B project. Default: launcher.", None)
    wandb_entity: Optional[str] = doc("W&B entity (user or team). Default: W&B's own.", None)
    wandb_mode: Optional[str] = doc("online, offline (no network; `wandb sync` later) or disabled. Default: W&B's "
                                    "own (WANDB_MODE).", None)
    progress: str = doc("Rank 0's console progress: auto (a bar with rate and ETA on a terminal, plain lines "
                        "otherwise), bar, or lines.", "auto")
    grad_norm: bool = doc("Record the global gradient norm at log steps (free when trainer.grad_clip_norm is set).",
                          True)


@dataclass
class Recipe:
    seed: int = doc("Seed for model initialisation (same on all ranks), data order and per-rank streams.", 0)
    run: RunSection = doc("Where the run lives.", factory=RunSection)
    launch: LaunchSection = doc("How many nodes and processes.", factory=LaunchSection)
    script: ScriptSection = doc("Bring-your-own training script instead of the built-in trainer.", factory=ScriptSection)
    model: Component = doc("The model: {_target_: ..., **kwargs}; a torch.nn.Module.", None)
    data: DataSection = doc("Datasets and DataLoader settings.", factory=DataSection)
    optimizer: Component = doc("Optimizer, called with the model's trainable parameters first.",
                               factory=lambda: {"_target_": "torch.optim.AdamW", "lr": 1e-3})
    lr_scheduler: Component = doc("LR scheduler, called with the optimizer first; stepped every step.", None)
    loss: Component = doc("Loss, called as loss(model_output, target).",
                          factory=lambda: {"_target_": "torch.nn.CrossEntropyLoss"})
    trainer: TrainerSection = doc("Training limits, logging and clipping.", factory=TrainerSection)
    finetune: FinetuneSection = doc("Pretrained weights, frozen layers and per-group learning rates.",
                                    factory=FinetuneSection)
    checkpoint: CheckpointSection = doc("Sharded checkpoints: where, how often, how many.",
                                        factory=CheckpointSection)
    logging: LoggingSection = doc("Metrics (metrics.jsonl, TensorBoard, W&B) and console progress.",
                                  factory=LoggingSection)
    backend: str = doc("local (torchrun on this machine) or slurm (a SLURM job through submitit; `--slurm`).",
                       "local")
    slurm: SlurmSection = doc("SLURM job settings (with backend slurm).", factory=SlurmSection)
    resume: str = doc("auto (newest committed checkpoint), never, or the path of a checkpoint (step-<N> folder).",
                      "auto")


COMPONENT_KEYS = ("model", "data.train", "optimizer", "lr_scheduler", "loss")
DEVICES = ("auto", "cpu", "cuda")


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


# ----------------------------------------------------------------------------------------------- schema checks

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _aliases(cls: type) -> dict[str, str]:
    """Recipe key -> field name, for keys Python cannot name (`checkpoint.async` is the field `async_`)."""
    return {f.metadata["key"]: f.name for f in dataclasses.fields(cls) if "key" in f.metadata}


def _keys_in(cls: type, data: Any) -> Any:
    """Rename recipe keys to schema field names, recursively."""
    if not isinstance(data, dict):
        return data
    hints, alias = _hints(cls), _aliases(cls)
    out = {}
    for k, v in data.items():
        name = alias.get(k, k)
        inner = _strip_optional(hints[name]) if name in hints else None
        out[name] = _keys_in(inner, v) if inner is not None and dataclasses.is_dataclass(inner) else v
    return out


def _keys_out(cls: type, data: Any) -> Any:
    """Field names back to recipe keys, for what users see (config.yaml, --dry-run)."""
    if not isinstance(data, dict):
        return data
    hints = _hints(cls)
    back = {v: k for k, v in _aliases(cls).items()}
    out = {}
    for k, v in data.items():
        inner = _strip_optional(hints[k]) if k in hints else None
        out[back.get(k, k)] = _keys_out(inner, v) if inner is not None and dataclasses.is_dataclass(inner) else v
    return out


def _path_in(key: str) -> str:
    cls: Any = Recipe
    parts = []
    for part in key.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            parts.append(part)
            continue
        name = _aliases(cls).get(part, part)
        parts.append(name)
        hints = _hints(cls)
        cls = _strip_optional(hints[name]) if name in hints else None
    return ".".join(parts)


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.metadata.get('key', f.name)}"
        out.append(path)
        tp = _strip_optional(_hints(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            out.extend(all_keys(tp, path + "."))
    return out


def explain(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, doc) for every leaf and section: the reference `launch --explain` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        inner = _strip_optional(tp)
        key = f"{prefix}{f.metadata.get('key', f.name)}"
        rows.append((key, _type_name(tp, key), f.metadata.get("doc", "")))
        if dataclasses.is_dataclass(inner):
            rows.extend(explain(inner, f"{prefix}{f.name}."))
    return rows


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _type_name(tp: Any, key: str = "") -> str:
    optional = typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)
    inner = _strip_optional(tp)
    if dataclasses.is_dataclass(inner):
        name = "section"
    elif typing.get_origin(inner) in (dict, Dict):
        name = "component" if key in COMPONENT_KEYS or key == "data.val" else "mapping"
    elif typing.get_origin(inner) in (list, List):
        name = "list"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def _is_component(tp: Any) -> bool:
    return typing.get_origin(_strip_optional(tp)) in (dict, Dict)


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
    tp = _strip_optional(tp)
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


def _check_tree(cls: type, data: dict, prefix: str, where: Any, problems: list[str]) -> dict:
    """Check a raw mapping against a schema section; `where(path)` says where a key came from.
    Returns the mapping without the entries that have problems, so later checks can still run."""
    hints = _hints(cls)
    valid = [f.metadata.get("key", f.name) for f in dataclasses.fields(cls)]
    alias = _aliases(cls)
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
        inner = _strip_optional(tp)
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            value = _check_tree(inner, value, path + ".", where, problems)
        clean[path.rsplit(".", 1)[-1]] = value  # recipe spelling; renamed to field names on merge
    return clean


def _check_override(key: str, value: Any, problems: list[str], text: str) -> bool:
    """Check one override against the schema; False (and a problem recorded) when it does not fit."""
    before = len(problems)
    _check_override_path(key, value, problems, text)
    return len(problems) == before


def _check_override_path(key: str, value: Any, problems: list[str], text: str) -> None:
    cls: Any = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(cls)
        path = ".".join(parts[: i + 1])
        part = _aliases(cls).get(part, part)
        if part not in hints:
            valid = [f.metadata.get("key", f.name) for f in dataclasses.fields(cls)]
            problems.append(f"override '{text}': {_unknown_key(part, path, valid)}")
            return
        tp = hints[part]
        if _is_component(tp) or _strip_optional(tp) is Any:
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
        inner = _strip_optional(tp)
        if not dataclasses.is_dataclass(inner):
            problems.append(f"override '{text}': '{path}' is a {_type_name(tp)}, it has no key '{parts[i + 1]}'")
            return
        cls = inner


# ----------------------------------------------------------------------------------------------- loading

@dataclass
class Loaded:
    """A validated, fully resolved recipe and where it came from."""

    cfg: DictConfig
    source: str  # recipe file, or a description for script-only launches

    @property
    def is_script(self) -> bool:
        return bool(self.cfg.script.path or self.cfg.script.module)


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
        data = _check_tree(Recipe, data, "", lambda p: f"{path}:{lines.get(p, '?')}", problems)

    parsed: list[tuple[str, Any, str]] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ValueError as e:
            problems.append(str(e))
            continue
        if _check_override(key, value, problems, text):
            parsed.append((key, value, text))

    cfg = OmegaConf.structured(Recipe)
    for layer in (defaults or {}, data):
        try:
            cfg = _merge_layer(cfg, _keys_in(Recipe, layer))
        except OmegaConfBaseException as e:
            problems.append(f"{source}: {_omegaconf_message(e)}")
    for key, value, text in parsed:
        key = _path_in(key)
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

    problems.extend(_semantic_problems(cfg, source, lines))
    if problems:
        raise RecipeError(problems)
    _keep_env_references(cfg, raw)
    return Loaded(cfg=cfg, source=source)


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


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).split("\n")[0]
    return f"{key}: {msg}" if key else msg


def _semantic_problems(cfg: DictConfig, source: str, lines: dict[str, int]) -> list[str]:
    """Checks on values that types alone cannot express."""
    out: list[str] = []

    def at(key: str) -> str:
        return f"{source}:{lines[key]}" if key in lines else source

    def positive(key: str, allow_none: bool = True, minimum: int = 1) -> None:
        v = OmegaConf.select(cfg, key)
        if v is None and allow_none:
            return
        if v is None or v < minimum:
            out.append(f"{at(key)}: {key} must be >= {minimum}, got {v}")

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
    if cfg.checkpoint.on_save_error not in ("stop", "continue"):
        out.append(f"{at('checkpoint.on_save_error')}: checkpoint.on_save_error must be stop or continue, got "
                   f"'{cfg.checkpoint.on_save_error}'")
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
    positive("data.val_batch_size")
    positive("checkpoint.keep_best", allow_none=False, minimum=0)
    if cfg.trainer.monitor_mode not in ("min", "max"):
        out.append(f"{at('trainer.monitor_mode')}: trainer.monitor_mode must be min or max, got "
                   f"'{cfg.trainer.monitor_mode}'")
    if cfg.trainer.monitor not in ("val/loss", "val/accuracy"):
        out.append(f"{at('trainer.monitor')}: trainer.monitor must be val/loss or val/accuracy, got "
                   f"'{cfg.trainer.monitor}'")
    if cfg.data.val is None:
        for key, value in (("checkpoint.keep_best", cfg.checkpoint.keep_best),
                           ("trainer.early_stop_patience", cfg.trainer.early_stop_patience),
                           ("trainer.val_every_steps", cfg.trainer.val_every_steps)):
            if value:
                out.append(f"{at(key)}: {key} needs a validation set: add data.val: {{_target_: ...}}")
    if cfg.logging.progress not in ("auto", "bar", "lines"):
        out.append(f"{at('logging.progress')}: logging.progress must be auto, bar or lines, got "
                   f"'{cfg.logging.progress}'")
    if cfg.logging.wandb_mode not in (None, "online", "offline", "disabled"):
        out.append(f"{at('logging.wandb_mode')}: logging.wandb_mode must be online, offline or disabled, got "
                   f"'{cfg.logging.wandb_mode}'")
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
    if cfg.trainer.precision not in ("fp32", "bf16", "fp16"):
        out.append(f"{at('trainer.precision')}: trainer.precision must be fp32, bf16 or fp16, got "
                   f"'{cfg.trainer.precision}'")
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
    if cfg.backend not in ("local", "slurm"):
        out.append(f"{at('backend')}: backend must be local or slurm, got '{cfg.backend}'")
    positive("slurm.time_min", allow_none=False)
    positive("slurm.signal_grace_s", allow_none=False, minimum=0)
    positive("slurm.max_requeues", allow_none=False, minimum=0)
    positive("slurm.cpus_per_task")
    if cfg.backend == "slurm" and cfg.slurm.signal_grace_s >= cfg.slurm.time_min * 60:
        out.append(f"{at('slurm.signal_grace_s')}: slurm.signal_grace_s ({cfg.slurm.signal_grace_s}) must be "
                   f"shorter than the time limit slurm.time_min ({cfg.slurm.time_min} min)")
    if cfg.trainer.device not in DEVICES:
        out.append(f"{at('trainer.device')}: trainer.device must be one of {', '.join(DEVICES)}, got "
                   f"'{cfg.trainer.device}'")
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


def _merge_layer(cfg: DictConfig, layer: dict) -> DictConfig:
    """Merge a raw mapping; a component it gives whole replaces the one below, never merges into it."""
    for key in COMPONENT_KEYS:
        node: Any = layer
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            OmegaConf.update(cfg, key, None, merge=False)
    return OmegaConf.merge(cfg, layer)


_ABSENT = object()


# ----------------------------------------------------------------------------------------------- instantiation

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

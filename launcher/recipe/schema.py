"""The recipe schema: one dataclass per section, each field with its one-line doc (what `launch --explain` prints).

A field that takes one of a closed set of values is typed `Annotated[str, Literal[...]]`, the Literal named here
(`Precision`, `Device`, ...). OmegaConf reads the `str` (before 2.4 it accepts no Literal, and from 2.4 its own
check would name neither file nor line); validation, the `--explain` type column and the error messages read the
allowed values from the Literal (`choices`, `choice_fields`). Adding such a knob is that one field, nothing else.
Also here: walking the schema (field types, recipe keys, the `--explain` table). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Literal, Optional, Union


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A schema field with its one-line documentation (shown by `launch --explain`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# The closed sets of values, each written once; a field takes one as `Annotated[str, Name]`.
Device = Literal["auto", "cuda", "cpu"]
Precision = Literal["fp32", "bf16", "fp16"]
Monitor = Literal["val/loss", "val/accuracy"]
MonitorMode = Literal["min", "max"]
OnSaveError = Literal["stop", "continue"]
WandbMode = Literal["online", "offline", "disabled"]
Progress = Literal["auto", "bar", "lines"]
Backend = Literal["local", "slurm"]
Sampler = Literal["tpe", "random", "grid", "gp", "cmaes"]
Pruner = Literal["none", "median", "asha", "hyperband"]
Objective = Literal["last", "best"]

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
    device: Annotated[str, Device] = doc("Where the ranks compute. auto: GPUs when the driver shows any, NVIDIA or "
                                         "AMD, else the CPU (decided by the launcher, followed by every rank).",
                                         "auto")
    precision: Annotated[str, Precision] = doc("Arithmetic precision. bf16: autocast; fp16: autocast with a "
                                               "gradient scaler, kept in checkpoints.", "fp32")
    val_every_steps: Optional[int] = doc("Validate every N optimizer steps (needs data.val).", None)
    val_every_epochs: Optional[int] = doc("Validate at the end of every N epochs (needs data.val).", 1)
    monitor: Annotated[str, Monitor] = doc("The validation metric that decides the best checkpoints and early "
                                           "stopping (val/accuracy: classifiers, with logits [N, C] and integer "
                                           "targets [N]).", "val/loss")
    monitor_mode: Annotated[str, MonitorMode] = doc("Whether a smaller (min) or a larger (max) `monitor` is better.",
                                                    "min")
    early_stop_patience: Optional[int] = doc("Stop when `monitor` has not improved for this many validations.",
                                             None)
    overfit_batches: Optional[int] = doc(
        "Train on N fixed batches per rank: the first N x batch_size x world size samples, in order, every epoch "
        "(to watch the model memorise them; `launch doctor` checks one batch with a verdict).", None)
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
    on_save_error: Annotated[str, OnSaveError] = doc(
        "What a failed periodic save does: stop the run (exit 1), or continue training with a warning and try again "
        "at the next save. The previous committed checkpoint stays intact either way; a failed save at the end of "
        "training or before a preemption always stops.", "stop")
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
    wandb_group: Optional[str] = doc("W&B group of the run (`launch sweep` puts its trials in one group, the "
                                     "sweep's name).", None)
    wandb_mode: Optional[Annotated[str, WandbMode]] = doc("W&B mode (offline: no network; `wandb sync` later). "
                                                          "Default: W&B's own (WANDB_MODE).", None)
    progress: Annotated[str, Progress] = doc("Rank 0's console progress. auto: a bar with rate and ETA on a "
                                             "terminal, plain lines otherwise.", "auto")
    grad_norm: bool = doc("Record the global gradient norm at log steps (free when trainer.grad_clip_norm is set).",
                          True)


@dataclass
class SweepSection:
    metric: str = doc("What a trial is judged by: a metric the trainer records (train/loss, val/loss, val/accuracy, "
                      "train/lr, train/grad_norm, perf/samples_per_s, ...).", "val/loss")
    mode: Annotated[str, MonitorMode] = doc("min or max the metric.", "min")
    objective: Annotated[str, Objective] = doc("A trial's value: the metric's last recorded value, or its best.",
                                               "last")
    sampler: Annotated[str, Sampler] = doc("Optuna's sampler: tpe (Bayesian), random, grid (every combination), gp "
                                           "(Gaussian process), cmaes (needs the cmaes package).", "tpe")
    pruner: Annotated[str, Pruner] = doc("Stop unpromising trials early (each ends PRUNED with a committed "
                                         "checkpoint): none, median, asha (successive halving), hyperband.", "none")
    min_steps: int = doc("No trial is pruned before this step (the pruners' warm-up / minimum resource).", 0)
    sampler_args: Optional[Dict[str, Any]] = doc("Keyword arguments for Optuna's sampler, e.g. {n_startup_trials: 5} "
                                                 "for tpe.", None)
    pruner_args: Optional[Dict[str, Any]] = doc("Keyword arguments for Optuna's pruner, e.g. {n_startup_trials: 2} for "
                                                "median.", None)
    trials: Optional[int] = doc("Trials in all (running the sweep again with more continues it). Default: 20, or "
                                "every combination of a grid.", None)
    parallel: int = doc("Trials at a time. Locally each gets its own GPUs (CUDA_VISIBLE_DEVICES) and CPUs.", 1)
    max_failures: int = doc("The sweep stops asking for new trials after this many FAILED ones.", 3)
    retries: int = doc("Times a local trial killed from outside (a signal: the out-of-memory killer, a kill) "
                       "starts again from its newest committed checkpoint before it counts as FAILED. A trial whose "
                       "run raises fails at once; a SLURM trial requeues as any job does.", 2)
    seed: Optional[int] = doc("The samplers' seed (trial N samples with seed and N, so a restarted sweep goes on "
                              "as it would have). Default: the recipe's seed.", None)
    storage: Optional[str] = doc("An Optuna storage URL (sqlite:///..., postgresql://...) for sites that have one. "
                                 "Default: a journal file in the sweep directory, written by the controller alone.",
                                 None)
    dir: Optional[str] = doc("The sweep directory (`--dir`). Default: sweeps/<run.name>.", None)
    params: Optional[Dict[str, Any]] = doc(
        "The search space by recipe key: {type: float|int, low, high, log, step} or {type: choice, values: [...]}, "
        "e.g. optimizer.lr: {type: float, low: 1.0e-5, high: 0.1, log: true}.", None)


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
    backend: Annotated[str, Backend] = doc("Where the job runs. local: torchrun on this machine; slurm: a SLURM job "
                                           "through submitit (`--slurm`).", "local")
    slurm: SlurmSection = doc("SLURM job settings (with backend slurm).", factory=SlurmSection)
    resume: str = doc("auto (newest committed checkpoint), never, or the path of a checkpoint (step-<N> folder).",
                      "auto")
    sweep: SweepSection = doc("Hyperparameter search over this recipe (`launch sweep`); plain `launch` ignores it.",
                              factory=SweepSection)


COMPONENT_KEYS = ("model", "data.train", "optimizer", "lr_scheduler", "loss")


# ----------------------------------------------------------------------------------------------- walking the schema

def field_types(cls: type) -> dict[str, Any]:
    """Field name -> type as OmegaConf sees it: a choice field is a `str` here."""
    return typing.get_type_hints(cls)


def key_aliases(cls: type) -> dict[str, str]:
    """Recipe key -> field name, for keys Python cannot name (`checkpoint.async` is the field `async_`)."""
    return {f.metadata["key"]: f.name for f in dataclasses.fields(cls) if "key" in f.metadata}


def strip_optional(tp: Any) -> Any:
    """`Optional[X]` -> X; any other type as it is."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def field_path(key: str) -> str:
    """A dotted recipe key as the path of field names (`checkpoint.async` -> `checkpoint.async_`)."""
    cls: Any = Recipe
    parts = []
    for part in key.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            parts.append(part)
            continue
        name = key_aliases(cls).get(part, part)
        parts.append(name)
        hints = field_types(cls)
        cls = strip_optional(hints[name]) if name in hints else None
    return ".".join(parts)


def _choice_values(tp: Any) -> tuple[str, ...] | None:
    """The values of `Annotated[str, Literal[...]]` (or of its Optional), else None."""
    for meta in getattr(strip_optional(tp), "__metadata__", ()):
        if typing.get_origin(meta) is Literal:
            return typing.get_args(meta)
    return None


def choices(cls: type, name: str) -> tuple[str, ...] | None:
    """The allowed values of a field, e.g. `choices(TrainerSection, "precision")` -> ("fp32", "bf16", "fp16");
    None for a field open to any value of its type. `name` is the field name or its recipe key."""
    name = key_aliases(cls).get(name, name)
    return _choice_values(typing.get_type_hints(cls, include_extras=True)[name])


def choice_fields(cls: type = Recipe, prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """(dotted recipe key, allowed values) for every field with a closed set of values, in schema order."""
    out = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.metadata.get('key', f.name)}"
        values = _choice_values(tp)
        if values is not None:
            out.append((key, values))
        if dataclasses.is_dataclass(strip_optional(tp)):
            out.extend(choice_fields(strip_optional(tp), key + "."))
    return out


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.metadata.get('key', f.name)}"
        out.append(path)
        tp = strip_optional(field_types(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            out.extend(all_keys(tp, path + "."))
    return out


def explain(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, doc) for every leaf and section: the reference `launch --explain` prints. The type of a field
    with a closed set of values lists them (`fp32|bf16|fp16`)."""
    rows = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = strip_optional(tp)
        key = f"{prefix}{f.metadata.get('key', f.name)}"
        rows.append((key, type_name(tp, key), f.metadata.get("doc", "")))
        if dataclasses.is_dataclass(inner):
            rows.extend(explain(inner, f"{prefix}{f.name}."))
    return rows


def type_name(tp: Any, key: str = "") -> str:
    """How `--explain` and the error messages name a schema type: `int`, `int or null`, `section`, `a|b|c`..."""
    optional = typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)
    inner = strip_optional(tp)
    values = _choice_values(inner)
    if values is not None:
        name = "|".join(values)
    elif dataclasses.is_dataclass(inner):
        name = "section"
    elif typing.get_origin(inner) in (dict, Dict):
        name = "component" if key in COMPONENT_KEYS or key == "data.val" else "mapping"
    elif typing.get_origin(inner) in (list, List):
        name = "list"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name

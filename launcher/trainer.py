"""The built-in training loop: DDP model, optimizer, scheduler and loss from the recipe, stepped to its limits.

Per step it does what a hand-written DDP loop does and nothing more; values that need a device sync (the loss as
a Python float, the cross-rank mean) are taken only every `trainer.log_every_steps`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import logging
import os
import time
from typing import Any, Iterable, Iterator, NamedTuple

import torch
import torch.distributed as tdist
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel as DDP

from . import data as data_mod
from . import dist
from . import finetune as ft
from . import procs
from .monitor import Progress, peak_memory_gib
from .checkpoint import rng
from .checkpoint.checkpointer import Checkpointer, Position
from .recipe import instantiate

log = logging.getLogger("launcher")


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer: equal on all ranks iff initialisation is identical."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Tensors to the device (4-D ones in channels_last format when asked), through lists, tuples and dicts."""
    if isinstance(batch, torch.Tensor):
        if channels_last and batch.ndim == 4:
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def _ddp_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters DDP reduces, in DDP's order (the indices of its bucket layout)."""
    seen: set[int] = set()
    out = []
    for _, m in module.named_modules():
        for _, p in m.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@contextlib.contextmanager
def fixed_bucket_layout(layout: list[list[int]] | None) -> Iterator[None]:
    """Build DDP with this gradient bucket layout instead of its first-step one.

    DDP lays its buckets out again after the first backward of each process, in the order gradients became ready.
    A resumed process would otherwise take its first step with the initial layout where the interrupted run had
    already switched; over more than 2 ranks an all-reduce adds each gradient in an order that depends on where it
    sits in its bucket, and the resumed run would drift by an ulp. Starting from the saved layout (which the
    rebuild then reproduces) makes resume bitwise exact. A layout that does not fit the model is ignored.
    """
    original = tdist._compute_bucket_assignment_by_size

    def assign(tensors: list[torch.Tensor], limits: list[int], *args: Any, **kwargs: Any) -> Any:
        if layout is None or sorted(i for b in layout for i in b) != list(range(len(tensors))):
            return original(tensors, limits, *args, **kwargs)
        return [list(b) for b in reversed(layout)], [max(limits)] * len(layout)  # DDP reverses the bucket list

    tdist._compute_bucket_assignment_by_size = assign
    try:
        yield
    finally:
        tdist._compute_bucket_assignment_by_size = original


class Group(NamedTuple):
    """One optimizer step's micro-batches, `size` of them, taken from the loader only as they are used: taking a
    group ahead would move a main-process loader's random augmentation (num_workers=0) relative to the model's
    own random draws (dropout), and every loss after it."""
    micro_batches: Iterator[Any]
    size: int


_END = object()


def accumulation_groups(n_batches: int, accum: int) -> list[int]:
    """The sizes of an epoch's accumulation groups: `accum` micro-batches each, the last one shorter when
    `n_batches` is not a multiple of it (it still takes an optimizer step, on the mean of its own losses)."""
    return [min(accum, n_batches - start) for start in range(0, n_batches, accum)]


def grouped(batches: Iterable[Any], n_batches: int, accum: int) -> Iterator[Group]:
    """An epoch's `n_batches` batches as accumulation groups, each to be used up before the next is asked for."""
    it = iter(batches)
    for size in accumulation_groups(n_batches, accum):
        yield Group(itertools.islice(it, size), size)
    if next(it, _END) is not _END:  # the loader's end (a loader with workers shuts them down here)
        raise RuntimeError(f"the training loader gave more batches than its length ({n_batches})")


def log_due(step: int, every: int, done: bool, epoch_end: bool) -> bool:
    """A log step: every `every` steps, the last step of an epoch and the last of training."""
    return step % every == 0 or done or epoch_end


def validation_due(step: int, epoch: int, epoch_end: bool, every_steps: int | None,
                   every_epochs: int | None) -> bool:
    """Validation follows every `every_steps`-th step and the last step of every `every_epochs`-th epoch."""
    if every_steps and step % every_steps == 0:
        return True
    return bool(epoch_end and every_epochs and (epoch + 1) % every_epochs == 0)


def track_best(watch: dict[str, Any], value: float, step: int, mode: str, patience: int | None) -> bool:
    """Note one validation's value of the monitored metric in `watch` (best, best_step, since_best): True when it
    has not improved (lower in min mode, higher in max) for `patience` validations."""
    best = watch["best"]
    if best is None or (value < best if mode == "min" else value > best):
        watch.update(best=value, best_step=step, since_best=0)
    else:
        watch["since_best"] += 1
    return patience is not None and watch["since_best"] >= patience


def epoch_position(step: int, epoch: int, epoch_start: int, batches: int, n_batches: int | None,
                   samples_per_batch: int) -> Position:
    """Where training resumes after `batches` of an epoch that began at global sample `epoch_start` (non-zero
    after a resume) and has `n_batches` (None: not at its end): an ended epoch resumes at the next one's start."""
    if n_batches is not None and batches >= n_batches:
        return Position(step, epoch + 1, 0)
    return Position(step, epoch, epoch_start + batches * samples_per_batch)


class Trainer:
    """Owns the run's objects and the loop. Built on every rank from the same resolved recipe."""

    def __init__(self, cfg: DictConfig, run_dir: str, device: torch.device, joined_at: float | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        self.info = dist.rank_info()

        t_cfg = cfg.trainer
        rng.seed_all(cfg.seed)  # identical on every rank: same initial weights
        model = instantiate(cfg.model, key="model")
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model %s: %d parameters (%d trainable), fingerprint %s", type(model).__name__, n_params, n_train,
                 fingerprint(model))
        rng.seed_all(data_mod.derive_seed(cfg.seed, self.info.rank))  # per-rank streams from here on (dropout, noise)
        self.channels_last = bool(t_cfg.channels_last)
        model.to(device, memory_format=torch.channels_last) if self.channels_last else model.to(device)
        self.model = model
        f_cfg = cfg.finetune
        self.frozen = ft.frozen_names(model, list(f_cfg.freeze))
        ft.set_trainable(model, self.frozen, False)
        self.unfreeze_at: int | None = f_cfg.unfreeze_after_epochs
        self.unfrozen = False
        if self.info.is_main:
            log.info("parameters by module:\n%s", ft.parameter_table(model))
        # Parameters to be unfrozen later are in the optimizer from the start (without gradients it skips them),
        # so its structure, and every checkpoint's, stays the same when they join.
        self.optimizer = instantiate(cfg.optimizer, ft.param_groups(model, dict(f_cfg.lr_groups or {}),
                                                                    include_frozen=self.unfreeze_at is not None),
                                     key="optimizer")
        self.scheduler = (instantiate(cfg.lr_scheduler, self.optimizer, key="lr_scheduler")
                          if cfg.lr_scheduler is not None else None)
        self.precision = str(t_cfg.precision)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not. A disabled scaler passes
        # the loss and the optimizer step through untouched.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.accum = int(t_cfg.grad_accum_steps)
        self.loss_fn = instantiate(cfg.loss, key="loss")
        if isinstance(self.loss_fn, torch.nn.Module):
            self.loss_fn.to(device)

        dataset = instantiate(cfg.data.train, key="data.train")
        self.loader = data_mod.build_loader(cfg.data, dataset, seed=cfg.seed, info=self.info,
                                            pin_memory=device.type == "cuda")
        self.sampler: data_mod.DistributedSampler = self.loader.sampler  # type: ignore[assignment]
        self.step = 0
        self.epoch = 0
        # Plain Python values for the hot loop (a DictConfig attribute read costs ~20 us).
        t = cfg.trainer
        self.max_steps: int | None = t.max_steps
        self.max_epochs: int | None = t.max_epochs
        self.clip: float | None = t.grad_clip_norm
        self.log_every = int(t.log_every_steps)
        # Under SLURM a preemption signal may come at any step, and under NCCL a hung rank must be found on the host:
        # the ranks meet after every step on the CPU side group (a one-byte all-reduce, no GPU synchronisation).
        self.stop_every_step = dist.agree_every_step(device)
        global_batch = int(cfg.data.batch_size) * self.info.world_size * self.accum
        self.epoch_start = 0  # global sample offset the current epoch started from (non-zero after a resume)
        self.ckpt = Checkpointer(cfg, run_dir, model, self.optimizer, self.scheduler,
                                 self.scaler if self.scaler.is_enabled() else None, device=device)
        self.ckpt.extras = lambda: {"ddp_buckets": self._bucket_layout(), "monitor": self.watch,
                                    "unfrozen": self.unfrozen}
        # A checkpoint written after the unfreeze holds optimizer state for those parameters: unfreeze first.
        self.ckpt.before_load = lambda extras: self._unfreeze("the checkpoint was written after it") \
            if extras.get("unfrozen") else None
        self._layout: list[list[int]] | None = None
        # Validation, the monitored metric's best value so far and how many validations since it improved.
        self.val_loader = (data_mod.build_eval_loader(cfg.data, instantiate(cfg.data.val, key="data.val"),
                                                      info=self.info, pin_memory=device.type == "cuda")
                           if cfg.data.val is not None else None)
        self.val_every_steps: int | None = t_cfg.val_every_steps
        self.val_every_epochs: int | None = t_cfg.val_every_epochs
        self.monitor, self.mode = str(t_cfg.monitor), str(t_cfg.monitor_mode)
        self.patience: int | None = t_cfg.early_stop_patience
        self.watch: dict[str, Any] = {"best": None, "best_step": None, "since_best": 0}
        self.early_stopped = False
        t_load = time.perf_counter()
        pos = self.ckpt.resume(cfg.resume)
        load_s = time.perf_counter() - t_load
        if pos is not None:
            self.step, self.epoch, self.epoch_start = pos.step, pos.epoch, pos.sample_offset
            self.watch.update(pos.extras.get("monitor") or {})
        elif f_cfg.init_from:
            report = ft.load_initial(model, str(f_cfg.init_from), dict(f_cfg.init_key_map or {}),
                                     bool(f_cfg.init_strict), cfg.checkpoint.endpoint_url)
            if self.info.is_main:
                (log.info if report.complete else log.warning)("%s", report.text())
        # DDP comes after the resume: a resumed run lays out its gradient buckets as the interrupted one did.
        self.compile_options = dict(t_cfg.compile_options or {}) if t_cfg.compile else None
        with fixed_bucket_layout(pos.extras.get("ddp_buckets") if pos is not None else None):
            self.ddp = self._wrap(model)
        limits = [self.max_steps, self.max_epochs and self.max_epochs * len(self.loader)]
        total = min(x for x in limits if x) if any(limits) else None
        self.progress = Progress(run_dir, self.info.is_main, total, global_batch, cfg,
                                 resumed_step=pos.step if pos is not None else None)
        self.measure_norm = bool(cfg.logging.grad_norm)
        self._grad_norm: torch.Tensor | None = None  # the latest measured (a tensor: read only at log steps)
        self._data_wait = 0.0  # seconds spent waiting for the loader since the last log step
        self._last_record = self.step
        self._loss_sum = torch.zeros((), device=device)  # the steps' losses since the last log step
        self._loss_steps = 0
        self._start_step = self.step  # this attempt's first step is the one after it
        # When this attempt's milestones happened (bench/bench_recovery.py reads them after a restart).
        self.progress.event("ready", restart=self.info.restart_count, process_start=procs.start_time(),
                            group_joined=joined_at, resumed_step=pos.step if pos is not None else None,
                            load_s=round(load_s, 4))
        log.info("data: %d samples, %d per rank per epoch, batch %d per rank (%d global), %d loader workers",
                 len(dataset), len(self.sampler), cfg.data.batch_size, global_batch // self.accum,
                 cfg.data.num_workers)
        if self.accum > 1 or self.precision != "fp32":
            log.info("effective batch %d (%d per rank x %d ranks x %d accumulation steps), precision %s",
                     global_batch, cfg.data.batch_size, self.info.world_size, self.accum, self.precision)

    def _unfreeze(self, why: str) -> None:
        """Make the frozen parameters trainable (before the DDP model exists, or followed by _rebuild_ddp)."""
        ft.set_trainable(self.model, self.frozen, True)
        self.unfrozen = True
        if self.info.is_main:
            log.info("unfroze %d parameter tensors (%s); parameters by module:\n%s", len(self.frozen), why,
                     ft.parameter_table(self.model))

    def _rebuild_ddp(self) -> None:
        """DDP reduces the parameters that were trainable when it was built: a new set needs a new DDP (the old
        one's gradient hooks go with it)."""
        del self.ddp
        gc.collect()
        self._layout = None
        self.ddp = self._wrap(self.model)

    def _wrap(self, model: torch.nn.Module) -> DDP:
        """The DDP model, compiled in place when trainer.compile is set: compiling the DDP module lets dynamo split
        the graph at gradient-bucket boundaries (communication overlaps the backward); `self.model` stays the plain
        module, so checkpoints keep their parameter names."""
        ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.compile_options is not None:
            ddp.compile(**self.compile_options)
            if self.info.is_main:
                log.info("torch.compile: the DDP model compiles on its first step (%s)",
                         ", ".join(f"{k}={v}" for k, v in self.compile_options.items()) or "default options")
        return ddp

    def _done(self) -> bool:
        return (self.early_stopped or (self.max_steps is not None and self.step >= self.max_steps)
                or (self.max_epochs is not None and self.epoch >= self.max_epochs))

    def _inputs_targets(self, batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise TypeError(f"a training batch must be (inputs, targets); the dataset gave {type(batch).__name__}"
                            f"{' of ' + str(len(batch)) if isinstance(batch, (list, tuple)) else ''}")
        return to_device(batch, self.device, self.channels_last)

    def micro_step(self, batch: Any, share: float, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch whose loss counts `share` of the step's; gradients are
        all-reduced only when `sync` (the last micro-batch of an accumulation group)."""
        inputs, targets = self._inputs_targets(batch)
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            with self._autocast():
                loss = self.loss_fn(self.ddp(inputs), targets)
            scaled = loss.float() * share if share != 1.0 else loss
            self.scaler.scale(scaled).backward()
        return loss.detach().float()

    def _autocast(self) -> Any:
        """Autocast to the recipe's precision; no context at all in fp32 (entering a disabled one costs time)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def optimizer_step(self, measure_norm: bool = False) -> None:
        """Clip, step the optimizer and scheduler, clear the gradients. The global gradient norm is kept when
        clipping (it comes for free) or when `measure_norm`."""
        if self.clip is not None or measure_norm:
            self.scaler.unscale_(self.optimizer)
            if self.clip is not None:
                self._grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            else:
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                self._grad_norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                                         for g in grads])) if grads else None)
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _bucket_layout(self) -> list[list[int]]:
        """DDP's gradient buckets as lists of parameter indices, as the next step will use them (collective)."""
        if self._layout is None:
            self.ddp.reducer._rebuild_buckets()  # what the next forward would do: rebuild after the first backward
            index = {id(p): i for i, p in enumerate(_ddp_parameters(self.model))}
            layout = [[index[id(p)] for p in b.parameters()] for b in self.ddp.reducer._get_zeros_like_grad_buckets()]
            if self.step > 0:  # the layout is final once a backward ran
                self._layout = layout
            return layout
        return self._layout

    def validate(self) -> dict[str, float]:
        """Loss (and accuracy, for classifiers) over the whole validation set: each rank sums over its disjoint
        share, the sums are added over ranks, then divided by the true number of samples."""
        assert self.val_loader is not None
        was_training = self.model.training
        self.model.eval()
        # loss x samples, correct predictions, samples, ranks that cannot count accuracy
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for batch in self.val_loader:
                inputs, targets = self._inputs_targets(batch)
                with self._autocast():
                    out = self.model(inputs)
                    loss = self.loss_fn(out, targets)
                n = targets.shape[0] if isinstance(targets, torch.Tensor) and targets.ndim > 0 else 1
                sums[0] += loss.double() * n
                sums[2] += n
                if (isinstance(out, torch.Tensor) and out.ndim == 2 and isinstance(targets, torch.Tensor)
                        and targets.ndim == 1 and not targets.is_floating_point()):
                    sums[1] += (out.argmax(dim=1) == targets).sum().double()
                else:
                    sums[3] = 1
        if torch.distributed.is_initialized() and self.info.world_size > 1:
            torch.distributed.all_reduce(sums)
        self.model.train(was_training)
        total = max(float(sums[2]), 1.0)
        metrics = {"val/loss": float(sums[0]) / total}
        if float(sums[3]) == 0:
            metrics["val/accuracy"] = float(sums[1]) / total
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        log.info("validation at step %d: %s (%d samples)", self.step, shown, int(sums[2]))
        self.progress.record_validation(self.step, self.epoch, metrics, int(sums[2]))
        return metrics

    def after_validation(self, metrics: dict[str, float]) -> None:
        """Track the monitored metric (its best value decides early stopping; the checkpoint saved with these
        metrics competes for checkpoint.keep_best)."""
        if self.monitor not in metrics:
            raise ValueError(f"trainer.monitor is {self.monitor}, but validation gave only {sorted(metrics)}")
        if track_best(self.watch, metrics[self.monitor], self.step, self.mode, self.patience):
            log.warning("early stopping at step %d: %s has not improved for %d validations (best %.4f at step %d)",
                        self.step, self.monitor, self.watch["since_best"], self.watch["best"],
                        self.watch["best_step"])
            self.progress.event("early_stop", step=self.step, best=self.watch["best"],
                                best_step=self.watch["best_step"])
            self.early_stopped = True

    def position(self, batches: int, n_batches: int | None = None) -> Position:
        """Where training stands after `batches` of this epoch's `n_batches` (an ended epoch is the next one)."""
        return epoch_position(self.step, self.epoch, self.epoch_start, batches, n_batches,
                              int(self.cfg.data.batch_size) * self.info.world_size)

    def fit(self) -> None:
        try:
            self._fit()
        except torch.OutOfMemoryError as e:
            raise RuntimeError(self.oom_report(e)) from e
        except Exception as e:
            if dist.is_timeout(e):
                raise dist.timeout_error(e, f"step {self.step + 1}") from e
            raise
        finally:
            self.progress.close()  # flushes TensorBoard and W&B also when training fails

    def oom_report(self, e: BaseException) -> str:
        """One line a person can act on: where it ran out, with what batch and memory, and what to change."""
        batch, accum = int(self.cfg.data.batch_size), self.accum
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            memory = f"peak {peak:.2f} GiB allocated of {total:.2f} GiB on {self.device}"
        else:
            import resource
            memory = f"peak process RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        advice = []
        if batch > 1:
            advice.append(f"data.batch_size={batch // 2} trainer.grad_accum_steps={accum * 2} (same effective "
                          f"batch)")
        if self.precision == "fp32":
            advice.append("trainer.precision=bf16")
        committed = self.ckpt.committed_step
        kept = (f"the last committed checkpoint (step {committed}) is intact" if committed is not None
                else "no checkpoint was committed yet")
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else "out of memory"
        return (f"out of memory at step {self.step + 1} on rank {self.info.rank} with a batch of {batch} per rank "
                f"(x {accum} accumulation steps, precision {self.precision}); {memory}. Try "
                f"{' or '.join(advice) or 'a smaller model'}; {kept}. ({first})")

    def _timed(self, loader: Any) -> Iterator[Any]:
        """The loader's batches, adding the time spent waiting for each to `_data_wait`."""
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._data_wait += time.perf_counter() - t
            yield batch

    def _save(self, pos: Position, reason: str, final: bool = False, metrics: dict[str, float] | None = None) -> None:
        if self.ckpt.last_step == pos.step:
            return  # saved at this step already
        t = time.perf_counter()
        if self.ckpt.save(pos, reason, final=final, metrics=metrics):
            self.progress.record_checkpoint(pos.step, time.perf_counter() - t)

    def _fit(self) -> None:
        t0 = time.perf_counter()
        self.progress.reset_clock(self.step)
        if self._done():
            log.info("nothing to train: already at step %d, epoch %d", self.step, self.epoch)
        batches = 0  # of the current epoch, stepped
        while not self._done():
            if self.unfreeze_at is not None and not self.unfrozen and self.epoch >= self.unfreeze_at:
                self._unfreeze(f"finetune.unfreeze_after_epochs={self.unfreeze_at}, epoch {self.epoch} begins")
                self._rebuild_ddp()
            n_batches = self._begin_epoch()
            batches = 0
            for group in grouped(self._timed(self.loader), n_batches, self.accum):
                step_loss, agreed_stop = self.train_step(group)
                batches += group.size
                timed, asked_stop = self._log(step_loss, epoch_end=batches == n_batches)
                if (agreed_stop or asked_stop) and not self._done():  # a run at its last step ends normally
                    self._stop(self.position(batches, n_batches))
                    return
                metrics = self._validate_if_due(epoch_end=batches == n_batches)
                self._save_if_due(timed, metrics, batches, n_batches)
                if self._done():
                    break
            if batches == n_batches:  # the epoch ran to its end
                self.epoch += 1
                self.epoch_start = 0
                batches = 0
        elapsed = time.perf_counter() - t0
        log.info("training done: %d steps, %d epochs in %.1f s", self.step, self.epoch, elapsed)
        if self.compile_options is not None:
            from torch._dynamo.utils import counters
            log.info("torch.compile: %d graphs compiled, %d graph breaks", counters["stats"]["unique_graphs"],
                     sum(counters["graph_break"].values()))
        if self.ckpt.at_end:
            self._save(self.position(batches), "end of training", final=True)
        self.ckpt.wait()
        self.progress.event("train_end", step=self.step, epoch=self.epoch)
        self.progress.close()

    def _begin_epoch(self) -> int:
        """Position the sampler and seed the loader for `self.epoch`; returns this rank's number of batches in it."""
        self.sampler.set_epoch(self.epoch, start=self.epoch_start)
        self.loader.generator.manual_seed(  # type: ignore[union-attr]
            data_mod.derive_seed(int(self.cfg.seed), self.info.rank, self.epoch))
        n_batches = len(self.loader)
        if n_batches == 0:
            raise RuntimeError(
                f"rank {self.info.rank} got no batches in epoch {self.epoch}: {len(self.loader.dataset)} samples "
                f"over {self.info.world_size} ranks at batch size {self.cfg.data.batch_size}"
                f"{' with drop_last' if self.cfg.data.drop_last else ''}")
        return n_batches

    def train_step(self, group: Group) -> tuple[torch.Tensor, bool]:
        """One optimizer step on an accumulation group: each micro-batch's loss counts 1/size of the step's, and
        the gradients are all-reduced on the last one. Returns the step's loss (a device tensor, read only at log
        steps) and whether every rank agreed to stop (on the side group, when `stop_every_step`)."""
        losses = [self.micro_step(batch, 1.0 / group.size, sync=i == group.size)
                  for i, batch in enumerate(group.micro_batches, 1)]
        step_loss = losses[0]
        if group.size > 1:  # the mean over the micro-batches
            step_loss = torch.zeros((), device=self.device)
            for loss in losses:
                step_loss += loss / group.size
        # Under SLURM or NCCL the ranks meet on the CPU side group after every backward, before anything makes the
        # host wait for the GPU (the optimizer step's scaler check, the log step's loss): a rank that stopped
        # answering then times out here, where the report can name it (dist.agree_every_step).
        agreed_stop = self.stop_every_step and dist.any_rank(dist.STOP.requested)
        self.optimizer_step(self.measure_norm and (self.step + 1) % self.log_every == 0)
        if self.step == self._start_step:
            self.progress.event("first_step", step=self.step + 1)
        self.step += 1
        self.progress.tick(self.step)
        return step_loss, agreed_stop

    def _log(self, step_loss: torch.Tensor, epoch_end: bool) -> tuple[bool, bool]:
        """Add the step's loss to those since the last log step; at a log step record their mean over ranks.
        Returns what that step's all-reduce agreed: (a timed checkpoint is due, a rank was asked to stop)."""
        self._loss_sum += step_loss
        self._loss_steps += 1
        if not log_due(self.step, self.log_every, self._done(), epoch_end):
            return False, False  # a step that logs nothing stops only on what the side group agreed (SLURM, NCCL)
        due = self._record(self._loss_sum / self._loss_steps)
        self._loss_sum.zero_()
        self._loss_steps = 0
        return due

    def _validate_if_due(self, epoch_end: bool) -> dict[str, float] | None:
        """Validate when trainer.val_every_steps or val_every_epochs says so; the metrics, or None."""
        if self.val_loader is None or not validation_due(self.step, self.epoch, epoch_end, self.val_every_steps,
                                                         self.val_every_epochs):
            return None
        metrics = self.validate()
        self.after_validation(metrics)
        return metrics

    def _save_if_due(self, timed: bool, metrics: dict[str, float] | None, batches: int, n_batches: int) -> None:
        """Checkpoint at checkpoint.every_steps, when the log step found a timed one due, and after a validation
        when checkpoint.keep_best ranks checkpoints by its metrics."""
        if self.ckpt.due(self.step) or timed or (metrics is not None and self.ckpt.keep_best > 0):
            self._save(self.position(batches, n_batches), "validation" if metrics else "interval", metrics=metrics)

    def _stop(self, pos: Position) -> None:
        """Every rank agreed to stop (a preemption signal): write one committed checkpoint, leave a marker."""
        log.warning("stop requested: checkpointing at step %d and exiting", pos.step)
        self._save(pos, "preemption signal", final=True)
        self.ckpt.wait()
        if self.info.is_main:
            marker = {"step": pos.step, "job_id": os.environ.get("SLURM_JOB_ID"),
                      "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "time": time.time()}
            with open(os.path.join(self.run_dir, "preempted.json"), "w") as f:
                json.dump(marker, f)
        self.progress.event("preempted", step=pos.step)
        self.progress.close()

    def _record(self, mean_loss: torch.Tensor) -> tuple[bool, bool]:
        """Log the loss averaged over ranks. One all-reduce also tells every rank whether any rank finds a timed
        checkpoint due and whether any rank was asked to stop: returns (checkpoint due, stop)."""
        flags = torch.tensor([float(self.ckpt.time_due()), float(dist.STOP.requested)], device=self.device)
        both = dist.all_reduce_mean(torch.cat([mean_loss.float().reshape(1), flags]))
        loss, timed, stop = float(both[0]), float(both[1]) > 0, float(both[2]) > 0
        lr = self.optimizer.param_groups[-1].get("lr")  # the last group: parameters outside finetune.lr_groups
        if self.info.is_main:
            norm = float(self._grad_norm) if self._grad_norm is not None else None
            self.progress.record(self.step, self.epoch, loss, float(lr) if lr is not None else None,
                                 data_wait_s=self._data_wait / max(self.step - self._last_record, 1),
                                 grad_norm=norm, peak_memory_gib=peak_memory_gib(self.device))
        self._data_wait, self._last_record, self._grad_norm = 0.0, self.step, None
        return timed, stop


def deterministic_kernels() -> None:
    """trainer.deterministic: kernels that give the same bits every time, before anything runs on the device.
    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its handle (the first matmul), so it is set here, first;
    an operation that has no deterministic kernel raises, naming itself, instead of varying silently."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    log.info("deterministic kernels: torch.use_deterministic_algorithms(True), cuDNN deterministic without "
             "autotuning, CUBLAS_WORKSPACE_CONFIG=%s", os.environ["CUBLAS_WORKSPACE_CONFIG"])


def train(cfg: DictConfig, run_dir: str) -> None:
    """Everything a rank does for a recipe with the built-in trainer, after logging is set up."""
    if cfg.trainer.deterministic:
        deterministic_kernels()
    device = dist.choose_device(cfg.trainer.device)
    info = dist.init(device)
    joined_at = time.time()
    log.info("rank %d of %d (local rank %d of %d, node %d) on %s, device %s, backend %s", info.rank,
             info.world_size, info.local_rank, info.local_world_size, info.node_rank, info.host, device,
             torch.distributed.get_backend())
    Trainer(cfg, run_dir, device, joined_at).fit()
    dist.barrier()  # every rank done before any tears down: no rank exits while a peer still talks to it

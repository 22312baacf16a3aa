"""The built-in training loop: DDP model, optimizer, scheduler and loss from the recipe, stepped to its limits.

Per step it does what a hand-written DDP loop does and nothing more; values that need a device sync (the loss as
a Python float, the cross-rank mean) are taken only every `trainer.log_every_steps`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import time
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel as DDP

from . import data as data_mod
from . import dist
from .monitor import Progress
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


def process_start_time() -> float | None:
    """Wall-clock time this process started (from /proc, to 10 ms), or None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def seed_all(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def freeze(model: torch.nn.Module, patterns: list[str]) -> None:
    """Freeze every parameter whose name matches one of the globs; a glob that matches nothing is an error."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"finetune.freeze: '{pattern}' matches no parameter of {type(model).__name__}; "
                             f"its parameters are named like {', '.join(names[:6])}")
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            p.requires_grad_(False)


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


def param_groups(model: torch.nn.Module, lr_groups: dict[str, float]) -> list[Any]:
    """The trainable parameters, as optimizer groups: one per glob of `lr_groups` (first match wins), then the rest
    (which keep the optimizer's lr). Without lr_groups, a plain list."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not lr_groups:
        return [p for _, p in trainable]
    groups: list[dict[str, Any]] = [{"params": [], "lr": float(lr)} for lr in lr_groups.values()]
    rest: list[torch.nn.Parameter] = []
    for name, p in trainable:
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
    return [g for g in groups] + ([{"params": rest}] if rest else [])


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


class Trainer:
    """Owns the run's objects and the loop. Built on every rank from the same resolved recipe."""

    def __init__(self, cfg: DictConfig, run_dir: str, device: torch.device, joined_at: float | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        self.info = dist.rank_info()

        t_cfg = cfg.trainer
        seed_all(cfg.seed)  # identical on every rank: same initial weights
        model = instantiate(cfg.model, key="model")
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model %s: %d parameters (%d trainable), fingerprint %s", type(model).__name__, n_params, n_train,
                 fingerprint(model))
        seed_all(data_mod.derive_seed(cfg.seed, self.info.rank))  # per-rank streams from here on (dropout, noise)
        model.to(device)
        self.model = model
        freeze(model, list(cfg.finetune.freeze))
        if self.info.is_main:
            log.info("parameters by module:\n%s", parameter_table(model))
        self.optimizer = instantiate(cfg.optimizer, param_groups(model, dict(cfg.finetune.lr_groups or {})),
                                     key="optimizer")
        self.scheduler = (instantiate(cfg.lr_scheduler, self.optimizer, key="lr_scheduler")
                          if cfg.lr_scheduler is not None else None)
        self.precision = str(t_cfg.precision)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
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
        # Under SLURM a preemption signal may come at any step: agree on it every step (a one-float all-reduce).
        self.stop_every_step = os.environ.get("LAUNCHER_PREEMPTIBLE") == "1"
        global_batch = int(cfg.data.batch_size) * self.info.world_size * self.accum
        self.epoch_start = 0  # global sample offset the current epoch started from (non-zero after a resume)
        self.ckpt = Checkpointer(cfg, run_dir, model, self.optimizer, self.scheduler, self.scaler)
        self.ckpt.extras = lambda: {"ddp_buckets": self._bucket_layout(), "monitor": self.watch}
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
        # DDP comes after the resume: a resumed run lays out its gradient buckets as the interrupted one did.
        with fixed_bucket_layout(pos.extras.get("ddp_buckets") if pos is not None else None):
            self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        limits = [self.max_steps, self.max_epochs and self.max_epochs * len(self.loader)]
        total = min(x for x in limits if x) if any(limits) else None
        self.progress = Progress(run_dir, self.info.is_main, total, global_batch)
        # When this attempt's milestones happened (bench/bench_recovery.py reads them after a restart).
        self.progress.event("ready", restart=self.info.restart_count, process_start=process_start_time(),
                            group_joined=joined_at, resumed_step=pos.step if pos is not None else None,
                            load_s=round(load_s, 4))
        log.info("data: %d samples, %d per rank per epoch, batch %d per rank (%d global), %d loader workers",
                 len(dataset), len(self.sampler), cfg.data.batch_size, global_batch // self.accum,
                 cfg.data.num_workers)
        if self.accum > 1 or self.precision != "fp32":
            log.info("effective batch %d (%d per rank x %d ranks x %d accumulation steps), precision %s",
                     global_batch, cfg.data.batch_size, self.info.world_size, self.accum, self.precision)

    def _done(self) -> bool:
        return (self.early_stopped or (self.max_steps is not None and self.step >= self.max_steps)
                or (self.max_epochs is not None and self.epoch >= self.max_epochs))

    def _inputs_targets(self, batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise TypeError(f"a training batch must be (inputs, targets); the dataset gave {type(batch).__name__}"
                            f"{' of ' + str(len(batch)) if isinstance(batch, (list, tuple)) else ''}")
        return to_device(batch, self.device)

    def micro_step(self, batch: Any, share: float, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch whose loss counts `share` of the step's; gradients are
        all-reduced only when `sync` (the last micro-batch of an accumulation group)."""
        inputs, targets = self._inputs_targets(batch)
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.loss_fn(self.ddp(inputs), targets)
            scaled = loss.float() * share if share != 1.0 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach().float()

    def optimizer_step(self) -> None:
        if self.clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
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
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
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

    def _validation_due(self, batches: int, n_batches: int) -> bool:
        if self.val_loader is None:
            return False
        if self.val_every_steps and self.step % self.val_every_steps == 0:
            return True
        return bool(batches == n_batches and self.val_every_epochs and (self.epoch + 1) % self.val_every_epochs == 0)

    def after_validation(self, metrics: dict[str, float]) -> None:
        """Track the monitored metric (its best value decides early stopping; the checkpoint saved with these
        metrics competes for checkpoint.keep_best)."""
        if self.monitor not in metrics:
            raise ValueError(f"trainer.monitor is {self.monitor}, but validation gave only {sorted(metrics)}")
        value, best = metrics[self.monitor], self.watch["best"]
        if best is None or (value < best if self.mode == "min" else value > best):
            self.watch.update(best=value, best_step=self.step, since_best=0)
        else:
            self.watch["since_best"] += 1
        if self.patience is not None and self.watch["since_best"] >= self.patience:
            log.warning("early stopping at step %d: %s has not improved for %d validations (best %.4f at step %d)",
                        self.step, self.monitor, self.watch["since_best"], self.watch["best"],
                        self.watch["best_step"])
            self.progress.event("early_stop", step=self.step, best=self.watch["best"],
                                best_step=self.watch["best_step"])
            self.early_stopped = True

    def position(self, batches: int, n_batches: int) -> Position:
        """Where training stands after `batches` of this epoch's `n_batches` (an ended epoch is the next one)."""
        if batches >= n_batches:
            return Position(self.step, self.epoch + 1, 0)
        consumed = batches * int(self.cfg.data.batch_size) * self.info.world_size
        return Position(self.step, self.epoch, self.epoch_start + consumed)

    def fit(self) -> None:
        try:
            self._fit()
        except torch.OutOfMemoryError as e:
            raise RuntimeError(self.oom_report(e)) from e
        except Exception as e:
            if dist.is_timeout(e):
                raise dist.timeout_error(e, f"step {self.step + 1}") from e
            raise

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

    def _fit(self) -> None:
        t0 = time.perf_counter()
        every = self.log_every
        seed = int(self.cfg.seed)
        running = torch.zeros((), device=self.device)
        n_running = 0
        self.progress.reset_clock(self.step)
        start_step = self.step
        if self._done():
            log.info("nothing to train: already at step %d, epoch %d", self.step, self.epoch)
        batches, n_batches = 0, 1
        while not self._done():
            self.sampler.set_epoch(self.epoch, start=self.epoch_start)
            self.loader.generator.manual_seed(  # type: ignore[union-attr]
                data_mod.derive_seed(seed, self.info.rank, self.epoch))
            batches = 0
            n_batches = len(self.loader)
            micro, group = 0, 1
            step_loss = torch.zeros((), device=self.device)
            for batch in self.loader:
                if micro == 0:  # a new accumulation group: as many micro-batches as remain, up to accum
                    group = min(self.accum, n_batches - batches)
                    step_loss.zero_()
                micro += 1
                batches += 1
                step_loss += self.micro_step(batch, 1.0 / group, sync=micro == group) / group
                if micro < group:
                    continue
                micro = 0
                self.optimizer_step()
                running += step_loss
                if self.step == start_step:
                    self.progress.event("first_step", step=self.step + 1)
                n_running += 1
                self.step += 1
                save_now = self.ckpt.due(self.step)
                if self.step % every == 0 or self._done() or batches == n_batches:
                    save_now |= self._record(running / n_running)
                    running.zero_()
                    n_running = 0
                if self.stop_every_step or self.step % every == 0:
                    if dist.any_rank(dist.STOP.requested, self.device):
                        self._stop(self.position(batches, n_batches))
                        return
                metrics = None
                if self._validation_due(batches, n_batches):
                    metrics = self.validate()
                    self.after_validation(metrics)
                    save_now |= self.ckpt.keep_best > 0
                if save_now:
                    self.ckpt.save(self.position(batches, n_batches), "validation" if metrics else "interval",
                                   metrics=metrics)
                if self._done():
                    break
            if batches == 0 and n_batches == 0:
                raise RuntimeError(
                    f"rank {self.info.rank} got no batches in epoch {self.epoch}: {len(self.loader.dataset)} samples "
                    f"over {self.info.world_size} ranks at batch size {self.cfg.data.batch_size}"
                    f"{' with drop_last' if self.cfg.data.drop_last else ''}")
            if batches == n_batches:  # the epoch ran to its end
                self.epoch += 1
                self.epoch_start = 0
                batches, n_batches = 0, 1
        elapsed = time.perf_counter() - t0
        log.info("training done: %d steps, %d epochs in %.1f s", self.step, self.epoch, elapsed)
        if self.ckpt.at_end:
            self.ckpt.save(self.position(batches, n_batches), "end of training", final=True)
        self.ckpt.wait()
        self.progress.event("train_end", step=self.step, epoch=self.epoch)
        self.progress.close()

    def _stop(self, pos: Position) -> None:
        """Every rank agreed to stop (a preemption signal): write one committed checkpoint, leave a marker."""
        log.warning("stop requested: checkpointing at step %d and exiting", pos.step)
        self.ckpt.save(pos, "preemption signal", final=True)
        self.ckpt.wait()
        if self.info.is_main:
            marker = {"step": pos.step, "job_id": os.environ.get("SLURM_JOB_ID"),
                      "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "time": time.time()}
            with open(os.path.join(self.run_dir, "preempted.json"), "w") as f:
                json.dump(marker, f)
        self.progress.event("preempted", step=pos.step)
        self.progress.close()

    def _record(self, mean_loss: torch.Tensor) -> bool:
        """Log the loss averaged over ranks; returns whether the ranks agree a timed checkpoint is due."""
        both = torch.stack([mean_loss.float(), torch.tensor(float(self.ckpt.time_due()), device=self.device)])
        both = dist.all_reduce_mean(both)
        loss, timed = float(both[0]), float(both[1]) > 0
        lr = self.optimizer.param_groups[0].get("lr")
        self.progress.record(self.step, self.epoch, loss, float(lr) if lr is not None else None)
        return timed


def train(cfg: DictConfig, run_dir: str) -> None:
    """Everything a rank does for a recipe with the built-in trainer, after logging is set up."""
    device = dist.choose_device(cfg.trainer.device)
    info = dist.init(device)
    joined_at = time.time()
    log.info("rank %d of %d (local rank %d of %d, node %d) on %s, device %s, backend %s", info.rank,
             info.world_size, info.local_rank, info.local_world_size, info.node_rank, info.host, device,
             torch.distributed.get_backend())
    Trainer(cfg, run_dir, device, joined_at).fit()
    dist.barrier()  # every rank done before any tears down: no rank exits while a peer still talks to it

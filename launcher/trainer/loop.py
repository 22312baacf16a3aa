"""The built-in training loop: DDP model, optimizer, scheduler and loss from the recipe, stepped to its limits.

Per step it does what a hand-written DDP loop does and nothing more; values that need a device sync (the loss as
a Python float, the cross-rank mean) are taken only every `trainer.log_every_steps`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any, Iterator

import torch
from omegaconf import DictConfig

from .. import data as data_mod
from .. import dist
from .. import finetune as ft
from .. import procs
from ..checkpoint.checkpointer import Checkpointer, Position
from ..files import STOP_REQUEST
from ..monitor import Progress, peak_memory_gib
from .setup import (Precision, build_loaders, build_loss, build_model, build_optimizer, deterministic_kernels,
                    to_device)
from .ddp import DDPModel
from .decisions import Group, epoch_position, grouped, log_due, validation_due
from .state import EarlyStopping, Unfreeze
from .validation import evaluate

log = logging.getLogger("launcher")


class Trainer:
    """Owns the run's objects and the loop. Built on every rank from the same resolved recipe: setup in named
    steps (model, optimizer, data, checkpointer, resume, DDP, progress), then `fit`."""

    def __init__(self, cfg: DictConfig, run_dir: str, device: torch.device, joined_at: float | None = None) -> None:
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        self.info = dist.rank_info()
        self._read_limits(cfg.trainer)
        self._setup_model()
        self._setup_optimizer()
        self._setup_data()
        self._setup_checkpointer()
        t_load = time.perf_counter()
        pos = self._resume_or_initialise()
        load_s = time.perf_counter() - t_load
        self.ddp_model.trained = pos is not None and pos.step > 0
        self.ddp_model.build()  # after the resume: buckets laid out as the interrupted run had them
        self._setup_progress(pos, joined_at, load_s)

    @property
    def ddp(self) -> Any:
        """The DDP module (held by `ddp_model` alone: a rebuild must free the old one and its gradient hooks)."""
        return self.ddp_model.module

    # ------------------------------------------------------------------ setup
    def _read_limits(self, t: DictConfig) -> None:
        """Plain Python values for the hot loop (a DictConfig attribute read costs ~20 us)."""
        self.step, self.epoch = 0, 0
        self.epoch_start = 0  # global sample offset the current epoch started from (non-zero after a resume)
        self.max_steps: int | None = t.max_steps
        self.max_epochs: int | None = t.max_epochs
        self.clip: float | None = t.grad_clip_norm
        self.log_every = int(t.log_every_steps)
        self.accum = int(t.grad_accum_steps)
        self.channels_last = bool(t.channels_last)
        self.val_every_steps: int | None = t.val_every_steps
        self.val_every_epochs: int | None = t.val_every_epochs
        self.measure_norm = bool(self.cfg.logging.grad_norm)
        # Under SLURM a preemption signal may come at any step, and under NCCL a hung rank must be found on the
        # host: the ranks meet after every step on the CPU side group (a one-byte all-reduce, no GPU sync).
        self.stop_every_step = dist.agree_every_step(self.device)

    def _setup_model(self) -> None:
        self.model = build_model(self.cfg, self.info, self.device)
        self.unfreeze = Unfreeze(self.model, self.cfg.finetune, self.info.is_main)
        if self.info.is_main:
            log.info("parameters by module:\n%s", ft.parameter_table(self.model))
        t = self.cfg.trainer
        self.compile_options = dict(t.compile_options or {}) if t.compile else None
        self.ddp_model = DDPModel(self.model, self.device, self.compile_options, self.info.is_main)

    def _setup_optimizer(self) -> None:
        self.optimizer, self.scheduler = build_optimizer(self.cfg, self.model,
                                                               self.unfreeze.after_epochs is not None)
        self.precision = Precision(str(self.cfg.trainer.precision), self.device)
        self.scaler = self.precision.scaler
        self.loss_fn = build_loss(self.cfg, self.device)

    def _setup_data(self) -> None:
        self.loader, self.val_loader = build_loaders(self.cfg, self.info, self.device)
        self.sampler: data_mod.DistributedSampler = self.loader.sampler  # type: ignore[assignment]

    def _setup_checkpointer(self) -> None:
        t = self.cfg.trainer
        self.early_stop = EarlyStopping(str(t.monitor), str(t.monitor_mode), t.early_stop_patience)
        states = {"scheduler": self.scheduler, "scaler": self.scaler if self.scaler.is_enabled() else None,
                  "unfrozen": self.unfreeze, "monitor": self.early_stop, "ddp_buckets": self.ddp_model}
        self.ckpt = Checkpointer(self.cfg, self.run_dir, self.model, self.optimizer, states, device=self.device)

    def _resume_or_initialise(self) -> Position | None:
        """Resume from the run's own checkpoint (recipe `resume`), else start from finetune.init_from if set."""
        pos = self.ckpt.resume(self.cfg.resume)
        f = self.cfg.finetune
        if pos is not None:
            self.step, self.epoch, self.epoch_start = pos.step, pos.epoch, pos.sample_offset
        elif f.init_from:
            report = ft.load_initial(self.model, str(f.init_from), dict(f.init_key_map or {}), bool(f.init_strict),
                                     self.cfg.checkpoint.endpoint_url)
            if self.info.is_main:
                (log.info if report.complete else log.warning)("%s", report.text())
        return pos

    def _setup_progress(self, pos: Position | None, joined_at: float | None, load_s: float) -> None:
        cfg = self.cfg
        global_batch = int(cfg.data.batch_size) * self.info.world_size * self.accum
        limits = [self.max_steps, self.max_epochs and self.max_epochs * len(self.loader)]
        total = min(x for x in limits if x) if any(limits) else None
        resumed = pos.step if pos is not None else None
        self.progress = Progress(self.run_dir, self.info.is_main, total, global_batch, cfg, resumed_step=resumed)
        self._grad_norm: torch.Tensor | None = None  # the latest measured (a tensor: read only at log steps)
        self._data_wait = 0.0  # seconds spent waiting for the loader since the last log step
        self._last_record = self.step
        self._loss_sum = torch.zeros((), device=self.device)  # the steps' losses since the last log step
        self._loss_steps = 0
        self._start_step = self.step  # this attempt's first step is the one after it
        # When this attempt's milestones happened (bench/bench_recovery.py reads them after a restart).
        self.progress.event("ready", restart=self.info.restart_count, process_start=procs.start_time(),
                            group_joined=joined_at, resumed_step=resumed, load_s=round(load_s, 4))
        log.info("data: %d samples, %d per rank per epoch, batch %d per rank (%d global), %d loader workers",
                 len(self.loader.dataset), len(self.sampler), cfg.data.batch_size, global_batch // self.accum,
                 cfg.data.num_workers)
        if self.accum > 1 or self.precision.name != "fp32":
            log.info("effective batch %d (%d per rank x %d ranks x %d accumulation steps), precision %s",
                     global_batch, cfg.data.batch_size, self.info.world_size, self.accum, self.precision.name)

    # ------------------------------------------------------------------ the loop
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

    def _fit(self) -> None:
        t0 = time.perf_counter()
        self.progress.reset_clock(self.step)
        if self._done():
            log.info("nothing to train: already at step %d, epoch %d", self.step, self.epoch)
        batches = 0  # of the current epoch, stepped
        while not self._done():
            if self.unfreeze.due(self.epoch):
                self.unfreeze.apply(f"finetune.unfreeze_after_epochs={self.unfreeze.after_epochs}, epoch "
                                    f"{self.epoch} begins")
                self.ddp_model.rebuild()
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
        self._finish(time.perf_counter() - t0, batches)

    def _done(self) -> bool:
        return (self.early_stop.stopped or (self.max_steps is not None and self.step >= self.max_steps)
                or (self.max_epochs is not None and self.epoch >= self.max_epochs))

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
            self.ddp_model.trained = True
        self.step += 1
        self.progress.tick(self.step)
        return step_loss, agreed_stop

    def micro_step(self, batch: Any, share: float, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch whose loss counts `share` of the step's; gradients are
        all-reduced only when `sync` (the last micro-batch of an accumulation group)."""
        inputs, targets = self._inputs_targets(batch)
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            with self.precision.autocast():
                loss = self.loss_fn(self.ddp(inputs), targets)
            scaled = loss.float() * share if share != 1.0 else loss
            self.scaler.scale(scaled).backward()
        return loss.detach().float()

    def _inputs_targets(self, batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise TypeError(f"a training batch must be (inputs, targets); the dataset gave {type(batch).__name__}"
                            f"{' of ' + str(len(batch)) if isinstance(batch, (list, tuple)) else ''}")
        return to_device(batch, self.device, self.channels_last)

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

    # ------------------------------------------------------------------ what follows a step, each when due
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

    def _record(self, mean_loss: torch.Tensor) -> tuple[bool, bool]:
        """Log the loss averaged over ranks. One all-reduce also tells every rank whether any rank finds a timed
        checkpoint due and whether any rank was asked to stop: returns (checkpoint due, stop)."""
        if self.info.is_main and not dist.STOP.requested:
            self._read_stop_request()
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

    def _read_stop_request(self) -> None:
        """Rank 0, at a log step: a stop asked for in RUN_DIR/stop-request.json (by `launch sweep`, pruning this
        run) becomes a stop request; the log step's all-reduce makes every rank stop at this same step."""
        try:
            with open(os.path.join(self.run_dir, STOP_REQUEST)) as f:
                asked = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            asked = {"reason": f"{STOP_REQUEST} unreadable ({e})"}
        reason = asked.get("reason") if isinstance(asked, dict) else None
        dist.STOP.ask(str(reason or "stop requested"))

    def validate(self) -> dict[str, float]:
        """The validation metrics over the whole validation set (collective), logged and recorded."""
        assert self.val_loader is not None
        metrics, n = evaluate(self.model, self.val_loader, self.loss_fn, self._inputs_targets,
                              self.precision.autocast, self.device)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        log.info("validation at step %d: %s (%d samples)", self.step, shown, n)
        self.progress.record_validation(self.step, self.epoch, metrics, n)
        return metrics

    def _validate_if_due(self, epoch_end: bool) -> dict[str, float] | None:
        """Validate when trainer.val_every_steps or val_every_epochs says so; the metrics, or None. The monitored
        metric's best value decides early stopping, and the checkpoint saved with these metrics competes for
        checkpoint.keep_best."""
        if self.val_loader is None or not validation_due(self.step, self.epoch, epoch_end, self.val_every_steps,
                                                         self.val_every_epochs):
            return None
        metrics = self.validate()
        if self.early_stop.update(metrics, self.step):
            w = self.early_stop.watch
            self.progress.event("early_stop", step=self.step, best=w["best"], best_step=w["best_step"])
        return metrics

    def _save_if_due(self, timed: bool, metrics: dict[str, float] | None, batches: int, n_batches: int) -> None:
        """Checkpoint at checkpoint.every_steps, when the log step found a timed one due, and after a validation
        when checkpoint.keep_best ranks checkpoints by its metrics."""
        if self.ckpt.due(self.step) or timed or (metrics is not None and self.ckpt.keep_best > 0):
            self._save(self.position(batches, n_batches), "validation" if metrics else "interval", metrics=metrics)

    def position(self, batches: int, n_batches: int | None = None) -> Position:
        """Where training stands after `batches` of this epoch's `n_batches` (an ended epoch is the next one)."""
        return epoch_position(self.step, self.epoch, self.epoch_start, batches, n_batches,
                              int(self.cfg.data.batch_size) * self.info.world_size)

    def _save(self, pos: Position, reason: str, final: bool = False, metrics: dict[str, float] | None = None) -> None:
        if self.ckpt.last_step == pos.step:
            return  # saved at this step already
        t = time.perf_counter()
        if self.ckpt.save(pos, reason, final=final, metrics=metrics):
            self.progress.record_checkpoint(pos.step, time.perf_counter() - t)

    # ------------------------------------------------------------------ the end
    def _stop(self, pos: Position) -> None:
        """Every rank agreed to stop: write one committed checkpoint, leave a marker. A preemption signal leaves
        preempted.json (the SLURM node task requeues on it); a stop asked for in stop-request.json leaves
        stopped.json and takes the request away, so that launching the run again continues it."""
        # A signal may have reached one rank only: every rank learns whether any rank had one (a preemption,
        # which requeues) or none did (a stop asked for in stop-request.json, which does not).
        signalled = torch.tensor([float(dist.STOP.signum is not None)], device=self.device)
        preempted = float(dist.all_reduce_mean(signalled)[0]) > 0
        log.warning("stop requested: checkpointing at step %d and exiting", pos.step)
        self._save(pos, "preemption signal" if preempted else "stop requested", final=True)
        self.ckpt.wait()
        if self.info.is_main:
            marker = {"step": pos.step, "job_id": os.environ.get("SLURM_JOB_ID"),
                      "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "time": time.time()}
            if not preempted:
                marker["reason"] = dist.STOP.reason
            with open(os.path.join(self.run_dir, "preempted.json" if preempted else "stopped.json"), "w") as f:
                json.dump(marker, f)
            if not preempted:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.run_dir, STOP_REQUEST))
        if preempted:
            self.progress.event("preempted", step=pos.step)
        else:
            self.progress.event("stopped", step=pos.step, reason=dist.STOP.reason)
        self.progress.close()

    def _finish(self, elapsed: float, batches: int) -> None:
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

    def oom_report(self, e: BaseException) -> str:
        """One line a person can act on: where it ran out, with what batch and memory, and what to change."""
        batch, accum = int(self.cfg.data.batch_size), self.accum
        peak = peak_memory_gib(self.device)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            memory = f"peak {peak:.2f} GiB allocated of {total:.2f} GiB on {self.device}"
        else:
            memory = f"peak process RSS {peak:.2f} GiB"
        advice = []
        if batch > 1:
            advice.append(f"data.batch_size={batch // 2} trainer.grad_accum_steps={accum * 2} (same effective "
                          f"batch)")
        if self.precision.name == "fp32":
            advice.append("trainer.precision=bf16")
        committed = self.ckpt.committed_step
        kept = (f"the last committed checkpoint (step {committed}) is intact" if committed is not None
                else "no checkpoint was committed yet")
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else "out of memory"
        return (f"out of memory at step {self.step + 1} on rank {self.info.rank} with a batch of {batch} per rank "
                f"(x {accum} accumulation steps, precision {self.precision.name}); {memory}. Try "
                f"{' or '.join(advice) or 'a smaller model'}; {kept}. ({first})")


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

"""Training steps as the trainer takes them, timed for the data check: the recipe's model in DDP with its optimizer,
precision and loss, the time waiting for each batch measured as the trainer measures it (perf_counter around
next()), and the step time on one fixed batch (no loading). The ranks agree after each next() and each forward on a
CPU group, so a batch or forward that raises on one rank stops every rank there."""

from __future__ import annotations

import itertools
import math
import time
import warnings
from typing import Any

import torch
import torch.distributed as tdist
from omegaconf import DictConfig, OmegaConf

from ..data import build_loader
from ..dist import RankInfo
from ..trainer.ddp import DDPModel
from ..trainer.setup import Precision, build_loss, build_model, build_optimizer, to_device
from ..trainer.state import Unfreeze
from .samples import error_text as _error


# torch's warning about more workers than it suggests (DataLoader() and iter() both give it): more than the CPUs
# is what a probe of a loader that waits on I/O tries
_MANY = "This DataLoader will create"


def _loader(cfg: DictConfig, dataset: Any, info: RankInfo, workers: int, pin: bool) -> Any:
    data_cfg = OmegaConf.merge(cfg.data, {"num_workers": workers, "pin_memory": pin, "persistent_workers": False})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_MANY)
        return build_loader(data_cfg, dataset, seed=int(cfg.seed), info=info)


def _iter(loader: Any) -> Any:
    """iter(loader): its workers started."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_MANY)
        return iter(loader)


def _close(it: Any) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)  # the multiprocessing iterator's; joins the workers
    if shutdown is not None:
        shutdown()


def _inputs_targets(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise TypeError(f"a training batch must be (inputs, targets); the dataset gave {type(batch).__name__}")
    return batch[0], batch[1]


def _agree(flags: list[bool], group: Any) -> list[bool]:
    """Each flag set on any rank, on every rank: a small all-reduce (on a CPU group), so the ranks leave the step
    loop together and none waits alone in DDP's collectives."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return flags
    t = torch.tensor([float(f) for f in flags])
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group)
    return [bool(v > 0) for v in t.tolist()]


class Stepper:
    """The recipe's training step as the trainer takes it (its model in DDP, optimizer, precision, loss), built
    once; `run` times steps on a loader setting. Collective: the ranks agree after each next() and each forward,
    so a rank whose batch or forward raises stops every rank there, none left waiting in DDP's all-reduce."""

    def __init__(self, cfg: DictConfig, info: RankInfo, device: torch.device, group: Any) -> None:
        self.cfg, self.info, self.device, self.group = cfg, info, device, group
        self.ddp: Any = None
        self.error: str | None = None
        try:
            model = build_model(cfg, info, device)
            Unfreeze(model, cfg.finetune)
            self.optimizer, _ = build_optimizer(cfg, model, False)
            self.precision, self.loss_fn = Precision(str(cfg.trainer.precision), device), build_loss(cfg, device)
        except Exception as e:
            self.error = _error(e)
        if not _agree([self.error is not None], group)[0]:
            ddp_model = DDPModel(model, device, None)
            ddp_model.build()
            self.ddp = ddp_model.module

    def run(self, dataset: Any, workers: int, pin: bool, seconds: float) -> dict[str, Any]:
        """Steps on this loader setting for about `seconds`: the time each spends in next() and in all (after
        the first step), then the same number on its last batch again, without the loader (`compute_s`)."""
        out: dict[str, Any] = {"num_workers": workers, "pin_memory": pin, "steps": 0, "wait_s": None,
                               "step_s": None, "compute_s": None, "error": self.error, "in_loader": False}
        it, error = None, None
        try:
            if self.ddp is not None:
                if dataset is None:
                    raise RuntimeError("data.train did not build")
                loader = _loader(self.cfg, dataset, self.info, workers, pin)
                loader.sampler.set_epoch(0)
                it = _iter(loader)
        except Exception as e:
            error = e
        if self.ddp is None or _agree([error is not None], self.group)[0]:
            out["error"] = out["error"] or (_error(error) if error else None)
            _close(it)
            return out
        try:  # the clock starts after the first round of batches (from workers that started together)
            timed, batch = self._loop(it, seconds, out, warm=1 + min(workers, len(loader) // 4))
        finally:
            _close(it)
        failed = timed.pop("failed")
        out.update(timed)
        if out["steps"] and not failed:  # the same on every rank; the loader's workers are gone now
            again, _ = self._loop(itertools.repeat(batch, min(out["steps"], 20) + 1), seconds, {}, warm=1)
            out["compute_s"] = again["step_s"]
        return out

    def _loop(self, batches: Any, seconds: float, out: dict[str, Any], warm: int) -> tuple[dict[str, Any], Any]:
        """Steps until `seconds` after the first `warm` ones (or the batches end): the mean time in next() and
        in a whole step after those, this rank's error, and whether any rank failed (agreed)."""
        device, ddp, group = self.device, self.ddp, self.group
        channels_last = bool(self.cfg.trainer.channels_last)
        wait, steps, first_done, t0, stop, error, batch = 0.0, 0, None, time.perf_counter(), False, None, None
        # the agreements cost what the shortest of them took, each (the rest is waiting for a slower rank, which
        # DDP's all-reduce would make the step wait too): that much is the doctor's, and left out of a step
        failed, done, agreements, shortest = False, 0, 0, math.inf
        try:
            while True:
                t, nxt = time.perf_counter(), None
                try:
                    nxt = next(batches)
                except StopIteration:
                    stop = True
                except Exception as e:
                    error, out["in_loader"] = e, True
                waited = time.perf_counter() - t
                failed, stop = _agree([error is not None, stop], group)
                shortest = min(shortest, time.perf_counter() - t - waited)
                if failed or stop:
                    break
                batch = nxt
                if first_done is not None:
                    wait += waited
                try:
                    inputs, targets = to_device(_inputs_targets(batch), device, channels_last)
                    self.optimizer.zero_grad(set_to_none=True)
                    with self.precision.autocast():
                        loss = self.loss_fn(ddp(inputs), targets)
                except Exception as e:
                    error = e
                t = time.perf_counter()
                failed = _agree([error is not None], group)[0]
                shortest = min(shortest, time.perf_counter() - t)
                if failed:
                    break
                agreements += 2 if first_done is not None else 0
                self.precision.scaler.scale(loss).backward()
                self.precision.scaler.step(self.optimizer)
                self.precision.scaler.update()
                now, done = time.perf_counter(), done + 1
                if first_done is not None:
                    steps += 1
                elif done == warm:
                    first_done = now
                stop = (first_done is not None and now - first_done > seconds and steps >= 2) or now - t0 > 2 * seconds
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:  # after the agreements (a backward): this rank's own
            error = e
        timed: dict[str, Any] = {"error": _error(error) if error else None, "failed": failed}
        if steps and first_done is not None:
            timed.update(steps=steps, wait_s=wait / steps,
                         step_s=(time.perf_counter() - first_done - agreements * shortest) / steps)
        return timed, batch

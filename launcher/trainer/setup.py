"""Building what a rank trains with, one named step each: the model (identical on every rank), the optimizer and
LR scheduler, the precision, the loss, and the data loaders. Each takes the resolved recipe and returns objects;
none runs a step, so a check can build one piece and use it on its own."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .. import data as data_mod
from .. import finetune as ft
from ..checkpoint import rng
from ..dist import RankInfo
from ..recipe import instantiate

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


def build_model(cfg: DictConfig, info: RankInfo, device: torch.device) -> torch.nn.Module:
    """The recipe's model, initialised from `seed` (the same weights on every rank), on the device; the RNG
    streams then become per-rank (dropout, noise)."""
    rng.seed_all(cfg.seed)
    model = instantiate(cfg.model, key="model")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %d parameters (%d trainable), fingerprint %s", type(model).__name__, n_params, n_train,
             fingerprint(model))
    rng.seed_all(data_mod.derive_seed(cfg.seed, info.rank))
    if cfg.trainer.channels_last:
        model.to(device, memory_format=torch.channels_last)
    else:
        model.to(device)
    return model


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, will_unfreeze: bool) -> tuple[Any, Any]:
    """The optimizer over the model's parameters (grouped by finetune.lr_groups) and the LR scheduler, or None.
    Parameters to be unfrozen later are in the optimizer from the start (without gradients it skips them), so
    its structure, and every checkpoint's, stays the same when they join."""
    groups = ft.param_groups(model, dict(cfg.finetune.lr_groups or {}), include_frozen=will_unfreeze)
    optimizer = instantiate(cfg.optimizer, groups, key="optimizer")
    scheduler = (instantiate(cfg.lr_scheduler, optimizer, key="lr_scheduler")
                 if cfg.lr_scheduler is not None else None)
    return optimizer, scheduler


def build_loss(cfg: DictConfig, device: torch.device) -> Any:
    loss_fn = instantiate(cfg.loss, key="loss")
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn.to(device)
    return loss_fn


def build_loaders(cfg: DictConfig, info: RankInfo, device: torch.device) -> tuple[Any, Any]:
    """This rank's training loader (a resumable DistributedSampler) and validation loader (None without
    data.val)."""
    pin = device.type == "cuda"
    dataset, data_cfg = instantiate(cfg.data.train, key="data.train"), cfg.data
    if cfg.trainer.overfit_batches:
        dataset, data_cfg = _fixed_batches(dataset, data_cfg, int(cfg.trainer.overfit_batches), info)
    train = data_mod.build_loader(data_cfg, dataset, seed=cfg.seed, info=info, pin_memory=pin)
    val = (data_mod.build_eval_loader(cfg.data, instantiate(cfg.data.val, key="data.val"), info=info, pin_memory=pin)
           if cfg.data.val is not None else None)
    return train, val


def _fixed_batches(dataset: Any, data_cfg: DictConfig, n: int, info: RankInfo) -> tuple[Any, DictConfig]:
    """trainer.overfit_batches: the first n x batch x world samples, unshuffled, so each rank sees the same n
    batches every epoch."""
    from torch.utils.data import Subset

    take = min(len(dataset), n * int(data_cfg.batch_size) * info.world_size)
    if info.is_main:
        log.info("trainer.overfit_batches=%d: training on %d fixed samples (%d batches per rank), in order", n,
                 take, n)
    fixed = OmegaConf.merge(data_cfg, {"shuffle": False})
    return Subset(dataset, range(take)), fixed


class Precision:
    """trainer.precision as one code path: an autocast context (none in fp32: entering a disabled one costs
    time) and a gradient scaler, enabled for fp16 only (loss scaling against underflow; bf16 has fp32's range).
    A disabled scaler passes the loss and the optimizer step through untouched."""

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device_type = device.type
        self.dtype = self.DTYPES.get(name)
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self) -> Any:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


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

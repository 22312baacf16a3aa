"""Overfit one batch, the first thing to try on a new model: a fixed batch per rank, bounded steps, and a verdict.

Dropout is off for it (memorising one batch needs no regularisation, and dropout's noise hides the trend).
It passes when the first loss is finite (and, for C-class cross-entropy, about ln C), every trainable parameter
receives a gradient and changes, every loss and gradient stays finite on every rank, and the loss falls to
`target` of its start. Otherwise it names what it can see: a learning rate of 0, a frozen model, parameters that
never get a gradient (by name), the rank and step of the first NaN or Inf, a loss that rises or does not move.
The model, optimizer, precision and loss come from the trainer's own setup, so this is the recipe's training step.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .. import dist
from ..dist import RankInfo
from ..trainer.ddp import DDPModel
from ..trainer.setup import Precision, build_loaders, build_loss, build_model, build_optimizer, to_device
from ..trainer.state import Unfreeze
from .report import FAIL, PASS, WARN, Result


def _mean(value: float, device: torch.device) -> float:
    return float(dist.all_reduce_mean(torch.tensor([value], dtype=torch.float64, device=device))[0])


def fixed_batch(cfg: DictConfig, info: RankInfo, device: torch.device) -> Any:
    """This rank's first training batch of epoch 0, read in this process (no loader workers started)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data["data"]["num_workers"] = 0  # type: ignore[index]
    data["data"]["val"] = None  # type: ignore[index]
    loader, _ = build_loaders(OmegaConf.create(data), info, device)
    loader.sampler.set_epoch(0)  # type: ignore[attr-defined]
    return next(iter(loader))


SLOW = 0.5  # a loss that fell below this fraction of its start but not to the target: a warning, not a failure


def check(cfg: DictConfig, info: RankInfo, device: torch.device, steps: int = 200, target: float = 0.2,
          budget_s: float = 60.0) -> tuple[Result, Result]:
    """The overfit result and the finite-values result (collective: every rank calls it, all get the same)."""
    t0 = time.perf_counter()
    model = build_model(cfg, info, device)
    Unfreeze(model, cfg.finetune)
    for m in model.modules():  # regularisation is not what this check is about: memorising needs none
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    skipped = Result("finite", WARN, "not run", "the overfit check stopped before any step")
    if not trainable:
        frozen = cfg.finetune.freeze
        return Result("overfit", FAIL, "no trainable parameter",
                      f"every parameter is frozen (finetune.freeze={list(frozen)}): freeze fewer, or set "
                      f"finetune.unfreeze_after_epochs"), skipped
    optimizer, _ = build_optimizer(cfg, model, False)  # the LR scheduler is left out: one batch at a fixed rate
    lrs = sorted({float(g.get("lr", 0.0)) for g in optimizer.param_groups})
    if lrs and max(lrs) == 0.0:
        return Result("overfit", FAIL, "learning rate 0",
                      "optimizer.lr is 0 (and every finetune.lr_groups rate): nothing can change; set optimizer.lr, "
                      "e.g. 1e-3 for AdamW"), skipped
    precision = Precision(str(cfg.trainer.precision), device)
    loss_fn = build_loss(cfg, device)
    inputs, targets = to_device(fixed_batch(cfg, info, device), device, bool(cfg.trainer.channels_last))
    ddp_model = DDPModel(model, device, None)
    ddp_model.build()
    ddp = ddp_model.module
    assert ddp is not None
    start = {n: p.detach().clone() for n, p in trainable}
    losses: list[float] = []
    first_bad: dict[str, Any] | None = None
    classes = None
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            out = ddp(inputs)
            loss = loss_fn(out, targets)
        if step == 1 and isinstance(loss_fn, torch.nn.CrossEntropyLoss) and isinstance(out, torch.Tensor) \
                and out.ndim == 2:
            classes = int(out.shape[1])
        precision.scaler.scale(loss).backward()
        bad = _nonfinite(loss, trainable, precision.scaler.is_enabled())
        flags = dist.gather_objects(bad)
        if any(flags):  # a NaN loss is where it began: DDP's all-reduce carries NaN gradients to every rank
            order = sorted((f.get("parameter") is not None, r) for r, f in enumerate(flags) if f)
            rank = order[0][1]
            first_bad = {"rank": rank, "step": step, "ranks": [r for _, r in order], **flags[rank]}
            break
        if step == 1:
            missing = sorted(set().union(*dist.gather_objects([n for n, p in trainable if p.grad is None])))
            if missing:
                return Result("overfit", FAIL, f"{len(missing)} of {len(trainable)} parameter tensors get no "
                              f"gradient", "never used in the forward pass, or cut from the graph (detach, "
                              "no_grad): " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "") +
                              "; use them, freeze them (finetune.freeze), or remove them",
                              {"no_gradient": missing}), skipped
        precision.scaler.step(optimizer)
        precision.scaler.update()
        losses.append(_mean(float(loss.detach()), device))
        if losses[-1] <= target * losses[0] or _mean(time.perf_counter() - t0, device) > budget_s:
            break
    seconds = round(time.perf_counter() - t0, 2)
    if first_bad is not None:
        what = first_bad["what"]
        finite = Result("finite", FAIL, f"{what} on rank {first_bad['rank']} at step {first_bad['step']}",
                        _nonfinite_advice(first_bad, losses), {"first": first_bad}, seconds)
        return Result("overfit", FAIL, f"stopped at step {first_bad['step']}: {what}", finite.advice,
                      {"losses": losses}, seconds), finite
    finite = Result("finite", PASS, f"loss and gradients finite on {info.world_size} ranks for {len(losses)} steps",
                    seconds=seconds)
    unchanged = sorted(set().union(*dist.gather_objects([n for n, p in trainable if torch.equal(p.detach(), start[n])])))
    return _verdict(losses, target, classes, unchanged, lrs, len(trainable), seconds), finite


def _nonfinite(loss: torch.Tensor, trainable: list[tuple[str, torch.nn.Parameter]], scaled: bool) -> dict | None:
    """What is NaN or Inf on this rank after the backward: the loss, else the first gradient (by name). Under fp16
    loss scaling an Inf gradient is the scaler's to handle (it skips that step), so only the loss counts."""
    if not bool(torch.isfinite(loss.detach()).all()):
        return {"what": f"the loss is {float(loss.detach())}"}
    if scaled:
        return None
    for name, p in trainable:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return {"what": f"the gradient of {name} is not finite", "parameter": name}
    return None


def _nonfinite_advice(bad: dict[str, Any], losses: list[float]) -> str:
    if bad["step"] == 1:
        return ("already in the first forward/backward: look for a log or division of zero, or inputs with NaN; "
                "the step's inputs are this rank's first batch")
    rising = len(losses) >= 2 and losses[-1] > losses[0]
    return ("after training steps" + (" with a rising loss" if rising else "") + ": lower optimizer.lr, set "
            "trainer.grad_clip_norm, or try trainer.precision=bf16 (fp16 overflows sooner)")


def _verdict(losses: list[float], target: float, classes: int | None, unchanged: list[str], lrs: list[float],
             n_trainable: int, seconds: float) -> Result:
    first, last = losses[0], losses[-1]
    details: dict[str, Any] = {"losses": losses, "target": target, "unchanged": unchanged}
    figure = f"loss {first:.4g} -> {last:.4g} ({last / first:.0%} of its start) in {len(losses)} steps" \
        if first > 0 else f"loss {first:.4g} -> {last:.4g} in {len(losses)} steps"
    if unchanged:
        return Result("overfit", FAIL, f"{len(unchanged)} of {n_trainable} parameter tensors never changed",
                      "their gradient is zero or their learning rate is 0 (finetune.lr_groups): " +
                      ", ".join(unchanged[:8]) + (" ..." if len(unchanged) > 8 else ""), details, seconds)
    if last > first:
        return Result("overfit", FAIL, figure, f"the loss rose on the one batch it trains on: the learning rate "
                      f"({max(lrs):g}) is likely too high; try optimizer.lr={max(lrs) / 10:g}", details, seconds)
    if first > 0 and target * first < last <= SLOW * first:
        return Result("overfit", WARN, figure, f"the loss falls, but did not reach {target:.0%} of its start in "
                      f"{len(losses)} steps: a small learning rate ({max(lrs):g}) or a model slow to fit; more "
                      f"steps: --overfit-steps", details, seconds)
    if first > 0 and last > target * first:
        small = max(lrs) < 1e-6
        return Result("overfit", FAIL, figure,
                      (f"the learning rate ({max(lrs):g}) is likely too small; " if small else "") +
                      f"the model cannot fit one batch (target {target:.0%} of the first loss): check that the "
                      f"loss compares the model's output with the targets, and that the output can reach them",
                      details, seconds)
    if classes is not None and classes > 1:
        expected = math.log(classes)
        details["expected_first_loss"] = expected
        if not 0.25 * expected <= first <= 2 * expected + 1:
            return Result("overfit", WARN, figure + f"; first loss {first:.3g}, ln {classes} = {expected:.3g}",
                          f"a {classes}-class cross-entropy starts near ln {classes}; far from it, the output "
                          f"layer starts with large weights (scale its initialisation down) or the targets are "
                          f"not class indices", details, seconds)
    return Result("overfit", PASS, figure, "", details, seconds)

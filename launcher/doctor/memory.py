"""The memory and batch-size checks of `launch doctor`: what the recipe's training step costs in memory, whether
that grows from step to step, and the largest batch per rank that fits.

    launch doctor recipes/quickstart.yaml --gpus 2 --only memory,batch_size [--memory-budget 8G]

The step is the recipe's own (model, optimizer, precision and loss from the trainer's setup; the DDP wrapper is
built, so its gradient buckets count) on this rank's first batch, its samples repeated to make larger batches.
Memory is read where the step keeps it: on CUDA from the caching allocator (memory_allocated, max_memory_allocated
after reset_peak_memory_stats); on the CPU from this process's resident memory (/proc/self/status), after handing
glibc's kept free memory back (malloc_trim) so that it counts live memory, with the peak reset before each step
(/proc/self/clear_refs). Peaks at three or more batch sizes (growing until a step takes PROBE_BYTES or
PROBE_SECONDS) give fixed + per_sample x batch (MB here are MiB).

memory fails when, after warm-up, memory grows step after step at one batch size: a tensor kept across steps
(`history.append(loss)`, `total += loss`, an output kept by the model), by more than LEAK_FRACTION of the memory per
sample each step; or when the loss or the model's output of most watched steps is still alive after its step (a
weak reference to each, and a sentinel hooked on its autograd node: KeptWatch), which catches what memory cannot
see yet: a scalar loss kept with its graph costs a few hundred bytes a step once backward freed its activations.

batch_size predicts the largest batch within the budget (CUDA: the free device memory; CPU: --memory-budget, else
the machine's, the container's or the SLURM allocation's memory per rank), tries it for real (an out-of-memory is
caught, freed and counted as too large), agrees on the smallest over the ranks, and fails when the recipe's batch is
larger, naming a batch and the gradient accumulation that keep the effective batch.

Each step runs the plain module (DDP's hooks stay idle), so no collective runs inside a step: an error or an
out-of-memory on one rank is caught there, the ranks gather every rank's outcome after each step, and all of them
decide from the same gathered figures. None raises alone or waits alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from .. import dist
from ..dist import RankInfo
from ..trainer.ddp import DDPModel
from ..trainer.setup import Precision, build_loaders, build_loss, build_model, build_optimizer, to_device
from ..trainer.state import Unfreeze
from .meters import MB, CudaMeter, HostMeter, KeptWatch, budget, node_memory, parse_size, resize  # noqa: F401 (tests)
from .report import FAIL, PASS, WARN, Result

log = logging.getLogger("launcher")

PROBE_BYTES = 16 * MB  # the fit's largest step uses at least this much (far above the CPU figures' ~50 kB jitter),
PROBE_MAX = 1 << 20  # or has this many samples,
PROBE_SECONDS = 1.0  # or took this long
GROWTH_WARMUP, GROWTH_STEPS = 3, 20
GROWTH_SECONDS = 10.0  # the growth steps run at the largest size measured whose steps fit this time (else the least)
LEAK_FRACTION = 0.002  # growth per step and sample, as a fraction of the memory per sample, that fails...
LEAK_FLOOR = 1 * MB  # ... once the whole window grew at least this much
CONFIRMS = 4  # real tries of the largest batch size...
CONFIRM_SECONDS = 5.0  # ... each of which may take this long (or twice the recipe's step); a larger is predicted
CUDA_HEADROOM = 0.95  # of the free device memory a prediction plans for (the allocator's rounding, fragmentation)
CHECKS = ("memory", "batch_size")

_DONE: dict[str, dict[str, Result]] = {}  # probe id -> the results not yet returned (both come from one measurement)


def check(cfg: DictConfig, info: RankInfo, device: torch.device, spec: dict[str, Any], name: str) -> list[Result]:
    """The `name` result ("memory" or "batch_size"); collective: every rank calls it and gets the same verdict.
    The first call measures for both checks the run asked for; the second returns the other result."""
    key = str(spec.get("probe_id", ""))
    if name not in _DONE.get(key, {}):
        wanted = [c for c in CHECKS if c == name or c in spec.get("checks", ())]
        _DONE[key] = _run(cfg, info, device, spec, wanted)
    return [_DONE[key].pop(name)]


# ----------------------------------------------------------------------------------------------- budget

class _Step:
    """The recipe's training step on this rank's first batch, at any batch size."""

    def __init__(self, cfg: DictConfig, info: RankInfo, device: torch.device) -> None:
        self.device, self.channels_last = device, bool(cfg.trainer.channels_last)
        self.model = build_model(cfg, info, device)
        Unfreeze(self.model, cfg.finetune)
        self.optimizer, _ = build_optimizer(cfg, self.model, False)
        self.precision = Precision(str(cfg.trainer.precision), device)
        self.loss_fn = build_loss(cfg, device)
        data = OmegaConf.to_container(cfg, resolve=True)
        data["data"]["num_workers"] = 0  # type: ignore[index]
        data["data"]["val"] = None  # type: ignore[index]
        loader, _ = build_loaders(OmegaConf.create(data), info, device)
        loader.sampler.set_epoch(0)  # type: ignore[attr-defined]
        self.batch = next(iter(loader))
        self.share = len(loader.sampler)  # type: ignore[arg-type]  # this rank's samples per epoch
        self.ddp = DDPModel(self.model, device, None)

    def wrap(self) -> None:
        """Build the DDP wrapper (collective): its gradient buckets are memory a training step has."""
        if any(p.requires_grad for p in self.model.parameters()):  # DDP refuses a model with nothing to train
            self.ddp.build()

    def run(self, n: int, meter: Any, watch: KeptWatch | None = None) -> int:
        """One step at batch n (forward, backward, optimizer step, gradients cleared as the trainer clears them);
        the peak memory it reached, the batch included. `watch` marks the step's output and loss."""
        inputs, targets = to_device(resize(self.batch, n), self.device, self.channels_last)
        meter.start()
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            outputs = self.model(inputs)
            loss = self.loss_fn(outputs, targets)
        if watch is not None:
            watch.mark(outputs, loss)
        del outputs
        if loss.requires_grad:
            self.precision.scaler.scale(loss).backward()
            self.precision.scaler.step(self.optimizer)
            self.precision.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return meter.peak()

    def growth(self, n: int, meter: Any) -> tuple[list[int], dict[str, dict[str, int]]]:
        """Memory at rest after each of GROWTH_STEPS steps at batch n, after GROWTH_WARMUP steps; and which of
        those steps' tensors outlived them (KeptWatch.kept)."""
        for _ in range(GROWTH_WARMUP):
            self.run(n, meter)
        after, watch = [], KeptWatch()
        for _ in range(GROWTH_STEPS):
            self.run(n, meter, watch)
            after.append(meter.current())
        return after, watch.kept()

    def recover(self, meter: Any) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        meter.recover()

    def sizes(self) -> dict[str, int]:
        """Bytes of the parameters, of their gradients and of the optimizer state (after a step)."""
        params = list(self.model.parameters())
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return {"parameters": sum(p.numel() * p.element_size() for p in params),
                "gradients": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
                "optimizer_state": sum(t.numel() * t.element_size() for t in state)}


# ----------------------------------------------------------------------------------------------- agreeing

class _Failed(Exception):
    """What stops the measurement, the same on every rank (each raises it from the same gathered outcomes)."""

    def __init__(self, figure: str, advice: str) -> None:
        super().__init__(figure)
        self.figure, self.advice = figure, advice


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))  # the CPU allocator's


def _attempt(fn: Callable[[], Any], step: _Step | None, meter: Any, what: str) -> list[tuple[Any, bool]]:
    """Run fn on every rank, then gather what each got: (value, out of memory). An error on any rank stops the
    measurement on all of them, naming the rank; so does an out-of-memory outside a step (step None)."""
    value, oom, error = None, False, None
    try:
        value = fn()
    except Exception as e:  # caught on this rank, agreed below: never raised alone
        oom = _is_oom(e) and step is not None
        error = None if oom else f"{type(e).__name__}: {e}"
        log.warning("doctor memory probe: %s: %s", what, error or "out of memory")
    if oom and step is not None:
        step.recover(meter)  # the exception and its frames are gone: their tensors can be freed
    outs = dist.gather_objects((value, oom, error))
    for rank, (_, _, err) in enumerate(outs):
        if err:
            raise _Failed(f"{what} raised on rank {rank}", f"{err[:300]} (rank {rank}'s log has the traceback)")
    return [(v, o) for v, o, _ in outs]


# ----------------------------------------------------------------------------------------------- measuring

@dataclass
class _Rank:
    """One rank's figures, as every rank sees them (gathered)."""

    rest: int  # bytes at rest between steps: parameters, optimizer state, DDP buckets (CPU: and the runtime)
    budget: int
    budget_from: str
    share: int
    room_now: int | None
    points: list[tuple[int, int]] = field(default_factory=list)  # (batch, peak bytes)
    growth: float | None = None  # bytes per step
    kept: dict[str, dict[str, int]] = field(default_factory=dict)  # KeptWatch.kept over the growth steps

    def fit(self) -> tuple[float, float]:
        """(fixed, per sample) bytes: the least-squares line through the peaks."""
        if len({b for b, _ in self.points}) < 2:
            b, peak = self.points[-1]
            return float(self.rest), max(peak - self.rest, 0) / b
        n = len(self.points)
        mb = sum(b for b, _ in self.points) / n
        mp = sum(p for _, p in self.points) / n
        slope = sum((b - mb) * (p - mp) for b, p in self.points) / sum((b - mb) ** 2 for b, _ in self.points)
        slope = max(slope, 0.0)
        return mp - slope * mb, slope

    def fits(self, cap: int, headroom: float) -> int:
        """The largest batch, up to cap, within the budget (0: not even one sample): the fit's prediction, where no
        step measured says otherwise. A measured step wins over the line through them all: a size that stayed
        within the budget fits, one that went over does not, and neither do the sizes above it."""
        fixed, per_sample = self.fit()
        limit = self.budget * headroom
        room = limit - fixed
        if room < per_sample or room <= 0:
            predicted = 0
        else:
            predicted = cap if per_sample <= 0 else min(cap, int(room // per_sample))
        within = [b for b, peak in self.points if peak <= limit]
        over = [b for b, peak in self.points if peak > limit]
        n = max([predicted] + within)
        if over:
            n = min(n, min(over) - 1)
        return min(n, cap)


def _run(cfg: DictConfig, info: RankInfo, device: torch.device, spec: dict[str, Any],
         wanted: list[str]) -> dict[str, Result]:
    t0 = time.perf_counter()
    results: dict[str, Result] = {}
    given = spec.get("memory_budget")
    if "batch_size" in wanted and given:
        try:
            parse_size(given)
        except ValueError as e:  # the same on every rank
            results["batch_size"] = Result("batch_size", FAIL, "no budget", str(e))
            wanted = [w for w in wanted if w != "batch_size"]
    if wanted:
        try:
            results.update(_measure(cfg, info, device, given, wanted))
        except _Failed as e:
            results.update({w: Result(w, FAIL, e.figure, e.advice) for w in wanted})
    for r in results.values():
        r.seconds = round(time.perf_counter() - t0, 2)
    return results


def _measure(cfg: DictConfig, info: RankInfo, device: torch.device, given: str | None,
             wanted: list[str]) -> dict[str, Result]:
    meter: Any = CudaMeter(device) if device.type == "cuda" else HostMeter()
    why = [w for w in dist.gather_objects(meter.unavailable()) if w]
    if why:
        return {w: Result(w, WARN, "not measured", why[0]) for w in wanted}
    box: list[_Step] = []
    _attempt(lambda: box.append(_Step(cfg, info, device)), None, meter, "building the model, optimizer and batch")
    step = box[0]
    _attempt(step.wrap, None, meter, "wrapping the model in DDP")
    b0 = int(cfg.data.batch_size)

    size = b0  # warm-up: the first step allocates the optimizer state; halve until a step fits
    while any(oom for _, oom in _attempt(lambda: step.run(size, meter), step, meter, f"a step at batch {size}")):
        if size == 1:
            raise _Failed("out of memory at batch 1", "the model, its gradients and the optimizer state alone do not "
                          "fit: a smaller model, trainer.precision=bf16, or fewer ranks per device")
        size = max(1, size // 2)
    ranks = [_Rank(rest, *budget, share, room) for rest, budget, share, room in dist.gather_objects(
        (meter.current(), budget(given, device, info), step.share, meter.room_now(info.local_world_size)))]
    cap = max(b0, min(r.share for r in ranks))  # no batch larger than a rank's share of the data

    seconds: dict[int, float] = {}  # batch -> the slowest rank's step

    def measure(n: int) -> bool:
        """A step at batch n on every rank, its peaks added to the fit; False when it ran out of memory."""
        t = time.perf_counter()
        outs = _attempt(lambda: (step.run(n, meter), time.perf_counter() - t), step, meter, f"a step at batch {n}")
        if any(oom for _, oom in outs):  # on one rank is on all of them
            return False
        for r, ((peak, _), _) in zip(ranks, outs):
            r.points.append((n, peak))
        seconds[n] = max(s for (_, s), _ in outs)
        return True

    probe, too_big = size, None  # the fit: growing batches until a step's memory is well above the noise
    while measure(probe):
        grown = min(r.points[-1][1] - r.rest for r in ranks)
        if grown >= PROBE_BYTES or probe >= PROBE_MAX or seconds[probe] >= PROBE_SECONDS:
            break
        probe = min(4 * probe, PROBE_MAX)
    else:
        too_big = probe
    if not ranks[0].points:
        raise _Failed(f"out of memory at batch {probe}", "the warm-up step fit but the next did not: memory is at "
                      "its limit; try a smaller data.batch_size")
    for small in (size // 2, size // 4):  # the line through three sizes at least (the first step was large)
        if len(seconds) < 3 and small >= 1 and small not in seconds:
            measure(small)
    for r in ranks:
        r.points.sort()

    quick = [b for b, t in seconds.items() if t * (GROWTH_WARMUP + GROWTH_STEPS) <= GROWTH_SECONDS]
    big = max(quick, default=min(seconds))
    if "memory" in wanted:
        outs = _attempt(lambda: step.growth(big, meter), step, meter, f"steps at batch {big}")
        for r, (grown, oom) in zip(ranks, outs):
            if not oom:
                r.growth, r.kept = _slope(grown[0]), grown[1]
    if "batch_size" in wanted:
        largest, untried = _largest(ranks, step, meter, cap, too_big, seconds, b0, device)  # tries refine the fit
    out: dict[str, Result] = {}
    if "memory" in wanted:
        out["memory"] = _memory_verdict(ranks, step.sizes(), big, b0)
    if "batch_size" in wanted:
        out["batch_size"] = _batch_verdict(cfg, info, ranks, largest, untried, b0, cap)
    for r in out.values():
        r.details["ranks"] = [_rank_details(i, rank, cap) for i, rank in enumerate(ranks)]
        r.details["step_seconds"] = {str(b): round(t, 4) for b, t in sorted(seconds.items())}
    log.info("doctor memory: %s", "; ".join(f"{r.check} {r.status}: {r.figure}" for r in out.values()))
    del step, box
    meter.recover()
    return out


def _slope(values: list[int]) -> float:
    n = len(values)
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def _largest(ranks: list[_Rank], step: _Step, meter: Any, cap: int, too_big: int | None, seconds: dict[int, float],
             b0: int, device: torch.device) -> tuple[int, str | None]:
    """The largest batch per rank up to cap that fits on every rank, and why a real step did not confirm it (None:
    it did): the smallest of the ranks' predictions, tried on all of them, then the refined fit's, CONFIRMS times at
    most; a size that does not fit on one rank (over its budget, or out of memory, like too_big) is too large for
    all. `seconds`: the probes' step times."""
    headroom = CUDA_HEADROOM if device.type == "cuda" else 1.0
    slowest = max(seconds, key=lambda b: seconds[b] / b)
    per_sample_s = seconds[slowest] / slowest
    allowed_s = max(CONFIRM_SECONDS, 2 * per_sample_s * b0)
    sizes = [b for b, _ in ranks[0].points]
    fit_all = [b for i, b in enumerate(sizes) if all(r.points[i][1] <= r.budget for r in ranks)]
    lo = min(max(fit_all, default=0), cap)  # known to fit everywhere
    hi = min([b for b in sizes if b not in fit_all] + [too_big] * (too_big is not None), default=None)
    bisect = False
    for _ in range(CONFIRMS):
        cand = (lo + hi) // 2 if bisect and hi else min(r.fits(cap, headroom) for r in ranks)
        if hi is not None and cand >= hi:
            cand = (lo + hi) // 2
        if cand <= lo:
            return lo, None
        predicted = [r.fit()[0] + r.fit()[1] * cand for r in ranks]
        if any(r.room_now is not None and p > r.room_now for r, p in zip(ranks, predicted)):
            return cand, "that step needs more memory than is free now"  # it would take it from others
        if per_sample_s * cand > allowed_s:
            return cand, f"that step would take about {per_sample_s * cand:.0f} s"
        outs = _attempt(lambda: step.run(cand, meter), step, meter, f"a step at batch {cand}")
        bisect = any(oom for _, oom in outs)
        if not bisect:
            for r, (peak, _) in zip(ranks, outs):
                r.points.append((cand, peak))
        if all(not oom and peak <= r.budget for r, (peak, oom) in zip(ranks, outs)):
            lo = cand  # and the refined fit may allow more
        else:
            hi = cand
    return lo, None


# ----------------------------------------------------------------------------------------------- verdicts

def _mb(n: float) -> str:
    v = n / MB
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _memory_verdict(ranks: list[_Rank], sizes: dict[str, int], big: int, b0: int) -> Result:
    fixed = max(r.fit()[0] for r in ranks)
    per_sample = max(r.fit()[1] for r in ranks)
    parts = ", ".join(f"{k.replace('_', ' ')} {_mb(v)}" for k, v in sizes.items())
    other = fixed - sum(sizes.values())  # the runtime (CPU), DDP buckets, the dataset, the step's workspace
    figure = f"{_mb(fixed)} MB fixed ({parts}, other {_mb(other)} MB) + {_mb(per_sample)} MB/sample"
    details: dict[str, Any] = {"fixed_mb": fixed / MB, "per_sample_mb": per_sample / MB,
                               **{f"{k}_mb": v / MB for k, v in sizes.items()}, "growth_batch": big,
                               "growth_steps": GROWTH_STEPS, "leak_fraction": LEAK_FRACTION}
    growths = [r.growth for r in ranks if r.growth is not None]
    if not growths:
        return Result("memory", WARN, figure + "; growth not measured",
                      f"the steps at batch {big} ran out of memory on the second try", details)
    limit = [max(LEAK_FRACTION * r.fit()[1] * big, LEAK_FLOOR / GROWTH_STEPS) for r in ranks]
    leaking = [i for i, (r, lim) in enumerate(zip(ranks, limit)) if r.growth is not None and r.growth > lim]
    keeping = {what: [i for i, r in enumerate(ranks) if r.kept.get(what, {}).get("steps", 0) >= KEPT_STEPS]
               for what in KeptWatch.WHAT}
    keeping = {what: which for what, which in keeping.items() if which}
    worst = max(growths)
    details["growth_mb_per_step"] = worst / MB
    details["kept"] = keeping
    if not leaking and not keeping:
        return Result("memory", PASS, figure + f"; growth {_mb(max(worst, 0))} MB/step ({GROWTH_STEPS} steps at "
                      f"batch {big})", "", details)
    per = max(worst, 0) / big
    grows = f"grows {_mb(max(worst, 0))} MB/step at batch {big} ({per:.3g} bytes per sample and step; " \
            f"{_mb(per * b0)} MB/step at the recipe's {b0})"
    kept = []
    for what, which in keeping.items():
        k = max((ranks[i].kept[what] for i in which), key=lambda d: d["steps"])
        graph = ", with its autograd graph," if k["with_graph"] else ""
        kept.append(f"{_NAMES[what]} of {k['steps']} of {k['of']} steps outlives its step{graph} on "
                    f"{_ranks(which, len(ranks))}")
    if leaking:
        head = f"{grows} on {_ranks(leaking, len(ranks))}" + "".join(f"; {k}" for k in kept)
    else:  # what is kept is too small for the memory figures to see yet: it adds up over a long run
        head = "; ".join(kept) + f": the memory it holds grows about {max(worst, 0) / 1024:.3g} kB/step (batch " \
            f"{big}), too little for the memory figures yet, and without end over a long run"
    return Result("memory", FAIL, f"{head}; {figure}", _kept_advice(list(keeping)), details)


KEPT_STEPS = GROWTH_STEPS // 2  # a step's output or loss alive after this many of the watched steps: kept (a module
# that stores only its last output keeps one)
_NAMES = {"loss": "the loss", "output": "the model's output"}


def _kept_advice(kept: list[str]) -> str:
    if kept == ["loss"]:
        return ("the loss is kept from step to step: a loss appended to a list (history.append(loss)) or summed "
                "(total += loss) in the loss function or the model keeps it and its autograd graph alive (and, "
                "where no backward runs through it, every activation the graph saved); keep a number (loss.item()) "
                "or a detached tensor (loss.detach())")
    what = "the model's output" if kept == ["output"] else "a tensor" if not kept else "the model's output and the loss"
    return (f"{what} is kept from step to step: appended to a list (history.append(loss)), summed (total += loss) or "
            "stored on a module, it stays alive with what it references; keep a number (loss.item()) or a detached "
            "tensor (output.detach(), loss.detach())")


def _batch_verdict(cfg: DictConfig, info: RankInfo, ranks: list[_Rank], largest: int, untried: str | None,
                   b0: int, cap: int) -> Result:
    fixed = max(r.fit()[0] for r in ranks)
    per_sample = max(r.fit()[1] for r in ranks)
    note = f"; all of a rank's {cap} samples" if largest == cap and largest > b0 else ""
    note += f"; predicted, not tried: {untried}" if untried else ""
    figure = f"largest batch per rank {largest} (recipe {b0}{note}), {_mb(fixed)} MB fixed + {_mb(per_sample)} " \
             f"MB/sample"
    details: dict[str, Any] = {"largest": largest, "recipe": b0, "confirmed": untried is None, "cap": cap,
                               "fixed_mb": fixed / MB, "per_sample_mb": per_sample / MB}
    if largest >= b0:
        return Result("batch_size", PASS, figure, "", details)
    tight = min(ranks, key=lambda r: r.budget - r.fit()[0] - r.fit()[1] * b0)
    where = f"the budget of {_mb(tight.budget)} MB per rank ({tight.budget_from})"
    own = [r.fits(cap, 1.0) for r in ranks]
    if len(set(own)) > 1:
        low = own.index(min(own))
        where += f" on rank {low} (" + ", ".join(f"rank {i} fits {n}" for i, n in enumerate(own) if i != low) + ")"
    need = tight.fit()[0] + tight.fit()[1] * b0
    if largest == 0:
        return Result("batch_size", FAIL, figure, f"even one sample does not fit in {where}: the fixed part alone "
                      f"({_mb(fixed)} MB: the model, its gradients, the optimizer state and the runtime) is too "
                      f"large; more memory per rank (fewer ranks per node), a smaller model or trainer.precision=bf16",
                      details)
    accum = int(cfg.trainer.grad_accum_steps)
    micro = b0 * accum
    batch = max(d for d in range(1, largest + 1) if micro % d == 0)
    details.update(advice_batch_size=batch, advice_grad_accum_steps=micro // batch)
    return Result("batch_size", FAIL, figure,
                  f"data.batch_size={b0} needs about {_mb(need)} MB per rank, over {where}: set "
                  f"data.batch_size={batch} trainer.grad_accum_steps={micro // batch}, which keeps the effective "
                  f"batch of {micro * info.world_size} ({batch} x {info.world_size} ranks x {micro // batch})",
                  details)


def _ranks(which: list[int], world: int) -> str:
    if len(which) == world > 1:
        return "every rank"
    return f"rank{'s' if len(which) > 1 else ''} {', '.join(map(str, which))}"


def _rank_details(i: int, r: _Rank, cap: int) -> dict[str, Any]:
    fixed, per_sample = r.fit()
    return {"rank": i, "fixed_mb": fixed / MB, "per_sample_mb": per_sample / MB, "rest_mb": r.rest / MB,
            "budget_mb": r.budget / MB, "budget_from": r.budget_from, "fits": r.fits(cap, 1.0),
            "growth_mb_per_step": None if r.growth is None else r.growth / MB, "kept": r.kept,
            "points": [(b, p / MB) for b, p in r.points]}

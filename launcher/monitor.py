"""Per-rank log files, console progress, and the metric sinks (metrics.jsonl, TensorBoard, W&B).

Every rank sends its whole stdout and stderr (C-level output and crash tracebacks included) to
<run dir>/logs/rank<r>.log. Rank 0 also prints progress to the console: a progress bar with rate and ETA when the
console is a terminal, plain periodic lines when it is not (SLURM logs, pipes); other ranks print only warnings,
prefixed with their rank, so nothing important stays hidden in a file. Only rank 0 writes metrics.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import time
from typing import IO, Any

from .files import write_atomic

log = logging.getLogger("launcher")


def log_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "logs", f"rank{rank}.log")


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int, prefix: bool) -> None:
        super().__init__()
        self.rank = rank
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if self.prefix:
            level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
            return f"[rank {self.rank}] {level}{msg}"
        return msg if record.levelno == logging.INFO else f"{record.levelname.lower()}: {msg}"


class _ConsoleHandler(logging.StreamHandler):
    """The console: clears a progress bar before a message and draws it again after."""

    bar: "Bar | None" = None

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "progress_line", False) and self.bar is not None:
            return  # the bar shows it
        if self.bar is not None:
            self.bar.clear()
        super().emit(record)
        if self.bar is not None:
            self.bar.draw()


_console: _ConsoleHandler | None = None


def setup_rank_logging(run_dir: str, rank: int) -> IO[str]:
    """Point this process's stdout/stderr at its rank log; return a stream to the original console."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(1), "w", buffering=1)
    fd = os.open(log_path(run_dir, rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    faulthandler.enable(file=sys.stderr)

    root = logging.getLogger("launcher")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    root.propagate = False
    to_file = logging.StreamHandler(sys.stderr)
    to_file.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s"))
    root.addHandler(to_file)
    global _console
    to_console = _console = _ConsoleHandler(console)
    to_console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    to_console.setFormatter(_RankFormatter(rank, prefix=rank != 0))
    root.addHandler(to_console)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers = root.handlers
    warnings_logger.propagate = False
    return console


def quiet_console() -> None:
    """Only warnings and errors to the console from here on (the rank log keeps everything): for commands that
    print their own report, as `launch doctor` does."""
    if _console is not None:
        _console.setLevel(logging.WARNING)


def peak_memory_gib(device: Any) -> float:
    """Peak memory so far: CUDA's max allocated on the device, or this process's peak RSS on the CPU."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class Bar:
    """One console line, redrawn in place: step/total, a bar, loss, rate and ETA (a terminal only)."""

    def __init__(self, stream: IO[str], total: int | None) -> None:
        self.stream = stream
        self.total = total
        self.text = ""
        self._drawn = 0.0
        self._t0 = time.perf_counter()
        self._step0: int | None = None

    def update(self, step: int, loss: float | None, rate: float | None) -> None:
        now = time.perf_counter()
        if self._step0 is None:
            self._step0, self._t0 = step - 1, now - 1e-9
        if now - self._drawn < 0.2 and step != self.total:
            return
        done = step - self._step0
        per_step = (now - self._t0) / max(done, 1)
        parts = [f"step {step}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            frac = min(step / self.total, 1.0)
            parts[0] += f" [{'#' * int(frac * 20):<20}] {frac:4.0%}"
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if rate is not None:
            parts.append(f"{rate:.0f} samples/s")
        if self.total:
            parts.append(f"ETA {_duration(per_step * max(self.total - step, 0))}")
        self.text = " | ".join(parts)
        self._drawn = now
        self.draw()

    def draw(self) -> None:
        if self.text:
            self.stream.write("\r\x1b[2K" + self.text)
            self.stream.flush()

    def clear(self) -> None:
        if self.text:
            self.stream.write("\r\x1b[2K")

    def close(self) -> None:
        if self.text:
            self.stream.write("\n")
            self.stream.flush()
            self.text = ""


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Sinks:
    """TensorBoard and W&B, written by rank 0 at log steps; each optional."""

    def __init__(self, cfg: Any, run_dir: str, resumed_step: int | None = None) -> None:
        lg = cfg.logging
        self.tb: Any = None
        self.wandb: Any = None
        want_tb = lg.tensorboard
        if want_tb is None:
            import importlib.util
            want_tb = importlib.util.find_spec("tensorboard") is not None
            if not want_tb:
                log.info("TensorBoard logging is off: the tensorboard package is not installed "
                         "(pip install tensorboard; logging.tensorboard=false says so and silences this)")
        if want_tb:
            from torch.utils.tensorboard import SummaryWriter
            # After a resume from step S, hide what the interrupted attempt logged past S: the resumed run logs
            # those steps again, and TensorBoard would otherwise draw both.
            self.tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"), flush_secs=10,
                                    purge_step=resumed_step + 1 if resumed_step is not None else None)
            log.info("TensorBoard: tensorboard --logdir %s", os.path.join(run_dir, "tb"))
        if lg.wandb:
            self.wandb = _start_wandb(cfg, run_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def wandb_run_id(run_dir: str) -> str:
    """The run's W&B id: made once, kept in <run dir>/wandb-run-id, so resumes and requeues continue one run."""
    path = os.path.join(run_dir, "wandb-run-id")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    import secrets
    run_id = secrets.token_hex(4)
    write_atomic(path, run_id + "\n")
    return run_id


def _start_wandb(cfg: Any, run_dir: str) -> Any:
    import wandb

    from .recipe import public

    lg = cfg.logging
    run_id = wandb_run_id(run_dir)
    run = wandb.init(project=lg.wandb_project or "launcher", entity=lg.wandb_entity, name=cfg.run.name, id=run_id,
                     group=lg.wandb_group,
                     resume="allow", dir=run_dir, mode=lg.wandb_mode,
                     config=public(cfg))  # environment references unresolved, URL passwords redacted
    log.info("W&B: run %s (id %s, %s mode)", cfg.run.name, run_id, lg.wandb_mode or os.environ.get("WANDB_MODE",
                                                                                                      "default"))
    return run


class Progress:
    """Rank 0's progress (console bar or lines), <run dir>/metrics.jsonl, and the TensorBoard/W&B sinks."""

    def __init__(self, run_dir: str, enabled: bool, max_steps: int | None, global_batch: int, cfg: Any = None,
                 console: IO[str] | None = None, resumed_step: int | None = None) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.global_batch = global_batch
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a") if enabled else None
        self._t = time.perf_counter()
        self._last_step = 0
        self.sinks = Sinks(cfg, run_dir, resumed_step) if enabled and cfg is not None else None
        self.bar: Bar | None = None
        mode = str(cfg.logging.progress) if cfg is not None else "lines"
        stream = console if console is not None else (_console.stream if _console is not None else None)
        if enabled and stream is not None and (mode == "bar" or (mode == "auto" and _isatty(stream))):
            self.bar = Bar(stream, max_steps)
            if _console is not None:
                _console.bar = self.bar

    def event(self, name: str, **extra: Any) -> None:
        """A milestone (first step, end of training) with its wall-clock time, in <run dir>/events.jsonl."""
        if self.enabled:
            with open(os.path.join(os.path.dirname(self.path), "events.jsonl"), "a") as f:
                f.write(json.dumps({"event": name, "time": time.time(), **extra}) + "\n")

    def reset_clock(self, step: int) -> None:
        self._t = time.perf_counter()
        self._last_step = step

    def tick(self, step: int) -> None:
        """Every step: move the bar (redrawn at most 5 times a second)."""
        if self.bar is not None:
            self.bar.update(step, self._loss, self._rate)

    _loss: float | None = None
    _rate: float | None = None

    def record(self, step: int, epoch: int, loss: float, lr: float | None, **extra: Any) -> None:
        """A log step: `extra` holds more metrics (step time, data wait, gradient norm, peak memory)."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        elapsed = max(now - self._t, 1e-9)
        rate = steps * self.global_batch / elapsed
        self._t, self._last_step = now, step
        if not self.enabled:
            return
        self._loss, self._rate = loss, rate
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "samples_per_s": rate,
               "step_time_s": elapsed / steps, "time": time.time(), **extra}
        assert self._file is not None
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        total = f"/{self.max_steps}" if self.max_steps else ""
        lr_text = f" | lr {lr:.3g}" if lr is not None else ""
        log.info("step %d%s | epoch %d | loss %.4f%s | %.0f samples/s", step, total, epoch, loss, lr_text, rate,
                 extra={"progress_line": True})
        if self.sinks is not None:
            scalars = {"train/loss": loss, "train/epoch": epoch, "perf/samples_per_s": rate,
                       "perf/step_time_s": elapsed / steps}
            if lr is not None:
                scalars["train/lr"] = lr
            names = {"data_wait_s": "perf/data_wait_s", "grad_norm": "train/grad_norm",
                     "peak_memory_gib": "perf/peak_memory_gib"}
            scalars.update({names.get(k, k): v for k, v in extra.items() if v is not None})
            self.sinks.scalars(step, scalars)
        self.tick(step)

    def record_validation(self, step: int, epoch: int, metrics: dict[str, float], samples: int) -> None:
        """One row per validation in <run dir>/validation.jsonl, and the metrics to the sinks."""
        if not self.enabled:
            return
        with open(os.path.join(os.path.dirname(self.path), "validation.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, **metrics, "samples": samples, "time": time.time()})
                    + "\n")
        if self.sinks is not None:
            self.sinks.scalars(step, metrics)

    def record_checkpoint(self, step: int, seconds: float) -> None:
        """How long training stood still for a checkpoint save."""
        if self.enabled and self.sinks is not None:
            self.sinks.scalars(step, {"checkpoint/save_s": seconds})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            if _console is not None:
                _console.bar = None
            self.bar = None
        if self.sinks is not None:
            self.sinks.close()
            self.sinks = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

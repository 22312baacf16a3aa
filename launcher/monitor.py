"""Per-rank log files and console progress.

Every rank sends its whole stdout and stderr (C-level output and crash tracebacks included) to
<run dir>/logs/rank<r>.log. Rank 0 also prints progress to the console; other ranks print only warnings, prefixed
with their rank, so nothing important stays hidden in a file.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import time
from typing import IO, Any

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
    to_console = logging.StreamHandler(console)
    to_console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    to_console.setFormatter(_RankFormatter(rank, prefix=rank != 0))
    root.addHandler(to_console)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers = root.handlers
    warnings_logger.propagate = False
    return console


class Progress:
    """Rank 0's periodic progress lines and the metrics file (<run dir>/metrics.jsonl)."""

    def __init__(self, run_dir: str, enabled: bool, max_steps: int | None, global_batch: int) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.global_batch = global_batch
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a") if enabled else None
        self._t = time.perf_counter()
        self._last_step = 0

    def event(self, name: str, **extra: Any) -> None:
        """A milestone (first step, end of training) with its wall-clock time, in <run dir>/events.jsonl."""
        if self.enabled:
            with open(os.path.join(os.path.dirname(self.path), "events.jsonl"), "a") as f:
                f.write(json.dumps({"event": name, "time": time.time(), **extra}) + "\n")

    def reset_clock(self, step: int) -> None:
        self._t = time.perf_counter()
        self._last_step = step

    def record(self, step: int, epoch: int, loss: float, lr: float | None, **extra: Any) -> None:
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        rate = steps * self.global_batch / max(now - self._t, 1e-9)
        self._t, self._last_step = now, step
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "samples_per_s": rate,
               "time": time.time(), **extra}
        assert self._file is not None
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        total = f"/{self.max_steps}" if self.max_steps else ""
        lr_text = f" | lr {lr:.3g}" if lr is not None else ""
        log.info("step %d%s | epoch %d | loss %.4f%s | %.0f samples/s", step, total, epoch, loss, lr_text, rate)

    def record_validation(self, step: int, epoch: int, metrics: dict[str, float], samples: int) -> None:
        """One row per validation in <run dir>/validation.jsonl."""
        if not self.enabled:
            return
        with open(os.path.join(os.path.dirname(self.path), "validation.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, **metrics, "samples": samples, "time": time.time()})
                    + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

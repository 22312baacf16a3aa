"""Rank, world and device: the one module that reads RANK/LOCAL_RANK/WORLD_SIZE and owns the process group.

Everything else asks `rank_info()`. Without the torchrun variables it describes a single process, so the same code
runs under `python train.py`. `init()` picks NCCL with the device set from LOCAL_RANK when CUDA is present, gloo on
the CPU otherwise, and cross-checks the environment against the live process group.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("launcher")


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    restart_count: int = 0
    host: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def rank_info() -> RankInfo:
    """This process's rank as torchrun (or SLURM through the launcher) set it; one process when unset."""
    return RankInfo(
        rank=_env_int("RANK", 0),
        local_rank=_env_int("LOCAL_RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
        node_rank=_env_int("GROUP_RANK", 0),
        restart_count=_env_int("TORCHELASTIC_RESTART_COUNT", 0),
        host=socket.gethostname(),
    )


def choose_device(kind: str = "auto") -> torch.device:
    """cuda:LOCAL_RANK when CUDA is wanted and present, else cpu."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.device is 'cuda' but this process sees no CUDA device")
    info = rank_info()
    if info.local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {info.local_rank} has no GPU: this host has {torch.cuda.device_count()}")
    return torch.device("cuda", info.local_rank)


def init(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> RankInfo:
    """Join the process group (NCCL on CUDA, gloo on CPU). Safe to call when already initialised."""
    info = rank_info()
    dev = device if isinstance(device, torch.device) else choose_device(device)
    if dist.is_initialized():
        return info
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {"timeout": timeout}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs.update(backend="nccl", device_id=dev)
    else:
        kwargs.update(backend="gloo")
    if "MASTER_ADDR" not in os.environ:  # a plain `python train.py`: a group of one
        kwargs.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    dist.init_process_group(**kwargs)
    if dist.get_rank() != info.rank or dist.get_world_size() != info.world_size:
        raise RuntimeError(
            f"process group disagrees with the environment: group rank {dist.get_rank()}/{dist.get_world_size()}, "
            f"RANK={info.rank} WORLD_SIZE={info.world_size}")
    log.debug("joined process group: rank %d/%d backend %s", info.rank, info.world_size, dist.get_backend())
    return info


def teardown() -> None:
    """Leave the process group if one is up; always called from a `finally`."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        if not dist.is_initialized():
            log.info("process group destroyed")


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place on a copy); identity without a group."""
    t = t.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


class StopRequest:
    """A request to checkpoint and stop (SIGUSR2 from SLURM ahead of preemption or a time limit). Set by a signal
    handler, acted on at the next step boundary once every rank agrees (see `any_rank`)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self, *signums: int) -> None:
        """Handle `signums` from now on, including any that came earlier: the SLURM node task starts workers with
        these signals blocked (they wait, pending) and leaves $LAUNCHER_STOP_FILE if one came before the worker
        existed (see backends.slurm.hold_preemption_signal)."""
        for s in signums:
            signal.signal(s, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signums))
        stop_file = os.environ.get("LAUNCHER_STOP_FILE")
        if signums and stop_file and os.path.exists(stop_file):
            self._handle(signums[0], None)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            log.warning("received %s: will checkpoint and stop at the next step boundary",
                        signal.Signals(signum).name)
        self.signum = signum


STOP = StopRequest()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank's flag is set (one tiny all-reduce, so no rank waits alone)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Rank, world and device: the one module that reads RANK/LOCAL_RANK/WORLD_SIZE and owns the process group.

Everything else asks `rank_info()`. Without the torchrun variables it describes a single process, so the same code
runs under `python train.py`. `init()` picks NCCL with the device set from LOCAL_RANK when CUDA is present, gloo on
the CPU otherwise, and cross-checks the environment against the live process group.
"""

from __future__ import annotations

import _thread
import datetime
import logging
import os
import re
import signal
import socket
import threading
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


def init(device: str | torch.device = "auto", timeout_s: float | None = None) -> RankInfo:
    """Join the process group (NCCL on CUDA, gloo on CPU). Safe to call when already initialised.

    `timeout_s` bounds every collective's wait for the other ranks; default: the recipe's
    launch.collective_timeout_s (passed by the launcher), else 600 s."""
    info = rank_info()
    dev = device if isinstance(device, torch.device) else choose_device(device)
    if dist.is_initialized():
        return info
    if timeout_s is None:
        timeout_s = float(os.environ.get("LAUNCHER_COLLECTIVE_TIMEOUT_S", 600))
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
    global _CHECK_GROUP
    if dist.get_world_size() > 1:  # made now: after a hang, no new group could be formed
        _CHECK_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    if dist.get_rank() != info.rank or dist.get_world_size() != info.world_size:
        raise RuntimeError(
            f"process group disagrees with the environment: group rank {dist.get_rank()}/{dist.get_world_size()}, "
            f"RANK={info.rank} WORLD_SIZE={info.world_size}")
    log.debug("joined process group: rank %d/%d backend %s", info.rank, info.world_size, dist.get_backend())
    return info


def teardown() -> None:
    """Leave the process group if one is up; always called from a `finally`."""
    global _CHECK_GROUP
    _CHECK_GROUP = None
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


_CHECK_GROUP: Any = None  # a gloo group of every rank, used only to find ranks that stopped answering


def is_timeout(e: BaseException) -> bool:
    """Whether `e` is a collective that gave up waiting for another rank."""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("timed out" in text or "timeout" in text)


def unresponsive_ranks(wait_s: float = 15.0) -> list[int] | None:
    """After a collective timed out: every rank checks in on a group of its own; rank 0 learns which ranks did not
    (a hung or far-behind rank). Returns those ranks on rank 0, [] when all answered, None when unknown."""
    if _CHECK_GROUP is None:
        return None
    try:
        dist.monitored_barrier(group=_CHECK_GROUP, timeout=datetime.timedelta(seconds=wait_s), wait_all_ranks=True)
    except RuntimeError as e:
        m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        return sorted(int(r) for r in m.group(1).replace(",", " ").split()) if m else None
    return []


def timeout_error(e: BaseException, where: str) -> RuntimeError:
    """A one-line error for a collective timeout: where it happened and which ranks did not answer."""
    limit = os.environ.get("LAUNCHER_COLLECTIVE_TIMEOUT_S", "?")
    hung = unresponsive_ranks()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if hung:
        who = (f"rank{'s' if len(hung) > 1 else ''} {', '.join(map(str, hung))} did not answer: hung or far behind "
               f"(see logs/rank{hung[0]}.log)")
    elif hung == [] and rank == 0:
        who = "every rank answered a check afterwards: one was slower than the limit"
    else:
        who = "rank 0 coordinates the check; its log names the ranks that did not answer"
    return RuntimeError(f"a collective timed out at {where} after {limit} s (launch.collective_timeout_s) on rank "
                        f"{rank}: {who}; original error: {str(e).strip().splitlines()[0][:200]}")


class StopRequest:
    """A request to checkpoint and stop (SIGUSR2 from SLURM ahead of preemption or a time limit, or SLURM's SIGTERM).
    Set by a signal handler, acted on at the next step boundary once every rank agrees (see `any_rank`)."""

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

    def take_slurm_sigterm(self) -> bool:
        """Under SLURM, make a SIGTERM from SLURM (a preemption without a user signal, `scancel --signal=TERM`, the
        start of a cancel) a stop request, while a SIGTERM from the agent (`agent_pid`, which stops the surviving
        ranks when one failed) still goes to the SIGTERM handler in place and unwinds the worker.

        A Python handler cannot tell who sent a signal, a thread in sigwaitinfo can: the SLURM node task starts
        workers with SIGTERM blocked (backends.slurm.hold_preemption_signal) and it stays blocked. Processes this
        one forks (DataLoader workers) end on their parent's SIGTERM, as torch's own handler makes them, and
        ignore SLURM's, so none dies before the emergency checkpoint. Only the built-in trainer acts on a stop
        request ($LAUNCHER_STOP_ON_SIGTERM, set by the node task): a plain script keeps SIGTERM as it was.
        Returns whether SIGTERM is now taken this way."""
        if signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
            return False
        if os.environ.get("LAUNCHER_STOP_ON_SIGTERM") != "1":
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # the handler in place takes it
            return False
        agent = agent_pid()

        def receive() -> None:
            while True:
                if signal.sigwaitinfo({signal.SIGTERM}).si_pid == agent:
                    _thread.interrupt_main(signal.SIGTERM)  # runs the SIGTERM handler, as the signal itself would
                else:
                    self._handle(signal.SIGTERM, None)

        threading.Thread(target=receive, name="launcher-sigterm", daemon=True).start()
        os.register_at_fork(after_in_child=self._end_on_parents_sigterm)
        return True

    @staticmethod
    def _end_on_parents_sigterm() -> None:
        """In a process forked by a rank under SLURM (SIGTERM stays blocked): exit on the rank's SIGTERM
        (multiprocessing's terminate), ignore SLURM's."""
        if signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
            return
        parent = os.getppid()

        def receive() -> None:
            while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
                pass
            os._exit(0)

        threading.Thread(target=receive, name="launcher-sigterm", daemon=True).start()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            log.warning("received %s: will checkpoint and stop at the next step boundary",
                        signal.Signals(signum).name)
        self.signum = signum


STOP = StopRequest()


def agent_pid() -> int:
    """The pid of this node's agent (`launch`): $LAUNCHER_AGENT_PID, which the agent sets, since a rank forked
    from the node's fork server has that server as its parent; else the parent."""
    try:
        return int(os.environ["LAUNCHER_AGENT_PID"])
    except (KeyError, ValueError):
        return os.getppid()


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

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
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .backends.plan import DEVICE_ENV
from .recipe.schema import Device

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
    """This process's device for trainer.device `kind`: cuda:LOCAL_RANK or cpu. Under the launcher, auto follows
    the plan's decision ($LAUNCHER_DEVICE); without it (a plain `python train.py`), CUDA when torch sees a GPU.
    ROCm builds of torch drive AMD GPUs through torch.cuda too. Raises RuntimeError when torch cannot do what the
    plan decided (see `decide_device`)."""
    info = rank_info()
    planned = os.environ.get(DEVICE_ENV) or None
    chosen = decide_device(kind, planned, torch.cuda.device_count, build=torch_build(), local_rank=info.local_rank,
                           local_world_size=info.local_world_size, who=f"rank {info.rank} on host {info.host}")
    dev = torch.device("cuda", info.local_rank) if chosen == "cuda" else torch.device("cpu")
    log.info("device %s (asked: %s, %s=%s)", dev, kind, DEVICE_ENV, planned or "unset: no launcher plan")
    return dev


def torch_build() -> str:
    """This torch as errors name it: version, CUDA/HIP build or neither, and where it is installed."""
    hip = getattr(torch.version, "hip", None)
    cuda = getattr(torch.version, "cuda", None)
    build = f"a ROCm build, HIP {hip}" if hip else f"a CUDA {cuda} build" if cuda else "a CPU-only build"
    return f"torch {torch.__version__} ({build}, in {os.path.dirname(torch.__file__)})"


def decide_device(kind: str, planned: str | None, count_gpus: Callable[[], int], *, build: str,
                  local_rank: int = 0, local_world_size: int = 1, who: str = "this process") -> str:
    """'cuda' or 'cpu' for one process; RuntimeError, naming both sides, when torch and the plan disagree.

    `kind`: trainer.device (auto, cuda, cpu). `planned`: the launcher's decision ($LAUNCHER_DEVICE, taken from the
    GPUs the driver's files show), None without a launcher. `count_gpus`: the GPUs this torch sees, called only
    when a GPU may be used (a CPU process never touches CUDA). `build` (torch_build()) and `who` (e.g. "rank 3 on
    host n1") go into the errors. Once the launcher planned a device, processes, backend (NCCL or gloo) and threads
    were sized for it, so auto follows the plan: a torch that sees no GPU fails here rather than training on the
    CPU while the launcher reports GPUs."""
    if kind not in typing.get_args(Device):
        raise RuntimeError(f"trainer.device must be {', '.join(typing.get_args(Device))}, got {kind!r}")
    if planned not in (None, "cuda", "cpu"):
        raise RuntimeError(f"{DEVICE_ENV}={planned!r} is neither cuda nor cpu: it carries the launcher's device "
                           f"decision to the ranks; leave it unset and let `launch` set it")
    if kind == "cpu":
        return "cpu"
    procs = f"{local_world_size} process{'es' if local_world_size != 1 else ''}"
    if planned == "cpu":
        if kind == "cuda":
            raise RuntimeError(f"{who} asks for cuda but the launcher planned cpu for this node ({DEVICE_ENV}=cpu: "
                               f"no GPU in the driver's files, or trainer.device=cpu); check nvidia-smi or rocm-smi "
                               f"and the *_VISIBLE_DEVICES variables, or ask for cpu")
        return "cpu"
    seen = count_gpus()
    if planned == "cuda":
        side = f"the launcher planned cuda for {procs} on this node, one per GPU found by the driver, but {build}"
        if seen == 0:
            raise RuntimeError(f"{side} sees no GPU ({who}): install a CUDA (or ROCm) build of torch in this "
                               f"environment, or set trainer.device=cpu")
        if local_rank >= seen:
            raise RuntimeError(f"{side} sees only {seen}, none for LOCAL_RANK {local_rank} ({who}): check "
                               f"CUDA_VISIBLE_DEVICES (HIP_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES), or pass "
                               f"--gpus {seen}")
        return "cuda"
    if seen == 0:  # no launcher: a plain `python train.py`
        if kind == "cuda":
            raise RuntimeError(f"trainer.device is 'cuda' but {build} sees no GPU ({who}): install a CUDA (or "
                               f"ROCm) build of torch, or use trainer.device=cpu")
        return "cpu"
    if local_rank >= seen:
        raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU ({who}): {build} sees {seen}")
    return "cuda"


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
        # NCCL's own watchdog gets the limit plus a margin: the host-side check on the gloo side group (`any_rank`,
        # every step) fires first and names the rank that did not answer; NCCL's abort stays the backstop.
        kwargs.update(backend="nccl", device_id=dev, timeout=datetime.timedelta(seconds=nccl_timeout_s(timeout_s)))
        trace = os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
        if trace:  # the flight recorder's dump on a timeout (the launcher's plan sets it under the run directory)
            os.makedirs(os.path.dirname(trace) or ".", exist_ok=True)
    else:
        kwargs.update(backend="gloo")
    if "MASTER_ADDR" not in os.environ:  # a plain `python train.py`: a group of one
        kwargs.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    dist.init_process_group(**kwargs)
    global _CHECK_GROUP, _STOP_GROUP
    if dist.get_world_size() > 1:  # made now: after a hang, no new group could be formed
        _CHECK_GROUP = dist.new_group(backend="gloo", timeout=timeout)
        if agree_every_step(dev):
            _STOP_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    if dist.get_rank() != info.rank or dist.get_world_size() != info.world_size:
        raise RuntimeError(
            f"process group disagrees with the environment: group rank {dist.get_rank()}/{dist.get_world_size()}, "
            f"RANK={info.rank} WORLD_SIZE={info.world_size}")
    log.debug("joined process group: rank %d/%d backend %s", info.rank, info.world_size, dist.get_backend())
    return info


def nccl_timeout_s(limit_s: float) -> float:
    """NCCL's collective timeout for launch.collective_timeout_s = `limit_s`: later by a margin (10 %, at least 30 s)
    than the host-side check that names the rank at fault, which then always reports first."""
    return limit_s + max(30.0, 0.1 * limit_s)


def agree_every_step(device: torch.device) -> bool:
    """Whether the ranks meet on the CPU side group after every step (`any_rank`): under SLURM, to agree on a
    preemption signal; under NCCL, also as the host-side watchdog, since NCCL collectives do not block the host and
    a rank that stops answering would otherwise surface only as NCCL's abort ("killed by signal")."""
    return os.environ.get("LAUNCHER_PREEMPTIBLE") == "1" or device.type == "cuda"


def teardown(abort: bool = False) -> None:
    """Leave the process group if one is up; always called from a `finally`. `abort`: this rank is failing. Under
    NCCL it then aborts its communicators instead of destroying them: a destroy waits for work queued with peers
    that may be stuck or gone, and the rank would hang instead of exiting (its peers learn of it from the agent)."""
    global _CHECK_GROUP, _STOP_GROUP
    _CHECK_GROUP = _STOP_GROUP = None
    if not (dist.is_available() and dist.is_initialized()):
        return
    abort_all = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch's, marked experimental
    if abort and dist.get_backend() == "nccl" and abort_all is not None:
        abort_all()
        log.info("process group aborted (NCCL communicators of a failing rank)")
        return
    dist.destroy_process_group()
    if not dist.is_initialized():
        log.info("process group destroyed")


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] without a process group of several."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


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
_STOP_GROUP: Any = None  # a gloo group of every rank that meets after every step (`any_rank`, `agree_every_step`)


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
        self.reason: str | None = None  # a request that is not a signal (RUN_DIR/stop-request.json)

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.reason is not None

    def ask(self, reason: str) -> None:
        """A stop that is not a preemption (`launch sweep` pruning a trial): checkpoint and stop, no requeue."""
        if not self.requested:
            log.warning("stop requested (%s): will checkpoint and stop at the next step boundary", reason)
        self.reason = self.reason or reason

    def install(self, *signums: int) -> None:
        """Handle `signums` from now on, including any that came earlier: the SLURM node task starts workers with
        these signals blocked (they wait, pending) and leaves $LAUNCHER_STOP_FILE if one came before the worker
        existed (see backends.slurm_node.hold_preemption_signal)."""
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
        workers with SIGTERM blocked (backends.slurm_node.hold_preemption_signal) and it stays blocked. Processes this
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


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank's flag is set: a one-byte all-reduce on a CPU side group (gloo), so no rank
    waits alone and, under NCCL, nothing waits for the GPU (a CUDA tensor and `.item()` here would make the host
    wait for every queued kernel, each step). Every rank must call it at the same point. Its own group: a rank
    that hangs makes this time out, and the check that names it (`unresponsive_ranks`) needs a group not left
    broken by that timeout."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    if _STOP_GROUP is None and dist.get_backend() != "gloo":
        raise RuntimeError("dist.any_rank needs the CPU side group that dist.init makes under SLURM "
                           "(LAUNCHER_PREEMPTIBLE=1)")
    t = torch.tensor([1 if flag else 0], dtype=torch.uint8)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_STOP_GROUP)
    return bool(t.item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

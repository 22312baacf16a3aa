"""Memory figures for the doctor's memory and batch-size checks: sizes as people write them, the budget a rank
may use (the machine's, the container's, the SLURM allocation's, or --memory-budget; on CUDA the free device
memory), and meters that read what a step used: this process's resident memory on the CPU (after handing glibc's
kept free memory back, with the peak reset), the caching allocator on CUDA; and a watch on the tensors a step
makes, which tells whether any outlives its step."""

from __future__ import annotations

import ctypes
import gc
import os
import weakref
from typing import Any, Callable, Mapping

import torch

from ..dist import RankInfo
from .report import parse_size

MB = 2**20


def node_memory(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """This node's memory for the job and where that figure comes from: the machine's, narrowed by a container's
    limit (cgroup) and by the SLURM allocation (SLURM_MEM_PER_NODE, or SLURM_MEM_PER_CPU x its CPUs on the node)."""
    env = os.environ if environ is None else environ
    found = [(_meminfo("MemTotal") or 2**62, "the machine's memory")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            found.append((int(value), "the container's memory limit"))
    per_node, per_cpu = env.get("SLURM_MEM_PER_NODE", ""), env.get("SLURM_MEM_PER_CPU", "")
    cpus = env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_CPUS_PER_TASK") or "1"
    if per_node.isdigit() and int(per_node) > 0:
        found.append((int(per_node) * MB, "the SLURM allocation (SLURM_MEM_PER_NODE)"))
    elif per_cpu.isdigit() and int(per_cpu) > 0 and cpus.isdigit():
        found.append((int(per_cpu) * int(cpus) * MB, f"the SLURM allocation (SLURM_MEM_PER_CPU x {cpus} CPUs)"))
    return min(found)


def budget(given: str | None, device: torch.device, info: RankInfo) -> tuple[int, str]:
    """This rank's memory budget in bytes and where it comes from."""
    mine = (parse_size(given), f"--memory-budget {given}") if given else None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room = (free + torch.cuda.memory_reserved(device), f"the free memory of {device}")
        return min(mine, room) if mine else room
    if mine:
        return mine
    node, where = node_memory()
    ranks = max(1, info.local_world_size)
    return node // ranks, f"{where} / {ranks} rank{'s' if ranks != 1 else ''}"


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == key:
                    return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ----------------------------------------------------------------------------------------------- meters

class HostMeter:
    """This process's resident memory: live memory once glibc handed back what it keeps (the launcher's workers
    keep freed memory, launch.keep_freed_memory), and its peak since `start`."""

    CLEAR_REFS = "/proc/self/clear_refs"

    def __init__(self) -> None:
        try:
            self._trim: Callable[[int], int] | None = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc: the figures include freed memory, and are coarser
            self._trim = None

    def unavailable(self) -> str | None:
        try:
            self._reset_peak()
            self._status("VmHWM")
        except (OSError, KeyError) as e:
            return f"this process's peak memory cannot be reset or read ({self.CLEAR_REFS}, /proc/self/status: {e})"
        return None

    def start(self) -> None:
        self._release()
        self._reset_peak()

    def peak(self) -> int:
        return self._status("VmHWM")

    def current(self) -> int:
        self._release()
        return self._status("VmRSS")

    def recover(self) -> None:
        gc.collect()
        self._release()

    def room_now(self, ranks: int) -> int | None:
        """The most this rank may reach now without taking memory from its node's other ranks or processes."""
        available = _meminfo("MemAvailable")
        return None if available is None else available // max(1, ranks) + self.current()

    def _release(self) -> None:
        if self._trim is not None:
            self._trim(0)

    def _reset_peak(self) -> None:
        with open(self.CLEAR_REFS, "w") as f:
            f.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == key:
                    return int(value.split()[0]) * 1024
        raise KeyError(key)


class CudaMeter:
    """The caching allocator's figures for this rank's device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def unavailable(self) -> str | None:
        return None

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def current(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def recover(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def room_now(self, ranks: int) -> int | None:
        return None  # a try at a size is safe on a GPU: an out-of-memory is caught


# ----------------------------------------------------------------------------------------------- the step

def resize(batch: Any, n: int) -> Any:
    """The batch with n samples: its samples repeated in order (every tensor along its first dimension)."""
    if isinstance(batch, torch.Tensor) and batch.ndim:
        return batch.index_select(0, torch.arange(n, device=batch.device) % batch.shape[0])
    if isinstance(batch, (list, tuple)):
        return type(batch)(resize(b, n) for b in batch)
    if isinstance(batch, dict):
        return {k: resize(v, n) for k, v in batch.items()}
    return batch


# ----------------------------------------------------------------------------------------------- kept tensors

class _Sentinel:
    """Hooked on a tensor's autograd node, it lives exactly as long as the node: a weak reference to it says whether
    the graph outlived its step, even where only a later tensor's graph holds it (total = total + loss)."""

    def hook(self, *_: Any) -> None:
        return None


class KeptWatch:
    """Whether the tensors a step makes (the model's outputs, the loss) outlive it: weak references to each tensor
    and to a sentinel on its autograd node, checked after a garbage collection. Memory figures cannot see a scalar
    loss kept with its graph (its saved activations are freed by backward: a few hundred bytes a step); this can."""

    WHAT = ("loss", "output")

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[list[weakref.ref], list[weakref.ref]]]] = []

    def mark(self, outputs: Any, loss: Any) -> None:
        marks: dict[str, tuple[list[weakref.ref], list[weakref.ref]]] = {}
        for what, value in (("loss", loss), ("output", outputs)):
            tensors, graphs = [], []
            for t in _tensors(value):
                tensors.append(weakref.ref(t))
                if t.grad_fn is not None:
                    sentinel = _Sentinel()
                    t.grad_fn.register_hook(sentinel.hook)
                    graphs.append(weakref.ref(sentinel))
            marks[what] = (tensors, graphs)
        self.steps.append(marks)

    def kept(self) -> dict[str, dict[str, int]]:
        """For the loss and the outputs: in how many of the marked steps the tensor, or its graph, is still alive
        (an output only kept through the loss's graph is the loss's doing), with its graph, and the bytes of the
        tensors still alive."""
        gc.collect()

        def alive(refs: list[weakref.ref]) -> bool:
            return any(r() is not None for r in refs)

        loss = [alive(step["loss"][0] + step["loss"][1]) for step in self.steps]
        out = {}
        for what in self.WHAT:
            steps = [step[what] for i, step in enumerate(self.steps)
                     if alive(step[what][0]) or (alive(step[what][1]) and (what == "loss" or not loss[i]))]
            live = [t for ts, _ in steps for t in (r() for r in ts) if t is not None]
            out[what] = {"steps": len(steps), "of": len(self.steps),
                         "with_graph": sum(alive(gs) for _, gs in steps),
                         "bytes": sum(t.numel() * t.element_size() for t in live)}
        return out


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []

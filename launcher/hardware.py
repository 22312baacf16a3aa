"""What this machine offers a job, found without importing torch (for the submit path): GPUs from the driver's files
(NVIDIA, and AMD through ROCm's kfd driver) and the CPUs this process may run on."""

from __future__ import annotations

import glob
import os
import re
from typing import Mapping

# Variables that narrow the GPUs a process sees, in the order ROCm applies them (ROCr first, then HIP, which also
# reads CUDA_VISIBLE_DEVICES when HIP_VISIBLE_DEVICES is unset). CUDA builds read only CUDA_VISIBLE_DEVICES.
VISIBILITY_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


def nvidia_gpu_count(root: str = "/") -> int:
    """NVIDIA GPUs the driver exposes (0 without a driver). `root` lets tests point at a prepared tree."""
    found = glob.glob(os.path.join(root, "proc/driver/nvidia/gpus/*"))
    if found:
        return len(found)
    return len([p for p in glob.glob(os.path.join(root, "dev/nvidia*")) if re.fullmatch(r"nvidia\d+", os.path.basename(p))])


def amd_gpu_count(root: str = "/") -> int:
    """AMD GPUs ROCm can use: none without /dev/kfd (ROCm's compute driver); else the kfd topology's GPU nodes
    (gpu_id non-zero; CPU nodes have 0) whose render node is in /dev/dri (a container sees every host GPU in /sys
    but only the render nodes it was given), or the /dev/dri/renderD* nodes when the topology cannot be read."""
    if not os.path.exists(os.path.join(root, "dev/kfd")):
        return 0
    render_nodes = glob.glob(os.path.join(root, "dev/dri/renderD*"))
    topology = glob.glob(os.path.join(root, "sys/class/kfd/kfd/topology/nodes/*"))
    count, readable = 0, False
    for node in topology:
        try:
            with open(os.path.join(node, "gpu_id")) as f:
                gpu_id = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
        readable = True
        if gpu_id == 0:
            continue
        minor = _render_minor(node)
        if minor is None or os.path.exists(os.path.join(root, f"dev/dri/renderD{minor}")):
            count += 1
    return count if readable else len(render_nodes)


def _render_minor(node: str) -> int | None:
    """The `drm_render_minor` of a kfd topology node (its /dev/dri/renderD<minor>), None when not listed."""
    try:
        with open(os.path.join(node, "properties")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "drm_render_minor" and value.strip().lstrip("-").isdigit():
                    minor = int(value)
                    return minor if minor > 0 else None
    except OSError:
        pass
    return None


def physical_gpu_count(root: str = "/") -> int:
    """GPUs the driver exposes: NVIDIA ones, else AMD ones (a torch build drives one kind or the other)."""
    return nvidia_gpu_count(root) or amd_gpu_count(root)


def visible_gpu_count(root: str = "/", environ: Mapping[str, str] | None = None) -> int:
    """GPUs this process may use: the physical ones, narrowed by CUDA_VISIBLE_DEVICES (NVIDIA), or by
    ROCR_VISIBLE_DEVICES and then HIP_VISIBLE_DEVICES (else CUDA_VISIBLE_DEVICES) on AMD, as ROCm narrows them."""
    env = os.environ if environ is None else environ
    nvidia = nvidia_gpu_count(root)
    if nvidia:
        return _narrow(nvidia, env.get("CUDA_VISIBLE_DEVICES"))
    amd = _narrow(amd_gpu_count(root), env.get("ROCR_VISIBLE_DEVICES"))
    hip = env.get("HIP_VISIBLE_DEVICES")
    return _narrow(amd, hip if hip is not None else env.get("CUDA_VISIBLE_DEVICES"))


def _narrow(count: int, visible: str | None) -> int:
    """`count` GPUs seen through a *_VISIBLE_DEVICES list (indices or UUIDs); unset: all of them."""
    if count == 0 or visible is None:
        return count
    return min(len(visible_ids(visible)), count)


def visible_ids(visible: str) -> list[str]:
    """The entries of a *_VISIBLE_DEVICES list (indices, UUIDs, MIG names) as the runtimes read them: up to the
    first empty or negative one."""
    ids = []
    for item in visible.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break  # the runtimes stop at the first invalid entry
        ids.append(item)
    return ids


def visibility_settings(environ: Mapping[str, str] | None = None) -> str:
    """The GPU visibility variables that are set, as `NAME=value, ...` for messages ('' when none is)."""
    env = os.environ if environ is None else environ
    return ", ".join(f"{name}={env[name]}" for name in VISIBILITY_VARS if name in env)


def usable_cpu_count(environ: Mapping[str, str] | None = None) -> int:
    """CPUs this process may run on: its affinity mask (taskset, a cgroup cpuset, SLURM's task binding), and inside
    a SLURM job at most SLURM_CPUS_PER_TASK. os.cpu_count() counts the whole machine, which a job rarely owns."""
    env = os.environ if environ is None else environ
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    per_task = env.get("SLURM_CPUS_PER_TASK", "").strip()
    if per_task.isdigit() and int(per_task) > 0:
        cpus = min(cpus, int(per_task))
    return max(1, cpus)


def threads_per_process(procs: int, environ: Mapping[str, str] | None = None) -> int:
    """OMP_NUM_THREADS for each of `procs` processes on this node: the usable CPUs shared out, at least 1."""
    return max(1, usable_cpu_count(environ) // max(1, procs))

"""What accelerators this machine has, found without importing torch (for the submit path)."""

from __future__ import annotations

import glob
import os
import re


def physical_gpu_count(root: str = "/") -> int:
    """NVIDIA GPUs the driver exposes (0 without a driver). `root` lets tests point at a prepared tree."""
    found = glob.glob(os.path.join(root, "proc/driver/nvidia/gpus/*"))
    if found:
        return len(found)
    return len([p for p in glob.glob(os.path.join(root, "dev/nvidia*")) if re.fullmatch(r"nvidia\d+", os.path.basename(p))])


def visible_gpu_count(root: str = "/") -> int:
    """GPUs this process may use: the physical ones, narrowed by CUDA_VISIBLE_DEVICES when it is set."""
    physical = physical_gpu_count(root)
    if physical == 0:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    ids = []
    for item in visible.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break  # CUDA stops at the first invalid entry
        ids.append(item)
    return min(len(ids), physical)

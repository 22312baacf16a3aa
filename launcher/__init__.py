"""launcher: one command from a training recipe to a DDP run on this machine or a SLURM cluster.

The public API for your own training scripts (imported lazily, so `import launcher` stays light)::

    import launcher
    info = launcher.init()                    # process group: NCCL + device from LOCAL_RANK, or gloo on CPU
    sampler = launcher.distributed_sampler(dataset, seed=0)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ...
    launcher.teardown()
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "init": ("launcher.dist", "init"),
    "teardown": ("launcher.dist", "teardown"),
    "rank_info": ("launcher.dist", "rank_info"),
    "RankInfo": ("launcher.dist", "RankInfo"),
    "choose_device": ("launcher.dist", "choose_device"),
    "barrier": ("launcher.dist", "barrier"),
    "distributed_sampler": ("launcher.data", "distributed_sampler"),
    "DistributedSampler": ("launcher.data", "DistributedSampler"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib
        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'launcher' has no attribute '{name}'")

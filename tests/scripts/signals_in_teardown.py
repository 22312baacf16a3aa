"""Starts a DataLoader with a worker, then, from inside the process group's destruction, kills that loader worker
with SIGTERM and sends SIGTERM to this rank: the signals a rank gets when the agent stops it because another rank
failed, arriving while the worker leaves its process group."""

import os
import signal
import time

import torch
import torch.distributed as dist

import launcher

launcher.init()
loader = torch.utils.data.DataLoader(torch.arange(8), batch_size=2, num_workers=1)
batches = iter(loader)  # kept alive: its worker stays registered with the DataLoader's SIGCHLD handler
next(batches)
destroy = dist.destroy_process_group


def destroy_under_signals(*args, **kwargs):
    loader_worker = batches._workers[0]
    os.kill(loader_worker.pid, signal.SIGTERM)
    loader_worker.join(10)  # its SIGCHLD has arrived
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # both handlers run by now, at the latest here
    print(f"rank {os.environ['RANK']} signalled during teardown", flush=True)
    destroy(*args, **kwargs)


dist.destroy_process_group = destroy_under_signals

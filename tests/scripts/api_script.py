"""A script that uses the launcher's small public API instead of raw torch.distributed calls."""

import atexit
import sys
import threading
import time

import torch

import launcher

info = launcher.init()
dataset = torch.utils.data.TensorDataset(torch.arange(20).float())
sampler = launcher.distributed_sampler(dataset, shuffle=False)
sampler.set_epoch(0)
mine = [int(dataset[i][0]) for i in sampler]
print(f"api script rank {info.rank}/{info.world_size} local {info.local_rank} device {launcher.choose_device()} "
      f"samples {mine} argv {sys.argv[1:]}", flush=True)
if "--fail" in sys.argv and info.rank == 1:
    raise ValueError("api script failure on purpose")
# what a script may leave to the end of the process: buffered data in a file it never closes, an atexit
# handler, a non-daemon thread still working
left_open = open(f"left-open-rank{info.rank}.txt", "w")
left_open.write("buffered, never flushed by the script\n")
atexit.register(lambda: open(f"atexit-rank{info.rank}.txt", "w").write("ran\n"))
threading.Thread(target=lambda: (time.sleep(0.5), open(f"thread-rank{info.rank}.txt", "w").write("done\n"))).start()
launcher.teardown()

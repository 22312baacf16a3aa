"""What a node's fork server imports once, before it forks the ranks (`launch.preload_workers`, the default).

The local backend starts one fork server per node (multiprocessing's forkserver, with this module as its preload).
Each rank is then a fork of a process that has imported torch and the launcher already, so it starts in tens of
milliseconds instead of seconds: on a restart after a failure, and for every local rank at launch. Importing this
module is what the fork server does, and nothing else imports it.

The server itself must outlive the signals meant for the ranks (SLURM's preemption signals reach every process of
the step; a `kill` of launch's process group reaches it too): they are ignored here, and each rank takes the default
dispositions back first thing (`worker.run_rank`). The server ends when the agent does (multiprocessing closes its
pipe), and its ranks then end too (`worker.die_with_agent`). Nothing here may touch a GPU: a forked process cannot
use a CUDA context its parent made.
"""

import signal

for _signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(_signum, signal.SIG_IGN)

import gc  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402

# Should an import ask whether CUDA is there, NVML answers (it does not initialise the CUDA driver, after which a
# forked rank could not use CUDA); only for the imports: the ranks get torch's usual check.
_nvml = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"

import torch  # noqa: E402,F401  the point of the fork server: imported once per node, not once per rank
import torch._dynamo  # noqa: E402,F401  what torch.optim imports on the first optimizer built (0.4 s)

from . import trainer, worker  # noqa: E402,F401

if importlib.util.find_spec("tensorboard") is not None:  # rank 0 writes TensorBoard files by default
    from torch.utils import tensorboard  # noqa: F401

if _nvml is None:
    del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
else:
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = _nvml

# What the imports made (some 300,000 objects) lives as long as the ranks do: out of the collector's sight in every
# rank forked from here (gc.freeze), full collections and a rank's walk over its objects at exit (procs.leave, for
# the files a script left open) see only what the rank made itself: that walk takes 0.04 s instead of 0.4 s.
gc.freeze()

"""Fault injection for the test suite: kill a rank at a named point, so tests can reproduce a crash exactly where
it hurts most (say, between writing checkpoint shards and the commit). Off unless LAUNCHER_FAULT is set:

    LAUNCHER_FAULT=<point>:<step>:<rank>            e.g. save.after_shards:8:1  (SIGKILL rank 1 there at step 8)
    LAUNCHER_FAULT=<point>:<step>:<rank>:<file>     create <file> there and wait 3 s (a test acts meanwhile)

`active(point, step, rank)` only says whether the variable names this point: the code there plants the fault itself
(the doctor's late rank or wrong sum). Several faults: separated by commas.
"""

from __future__ import annotations

import os
import signal
import time


def active(name: str, step: int, rank: int) -> bool:
    for spec in filter(None, os.environ.get("LAUNCHER_FAULT", "").split(",")):
        where, at_step, at_rank, *_ = spec.split(":", 3)
        if where == name and int(at_step) == step and int(at_rank) == rank:
            return True
    return False


def point(name: str, step: int, rank: int) -> None:
    spec = os.environ.get("LAUNCHER_FAULT")
    if not spec:
        return
    where, at_step, at_rank, *action = spec.split(":", 3)
    if where == name and int(at_step) == step and int(at_rank) == rank:
        if not action:
            os.kill(os.getpid(), signal.SIGKILL)
        if not os.path.exists(action[0]):  # once
            open(action[0], "w").close()
            time.sleep(3)

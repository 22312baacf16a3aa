"""Fault injection for the test suite: kill a rank at a named point, so tests can reproduce a crash exactly where
it hurts most (say, between writing checkpoint shards and the commit). Off unless LAUNCHER_FAULT is set:

    LAUNCHER_FAULT=<point>:<step>:<rank>     e.g. save.after_shards:8:1  (SIGKILL rank 1 there at step 8)
"""

from __future__ import annotations

import os
import signal


def point(name: str, step: int, rank: int) -> None:
    spec = os.environ.get("LAUNCHER_FAULT")
    if not spec:
        return
    where, _, rest = spec.partition(":")
    at_step, _, at_rank = rest.partition(":")
    if where == name and int(at_step) == step and int(at_rank) == rank:
        os.kill(os.getpid(), signal.SIGKILL)

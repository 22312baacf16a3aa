"""A local trial's guard: `python -m launcher.sweep.guard CONTROLLER_PID ARGV...` runs the trial's `launch` in the
guard's own process group (the controller starts the guard in a session of its own) and, the moment the controller
is gone (PR_SET_PDEATHSIG), SIGKILLs everything below it: `launch`, its fork server and every rank and loader
worker at once. Without it, ranks forked from the fork server outlive a killed controller by seconds, long enough
to write into a run directory the next controller is already resuming. Exits with the trial's exit code (128+N for
a signal N). It imports nothing beyond the standard library and launcher.procs: it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from launcher.procs import children_by_parent  # standard library only, as this guard


def _descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc's parent links (ranks run in sessions of their own, so the guard's
    process group alone does not hold them)."""
    children = children_by_parent()
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _end_group(*_: object) -> None:
    """The controller is gone: SIGKILL everything this guard started, wherever its session, then the group."""
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os.killpg(0, signal.SIGKILL)  # this guard included


def main(argv: list[str]) -> int:
    parent, cmd = int(argv[0]), argv[1:]
    signal.signal(signal.SIGUSR1, _end_group)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGUSR1))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the controller died before the guard could watch it
        _end_group()
    child = subprocess.Popen(cmd)
    while True:
        try:
            rc = child.wait()
            break
        except InterruptedError:
            continue
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

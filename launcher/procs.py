"""Processes as Linux's /proc shows them: the one place that parses /proc/PID/stat; and how our processes leave
(`leave`, `exit_now`). Torch-free."""

from __future__ import annotations

import atexit
import gc
import io
import os
import sys
import threading
import time
from typing import NoReturn


def stat_fields(pid: int | str = "self") -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses): [0] is the
    state, [1] the parent pid, [19] the start time in clock ticks after boot. None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children_by_parent() -> dict[int, list[int]]:
    """parent pid -> its children's pids, for every process this one can see."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = stat_fields(name)
            if fields and fields[1].isdigit():
                out.setdefault(int(fields[1]), []).append(int(name))
    return out


def start_time(pid: int | str = "self") -> float | None:
    """Wall-clock time the process started (to 10 ms), or None off Linux or when it is gone."""
    fields = stat_fields(pid)
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # type: ignore[index]
    except (OSError, ValueError, IndexError, TypeError):
        return None


def leave(open_files: bool = False) -> None:
    """What a normal exit does for Python code, minus the interpreter's finalization: join the non-daemon threads,
    run the atexit handlers (logging, W&B), flush stdout and stderr, and with `open_files` every open Python file
    (a rank running a user's script, which may leave files open: a walk over the process's objects)."""
    shutdown = getattr(threading, "_shutdown", None)  # joins non-daemon threads, as interpreter exit does
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    if open_files:
        _flush_open_files()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _flush_open_files() -> None:
    is_file: dict[type, bool] = {}  # one subclass check per type: a process holds many thousand objects
    for obj in gc.get_objects():  # buffered data of files a script left open would be lost otherwise
        # type(), not isinstance(): isinstance reads obj.__class__, which a dead weak proxy or a deprecated
        # module attribute answers with an error or a warning
        tp = type(obj)
        try:
            file = is_file[tp]
        except KeyError:
            file = is_file[tp] = issubclass(tp, io.IOBase)
        except TypeError:  # a metaclass that leaves its classes unhashable
            file = issubclass(tp, io.IOBase)
        if file:
            try:
                if not obj.closed:
                    obj.flush()
            except Exception:  # a file that cannot flush now could not at exit either
                pass


def exit_now(code: int) -> NoReturn:
    """Leave with `code` after `leave()`, without the interpreter's finalization. `launch` ends so once it has
    imported torch (an agent, a controller): tearing down torch's modules takes a second of a process's end."""
    leave()
    os._exit(code)

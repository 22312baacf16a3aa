"""Processes as Linux's /proc shows them: the one place that parses /proc/PID/stat (torch-free)."""

from __future__ import annotations

import os
import time


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

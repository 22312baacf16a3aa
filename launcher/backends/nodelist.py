"""SLURM node lists: `scontrol show hostnames` when it is there, a parser of the same syntax when it is not.

The parser handles what real clusters use: `n[1-3,5]`, `gpu-a[01-02],gpu-b7` (zero padding kept),
`node-[001-003]`, several bracket groups in one name (`r[1-2]-n[1-2]`), plain names with dashes.
"""

from __future__ import annotations

import re
import shutil
import subprocess


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append("".join(cur))
    return [p for p in (x.strip() for x in parts) if p]


def _expand_range(body: str, text: str) -> list[str]:
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in node list {text!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in node list {text!r}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _expand_name(name: str, text: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        return [name]
    head, tail = name[: m.start()], name[m.end():]
    return [head + mid + rest for mid in _expand_range(m.group(1), text) for rest in _expand_name(tail, text)]


def expand(nodelist: str) -> list[str]:
    """Expand SLURM node list syntax into host names, in order."""
    return [host for part in _split_top(nodelist) for host in _expand_name(part, nodelist)]


def hostnames(nodelist: str) -> list[str]:
    """Host names of a node list: `scontrol show hostnames` (the ground truth), else the parser."""
    if shutil.which("scontrol"):
        try:
            r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30)
            if r.returncode == 0 and r.stdout.split():
                return r.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand(nodelist)


def port_for_job(job_id: str | int) -> int:
    """A rendezvous port derived from the job id, so two jobs sharing a node do not collide (10000-29999,
    below the kernel's ephemeral range)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 10000 + int(digits) % 20000

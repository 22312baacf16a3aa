"""A check's result, the table `launch doctor` prints, doctor.json and the exit code. No torch import here."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Any

from ..files import write_atomic

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
# In the order they run; "slurm" runs in the command (an allocation, or sbatch --test-only), the rest on the ranks.
CHECKS = ("recipe", "slurm", "overfit", "finite", "memory", "batch_size", "data", "collectives", "storage")
EXIT_OK, EXIT_FAILED, EXIT_BAD_RECIPE = 0, 1, 2


@dataclass
class Result:
    """One check's outcome: `figure` is what it measured, `advice` what to change (empty when nothing)."""

    check: str
    status: str
    figure: str = ""
    advice: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def exit_code(results: list[Result]) -> int:
    return EXIT_FAILED if any(r.status == FAIL for r in results) else EXIT_OK


def table(results: list[Result], width: int | None = None) -> str:
    """The results as a table: check, result, figure, advice (wrapped to the terminal)."""
    width = width or max(shutil.get_terminal_size((120, 24)).columns, 80)
    head = ("check", "result", "figure", "advice")
    rows = [(r.check, r.status.upper(), r.figure, r.advice) for r in results]
    w0 = max(len(head[0]), *(len(r[0]) for r in rows)) if rows else len(head[0])
    w1 = max(len(head[1]), *(len(r[1]) for r in rows)) if rows else len(head[1])
    rest = max(width - w0 - w1 - 4, 40)
    w2 = min(max([len(head[2])] + [len(r[2]) for r in rows]), rest // 2)
    w3 = max(rest - w2 - 2, 20)
    out = [f"{head[0]:{w0}}  {head[1]:{w1}}  {head[2]:{w2}}  {head[3]}", "-" * min(width, w0 + w1 + w2 + w3 + 6)]
    for check, status, figure, advice in rows:
        fig = textwrap.wrap(figure, w2) or [""]
        adv = textwrap.wrap(advice, w3) or [""]
        for i in range(max(len(fig), len(adv))):
            out.append(f"{check if i == 0 else '':{w0}}  {status if i == 0 else '':{w1}}  "
                       f"{fig[i] if i < len(fig) else '':{w2}}  {adv[i] if i < len(adv) else ''}".rstrip())
    return "\n".join(out)


def write_json(path: str, results: list[Result], **about: Any) -> None:
    body = {**about, "exit_code": exit_code(results), "results": [r.to_dict() for r in results]}
    write_atomic(path, json.dumps(body, indent=1, default=str))


def parse_size(text: str) -> int:
    """Bytes in a size like 8G, 512M, 1.5T or 8GiB (powers of 1024); a plain number is megabytes, as for SLURM."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--memory-budget {text!r} is not a size: write it like 8G, 512M or 1.5T")
    unit = m.group(2).upper() or "M"
    return int(float(m.group(1)) * 1024 ** (" KMGT".index(unit)))

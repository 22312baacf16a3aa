"""doctor.png: the overfit loss curve, memory against batch size, and batches/s against num_workers, from the
results' details. Plotting is an optional extra (`pip install 'launcher[plots]'`): without matplotlib the table and
doctor.json are complete and this writes nothing."""

from __future__ import annotations

import importlib.util
import os

from .report import Result


def panels(results: list[Result]) -> list[tuple[str, str, str, list[float], list[float]]]:
    """(title, x label, y label, xs, ys) for each picture the results have data for."""
    by = {r.check: r.details for r in results}
    out = []
    losses = by.get("overfit", {}).get("losses")
    if losses:
        out.append(("overfit one batch", "step", "loss (mean over ranks)", list(range(1, len(losses) + 1)), losses))
    ranks = by.get("memory", {}).get("ranks") or by.get("batch_size", {}).get("ranks") or []
    points = sorted(ranks[0].get("points") or []) if ranks else []
    if points:
        out.append(("memory of a step, rank 0", "batch size per rank", "MiB", [p[0] for p in points],
                    [p[1] for p in points]))
    settings = by.get("data", {}).get("settings") or []
    pairs = sorted((int(s["num_workers"]), float(s["batches_per_s"])) for s in settings if not s.get("pin_memory"))
    if pairs:
        out.append(("data loading", "num_workers", "batches/s", [p[0] for p in pairs], [p[1] for p in pairs]))
    return out


def write(path: str, results: list[Result]) -> str | None:
    """Draw the panels into `path`; the path, or None without matplotlib or data."""
    drawn = panels(results)
    if not drawn or importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(drawn), figsize=(4.5 * len(drawn), 3.4), squeeze=False)
    for ax, (title, xlabel, ylabel, xs, ys) in zip(axes[0], drawn):
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

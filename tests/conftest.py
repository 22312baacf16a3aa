"""Shared fixtures: the real `launch` command in a subprocess, and no silent skips under CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
LAUNCH = str(Path(sys.executable).parent / "launch")


def launch_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("OMP_NUM_THREADS", None)
    env.update(extra)
    return env


def run_launch(*args: str, cwd: Path | str, timeout: float = 180, env: dict | None = None,
               module: bool = False) -> subprocess.CompletedProcess:
    """Run the real `launch` command (or `python -m launcher`) and capture its output."""
    cmd = [sys.executable, "-m", "launcher", *args] if module else [LAUNCH, *args]
    return subprocess.run(cmd, cwd=cwd, env=env or launch_env(), capture_output=True, text=True, timeout=timeout)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and call.when in ("setup", "call"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which counts as a failure: {report.longrepr}"

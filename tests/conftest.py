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


def checkpoint_params(ckpt: Path | str) -> dict:
    """A local checkpoint folder's model state, read in this process by the reader `launch ckpt export` uses
    (test_checkpoint runs the command itself, locally and on S3)."""
    from launcher.checkpoint import dcp_io
    from launcher.checkpoint.storage import Storage
    return dcp_io.model_state(Storage(str(Path(ckpt).parent)), str(ckpt))


def require(ok: bool, why: str) -> None:
    """A test that needs what this machine may lack (root, apt-get, iproute2): on a user's machine without it the
    test is skipped, saying why; under CI (CI=true), which has all of it, the test fails instead."""
    if not ok and os.environ.get("CI") == "true":
        pytest.fail(f"{why}; under CI=true nothing may skip")
    if not ok:
        pytest.skip(why)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and call.when in ("setup", "call"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which counts as a failure: {report.longrepr}"


# ----------------------------------------------------------------------------------------------- storage

@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint for the whole session: moto's server on 127.0.0.1, started by the suite itself."""
    from s3 import S3Server
    server = S3Server()
    server.start()
    yield server
    server.stop()


class Store:
    """Where a test's checkpoints go: a local directory or a fresh bucket on the S3 endpoint."""

    _n = 0

    def __init__(self, kind: str, tmp_path: Path, s3=None) -> None:
        self.kind = kind
        self.s3 = s3
        if kind == "s3":
            Store._n += 1
            self.bucket = f"ckpt-{os.getpid()}-{Store._n}"
            s3.make_bucket(self.bucket)
            self.base = f"s3://{self.bucket}/runs"
            self.env = s3.env()
        else:
            self.base = str(tmp_path / "ckpt")
            self.env = {}

    def url(self, run: str) -> str:
        return f"{self.base}/{run}"

    def _fs(self):
        import fsspec
        if self.kind == "s3":
            return fsspec.filesystem("s3", **self.s3.fs_kwargs())
        return fsspec.filesystem("file")

    def truncate(self, path: str) -> None:
        fs = self._fs()
        data = fs.cat_file(path)
        fs.pipe_file(path, data[: len(data) // 2])

    def remove(self, path: str) -> None:
        self._fs().rm_file(path)


@pytest.fixture(scope="module", params=["local", "s3"])
def store_kind(request):
    return request.param


@pytest.fixture
def store(store_kind, tmp_path, s3_server):
    return Store(store_kind, tmp_path, s3_server)

"""Shared fixtures: recipes (`write_recipe`), the real `launch` command in a subprocess (`launch`, `run_launch`),
where checkpoints go (`store`), and no silent skips under CI."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
    """Run the real `launch` command (or `python -m launcher`) with exactly these arguments and capture its output:
    for subcommands (`ckpt ls`, `status`) and command lines a test spells itself (aliases, the default run
    directory). A training run in a run directory of the test's goes through `launch`."""
    cmd = [sys.executable, "-m", "launcher", *args] if module else [LAUNCH, *args]
    return subprocess.run(cmd, cwd=cwd, env=env or launch_env(), capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------- recipes and runs

# The tiny CPU recipe most tests start from: a 32-16-4 MLP whose rank a test can kill, hang, stop or slow through
# environment variables (components.KillableMLP), 256 synthetic samples, 16 per rank, 12 steps, a checkpoint every
# 4 steps, all kept.
BASE = """\
seed: 3
model: {_target_: components.KillableMLP, in_features: 32, hidden: 16, out_features: 4}
data:
  train: {_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 256}
  batch_size: 16
  num_workers: 0
trainer: {max_steps: 12, log_every_steps: 1}
checkpoint: {every_steps: 4, keep: 0}
"""


def write_recipe(where: Path | str, *changes: str, base: str = BASE, name: str = "exp.yaml") -> str:
    """Write the recipe file WHERE/NAME and return its path: `base` (YAML text; a test's own where it shares little
    with BASE) with each `key=value` change applied in order. A change sets its dotted key to the value, typed as
    YAML as on the `launch` command line, and replaces what was there: `model.dropout=0.2` changes one field,
    `model={_target_: ...}` the whole model, `checkpoint={}` leaves that section to the schema's defaults. (On the
    command line a mapping merges into what is there instead.) Without changes `base` is written as it is."""
    from launcher.recipe import parse_override, read_yaml
    path = Path(where) / name
    path.write_text(base)
    if changes:
        data, _ = read_yaml(str(path))
        for change in changes:
            key, value = parse_override(change)
            *parents, last = key.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def launch(where: Path, recipe: str, *args: str, run: str = "run", gpus: int = 2, store: Store | None = None,
           env: dict[str, str] | None = None, expect: int | None = 0,
           timeout: float = 180) -> tuple[subprocess.CompletedProcess, Path]:
    """A run of the real `launch` command in WHERE: `launch RECIPE --gpus GPUS --run-dir WHERE/RUN ARGS` in
    launch_env(**env); with a `store`, its checkpoint.dir for RUN comes before ARGS and its credentials under
    `env`. Fails the test, showing the tails of stderr and stdout, unless the exit status is `expect` (None: any
    status, for a test that checks it later itself). Returns the finished process and the run directory."""
    __tracebackhide__ = True  # a failure points at the test's line
    run_dir = Path(where) / run
    cmd = [str(recipe), "--gpus", str(gpus), "--run-dir", str(run_dir)]
    if store is not None:
        cmd.append(f"checkpoint.dir={store.url(run)}")
    cmd += args
    r = run_launch(*cmd, cwd=where, timeout=timeout, env=launch_env(**{**(store.env if store else {}), **(env or {})}))
    if expect is not None and r.returncode != expect:
        pytest.fail(f"`launch {' '.join(cmd)}` exited with {r.returncode}, expected {expect}\n"
                    f"--- stderr, last lines ---\n{_tail(r.stderr, 60)}\n"
                    f"--- stdout, last lines ---\n{_tail(r.stdout, 20)}")
    return r, run_dir


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


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


# ----------------------------------------------------------------------------------------------- the SLURM cluster
CLUSTER = [str(ROOT / "slurm" / "cluster.sh")]
_CLUSTER_USERS = Path("/tmp/launcher-tests-slurm-users.json")  # pids of the test processes using the cluster


@contextlib.contextmanager
def _cluster_users():
    """The list of processes using the cluster, read and written under a lock shared by the test workers."""
    with open(f"{_CLUSTER_USERS}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        users = json.loads(_CLUSTER_USERS.read_text()) if _CLUSTER_USERS.exists() else []
        alive = []
        for pid in users:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except OSError:
                pass  # a worker of a run that was killed
        yield alive
        _CLUSTER_USERS.write_text(json.dumps(alive))


@pytest.fixture(scope="module")
def slurm_cluster():
    """The one-machine SLURM cluster (slurm/cluster.sh: slurmctld, slurmdbd, two slurmd), shared by every module
    that needs it on any test worker: started by the first, stopped when the last one leaves (a module on the other
    worker may still be submitting jobs when this one ends)."""
    require(os.geteuid() == 0 and shutil.which("apt-get") is not None,
            "the SLURM tests stand up a cluster with slurm/cluster.sh, which needs root and apt-get")
    with _cluster_users() as users:
        up = subprocess.run([*CLUSTER, "status"], capture_output=True, text=True, timeout=120).returncode == 0
        if not up:
            r = subprocess.run([*CLUSTER, "start"], capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"slurm/cluster.sh start failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        users.append(os.getpid())
    yield
    with _cluster_users() as users:
        users.remove(os.getpid())
        if not users:
            subprocess.run([*CLUSTER, "stop"], capture_output=True, text=True, timeout=120)

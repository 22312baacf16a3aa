"""The faults a long run meets, with the real `launch` command and real gloo process groups: a node that never
arrives, a rank that hangs inside a collective, a rank that keeps dying, an S3 endpoint that goes away during a
save (moto's server, stopped and restarted), a disk that fills (a small tmpfs). The recipe is conftest.BASE,
slowed down or run longer where a test needs the time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import LAUNCH, launch, launch_env, require, run_launch, write_recipe
from s3 import free_port

from launcher import procs


def test_missing_node_fails_after_the_timeout_saying_who_arrived(tmp_path):
    recipe = write_recipe(tmp_path)
    endpoint = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r, _ = launch(tmp_path, recipe, "--nodes", "2", "--rdzv-endpoint", endpoint, "launch.rdzv_timeout_s=6", gpus=1,
                  expect=1, timeout=120)
    took = time.monotonic() - t0
    assert f"launch: rendezvous at {endpoint}: 1 of 2 nodes here (127.0.0.1 (pid " in r.stderr, r.stderr
    assert re.search(rf"launch: error: the rendezvous at {endpoint} timed out after 6 s: 1 of 2 nodes arrived "
                     rf"\(127\.0\.0\.1 \(pid \d+\)\)\. Check that every node runs the same command", r.stderr), r.stderr
    assert "launch.rdzv_timeout_s" in r.stderr and "Traceback" not in r.stderr
    assert took < 60, f"gave up after {took:.0f} s, not after the 6 s timeout"


def test_rank_hanging_in_a_collective_becomes_a_report(tmp_path):
    recipe = write_recipe(tmp_path)
    t0 = time.monotonic()
    r, _ = launch(tmp_path, recipe, "launch.collective_timeout_s=5", env={"HANG_AT_STEP": "6", "HANG_RANK": "1"},
                  expect=1, timeout=180)
    took = time.monotonic() - t0
    assert re.search(r"a collective timed out at step 6 after 5 s \(launch.collective_timeout_s\) on rank 0: "
                     r"rank 1 did not answer: hung or far behind", r.stderr), r.stderr
    assert "rank 0 (local rank 0" in r.stderr and "rank0.log" in r.stderr
    assert took < 120, f"the hang took {took:.0f} s to end"


def test_rank_that_keeps_dying_exhausts_restarts_and_is_named(tmp_path):
    recipe = write_recipe(tmp_path, "model={_target_: components.FailingMLP, step: 3, rank: 1, mode: kill}")
    r, run_dir = launch(tmp_path, recipe, "--max-restarts", "1", expect=1, timeout=180)
    assert "failed (first failure first), after 1 restart (launch.max_restarts)" in r.stderr, r.stderr
    assert re.search(r"rank 1 \(local rank 1, pid \d+\) on host \S+: killed by signal SIGKILL", r.stderr), r.stderr
    assert str(run_dir / "logs" / "rank1.log") in r.stderr
    log1 = (run_dir / "logs" / "rank1.log").read_text()
    assert "restart 0" in log1 and "restart 1" in log1, "the group was not restarted once"


def test_an_error_before_the_workers_main_is_printed_once(tmp_path):
    """(A rank that fails inside main() writes its traceback once: test_launch's failing-rank test.) An error
    before main() can catch it, here a run directory without config.yaml, is printed once too."""
    w = subprocess.run([sys.executable, "-m", "launcher.worker", str(tmp_path / "absent")], cwd=tmp_path,
                       env=launch_env(), capture_output=True, text=True, timeout=120)
    assert w.returncode == 1, w.stderr
    assert w.stderr.count("Traceback (most recent call last)") == 1 and "recipe file not found" in w.stderr, w.stderr


SLOW = ("model.step_sleep=0.15", "trainer.max_steps=24")


def test_s3_down_during_a_save_all_ranks_go_on_and_later_saves_commit(tmp_path):
    """The endpoint stops while rank 0 is about to write step 8: the save fails on every rank together after its
    retries, training goes on (on_save_error=continue), the endpoint comes back, later checkpoints commit."""
    from s3 import S3Server
    server = S3Server().start()
    try:
        server.make_bucket("ckpt")
        reached = tmp_path / "saving"
        url = "s3://ckpt/run"
        # botocore's own retries of a refused connection take ~20 s per try at its defaults; one attempt each here
        env = launch_env(**server.env(), LAUNCHER_FAULT=f"save.before_shards:8:0:{reached}", AWS_MAX_ATTEMPTS="1",
                         AWS_RETRY_MODE="standard")
        recipe = write_recipe(tmp_path, *SLOW)
        proc = subprocess.Popen([LAUNCH, recipe, "--gpus", "2", "--run-dir", str(tmp_path / "run"),
                                 f"checkpoint.dir={url}", "checkpoint.retries=1", "checkpoint.on_save_error=continue"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not reached.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        server.stop()
        log0 = tmp_path / "run" / "logs" / "rank0.log"
        while "CHECKPOINT NOT SAVED" not in log0.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        server.restart()
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, out + err
        text = log0.read_text()
        assert re.search(r"checkpoint step-000000008: write failed \(.+\); trying again in 1 s \(retry 1 of 1\)",
                         text), text
        assert re.search(r"CHECKPOINT NOT SAVED: checkpoint s3://ckpt/run/step-000000008 was not saved after 2 "
                         r"tries: .+; the previous committed checkpoint \(step 4\) is intact", text), text
        listing = run_launch("ckpt", "ls", url, cwd=tmp_path, env=launch_env(**server.env())).stdout
        assert re.search(r"^ +24 .*committed, latest$", listing, re.M), listing
        assert re.search(r"^ +4 .*committed$", listing, re.M) and not re.search(r"^ +8 ", listing, re.M), listing
    finally:
        server.stop()


def test_disk_full_during_a_save_stops_and_keeps_the_last_checkpoint(tmp_path):
    require(os.geteuid() == 0, "mounting a small tmpfs to fill needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], check=True)
    try:
        r, _ = launch(tmp_path, write_recipe(tmp_path, "trainer.max_steps=400"), f"checkpoint.dir={disk}/ck", expect=1,
                      timeout=300)
        m = re.search(r"checkpoint \S+/step-(\d+) was not saved: rank \d: \w+: \[Errno 28\] No space left on device"
                      r".*\(not retried: it will not go away by itself\); the previous committed checkpoint "
                      r"\(step (\d+)\) is intact", r.stderr)
        assert m, r.stderr
        failed, kept = int(m.group(1)), int(m.group(2))
        assert kept == failed - 4 and kept >= 4
        listing = run_launch("ckpt", "ls", f"{disk}/ck", cwd=tmp_path).stdout
        assert re.search(rf"\b{kept} .*committed, latest", listing), listing
        out = tmp_path / "kept.pt"
        exp = run_launch("ckpt", "export", f"{disk}/ck/step-{kept:09d}", str(out), cwd=tmp_path)
        assert exp.returncode == 0, exp.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_killing_launch_takes_its_workers_down(tmp_path):
    """`kill -9` of the launch process (the agent) must not leave ranks running as orphans."""
    recipe = write_recipe(tmp_path, "model.step_sleep=0.2", "trainer.max_steps=1000")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([LAUNCH, recipe, "--gpus", "2", "--run-dir", str(run_dir)], cwd=tmp_path,
                            env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: list[int] = []
    deadline = time.monotonic() + 120
    while len(pids) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.2)
        pids = [int(m) for k in (0, 1) if (run_dir / "logs" / f"rank{k}.log").exists()
                for m in re.findall(r"worker start: .* pid (\d+)", (run_dir / "logs" / f"rank{k}.log").read_text())]
    server = [pid for pid in procs.children_by_parent().get(proc.pid, [])
              if b"multiprocessing.forkserver" in _read(Path(f"/proc/{pid}/cmdline"))]
    assert server, "no fork server found for this run (launch.preload_workers is on by default)"
    pids += server
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if (procs.stat_fields(p) or ["Z"])[0] != "Z"]
    assert not alive, f"workers (or their fork server) {alive} outlived the launch process (fork server: {server})"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""

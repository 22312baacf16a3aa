"""The real `launch` command end to end: 2 CPU processes in a gloo process group."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TESTS, launch, launch_env, run_launch, write_recipe
from s3 import free_port

# conftest.BASE with these changes. Tests of the command line's own defaults (the run directory, aliases, scripts)
# spell their command lines with run_launch.
RECIPE = ("model._target_=launcher.zoo.models.MLP", "data.num_workers=1", "trainer.log_every_steps=4",
          "checkpoint={}")  # the schema's checkpoint defaults


def rank_log(run_dir: Path, rank: int) -> str:
    return (run_dir / "logs" / f"rank{rank}.log").read_text()


def test_trains_with_two_processes_and_writes_run_dir(tmp_path):
    r = run_launch(write_recipe(tmp_path, *RECIPE), "--nodes", "1", "--gpus", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "no CUDA device: running 2 processes per node on the CPU with gloo" in r.stderr
    run_dir = tmp_path / "runs" / "exp"
    for rank in (0, 1):
        text = rank_log(run_dir, rank)
        assert f"worker start: rank {rank} local_rank {rank} world_size 2" in text
        assert "backend gloo" in text and "process group destroyed" in text
        # trainer.device=auto follows the plan's decision, which reached the rank in its environment
        assert "device cpu (asked: auto, LAUNCHER_DEVICE=cpu)" in text
    # rank 0 prints progress (step, epoch, loss, samples/s) on the console; other ranks only warnings
    assert re.search(r"step 12/12 \| epoch \d+ \| loss \d+\.\d+ \| lr [\d.e-]+ \| \d+ samples/s", r.stdout)
    assert "[rank 1]" not in r.stdout
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["seed"] == 3 and config["trainer"]["max_steps"] == 12 and config["run"]["dir"] == str(run_dir)
    assert config["launcher_version"]
    plan = json.loads((run_dir / "launch.json").read_text())
    assert plan["world_size"] == 2 and plan["dist_backend"] == "gloo"
    assert plan["device"] == "cpu" and plan["env"]["LAUNCHER_DEVICE"] == "cpu"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]


def test_python_m_launcher_torchrun_aliases_and_overrides(tmp_path):
    r = run_launch(write_recipe(tmp_path, *RECIPE), "--nnodes", "1", "--nproc-per-node", "2", "--run-dir",
                   str(tmp_path / "out"),
                   "trainer.max_steps=5", "trainer.log_every_steps=5", cwd=tmp_path, module=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5]
    assert "world_size 2" in rank_log(tmp_path / "out", 1)


def _epochs(path: Path, per_epoch_batches: int) -> list[list[int]]:
    batches = [[int(v) for v in line.split(",")] for line in path.read_text().splitlines()]
    return [sum(batches[i:i + per_epoch_batches], []) for i in range(0, len(batches), per_epoch_batches)]


def test_sampler_covers_every_sample_once_per_epoch_and_reshuffles(tmp_path):
    recipe = f"""\
seed: 0
model: {{_target_: components.IndexProbe, out: "{tmp_path}"}}
data:
  train: {{_target_: components.IndexDataset, n: 64}}
  batch_size: 8
  num_workers: 2
trainer: {{max_epochs: 3, log_every_steps: 100}}
"""
    r = run_launch(write_recipe(tmp_path, base=recipe), "--gpus", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    per_rank = [_epochs(tmp_path / f"indices-rank{k}.txt", per_epoch_batches=4) for k in (0, 1)]
    assert all(len(epochs) == 3 for epochs in per_rank)
    orders = []
    for epoch in range(3):
        a, b = per_rank[0][epoch], per_rank[1][epoch]
        assert len(a) == len(b) == 32
        assert sorted(a + b) == list(range(64)), f"epoch {epoch}: a sample was repeated or missed"
        orders.append(a + b)
    assert orders[0] != orders[1] != orders[2], "the order did not change between epochs (set_epoch not called?)"


def test_identical_init_on_all_ranks_and_distinct_worker_seeds(tmp_path):
    recipe = f"""\
seed: 5
model: {{_target_: launcher.zoo.models.MLP, in_features: 4, hidden: 8, out_features: 2}}
data:
  train: {{_target_: components.SeedProbeDataset, out: "{tmp_path}", n: 32}}
  batch_size: 4
  num_workers: 2
trainer: {{max_epochs: 1}}
"""
    r = run_launch(write_recipe(tmp_path, base=recipe), "--gpus", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "runs" / "exp"
    prints = [re.search(r"fingerprint (\w+)", rank_log(run_dir, k)).group(1) for k in (0, 1)]
    assert prints[0] == prints[1], "model initialisation differs between ranks"
    rows = [line.split() for line in (tmp_path / "seeds.txt").read_text().splitlines()]
    by_worker: dict[tuple[str, str], set[tuple[str, ...]]] = {}
    for rank, worker, torch_seed, np_draw, py_draw in rows:
        by_worker.setdefault((rank, worker), set()).add(torch_seed)
    assert set(by_worker) == {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}
    seeds = [s for v in by_worker.values() for s in v]
    assert len(seeds) == 4 and len(set(seeds)) == 4, f"loader worker seeds collide: {by_worker}"
    first_draws = {}
    for rank, worker, _, np_draw, py_draw in rows:
        first_draws.setdefault((rank, worker), (np_draw, py_draw))
    np_first = [d[0] for d in first_draws.values()]
    py_first = [d[1] for d in first_draws.values()]
    assert len(set(np_first)) == 4, "numpy streams repeat across ranks or workers"
    assert len(set(py_first)) == 4, "python random streams repeat across ranks or workers"


@pytest.mark.parametrize("mode, expected", [("raise", r"exit code 1"), ("kill", r"killed by signal SIGKILL")])
def test_failing_rank_is_reported_and_group_torn_down(tmp_path, mode, expected):
    recipe = write_recipe(tmp_path, *RECIPE,
                          f"model={{_target_: components.FailingMLP, step: 3, rank: 1, mode: {mode}}}")
    r = run_launch(recipe, "--gpus", "2", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    run_dir = tmp_path / "runs" / "exp"
    assert re.search(rf"rank 1 \(local rank 1, pid \d+\) on host \S+: {expected}", r.stderr), r.stderr
    assert f"log: {run_dir / 'logs' / 'rank1.log'}" in r.stderr
    if mode == "raise":
        assert "error: RuntimeError: injected failure at step 3" in r.stderr
        log1 = rank_log(run_dir, 1)
        assert log1.count("Traceback (most recent call last)") == 1, log1  # written once, before teardown
        assert log1.count("RuntimeError: injected failure at step 3") == 1, log1
        assert "process group destroyed" in log1
    assert "process group destroyed" in rank_log(run_dir, 0), "the surviving rank did not tear its group down"


PROBE = """\
import json, multiprocessing, os, signal, sys
import numpy
import torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"numpy": int(numpy.random.randint(2**31)), "start_method": multiprocessing.get_start_method(),
               "own_group": os.getpgid(0) == os.getpid(), "parent": os.getppid(),
               "agent": int(os.environ["LAUNCHER_AGENT_PID"]),
               "default_signals": [signal.getsignal(s) == signal.SIG_DFL for s in (signal.SIGHUP, signal.SIGUSR1)]},
              f)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("preload", [True, False])
def test_ranks_start_as_fresh_interpreters_would_forked_or_not(tmp_path, preload):
    """With launch.preload_workers (the default) every rank is forked from one fork server per node that imported
    torch once; a rank must still look like the fresh interpreter it replaces (false)."""
    (tmp_path / "probe.py").write_text(PROBE)
    recipe = f"script: {{path: probe.py, args: ['{tmp_path}']}}\nlaunch: {{preload_workers: {str(preload).lower()}}}\n"
    r = run_launch(write_recipe(tmp_path, base=recipe), "--gpus", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    fresh = subprocess.run([sys.executable, "-c", "import multiprocessing; print(multiprocessing.get_start_method())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert ranks[0]["numpy"] != ranks[1]["numpy"], "numpy's global generator repeats across ranks"
    for rank in ranks:
        assert rank["start_method"] == fresh, rank  # a rank's DataLoader must not start a fork server of its own
        assert rank["own_group"], "a rank must lead its own process group (the agent signals the group)"
        assert all(rank["default_signals"]), "SIGHUP/SIGUSR1 left ignored, as the fork server has them"
        assert (rank["parent"] != rank["agent"]) is preload, rank


def test_the_fork_servers_imports_never_ask_cuda():
    """Every rank is forked from the server: had its imports called into CUDA (is_available, device_count, ...),
    a forked rank could not use the GPU. Each torch.cuda entry point is recorded while the preload runs."""
    code = """if True:
    import torch, torch.cuda
    calls = []
    def recorder(name, original):
        def call(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return call
    for name in ("is_available", "device_count", "is_initialized", "init", "_lazy_init", "current_device",
                 "get_device_capability", "get_device_properties", "set_device", "synchronize"):
        setattr(torch.cuda, name, recorder(name, getattr(torch.cuda, name)))
    import launcher.preload
    import os
    print(calls, os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=launch_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "None"], r.stdout


def test_the_fork_server_keeps_the_signal_mask_that_its_ranks_inherit(tmp_path):
    """Under SLURM the node task blocks SIGTERM and SIGUSR2 before any worker exists, and every rank must start with
    both blocked (dist.StopRequest tells SLURM's SIGTERM from the agent's). Starting the fork server must neither
    unblock them in the agent nor start the server, and so the ranks, without them."""
    code = """if True:
    import multiprocessing, signal
    from launcher.backends import local
    def mask(q):
        q.put(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, ())))
    if __name__ == "__main__":
        held = {signal.SIGTERM, signal.SIGUSR2}
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        local._start_fork_server()
        q = multiprocessing.get_context("forkserver").SimpleQueue()
        p = multiprocessing.get_context("forkserver").Process(target=mask, args=(q,))
        p.start()
        print(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, ())) == sorted(held), q.get() == sorted(held))
        p.join()
"""
    (tmp_path / "probe_mask.py").write_text(code)
    r = subprocess.run([sys.executable, str(tmp_path / "probe_mask.py")], capture_output=True, text=True,
                       env=launch_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"], f"agent's mask kept, ranks' mask kept: {r.stdout} {r.stderr}"


def test_plain_torchrun_script_runs_unchanged(tmp_path):
    script = ROOT / "recipes" / "scripts" / "plain_ddp.py"  # the shipped example
    r = run_launch(str(script), "--gpus", "2", "--", "--steps", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "runs" / "plain_ddp"
    for rank in (0, 1):
        text = rank_log(run_dir, rank)
        assert f"plain script rank {rank} of 2 local_rank {rank} steps 3" in text
        assert f"plain script rank {rank} finished 3 steps" in text


def test_script_through_public_api_and_its_failure(tmp_path):
    script = str(TESTS / "scripts" / "api_script.py")
    r = run_launch(script, "--gpus", "2", "--", "x", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "runs" / "api_script"
    assert "api script rank 0/2 local 0 device cpu samples [0, 2, 4, 6, 8, 10, 12, 14, 16, 18] argv ['x']" \
        in rank_log(run_dir, 0)
    assert "api script rank 1/2 local 1 device cpu samples [1, 3, 5" in rank_log(run_dir, 1)
    for rank in (0, 1):  # a finished rank exits as Python would: threads joined, atexit run, open files flushed
        assert (tmp_path / f"left-open-rank{rank}.txt").read_text() == "buffered, never flushed by the script\n"
        assert (tmp_path / f"atexit-rank{rank}.txt").read_text() == "ran\n"
        assert (tmp_path / f"thread-rank{rank}.txt").read_text() == "done\n"
    r = run_launch(script, "--gpus", "2", "--", "--fail", cwd=tmp_path)
    assert r.returncode == 1
    assert "rank 1" in r.stderr and "ValueError: api script failure on purpose" in r.stderr
    assert "process group destroyed" in rank_log(run_dir, 1)
    # rank 0 had finished and waited for the agent's word that all are done: the agent's SIGTERM ends it, not a
    # SIGKILL after torch's 30 s
    assert "Unable to shutdown process" not in r.stderr and "via SIGKILL" not in r.stderr, r.stderr[-2000:]


def test_script_module_from_recipe_and_from_dash_m(tmp_path):
    recipe = ("script:\n  module: plain_ddp\n  args: ['--steps', '2']\nlaunch:\n  gpus_per_node: 2\n"
              "run: {dir: elsewhere/mod-run}\n")
    env = launch_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "recipes" / "scripts"), env["PYTHONPATH"]])
    r = run_launch(write_recipe(tmp_path, base=recipe, name="mod.yaml"), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    # run.dir from the recipe (relative to where launch runs) holds the logs
    assert "plain script rank 1 finished 2 steps" in rank_log(tmp_path / "elsewhere" / "mod-run", 1)
    r = run_launch("-m", "plain_ddp", "--gpus", "2", "--", "--steps", "1", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "plain script rank 1 finished 1 steps" in rank_log(tmp_path / "runs" / "plain_ddp", 1)


@pytest.mark.parametrize("static", [False, True], ids=["c10d", "static-node-rank"])
def test_two_launches_form_one_job_over_a_rendezvous(tmp_path, static):
    path = write_recipe(tmp_path, *RECIPE)
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node in (0, 1):
        extra = ["--node-rank", str(node)] if static else []
        cmd = [str(Path(sys.executable).parent / "launch"), path, "--nodes", "2", "--gpus", "1",
               "--rdzv-endpoint", endpoint, "--run-dir", str(tmp_path / "run"), *extra]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    logs = [rank_log(tmp_path / "run", k) for k in (0, 1)]
    for rank, text in enumerate(logs):
        assert f"worker start: rank {rank} local_rank 0 world_size 2" in text
    assert "step 12/12" in "".join(o[0] for o in outs)


def test_multi_node_without_endpoint_is_refused(tmp_path):
    recipe = write_recipe(tmp_path, *RECIPE)
    r = run_launch(recipe, "--nodes", "2", cwd=tmp_path)
    assert r.returncode == 2 and "--rdzv-endpoint HOST:PORT" in r.stderr
    r = run_launch(recipe, "--nodes", "2", "--rdzv-endpoint", "nohostport", cwd=tmp_path)
    assert r.returncode == 2 and "is not HOST:PORT" in r.stderr
    r = run_launch(recipe, "--nodes", "2", "--rdzv-endpoint", "a:1", "--node-rank", "2", cwd=tmp_path)
    assert r.returncode == 2 and "--node-rank 2 is outside 0..1" in r.stderr


def test_ranks_keep_freed_memory_for_reuse(tmp_path):
    """A training step frees and allocates the same memory every time; with glibc's defaults the freed top of the
    heap goes back to the OS and its pages fault in again on the next allocation. By default every rank keeps it
    (launch.keep_freed_memory): 64 MiB of blocks filled and freed three times over faults (almost) nothing."""
    script = str(TESTS / "scripts" / "fault_count.py")
    faults = {}
    for setting in ("true", "false"):
        out = tmp_path / setting
        launch(tmp_path, script, f"launch.keep_freed_memory={setting}", "--", str(out), run=f"run-{setting}")
        faults[setting] = [int((tmp_path / f"{setting}-rank{rank}.txt").read_text()) for rank in (0, 1)]
    log = rank_log(tmp_path / "run-true", 1)
    assert "host memory: freed memory kept for reuse" in log, log[-1000:]
    pages = 3 * 64 * 2**20 // resource.getpagesize()  # what three rounds fault if nothing is kept
    assert max(faults["true"]) < pages // 100, f"page faults with freed memory kept, of {pages}: {faults}"
    assert min(faults["false"]) > pages // 2, f"page faults without keep_freed_memory, of {pages}: {faults}"


@pytest.mark.parametrize("env, said", [
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "malloc options as the environment sets them"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "malloc options as the environment sets them"),
    ({"LD_PRELOAD": "libjemalloc.so.2-absent"}, "malloc options of the preloaded allocator"),
    ({}, "freed memory kept for reuse"),
])
def test_keep_freed_memory_leaves_the_users_malloc_settings_alone(env, said):
    code = "from launcher.worker import keep_freed_memory; print(keep_freed_memory())"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env})
    assert said in r.stdout, r.stdout + r.stderr


def test_signals_during_teardown_do_not_stop_a_rank_leaving_its_group(tmp_path):
    """When a rank fails, the agent sends SIGTERM to every other rank's process group: the rank and its loader
    workers. The rank's SIGTERM handler and the DataLoader's SIGCHLD handler both raise; arriving while the rank
    leaves its process group, they must not cut that short. Once it has left, the rank ends as SIGTERM asks (exit
    code 143) instead of waiting for the agent's word that every rank is done, which never comes once a peer failed."""
    script = str(TESTS / "scripts" / "signals_in_teardown.py")
    r, run_dir = launch(tmp_path, script, expect=None)  # the exit status last: the logs say more
    for rank in (0, 1):
        log = rank_log(run_dir, rank)
        assert "process group destroyed" in log, log[-2000:]
        assert f"rank {rank} signalled during teardown" in log, log[-2000:]
        assert "Traceback" not in log, log[-2000:]  # no handler raised inside the teardown
    ended = re.search(r"rank \d \(local rank \d, pid \d+\) on host \S+: exit code 143", r.stderr)
    assert r.returncode == 1 and ended, r.stderr

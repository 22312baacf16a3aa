"""The command line: help, dry run, torch-free submit path, bad input -> exit code 2 with nothing started."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import LAUNCH, ROOT, launch_env, require, run_launch
from launcher import backends, cli, hardware, recipe
from launcher.backends import local
from launcher.backends.plan import Options
from launcher.errors import UsageError

QUICK = str(ROOT / "recipes" / "quickstart.yaml")


def test_help_lists_flags_and_exit_codes(tmp_path):
    r = run_launch("--help", cwd=tmp_path)
    assert r.returncode == 0
    for flag in ("--nodes", "--gpus", "--dry-run", "--run-dir", "--nproc-per-node", "--nnodes"):
        assert flag in r.stdout
    assert "exit codes" in r.stdout


@pytest.mark.parametrize("argv", [["--help"], [QUICK, "--dry-run"], [QUICK, "--dry-run", "data.batch_sise=3"],
                                  ["--explain"], [QUICK, "--slurm", "--dry-run"]])
def test_submit_path_does_not_import_torch(argv, tmp_path):
    code = ("import sys\nfrom launcher.cli import main\n"
            "try:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('torch-free')\n" % argv)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=launch_env(), capture_output=True, text=True)
    assert r.returncode == 0 and "torch-free" in r.stdout, r.stderr


def test_dry_run_prints_recipe_and_plan_and_starts_nothing(tmp_path):
    r = run_launch(QUICK, "--nodes", "1", "--gpus", "2", "--dry-run", "trainer.max_epochs=7", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "max_epochs: 7" in out and "_target_: launcher.zoo.models.MLP" in out
    for line in ("procs_per_node: 2", "world_size: 2", "dist_backend: gloo", "rdzv_backend: c10d",
                 "OMP_NUM_THREADS", "launcher.worker"):
        assert line in out
    assert "no CUDA device: running 2 processes per node on the CPU with gloo" in out
    assert not (tmp_path / "runs").exists(), "a dry run created the run directory"


def test_dry_run_plans_threads_from_usable_cpus_and_the_device_for_the_ranks(tmp_path):
    """OMP_NUM_THREADS comes from the CPUs `launch` may run on (taskset here), not from the machine's count."""
    require(shutil.which("taskset") is not None, "taskset (util-linux) is not installed")
    r = subprocess.run(["taskset", "-c", "0", LAUNCH, QUICK, "--gpus", "1", "--dry-run"], cwd=tmp_path,
                       env=launch_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    env = yaml.safe_load(r.stdout.split("# process plan (nothing was started)\n", 1)[1])["plan"]["env"]
    assert env["OMP_NUM_THREADS"] == "1", env
    assert env["LAUNCHER_DEVICE"] == "cpu", env  # no GPU here: the plan's decision, which every rank follows
    r = run_launch(QUICK, "--gpus", "1", "--dry-run", cwd=tmp_path, env=launch_env(OMP_NUM_THREADS="3"))
    assert "OMP_NUM_THREADS: '3'" in r.stdout, "the user's own setting wins"


def test_bad_inputs_exit_2_and_start_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(QUICK).read_text().replace("batch_size: 64", "batch_size: many")
                   .replace("launcher.zoo.models.MLP", "launcher.zoo.models.MPL") + "trainr: {}\n")
    r = run_launch(str(bad), "--gpus", "2", "seed=x", "oops", cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr
    assert "the recipe has 5 problems; nothing was started" in err
    assert f"{bad}:" in err and "data.batch_size: expected an integer, got 'many'" in err
    assert "unknown key 'trainr'" in err and "did you mean 'trainer'" in err
    assert "module 'launcher.zoo.models' has no name 'MPL'" in err
    assert "override 'seed=x': seed: expected an integer" in err
    assert "override 'oops' is not key=value" in err
    assert not (tmp_path / "runs").exists()

    r = run_launch(str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "recipe file not found" in r.stderr and "Traceback" not in r.stderr
    r = run_launch(QUICK, "--gpus", "two", cwd=tmp_path)
    assert r.returncode == 2 and "--gpus" in r.stderr
    r = run_launch(QUICK, "trainer.device=cuda", cwd=tmp_path)
    assert r.returncode == 2 and "no visible GPU" in r.stderr


def test_too_many_gpus_is_refused_with_numbers(tmp_path):
    cfg = recipe.load(QUICK, ["launch.gpus_per_node=8"]).cfg
    with pytest.raises(UsageError) as e:
        local.plan(cfg, str(tmp_path), gpus=2)
    assert "--gpus 8" in str(e.value) and "2 visible" in str(e.value) and "--gpus 2 or fewer" in str(e.value)
    p = local.plan(recipe.load(QUICK).cfg, str(tmp_path), gpus=4)
    assert (p.procs_per_node, p.device, p.dist_backend) == (4, "cuda", "nccl")  # default: every visible GPU
    p = local.plan(recipe.load(QUICK, ["launch.gpus_per_node=3"]).cfg, str(tmp_path), gpus=0)
    assert (p.procs_per_node, p.device, p.dist_backend) == (3, "cpu", "gloo")


def test_gpu_count_reads_driver_tree_and_cuda_visible_devices(tmp_path, monkeypatch):
    assert hardware.physical_gpu_count(str(tmp_path)) == 0
    gpus = tmp_path / "proc" / "driver" / "nvidia" / "gpus"
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (gpus / bus).mkdir(parents=True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert hardware.visible_gpu_count(str(tmp_path)) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert hardware.visible_gpu_count(str(tmp_path)) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,2")
    assert hardware.visible_gpu_count(str(tmp_path)) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.visible_gpu_count(str(tmp_path)) == 0


@pytest.mark.parametrize("flags, name", [([], "local"), (["--slurm", "--wait"], "slurm")])
def test_both_backends_go_through_plan_then_run(flags, name, tmp_path, monkeypatch, capsys):
    """The command picks the backend by the recipe's `backend` and uses only its interface: plan(cfg, run_dir,
    options); --dry-run prints plan.describe() after the resolved recipe; otherwise launch.json holds
    plan.to_dict() and run(plan) gives the exit code."""
    calls: list = []

    class FakePlan:
        def to_dict(self) -> dict:
            return {"backend": name, "from": "the plan"}

        def describe(self) -> str:
            return "# the plan's own description\n"

    def plan(cfg, run_dir, options):
        calls.append(("plan", cfg.backend, run_dir, options))
        return FakePlan()

    def get(backend: str):
        calls.append(("get", backend))
        return SimpleNamespace(plan=plan, run=lambda p: calls.append(("run", p)) or 7)

    monkeypatch.setattr(backends, "get", get)
    run_dir = str(tmp_path / "run")
    argv = [QUICK, "--rdzv-endpoint", "node1:29500", "--node-rank", "0", "--run-dir", run_dir, *flags]
    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# resolved recipe\n") and out.endswith("\n# the plan's own description\n"), out
    assert not os.path.exists(run_dir)
    expected = Options(rdzv_endpoint="node1:29500", node_rank=0, recipe_path=QUICK, emit_sbatch=False,
                       wait=name == "slurm")
    assert calls == [("get", name), ("plan", name, run_dir, expected)]

    calls.clear()
    assert cli.main(argv) == 7
    assert [c[0] for c in calls] == ["get", "plan", "run"] and isinstance(calls[2][1], FakePlan)
    launch = json.loads(Path(run_dir, "launch.json").read_text())
    assert (launch["backend"], launch["from"]) == (name, "the plan") and launch["launcher_version"]
    assert Path(run_dir, "config.yaml").exists()

"""The GPU test set: the CUDA/NCCL paths on a real GPU, with the real `launch` command.

    scripts/test.sh -m gpu                # in this checkout's venv, on a CUDA machine
    scripts/gpu-check.sh [WHEEL_DIR]      # on a CUDA machine without network: installs, runs these, prints a table

Marked `gpu` and deselected by default (CI has no GPU, and under CI nothing may skip). On a machine without CUDA
every test here fails at once saying so. Tests that need two GPUs skip on a one-GPU machine, saying why
(conftest.require: under CI=true they fail). Each test records a row (check, result, figure) in
$LAUNCHER_GPU_TABLE when set (scripts/gpu-check.sh prints them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, checkpoint_params, launch, launch_env, require, write_recipe

pytestmark = pytest.mark.gpu

# A recipe of its own, not conftest.BASE: a wider model, more data, larger batches and deterministic kernels.
RECIPE = """\
seed: 0
model: {_target_: components.KillableMLP, in_features: 32, hidden: 64, out_features: 4, dropout: 0.1}
data:
  train: {_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 2048}
  batch_size: 32
  num_workers: 1
optimizer: {_target_: torch.optim.AdamW, lr: 1.0e-3}
trainer: {max_steps: 24, log_every_steps: 2, deterministic: true}
checkpoint: {every_steps: 6, keep: 0}
"""


def gpus() -> int:
    if not torch.cuda.is_available():
        pytest.fail("the GPU tests need a CUDA (or ROCm) device: torch.cuda.is_available() is False here "
                    f"(torch {torch.__version__}, CUDA {torch.version.cuda}, "
                    f"HIP {getattr(torch.version, 'hip', None)})")
    return torch.cuda.device_count()


@pytest.fixture(autouse=True)
def _a_gpu_is_there() -> None:
    gpus()


def need(n: int) -> None:
    have = gpus()
    require(have >= n, f"needs {n} GPUs, this machine has {have}")


def record(check: str, result: str, figure: str = "") -> None:
    path = os.environ.get("LAUNCHER_GPU_TABLE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"check": check, "result": result, "figure": figure}) + "\n")


def losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def final(run_dir: Path, step: int = 24) -> dict[str, torch.Tensor]:
    return checkpoint_params(run_dir / "checkpoints" / f"step-{step:09d}")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted deterministic run on GPU 0: what every resume below must reproduce bit for bit."""
    gpus()
    tmp = tmp_path_factory.mktemp("gpu-ref")
    _, run_dir = launch(tmp, write_recipe(tmp, base=RECIPE, name="gpu.yaml"), run="ref", gpus=1, timeout=300)
    return run_dir


def test_nccl_on_the_gpu_of_local_rank(reference):
    log = (reference / "logs" / "rank0.log").read_text()
    assert re.search(r"device cuda:0, backend nccl", log), log[:3000]
    assert "deterministic kernels" in log
    steps = losses(reference)
    assert steps[24] < steps[2], f"did not learn on the GPU: {steps}"
    record("NCCL init, device from LOCAL_RANK", "pass", "cuda:0, nccl")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_and_resume_is_bitwise_on_the_gpu(tmp_path, reference, mode):
    """SIGKILL of the rank at step 14 (checkpoints every 6): the agent restarts it, it resumes from step 12 and
    ends with the uninterrupted run's parameters and losses (trainer.deterministic)."""
    recipe = write_recipe(tmp_path, base=RECIPE, name="gpu.yaml")
    t0 = time.time()
    r, run_dir = launch(tmp_path, recipe, "--max-restarts", "1",
                        f"checkpoint.async={'true' if mode == 'async' else 'false'}", gpus=1, timeout=300,
                        env={"KILL_AT_STEP": "14", "KILL_RANK": "0", "KILL_MARKER": str(tmp_path / "killed")})
    assert (tmp_path / "killed").exists(), "the rank was never killed"
    assert re.search(r"resume: from \S+step-000000012: step 12", r.stdout), r.stdout
    assert losses(run_dir) == losses(reference)
    assert same(final(run_dir), final(reference)), "parameters differ from the uninterrupted GPU run"
    record(f"{mode} save, kill, resume bitwise", "pass", f"{time.time() - t0:.1f} s with one restart")


def test_fp16_with_its_scaler_resumes_exactly_and_bf16_learns(tmp_path):
    recipe = write_recipe(tmp_path, base=RECIPE, name="gpu.yaml")
    _, ref = launch(tmp_path, recipe, "trainer.precision=fp16", run="ref", gpus=1, timeout=300)
    state = json.loads((ref / "checkpoints" / "step-000000024" / "train_state.json").read_text())
    assert state["scaler"]["scale"] > 0, state
    launch(tmp_path, recipe, "trainer.precision=fp16", "trainer.max_steps=12", gpus=1, timeout=300)
    r, run_dir = launch(tmp_path, recipe, "trainer.precision=fp16", gpus=1, timeout=300)
    assert "resume: from" in r.stdout, r.stderr
    assert losses(run_dir) == losses(ref)
    assert same(final(run_dir), final(ref))
    _, bf16 = launch(tmp_path, recipe, "trainer.precision=bf16", run="bf16", gpus=1, timeout=300)
    got = losses(bf16)
    assert got[24] < got[2], got
    record("fp16 + scaler across a resume; bf16", "pass", f"scale {state['scaler']['scale']:g}")


def test_compiled_model_trains(tmp_path):
    _, run_dir = launch(tmp_path, write_recipe(tmp_path, base=RECIPE, name="gpu.yaml"), "trainer.compile=true",
                        "trainer.deterministic=false", gpus=1, timeout=300)
    log = (run_dir / "logs" / "rank0.log").read_text()
    m = re.search(r"torch.compile: (\d+) graphs compiled, (\d+) graph breaks", log)
    assert m and int(m.group(1)) >= 1, log[-3000:]
    got = losses(run_dir)
    assert got[24] < got[2], got
    record("torch.compile", "pass", f"{m.group(1)} graphs, {m.group(2)} breaks")


def test_out_of_memory_is_a_report_that_says_what_to_change(tmp_path):
    recipe = write_recipe(tmp_path, "model={_target_: components.AllocatingMLP, step: 3, gib: 1048576}", base=RECIPE,
                          name="gpu.yaml")
    r, _ = launch(tmp_path, recipe, gpus=1, expect=1, timeout=300)
    assert re.search(r"out of memory", r.stderr, re.I) and "batch" in r.stderr, r.stderr[-3000:]
    record("out-of-memory report", "pass", "a real CUDA OOM at step 3")


def _cuda_device_files(pid: int) -> list[str]:
    """/dev/nvidiaN (a GPU) or /dev/kfd (ROCm) that process `pid` holds open: what a CUDA context opens."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if re.fullmatch(r"/dev/nvidia\d+|/dev/kfd", target):
            out.append(target)
    return out


def test_cpu_ranks_on_a_gpu_host_create_no_cuda_context(tmp_path):
    """trainer.device=cpu on a GPU machine: 2 CPU ranks with async checkpoints; no rank (nor a thread of it)
    opens a GPU, from start to end."""
    path = write_recipe(tmp_path, "model.step_sleep=0.05", base=RECIPE, name="cpu.yaml")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "launch"), path, "--gpus", "2", "--run-dir",
                             str(run_dir), "trainer.device=cpu", "checkpoint.async=true",
                             "checkpoint.every_steps=2"], cwd=tmp_path, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    opened: dict[int, list[str]] = {}
    while proc.poll() is None:
        for k in (0, 1):
            log = run_dir / "logs" / f"rank{k}.log"
            for pid in re.findall(r"worker start: .* pid (\d+)", log.read_text() if log.exists() else ""):
                files = _cuda_device_files(int(pid))
                if files:
                    opened[int(pid)] = files
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert not opened, f"CPU ranks opened GPUs: {opened}"
    record("CPU ranks on a GPU host: no CUDA context", "pass", "2 ranks, async saves")


def test_preemption_signal_checkpoints_on_the_gpu_and_resumes_exactly(tmp_path, reference):
    recipe = write_recipe(tmp_path, base=RECIPE, name="gpu.yaml")
    _, run_dir = launch(tmp_path, recipe, gpus=1, timeout=300,
                        env={"USR2_AT_STEP": "9", "USR2_RANK": "0", "LAUNCHER_PREEMPTIBLE": "1"})
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["step"] == 9, marker
    r, _ = launch(tmp_path, recipe, gpus=1, timeout=300)
    assert re.search(r"resume: from \S+step-000000009", r.stdout), r.stderr
    assert same(final(run_dir), final(reference))
    record("preemption: stop, checkpoint, resume", "pass", f"stopped at step {marker['step']}")


def test_a_gpu_checkpoint_exports_in_a_cpu_only_process(tmp_path, reference):
    out = tmp_path / "model.pt"
    env = launch_env(CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([str(Path(sys.executable).parent / "launch"), "ckpt", "export", str(reference / "checkpoints"),
                        str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    exported = torch.load(out, map_location="cpu", weights_only=True)
    want = final(reference)
    assert all(torch.equal(exported[k], want[k].cpu()) for k in want), "exported tensors differ"
    assert all(t.device.type == "cpu" for t in exported.values())
    record("GPU checkpoint exported without a GPU", "pass", f"{len(exported)} tensors")


def test_steps_per_second_against_the_hand_written_loop_on_the_same_gpu():
    gpus()
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_launch.py"), "--repeats", "2", "--steps", "500",
                        "--device", "cuda", "--gpus", "1"], capture_output=True, text=True, timeout=900,
                       env=launch_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"steps/s, .*?GPU ranks\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", r.stdout)
    assert m, r.stdout
    record("steps/s vs hand-written DDP (NCCL both)", "pass", f"{m.group(1)} vs {m.group(2)}: ratio {m.group(3)}")
    print(r.stdout)


def test_sweep_trials_each_get_gpus_of_their_own(tmp_path):
    """Two 1-GPU trials, 2 at a time: on one GPU they run one after the other (never two on one GPU), on two or
    more each on its own GPU; every trial trains on CUDA with NCCL."""
    pytest.importorskip("optuna", reason="launch sweep needs the sweep extra (pip install 'launcher[sweep]')")
    have = gpus()
    recipe = write_recipe(tmp_path, "trainer.max_steps=12", "sweep={metric: train/loss, sampler: grid, parallel: 2, "
                          "params: {optimizer.lr: {type: choice, values: [0.001, 0.003]}}}", base=RECIPE,
                          name="gpu.yaml")
    r = subprocess.run([str(Path(sys.executable).parent / "launch"), "sweep", recipe, "--dir", str(tmp_path / "sw"),
                        "--gpus", "1"], cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())["trials"]
    assert [row["state"] for row in rows] == ["COMPLETE", "COMPLETE"], rows
    placed = re.findall(r"trial (\d) started on GPUs (\S+)", r.stderr)
    assert len(placed) == 2, r.stderr[-3000:]
    for row in rows:
        assert "backend nccl" in (Path(row["run_dir"]) / "logs" / "rank0.log").read_text()
    if have >= 2:
        assert placed[0][1] != placed[1][1], placed  # side by side, each on its own GPU
        figure = f"trials on GPUs {placed[0][1]} and {placed[1][1]} at once"
    else:
        assert "1 GPU holds 1 trial of 1 GPU at once: running 1 at a time" in r.stderr, r.stderr[-3000:]
        figure = "one GPU: one trial at a time"
    record("sweep: a GPU per trial", "pass", figure)


# ----------------------------------------------------------------------------------------------- two GPUs or more

def test_two_ranks_train_with_nccl(tmp_path):
    need(2)
    _, run_dir = launch(tmp_path, write_recipe(tmp_path, base=RECIPE, name="gpu.yaml"), timeout=300)
    for k in (0, 1):
        assert f"device cuda:{k}, backend nccl" in (run_dir / "logs" / f"rank{k}.log").read_text()
    record("2-rank NCCL training", "pass", "cuda:0 + cuda:1")


def test_a_hung_rank_is_named_under_nccl(tmp_path):
    need(2)
    r, run_dir = launch(tmp_path, write_recipe(tmp_path, base=RECIPE, name="gpu.yaml"),
                        "launch.collective_timeout_s=20", env={"HANG_AT_STEP": "5", "HANG_RANK": "1"}, expect=1,
                        timeout=300)
    assert re.search(r"rank 1 did not answer", r.stderr + (run_dir / "logs" / "rank0.log").read_text()), \
        r.stderr[-3000:]
    record("hung rank named under NCCL", "pass", "rank 1, 20 s limit")


def _gpu_of_each_process() -> dict[int, set[str]]:
    """pid -> the GPUs (bus ids) it has a CUDA context on, from nvidia-smi."""
    r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id", "--format=csv,noheader"],
                       capture_output=True, text=True)
    out: dict[int, set[str]] = {}
    for line in r.stdout.splitlines():
        pid, _, bus = line.partition(",")
        if pid.strip().isdigit():
            out.setdefault(int(pid), set()).add(bus.strip())
    return out


def test_async_save_makes_no_context_on_another_ranks_gpu(tmp_path):
    """2 GPU ranks with async checkpoints every 2 steps: each rank's process has a context on its own GPU only
    (the staging and writer threads run on the rank's device, not on GPU 0)."""
    need(2)
    require(subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0,
            "needs nvidia-smi to see which process holds a context on which GPU")
    path = write_recipe(tmp_path, "model.step_sleep=0.05", base=RECIPE, name="two.yaml")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "launch"), path, "--gpus", "2", "--run-dir",
                             str(run_dir), "checkpoint.async=true", "checkpoint.every_steps=2"], cwd=tmp_path,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, set[str]] = {}
    pids: dict[int, int] = {}
    while proc.poll() is None:
        for k in (0, 1):
            log = run_dir / "logs" / f"rank{k}.log"
            found = re.findall(r"worker start: .* pid (\d+)", log.read_text() if log.exists() else "")
            if found:
                pids[k] = int(found[-1])
        for pid, buses in _gpu_of_each_process().items():
            seen.setdefault(pid, set()).update(buses)
        time.sleep(0.2)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert len(pids) == 2, pids
    held = {k: seen.get(pid, set()) for k, pid in pids.items()}
    assert all(len(b) == 1 for b in held.values()) and held[0] != held[1], f"contexts by rank: {held}"
    record("async save: no context on another rank's GPU", "pass", "2 ranks, one GPU each")

"""GPUs, CPUs and the one device decision: driver trees counted from prepared folders (NVIDIA and AMD), the device
decision the plan takes and every rank follows (LAUNCHER_DEVICE), its errors, threads per process and the socket
interfaces of a multi-node run. No GPU needed: the CUDA paths are decided by pure functions fed prepared inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from launcher import dist, hardware, recipe
from launcher.backends import local, rendezvous
from launcher.errors import UsageError

QUICK = str(ROOT / "recipes" / "quickstart.yaml")
BUILD = "torch 9.9.9+cpu (a CPU-only build, in /venv/torch)"


def _amd_tree(root: Path, gpus: dict[int, int], render_nodes: list[int], kfd: bool = True) -> None:
    """A ROCm host as the driver shows it: kfd topology nodes {gpu_id: drm_render_minor} (gpu_id 0: the CPU node),
    /dev/dri/renderD<minor> for `render_nodes`, and /dev/kfd."""
    dev = root / "dev" / "dri"
    dev.mkdir(parents=True)
    if kfd:
        (root / "dev" / "kfd").touch()
    for minor in render_nodes:
        (dev / f"renderD{minor}").touch()
    nodes = root / "sys" / "class" / "kfd" / "kfd" / "topology" / "nodes"
    for i, (gpu_id, minor) in enumerate({0: 0, **gpus}.items()):
        (nodes / str(i)).mkdir(parents=True)
        (nodes / str(i) / "gpu_id").write_text(f"{gpu_id}\n")
        (nodes / str(i) / "properties").write_text(f"cpu_cores_count 0\ndrm_render_minor {minor}\nsimd_count 4\n")


def test_amd_gpus_are_counted_from_kfd_and_narrowed_like_rocm(tmp_path):
    # three GPUs in the topology, but this container was given only two of their render nodes
    _amd_tree(tmp_path, {4660: 128, 22136: 129, 999: 130}, render_nodes=[128, 129])
    root = str(tmp_path)
    assert hardware.amd_gpu_count(root) == 2 and hardware.physical_gpu_count(root) == 2
    assert hardware.visible_gpu_count(root, {}) == 2
    assert hardware.visible_gpu_count(root, {"ROCR_VISIBLE_DEVICES": "1"}) == 1
    assert hardware.visible_gpu_count(root, {"HIP_VISIBLE_DEVICES": "0,1,2,3"}) == 2
    assert hardware.visible_gpu_count(root, {"CUDA_VISIBLE_DEVICES": ""}) == 0  # HIP reads it when HIP_* is unset
    assert hardware.visible_gpu_count(root, {"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": "0,1"}) == 2
    assert hardware.visible_gpu_count(root, {"ROCR_VISIBLE_DEVICES": "GPU-aa,GPU-bb", "HIP_VISIBLE_DEVICES": "0"}) == 1
    assert hardware.visible_gpu_count(root, {"HIP_VISIBLE_DEVICES": "0,-1,1"}) == 1


def test_amd_render_nodes_are_the_fallback_and_need_kfd(tmp_path):
    without_topology = tmp_path / "a"
    (without_topology / "dev" / "dri").mkdir(parents=True)
    (without_topology / "dev" / "kfd").touch()
    for minor in (128, 129, 130):
        (without_topology / "dev" / "dri" / f"renderD{minor}").touch()
    assert hardware.visible_gpu_count(str(without_topology), {}) == 3
    no_kfd = tmp_path / "b"  # render nodes alone (an Intel or virtual GPU) are no ROCm device
    _amd_tree(no_kfd, {4660: 128}, render_nodes=[128], kfd=False)
    assert hardware.visible_gpu_count(str(no_kfd), {}) == 0


def test_nvidia_gpus_are_counted_before_amd_and_narrowed_by_cuda_only(tmp_path):
    _amd_tree(tmp_path, {4660: 128}, render_nodes=[128])
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / "dev" / name).touch()
    root = str(tmp_path)
    assert hardware.physical_gpu_count(root) == 2
    assert hardware.visible_gpu_count(root, {"HIP_VISIBLE_DEVICES": ""}) == 2
    assert hardware.visible_gpu_count(root, {"CUDA_VISIBLE_DEVICES": "1"}) == 1
    assert hardware.visibility_settings({"HIP_VISIBLE_DEVICES": "0", "PATH": "/bin"}) == "HIP_VISIBLE_DEVICES=0"


def _never() -> int:
    raise AssertionError("a CPU decision must not ask torch about GPUs")


def test_ranks_follow_the_plans_device_decision():
    decide = dist.decide_device
    assert decide("auto", "cpu", _never, build=BUILD) == "cpu"  # the plan said cpu: torch's GPUs are not asked
    assert decide("cpu", "cuda", _never, build=BUILD) == "cpu"  # an explicit cpu always wins
    assert decide("auto", "cuda", lambda: 2, build=BUILD, local_rank=1, local_world_size=2) == "cuda"
    assert decide("cuda", "cuda", lambda: 8, build=BUILD) == "cuda"
    # no launcher (a plain `python train.py`): torch decides, as before
    assert decide("auto", None, lambda: 0, build=BUILD) == "cpu"
    assert decide("auto", None, lambda: 1, build=BUILD) == "cuda"


def test_a_torch_that_disagrees_with_the_plan_is_an_error_naming_both_sides():
    with pytest.raises(RuntimeError) as e:
        dist.decide_device("auto", "cuda", lambda: 0, build=BUILD, local_rank=1, local_world_size=4,
                           who="rank 5 on host n2")
    text = str(e.value)
    assert text.startswith("the launcher planned cuda for 4 processes on this node, one per GPU found by the driver")
    assert BUILD in text and "sees no GPU (rank 5 on host n2)" in text
    assert "install a CUDA (or ROCm) build of torch" in text and "trainer.device=cpu" in text
    with pytest.raises(RuntimeError, match=r"sees only 2, none for LOCAL_RANK 3 \(rank 3 on host n1\).*--gpus 2"):
        dist.decide_device("auto", "cuda", lambda: 2, build=BUILD, local_rank=3, local_world_size=4,
                           who="rank 3 on host n1")
    with pytest.raises(RuntimeError, match=r"rank 0 on host n1 asks for cuda but the launcher planned cpu"):
        dist.decide_device("cuda", "cpu", _never, build=BUILD, who="rank 0 on host n1")
    with pytest.raises(RuntimeError, match=r"LAUNCHER_DEVICE='gpu' is neither cuda nor cpu"):
        dist.decide_device("auto", "gpu", _never, build=BUILD)
    with pytest.raises(RuntimeError, match=r"trainer.device is 'cuda' but torch 9.9.9\+cpu .* sees no GPU"):
        dist.decide_device("cuda", None, lambda: 0, build=BUILD)


def test_choose_device_reads_the_plans_decision(monkeypatch):
    """This process's real torch: a cpu plan gives the CPU; a cuda plan for more GPUs than torch sees fails."""
    monkeypatch.setenv("LAUNCHER_DEVICE", "cpu")
    assert dist.choose_device("auto") == torch.device("cpu")
    seen = torch.cuda.device_count()
    monkeypatch.setenv("LAUNCHER_DEVICE", "cuda")
    monkeypatch.setenv("LOCAL_RANK", str(seen))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(seen + 1))
    with pytest.raises(RuntimeError, match=rf"the launcher planned cuda for {seen + 1} process"):
        dist.choose_device("auto")
    build = dist.torch_build()
    assert build.startswith(f"torch {torch.__version__} (") and os.path.dirname(torch.__file__) in build
    assert ("CPU-only" in build) == (torch.version.cuda is None and getattr(torch.version, "hip", None) is None)


def test_the_plan_carries_its_device_decision_to_the_ranks(tmp_path):
    cfg = recipe.load(QUICK).cfg
    p = local.plan(cfg, str(tmp_path), gpus=2)
    assert (p.device, p.dist_backend, p.env["LAUNCHER_DEVICE"]) == ("cuda", "nccl", "cuda")
    p = local.plan(cfg, str(tmp_path), gpus=0)
    assert (p.device, p.dist_backend, p.env["LAUNCHER_DEVICE"]) == ("cpu", "gloo", "cpu")
    p = local.plan(recipe.load(QUICK, ["trainer.device=cpu"]).cfg, str(tmp_path), gpus=2)
    assert (p.device, p.dist_backend, p.env["LAUNCHER_DEVICE"]) == ("cpu", "gloo", "cpu")


def test_run_refuses_a_cuda_plan_this_torch_cannot_drive_before_any_worker(tmp_path, monkeypatch):
    """The plan counted GPUs from the driver's files; this torch sees fewer (none, on a CPU-only build): one usage
    error (exit code 2) before the agent starts, the environment as it was and no fork server left."""
    monkeypatch.delenv("LAUNCHER_DEVICE", raising=False)
    gpus = torch.cuda.device_count() + 2
    p = local.plan(recipe.load(QUICK).cfg, str(tmp_path / "run"), gpus=gpus)
    with pytest.raises(UsageError) as e:
        local.run(p)
    text = str(e.value)
    assert e.value.exit_code == 2
    assert f"the launcher planned cuda for {gpus} processes on this node" in text
    assert f"torch {torch.__version__}" in text and "checked before starting them" in text
    assert text.endswith("; nothing was started")
    assert "LAUNCHER_DEVICE" not in os.environ and not (tmp_path / "run").exists()
    assert not any(k.startswith("TORCH_NCCL") for k in os.environ), "the plan's environment stayed behind"
    from multiprocessing import forkserver
    assert getattr(forkserver._forkserver, "_forkserver_pid", None) is None, "the fork server was left running"


def test_threads_per_process_come_from_the_usable_cpus():
    usable = len(os.sched_getaffinity(0))
    assert hardware.usable_cpu_count({}) == usable
    assert hardware.usable_cpu_count({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert hardware.usable_cpu_count({"SLURM_CPUS_PER_TASK": str(usable + 64)}) == usable  # an upper bound only
    assert hardware.usable_cpu_count({"SLURM_CPUS_PER_TASK": "oops"}) == usable
    assert hardware.threads_per_process(usable + 1, {}) == 1
    assert hardware.threads_per_process(1, {"SLURM_CPUS_PER_TASK": "1"}) == 1


def test_socket_interfaces_towards_the_rendezvous_for_gloo_and_nccl():
    lo = rendezvous.interface_of("127.0.0.1")
    assert lo, "the loopback interface holds 127.0.0.1"
    assert local.socket_interface_env("127.0.0.1", {}) == {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": f"={lo}"}
    assert local.socket_interface_env("127.0.0.1", {"NCCL_SOCKET_IFNAME": "ib"}) == {"GLOO_SOCKET_IFNAME": lo}
    assert local.socket_interface_env("10.1.2.3", {"GLOO_SOCKET_IFNAME": "eth0"},
                                      interface_of=lambda addr: "eth1") == {"NCCL_SOCKET_IFNAME": "=eth1"}
    assert local.socket_interface_env(None, {}) == {}
    assert local.socket_interface_env("10.1.2.3", {}, interface_of=lambda addr: None) == {}


# ----------------------------------------------------------------------------------------------- NCCL timeouts

def test_nccl_runs_get_the_flight_recorder_and_a_later_timeout_than_the_host_side_check(tmp_path, monkeypatch):
    """Under NCCL a hung rank must be named by the host-side check on the gloo side group (every step), which
    waits launch.collective_timeout_s; NCCL's own watchdog waits longer, and its flight recorder dumps into the run
    directory. A CPU plan sets none of it; a user's own setting wins."""
    monkeypatch.delenv("LAUNCHER_PREEMPTIBLE", raising=False)
    cfg = recipe.load(QUICK).cfg
    p = local.plan(cfg, str(tmp_path), gpus=2)
    assert p.env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(p.env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    assert p.env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / "nccl-trace" / "rank_")
    assert not any(k.startswith("TORCH_NCCL") for k in local.plan(cfg, str(tmp_path), gpus=0).env)
    monkeypatch.setenv("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "/scratch/mine_")
    assert "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in local.plan(cfg, str(tmp_path), gpus=2).env
    for limit in (20, 600, 3600):
        assert dist.nccl_timeout_s(limit) >= limit + 30
    assert dist.agree_every_step(torch.device("cuda", 0)) and not dist.agree_every_step(torch.device("cpu"))
    monkeypatch.setenv("LAUNCHER_PREEMPTIBLE", "1")
    assert dist.agree_every_step(torch.device("cpu"))


def test_a_rank_that_nccls_watchdog_aborted_is_reported_as_such(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank1.log").write_text(
        "step 40/100 | loss 1.2\n[rank1]:[E1202 10:00:00] [PG ID 0 PG GUID 0(default_pg) Rank 1] Watchdog caught "
        "collective operation timeout: WorkNCCL(SeqNum=812, OpType=ALLREDUCE, Timeout(ms)=660000) ran for 660012 "
        "milliseconds before timing out.\n")
    (tmp_path / "logs" / "rank0.log").write_text("step 40/100 | loss 1.2\n")
    failures = {r: ProcessFailure(local_rank=r, pid=100 + r, exitcode=-6, error_file=str(tmp_path / "none.json"))
                for r in (0, 1)}
    report = local.failure_report(failures, str(tmp_path), host="n1")
    assert report.count("NCCL's watchdog aborted") == 1, report
    assert "NCCL's watchdog aborted rank 1" in report and str(tmp_path / "nccl-trace") in report, report
    assert "killed by signal SIGABRT" in report

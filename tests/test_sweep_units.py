"""Where local trials run: the slots of a machine's GPUs and CPUs (never two trials on one GPU, each trial its share
of the CPUs, GPUs named as this process's own visibility list names them), and a real trial process that gets its
slot's GPUs and CPUs. The sweeps themselves run in test_sweep.py."""

from __future__ import annotations

import os
import sys
import time

import pytest

from launcher.sweep.trials import LocalTrial, Slot, local_slots


def test_gpus_go_to_trials_whole_and_the_cpus_are_shared_out():
    slots, notes = local_slots(parallel=3, procs=2, gpus=4, cpus=list(range(8)), environ={})
    assert [(s.gpus, s.cpus, s.gpu_var) for s in slots] == [
        (["0", "1"], [0, 1, 2, 3], "CUDA_VISIBLE_DEVICES"), (["2", "3"], [4, 5, 6, 7], "CUDA_VISIBLE_DEVICES")]
    assert notes == ["sweep.parallel=3, but 4 GPUs hold 2 trials of 2 GPUs at once: running 2 at a time"]
    assert slots[1].describe() == "GPUs 2,3 and CPUs 4-7"
    # one GPU per trial on 8 GPUs, 4 at a time: no GPU in two slots
    slots, notes = local_slots(parallel=4, procs=1, gpus=8, cpus=list(range(16)), environ={})
    assert [s.gpus for s in slots] == [["0"], ["1"], ["2"], ["3"]] and notes == []
    assert [len(s.cpus) for s in slots] == [4, 4, 4, 4]


def test_a_narrowed_process_hands_on_its_own_gpu_names():
    # SLURM gave us GPUs 2 and 5 (a child's "0" would be physical GPU 0, not ours), or MIG/UUID names
    for ours, expect in (("2,5", [["2"], ["5"]]), ("GPU-aa11,GPU-bb22", [["GPU-aa11"], ["GPU-bb22"]]),
                         ("MIG-1,MIG-2,-1,MIG-3", [["MIG-1"], ["MIG-2"]])):  # the runtimes stop at "-1"
        slots, _ = local_slots(parallel=4, procs=1, gpus=2, cpus=[0, 1], environ={"CUDA_VISIBLE_DEVICES": ours})
        assert [s.gpus for s in slots] == expect, ours
    # ROCm narrowed by HIP_VISIBLE_DEVICES: the child's list goes there (this machine has no NVIDIA driver)
    slots, _ = local_slots(parallel=2, procs=1, gpus=2, cpus=[0, 1], environ={"HIP_VISIBLE_DEVICES": "1,3"})
    assert [(s.gpus, s.gpu_var) for s in slots] == [(["1"], "HIP_VISIBLE_DEVICES"), (["3"], "HIP_VISIBLE_DEVICES")]


def test_too_few_gpus_or_cpus_are_said():
    slots, notes = local_slots(parallel=2, procs=2, gpus=1, cpus=[0, 1], environ={})
    assert slots == [] and notes == ["a trial needs 2 GPUs and 1 are visible"]
    slots, notes = local_slots(parallel=3, procs=1, gpus=0, cpus=[0, 1], environ={})
    assert [s.cpus for s in slots] == [[0], [1], [0]]
    assert notes == ["sweep.parallel=3 trials share 2 CPUs: trials share CPUs"]
    slots, _ = local_slots(parallel=2, procs=4, gpus=0, cpus=[0, 1, 2, 3, 6], environ={})
    assert [s.cpus for s in slots] == [[0, 1], [2, 3]] and slots[0].describe() == "CPUs 0-1"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_a_trial_process_runs_on_its_slots_gpus_and_cpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa11,GPU-bb22")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the controller's own: the trial's launch sets its own
    cpus = sorted(os.sched_getaffinity(0))[-1:]
    slot = Slot(1, ["GPU-bb22"], cpus)
    show = ("import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'), ','.join(map(str, sorted("
            f"os.sched_getaffinity(0)))), os.environ.get('OMP_NUM_THREADS'), os.getsid(0) != {os.getsid(0)})")
    trial = LocalTrial(0, str(tmp_path / "trial-0000"), [sys.executable, "-c", show], slot)
    deadline = time.time() + 30
    while trial.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert trial.poll() == 0
    said = (tmp_path / "trial-0000" / "sweep-launch.log").read_text().split()
    assert said == ["GPU-bb22", ",".join(map(str, cpus)), "None", "True"], said  # a session of its own

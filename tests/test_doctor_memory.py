"""`launch doctor --only memory,batch_size` with the real command and 2 gloo ranks: a healthy recipe passes both
with plausible figures; a model that keeps its outputs with their graph fails memory, naming the growth per step;
a memory budget too small for the recipe's batch fails batch_size, naming a smaller batch and the accumulation that
keeps the effective batch; so does one that is too small on one rank only, and both ranks agree on the size."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import launch_env, run_launch, write_recipe

MB = 2**20
WIDE = "model={_target_: components.WideActivations}"  # megabytes of activations per sample


def doctor(tmp_path: Path, recipe: str, *args: str, expect: int = 0,
           only: str = "memory,batch_size") -> tuple[subprocess.CompletedProcess, dict]:
    """`launch doctor RECIPE --gpus 2 --only ONLY ARGS`; its exit status must be `expect`; doctor.json's results by
    check."""
    run = tmp_path / "run"
    r = run_launch("doctor", recipe, "--gpus", "2", "--run-dir", str(run), "--only", only, *args, cwd=tmp_path,
                   env=launch_env(), timeout=240)
    assert r.returncode == expect, f"exit {r.returncode}, expected {expect}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r, {d["check"]: d for d in json.loads((run / "doctor.json").read_text())["results"]}


def verdicts(tmp_path: Path) -> list[str]:
    """Each rank's own log line of its verdicts (before rank 0 merged them)."""
    logs = sorted((tmp_path / "run" / "doctor" / "logs").glob("rank*.log"))
    assert len(logs) == 2, logs
    return [re.search(r"doctor memory: ((?:memory|batch_size) .*)", p.read_text()).group(1) for p in logs]


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict:
    """The wide model's figures without a budget, per rank: what the planted budgets are made from."""
    where = tmp_path_factory.mktemp("wide")
    _, results = doctor(where, write_recipe(where, WIDE), only="batch_size")
    b = results["batch_size"]
    assert b["status"] == "pass", b
    return {"fixed": max(r["fixed_mb"] for r in b["details"]["ranks"]),
            "per_sample": max(r["per_sample_mb"] for r in b["details"]["ranks"])}


def test_a_healthy_recipe_passes_both_with_plausible_figures(tmp_path):
    r, results = doctor(tmp_path, write_recipe(tmp_path))
    mem, size = results["memory"], results["batch_size"]
    assert mem["status"] == "pass" and size["status"] == "pass", r.stdout
    d = mem["details"]
    params = (32 * 16 + 16 + 16 * 4 + 4) * 4  # BASE's 32-16-4 MLP in fp32
    assert d["parameters_mb"] * MB == params and d["gradients_mb"] * MB == params
    assert d["optimizer_state_mb"] * MB >= 2 * params  # AdamW: two moments (and a step count) per parameter
    assert 50 < d["fixed_mb"] < 4096  # the process: torch and the runtime, the model, its optimizer state
    per_sample = d["per_sample_mb"] * MB
    assert 100 < per_sample < 20_000, per_sample  # its inputs and activations: about a hundred floats a sample
    assert abs(d["growth_mb_per_step"]) * MB < 0.001 * per_sample * d["growth_batch"]  # no growth
    for rank in d["ranks"]:
        batches = [b for b, _ in rank["points"]]
        peaks = [p for _, p in rank["points"]]
        assert len(batches) >= 2 and peaks == sorted(peaks), rank  # more memory for larger batches
    # batch size: a rank's whole share of the 256 samples fits easily in the machine's memory per rank
    assert size["details"]["largest"] == 128 and size["details"]["confirmed"], size
    assert "largest batch per rank 128 (recipe 16" in size["figure"] and "MB/sample" in size["figure"]
    assert size["details"]["ranks"][0]["budget_from"].endswith("/ 2 ranks")
    for check in ("memory", "batch_size"):
        assert check in r.stdout  # the table


def test_an_output_kept_with_its_graph_fails_memory_naming_the_growth_per_step(tmp_path):
    recipe = write_recipe(tmp_path, "model={_target_: components.KeepsOutputMLP}")
    _, results = doctor(tmp_path, recipe, expect=1)
    mem = results["memory"]
    assert mem["status"] == "fail", mem
    assert re.search(r"grows [\d.]+ MB/step at batch \d+", mem["figure"]) and "every rank" in mem["figure"], mem
    assert "loss.item()" in mem["advice"] and "loss.detach()" in mem["advice"]
    d = mem["details"]
    kept = d["growth_mb_per_step"] * MB / d["growth_batch"]
    assert 12 < kept < 32, kept  # what it keeps: 4 fp32 outputs a sample, every step
    assert d["kept"] == {"output": [0, 1]} and "the model's output of 20 of 20 steps outlives" in mem["figure"], d
    assert results["batch_size"]["status"] == "pass"


@pytest.mark.parametrize("loss", ["HistoryLoss", "RunningLoss"])
def test_a_scalar_loss_kept_with_its_graph_fails_memory_though_memory_barely_grows(tmp_path, loss):
    # history.append(loss) / total += loss in the loss function: backward freed the activations, so what each step
    # keeps is a scalar and its graph's nodes, far under what the memory figures can tell from noise
    recipe = write_recipe(tmp_path, f"loss={{_target_: components.{loss}}}")
    _, results = doctor(tmp_path, recipe, expect=1, only="memory")
    mem = results["memory"]
    assert mem["status"] == "fail", mem
    assert re.search(r"the loss of (\d+) of 20 steps outlives its step, with its autograd graph, on every rank",
                     mem["figure"]), mem
    assert "grows" in mem["figure"] and "history.append(loss)" in mem["advice"], mem
    assert "loss.item()" in mem["advice"] and "loss.detach()" in mem["advice"], mem
    assert mem["details"]["kept"] == {"loss": [0, 1]}, mem["details"]
    for rank in mem["details"]["ranks"]:
        kept = rank["kept"]["loss"]
        assert kept["steps"] >= 19 and kept["with_graph"] == kept["steps"], rank  # every watched step's graph
        assert kept["bytes"] == (4 * kept["steps"] if loss == "HistoryLoss" else 0), rank  # the sum keeps graphs only
        assert rank["kept"]["output"]["steps"] == 0, rank
        assert abs(rank["growth_mb_per_step"]) * MB < 64 * 1024, rank  # memory alone could not have told


def test_a_model_that_keeps_only_its_last_output_passes_memory(tmp_path):
    recipe = write_recipe(tmp_path, "model={_target_: components.LastOutputMLP}")
    _, results = doctor(tmp_path, recipe, only="memory")
    mem = results["memory"]
    assert mem["status"] == "pass" and mem["details"]["kept"] == {}, mem
    for rank in mem["details"]["ranks"]:
        assert rank["kept"]["output"]["steps"] == 1 and rank["kept"]["loss"]["steps"] == 0, rank


def test_a_budget_too_small_for_the_batch_fails_naming_a_smaller_batch_and_the_accumulation(tmp_path, wide):
    budget = wide["fixed"] + 6 * wide["per_sample"]  # room for about 6 of the recipe's 16 samples per rank
    recipe = write_recipe(tmp_path, WIDE)
    r, results = doctor(tmp_path, recipe, "--memory-budget", f"{budget:.0f}M", expect=1)
    size = results["batch_size"]
    assert size["status"] == "fail", size
    largest = size["details"]["largest"]
    assert 2 <= largest < 16 and size["details"]["confirmed"], size
    batch = _divisor(largest)
    assert f"data.batch_size={batch} trainer.grad_accum_steps={16 // batch}" in size["advice"], size
    assert "effective batch of 32" in size["advice"] and f"--memory-budget {budget:.0f}M" in size["advice"]
    assert f"largest batch per rank {largest} (recipe 16)" in size["figure"]
    for rank in size["details"]["ranks"]:  # the step it confirmed with stayed within the budget
        assert any(b == largest and peak <= budget for b, peak in rank["points"]), rank
    assert results["memory"]["status"] == "pass", results["memory"]
    assert "batch_size" in r.stdout and "grad_accum_steps" in r.stdout


def test_a_budget_too_small_on_one_rank_only_lowers_the_batch_for_both(tmp_path, wide):
    s = wide["per_sample"]
    budget = wide["fixed"] + 28 * s  # rank 0 fits about 28 samples, more than the recipe's 16
    ballast = round(20 * s)  # rank 1 holds 20 samples' worth more: about 8 fit there
    recipe = write_recipe(tmp_path, f"model={{_target_: components.WideActivations, ballast_mb: {ballast}, "
                                    f"ballast_rank: 1}}")
    _, results = doctor(tmp_path, recipe, "--memory-budget", f"{budget:.0f}M", expect=1)
    size = results["batch_size"]
    assert size["status"] == "fail", size
    rank0, rank1 = size["details"]["ranks"]
    assert rank0["fits"] >= 16 > rank1["fits"], size  # on its own rank 0 would take the recipe's batch
    largest = size["details"]["largest"]
    assert 2 <= largest <= rank1["fits"], size  # the ranks agreed on what fits on rank 1
    assert "on rank 1 (rank 0 fits" in size["advice"], size
    assert f"data.batch_size={_divisor(largest)} trainer.grad_accum_steps={16 // _divisor(largest)}" in \
        size["advice"], size
    first, second = verdicts(tmp_path)
    assert first == second and f"batch_size fail: largest batch per rank {largest} " in first, (first, second)


def test_a_measured_step_wins_over_the_fitted_line_in_what_a_rank_fits():
    from launcher.doctor.memory import _Rank

    # peaks 100 + 10 per sample, with batch 8 measured a little low: the line through them predicts 7 in 182,
    # but a step at 8 was measured within the budget, so 8 fits (and the ranks' details agree with the search)
    r = _Rank(rest=100, budget=182, budget_from="--memory-budget", share=64, room_now=None,
              points=[(1, 110), (2, 120), (4, 140), (8, 176), (16, 290)])
    fixed, per_sample = r.fit()
    assert int((182 - fixed) // per_sample) == 7  # the line alone
    assert r.fits(64, 1.0) == 8
    # a size measured over the budget does not fit, nor does anything above it, whatever the line says
    r = _Rank(rest=100, budget=200, budget_from="--memory-budget", share=64, room_now=None,
              points=[(1, 110), (2, 120), (4, 140), (8, 201)])
    assert r.fits(64, 1.0) == 7 and r.fits(4, 1.0) == 4
    r.points.append((6, 205))
    assert r.fits(64, 1.0) == 5
    # no room at all for one sample: nothing fits
    r = _Rank(rest=100, budget=105, budget_from="--memory-budget", share=64, room_now=None,
              points=[(1, 110), (2, 120)])
    assert r.fits(64, 1.0) == 0


def _divisor(largest: int) -> int:
    """The batch the advice names: the largest that fits and divides the recipe's 16 (the effective batch stays)."""
    return max(b for b in (1, 2, 4, 8) if b <= largest)


def test_an_error_or_an_out_of_memory_on_one_rank_is_agreed_by_both(tmp_path):
    # forward call 3 (the second batch size tried) raises on rank 1 only: both ranks fail, naming it, no hang
    recipe = write_recipe(tmp_path, "model={_target_: components.FailingMLP, step: 3, rank: 1}")
    _, results = doctor(tmp_path, recipe, expect=1)
    for check in ("memory", "batch_size"):
        assert results[check]["status"] == "fail" and "raised on rank 1" in results[check]["figure"], results
        assert "injected failure at step 3" in results[check]["advice"]
    # the same call runs out of memory instead: that batch size is too large for both, and the search goes on
    recipe = write_recipe(tmp_path, "model={_target_: components.OOMMLP, step: 3, rank: 1}")
    _, results = doctor(tmp_path, recipe)
    size = results["batch_size"]
    rank0, rank1 = size["details"]["ranks"]
    too_big = 64  # the size tried after the recipe's 16
    assert too_big not in [b for b, _ in rank0["points"]] + [b for b, _ in rank1["points"]], size
    assert 16 <= size["details"]["largest"] < too_big, size
    first, second = verdicts(tmp_path)
    assert first == second, (first, second)


def test_budget_sizes_and_the_slurm_allocation_per_node():
    from launcher.doctor.memory import node_memory, parse_size
    assert parse_size("8G") == parse_size("8GiB") == parse_size("8gb") == 8 * 2**30
    assert parse_size("512M") == parse_size("512") == 512 * MB  # a plain number is megabytes, as for SLURM
    assert parse_size("1.5T") == int(1.5 * 2**40)
    with pytest.raises(ValueError, match="like 8G"):
        parse_size("8X")
    machine, _ = node_memory({})
    assert node_memory({"SLURM_MEM_PER_NODE": "1024"}) == (1024 * MB, "the SLURM allocation (SLURM_MEM_PER_NODE)")
    assert node_memory({"SLURM_MEM_PER_CPU": "512", "SLURM_CPUS_ON_NODE": "4"})[0] == 2048 * MB
    assert node_memory({"SLURM_MEM_PER_NODE": str(2**40)})[0] == machine  # more than the machine has: the machine's

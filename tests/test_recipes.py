"""Every shipped recipe validates, documents its launch command, and trains a few steps with 2 processes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT, checkpoint_params, run_launch
from launcher import recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# Recipes that start from another's checkpoint; test_finetune_recipe trains them after their predecessor.
FOLLOW_UPS = {"digits_finetune"}


def test_the_promised_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "digits", "charlm", "own_script", "digits_finetune"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_names_its_command(path: Path, tmp_path):
    # a follow-up's init_from names its predecessor's checkpoints, which exist only once that has run
    loaded = recipe.load(str(path), [f"finetune.init_from={tmp_path}"] if path.stem in FOLLOW_UPS else [])
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"launch recipes/{path.name}" in line for line in header), "header must show the launch command"
    assert loaded.cfg.run.name == path.stem


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem not in FOLLOW_UPS], ids=lambda p: p.stem)
def test_recipe_trains_a_few_steps_with_two_processes(path: Path, tmp_path):
    overrides = [] if recipe.load(str(path)).is_script else ["trainer.max_steps=3", "trainer.log_every_steps=1"]
    r = run_launch(str(path), "--nodes", "1", "--gpus", "2", *overrides, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / path.stem
    assert (run_dir / "logs" / "rank1.log").exists()
    if overrides:
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)  # finite, positive


def test_finetune_recipe_starts_from_the_digits_model_with_its_backbone_frozen(tmp_path):
    pre = run_launch(str(ROOT / "recipes/digits.yaml"), "--gpus", "2", "trainer.max_steps=3", cwd=tmp_path)
    assert pre.returncode == 0, pre.stderr[-3000:]
    r = run_launch(str(ROOT / "recipes/digits_finetune.yaml"), "--gpus", "2", "trainer.max_epochs=null",
                   "trainer.max_steps=4", "checkpoint.every_steps=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert re.search(r"initialised from \S+runs/digits/checkpoints/step-000000003 \(step 3\): 14 tensors loaded",
                     out), out
    assert "head.weight [2, 512] in the model, [10, 512] in the source" in out
    assert re.search(r"backbone +0 +4,896\n +head +1,026 +0", out), out
    ckpts = tmp_path / "runs"
    pretrained = checkpoint_params(ckpts / "digits/checkpoints/step-000000003")
    early = checkpoint_params(ckpts / "digits_finetune/checkpoints/step-000000002")
    late = checkpoint_params(ckpts / "digits_finetune/checkpoints/step-000000004")
    for k, v in late.items():
        if k.startswith("backbone.") and not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(v, pretrained[k]) and torch.equal(early[k], pretrained[k]), f"frozen {k} changed"
    assert not torch.equal(early["head.weight"], late["head.weight"]), "the head did not train"

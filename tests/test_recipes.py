"""Every shipped recipe validates, documents its launch command, and trains a few steps with 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_launch
from launcher import recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_the_promised_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "digits", "charlm", "own_script"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_names_its_command(path: Path):
    loaded = recipe.load(str(path))
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"launch recipes/{path.name}" in line for line in header), "header must show the launch command"
    assert loaded.cfg.run.name == path.stem


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
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

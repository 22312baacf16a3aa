"""What the launcher writes and prints from a recipe: a secret given as `${oc.env:NAME}` stays a reference in every
file of the run directory, every log and the W&B run (the ranks resolve it), passwords in URLs are redacted in what
is printed or sent, and a value that reaches a generated sbatch script cannot end its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import launch_env, run_launch

SECRET = "tok-5f2c9e71d04b"  # the fake credential; it must appear nowhere the launcher writes
PASSWORD = "hunter2-a81f"

RECIPE = """\
seed: 0
model: {_target_: launcher.zoo.models.MLP, in_features: 32, hidden: 16, out_features: 4}
data:
  train: {_target_: components.TokenDataset, token: "${oc.env:FAKE_TOKEN}", num_samples: 128}
  val: {_target_: components.TokenDataset, token: "${data.train.token}", num_samples: 32, seed: 1}
  batch_size: 16
  num_workers: 1
trainer: {max_steps: 4, log_every_steps: 2, val_every_steps: 4, val_every_epochs: null}
"""


def files_holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_a_secret_given_by_reference_is_written_nowhere_and_still_reaches_the_ranks(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    run_dir = tmp_path / "run"
    url = f"data.train.url=http://alice:{PASSWORD}@127.0.0.1:9/data"
    args = ("r.yaml", "--gpus", "2", "--run-dir", str(run_dir), url, "logging.wandb=true",
            "logging.wandb_mode=offline", "logging.wandb_project=tests")
    env = launch_env(FAKE_TOKEN=SECRET, EXPECTED_TOKEN=SECRET, WANDB_SILENT="true")

    dry = run_launch(*args, "--dry-run", cwd=tmp_path, env=env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert SECRET not in dry.stdout + dry.stderr and PASSWORD not in dry.stdout + dry.stderr
    assert "token: ${oc.env:FAKE_TOKEN}" in dry.stdout and "http://alice:***@127.0.0.1:9/data" in dry.stdout

    r = run_launch(*args, cwd=tmp_path, env=env)
    # TokenDataset raises unless each rank got the secret's value: the ranks resolved the reference themselves
    assert r.returncode == 0, r.stderr[-3000:]
    assert "validation at step 4" in r.stdout
    assert SECRET not in r.stdout + r.stderr
    assert files_holding(run_dir, SECRET) == [], "the secret's value was written into the run directory"
    config = (run_dir / "config.yaml").read_text()
    assert "${oc.env:FAKE_TOKEN}" in config and "${data.train.token}" in config

    wandb_files = list((run_dir / "wandb").rglob("run-*.wandb"))
    assert wandb_files and all(b"${oc.env:FAKE_TOKEN}" in p.read_bytes() for p in wandb_files), \
        "W&B gets the recipe with the reference in it"
    # a password written into the recipe itself stays in config.yaml, which the ranks read, and nowhere else
    assert PASSWORD not in r.stdout + r.stderr
    assert files_holding(run_dir, PASSWORD) == [str(run_dir / "config.yaml")]


def test_an_unset_reference_is_a_recipe_error_naming_it(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    r = run_launch("r.yaml", "--dry-run", cwd=tmp_path, env=launch_env())
    assert r.returncode == 2 and "FAKE_TOKEN" in r.stderr, r.stderr


BASE = """\
model: {_target_: launcher.zoo.models.MLP}
data: {train: {_target_: launcher.zoo.datasets.SyntheticClassification}}
trainer: {max_steps: 2}
"""


@pytest.mark.parametrize("override, key", [
    ('run.name="a\\ntouch x"', "run.name"),
    ('slurm.partition="gpu\\n#SBATCH --wrap=x"', "slurm.partition"),
    ("slurm.setup=[\"module load a\\nrm -rf x\"]", "slurm.setup[0]"),
    ("slurm.extra_sbatch={mail-type: \"END\\r\"}", "slurm.extra_sbatch.mail-type"),
    ("slurm.extra_sbatch={\"gres\\ntouch x\": 1}", "slurm.extra_sbatch"),
    ("slurm.extra_sbatch={\"Wrap x\": 1}", "slurm.extra_sbatch"),
])
def test_a_value_that_would_leave_its_sbatch_line_is_refused(tmp_path, override, key):
    (tmp_path / "r.yaml").write_text(BASE)
    for flag in ("--slurm", "--emit-sbatch"):
        r = run_launch("r.yaml", flag, "--dry-run", "trainer.device=cpu", override, cwd=tmp_path)
        assert r.returncode == 2, (flag, r.stdout, r.stderr)
        assert key in r.stderr and "nothing was started" in r.stderr, r.stderr
        assert "#!/bin/bash" not in r.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_run_dir_with_a_line_break_is_refused_and_plain_odd_values_are_quoted(tmp_path):
    (tmp_path / "r.yaml").write_text(BASE)
    bad = run_launch("r.yaml", "--slurm", "--dry-run", "--run-dir", str(tmp_path / "a\nb"), cwd=tmp_path)
    assert bad.returncode == 2 and "--run-dir holds a newline" in bad.stderr, bad.stderr
    ok = run_launch("r.yaml", "--emit-sbatch", "trainer.device=cpu", "slurm.constraint=a b'c", "run.name=my run",
                    cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert "#SBATCH --constraint='a b'\"'\"'c'" in lines and "#SBATCH --job-name='launch-my run'" in lines

"""Monitoring with the real `launch` command on 2 gloo ranks: TensorBoard event files read back, a W&B run
(offline, no network) that keeps its id across a resume, and rank 0's console: a progress bar on a terminal,
plain lines otherwise."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from pathlib import Path

from conftest import LAUNCH, launch, launch_env, write_recipe

# conftest.BASE with these changes
RECIPE = ("seed=0", "model={_target_: launcher.zoo.models.MLP, in_features: 32, hidden: 32, out_features: 4}",
          "data.val={_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 100, seed: 1}",
          "data.num_workers=1", "checkpoint={every_steps: 4}",
          "trainer={max_steps: 8, log_every_steps: 2, val_every_steps: 4, val_every_epochs: null}")

SCALARS = {"train/loss", "train/lr", "train/epoch", "train/grad_norm", "perf/samples_per_s", "perf/step_time_s",
           "perf/data_wait_s", "perf/peak_memory_gib", "checkpoint/save_s", "val/loss", "val/accuracy"}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_steps(run_dir: Path, tag: str) -> list[int]:
    """Every step logged for `tag` in every event file, as written (TensorBoard's purge not applied)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    steps = []
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_tensorboard_has_every_metric_and_wandb_keeps_one_run_across_a_resume(tmp_path):
    recipe = write_recipe(tmp_path, *RECIPE, name="m.yaml")
    args = ("logging.wandb=true", "logging.wandb_mode=offline", "logging.wandb_project=tests",
            "model._target_=components.KillableMLP")
    # rank 1 dies in step 7 (its 11th forward: validation at step 4 made 4): step 6 was logged, the newest
    # checkpoint is step 4
    env = {"WANDB_SILENT": "true", "KILL_AT_STEP": "11", "KILL_RANK": "1", "KILL_MARKER": str(tmp_path / "killed")}
    _, run_dir = launch(tmp_path, recipe, *args, env=env, expect=1)
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    second, _ = launch(tmp_path, recipe, *args, env=env)
    assert "step-000000004: step 4" in second.stdout and f"(id {run_id}, offline mode)" in second.stdout
    # not a terminal: plain progress lines, no bar
    assert re.search(r"^step 6/8 \| epoch 0 \| loss \d\.\d{4} \| lr 0\.001 \| \d+ samples/s$", second.stdout, re.M)
    assert "\r" not in second.stdout

    assert raw_steps(run_dir, "train/loss") == [2, 4, 6, 6, 8], "step 6 is logged by both attempts"
    seen = scalars(run_dir)
    assert SCALARS <= set(seen), f"missing: {SCALARS - set(seen)}"
    assert [s for s, _ in seen["train/loss"]] == [2, 4, 6, 8], "the resumed run hides what the first logged after 4"
    assert [s for s, _ in seen["val/loss"]] == [4, 8]
    assert [s for s, _ in seen["checkpoint/save_s"]] == [4, 8] and all(v > 0 for _, v in seen["checkpoint/save_s"])
    assert all(v > 0 for _, v in seen["train/grad_norm"] + seen["perf/peak_memory_gib"] + seen["perf/step_time_s"])
    assert all(v >= 0 for _, v in seen["perf/data_wait_s"])

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) or r.name.endswith(f"{run_id}-1") for r in runs), runs
    for r in runs:
        data = (r / f"run-{run_id}.wandb").read_bytes()
        assert b"train/loss" in data, f"{r} holds no metrics"
    assert b"val/accuracy" in (runs[-1] / f"run-{run_id}.wandb").read_bytes()


def test_progress_bar_on_a_terminal(tmp_path):
    recipe = write_recipe(tmp_path, *RECIPE, name="m.yaml")
    main, child = pty.openpty()
    proc = subprocess.Popen([LAUNCH, recipe, "--gpus", "2", "--run-dir", str(tmp_path / "run"),
                             "logging.tensorboard=false"], cwd=tmp_path, env=launch_env(), stdin=child,
                            stdout=child, stderr=child)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closed: every process writing to it has exited
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")[-3000:]
    os.close(main)
    text = out.decode(errors="replace")
    assert re.search(r"\r\x1b\[2Kstep 8/8 \[#{20}\] 100% \| loss \d\.\d{4} \| \d+ samples/s \| ETA 0m00s", text), text
    assert not re.search(r"^step \d+/8 \| epoch", text, re.M), "a terminal gets the bar, not progress lines"
    assert "validation at step 4" in text  # messages still appear, the bar is redrawn below them

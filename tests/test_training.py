"""Training features with the real `launch` command on 2 gloo ranks: gradient accumulation, mixed precision,
validation with exact reduction, best-k checkpoints and early stopping."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from conftest import checkpoint_params, launch, run_launch, write_recipe

# conftest.BASE with these changes
RECIPE = ("seed=2", "model={_target_: launcher.zoo.models.MLP, in_features: 32, hidden: 32, out_features: 4}",
          "data.train.num_samples=512", "data.shuffle=true", "optimizer={_target_: torch.optim.SGD, lr: 0.1}")


def final(tmp_path: Path, run: str, step: int = 12) -> dict[str, torch.Tensor]:
    return checkpoint_params(tmp_path / run / "checkpoints" / f"step-{step:09d}")


def losses(tmp_path: Path, run: str) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_accumulating_two_micro_batches_equals_one_batch_twice_the_size(tmp_path):
    # Each rank's two consecutive 16-sample micro-batches are exactly the 32 samples of the 32-sample batch.
    recipe = write_recipe(tmp_path, *RECIPE)
    launch(tmp_path, recipe, "data.batch_size=32", run="big")
    acc, _ = launch(tmp_path, recipe, "trainer.grad_accum_steps=2", run="acc")
    assert "effective batch 64 (16 per rank x 2 ranks x 2 accumulation steps), precision fp32" in acc.stdout
    a, b = final(tmp_path, "acc"), final(tmp_path, "big")
    for k in b:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), f"{k} differs by {(a[k] - b[k]).abs().max():.3g}"
    la, lb = losses(tmp_path, "acc"), losses(tmp_path, "big")
    assert sorted(la) == list(range(1, 13)) and all(abs(la[s] - lb[s]) < 1e-5 for s in la)


def test_uneven_last_group_of_an_epoch_steps_on_a_true_mean(tmp_path):
    # 512 samples / (16 x 2 ranks) = 16 micro-batches per epoch; accumulating 3 leaves a last group of 1, whose
    # loss (and gradient) is divided by 1, not by 3
    launch(tmp_path, write_recipe(tmp_path, *RECIPE), "trainer.grad_accum_steps=3", "trainer.max_steps=null",
           "trainer.max_epochs=1", "checkpoint.every_steps=null")
    got = losses(tmp_path, "run")
    assert sorted(got) == list(range(1, 7))  # 5 full groups and the last micro-batch
    assert 0.5 < got[6] / got[5] < 2, got


def test_bf16_trains_and_fp16_resumes_exactly_with_its_scaler(tmp_path):
    recipe = write_recipe(tmp_path, *RECIPE)
    launch(tmp_path, recipe, "trainer.precision=bf16", run="bf16")
    got = losses(tmp_path, "bf16")
    assert got[12] < got[1], "bf16 did not learn"
    _, ref = launch(tmp_path, recipe, "trainer.precision=fp16", run="ref")
    state = json.loads((ref / "checkpoints" / "step-000000012" / "train_state.json").read_text())
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    launch(tmp_path, recipe, "trainer.precision=fp16", "trainer.max_steps=6")
    r, _ = launch(tmp_path, recipe, "trainer.precision=fp16")
    assert "resume: from" in r.stdout, r.stderr
    assert losses(tmp_path, "run") == losses(tmp_path, "ref")
    a, b = final(tmp_path, "run"), final(tmp_path, "ref")
    assert all(torch.equal(a[k], b[k]) for k in b)


VAL = "data.val={_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 203, seed: 9}"


def test_validation_metrics_are_exact_over_uneven_shards(tmp_path):
    # 203 samples over 2 ranks (102 + 101) in batches of 16: uneven shards and uneven last batches, no padding
    r, run_dir = launch(tmp_path, write_recipe(tmp_path, *RECIPE, VAL, name="val.yaml"), "trainer.val_every_steps=12",
                        "trainer.val_every_epochs=null")
    rows = [json.loads(ln) for ln in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [12] and rows[0]["samples"] == 203
    assert re.search(r"validation at step 12: val/loss \d\.\d{4}, val/accuracy \d\.\d{4} \(203 samples\)", r.stdout)
    params = final(tmp_path, "run")
    from launcher.zoo.datasets import SyntheticClassification
    from launcher.zoo.models import MLP
    model = MLP(in_features=32, hidden=32, out_features=4)
    model.load_state_dict(params)
    data = SyntheticClassification(num_samples=203, seed=9)
    x = torch.stack([data[i][0] for i in range(203)])
    y = torch.tensor([int(data[i][1]) for i in range(203)])
    with torch.no_grad():
        out = model.eval()(x)
    assert abs(rows[0]["val/loss"] - torch.nn.functional.cross_entropy(out, y).item()) < 1e-5
    assert abs(rows[0]["val/accuracy"] - (out.argmax(1) == y).sum().item() / 203) < 1e-12


def test_best_checkpoints_are_kept_and_early_stopping_ends_the_run(tmp_path):
    # monitor_mode=max on a falling loss: only the first validation is ever the best, so with patience 2 the run
    # stops at the third validation (step 6); retention keeps the newest (6) and the best (2)
    r, run_dir = launch(tmp_path, write_recipe(tmp_path, *RECIPE, VAL, name="val.yaml"), "trainer.max_steps=40",
                        "trainer.val_every_steps=2", "trainer.monitor_mode=max", "trainer.early_stop_patience=2",
                        "checkpoint.every_steps=null", "checkpoint.keep=1", "checkpoint.keep_best=1")
    assert re.search(r"early stopping at step 6: val/loss has not improved for 2 validations \(best \d\.\d{4} at "
                     r"step 2\)", r.stdout + r.stderr), r.stdout + r.stderr
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["step-000000002", "step-000000006"], kept
    manifest = json.loads((run_dir / "checkpoints" / "step-000000002" / "manifest.json").read_text())
    assert set(manifest["metrics"]) == {"val/loss", "val/accuracy"}
    assert max(losses(tmp_path, "run")) == 6


def test_out_of_memory_is_reported_with_advice_and_the_checkpoint_kept(tmp_path):
    recipe = write_recipe(tmp_path, *RECIPE, "model={_target_: components.OOMMLP, step: 3, rank: 1}",
                          "checkpoint.every_steps=2", name="oom.yaml")
    r, run_dir = launch(tmp_path, recipe, expect=1)
    assert re.search(r"out of memory at step 3 on rank 1 with a batch of 16 per rank \(x 1 accumulation steps, "
                     r"precision fp32\); peak process RSS \d+\.\d\d GiB\. Try data\.batch_size=8 "
                     r"trainer\.grad_accum_steps=2 \(same effective batch\) or trainer\.precision=bf16; the last "
                     r"committed checkpoint \(step 2\) is intact", r.stderr), r.stderr
    listing = run_launch("ckpt", "ls", str(run_dir / "checkpoints"), cwd=tmp_path).stdout
    assert re.search(r"^ +2 .*committed, latest$", listing, re.M), listing


def test_frozen_layers_stay_put_and_the_head_learns_at_its_own_rate(tmp_path):
    r, _ = launch(tmp_path, write_recipe(tmp_path, *RECIPE), "trainer.max_steps=6", "checkpoint.every_steps=2",
                  "finetune.freeze=[body.*]", "finetune.lr_groups={head.*: 0.05}")
    assert re.search(r"body +0 +2,112\n +head +132 +0", r.stdout), r.stdout
    assert "optimizer group head.*: lr 0.05, 2 tensors" in r.stdout
    early, late = final(tmp_path, "run", 2), final(tmp_path, "run", 6)
    for k in late:
        same = torch.equal(early[k], late[k])
        assert same if k.startswith("body.") else not same, f"{k} {'changed' if not same else 'did not change'}"


def test_unfreeze_after_an_epoch_trains_everything_and_resumes_exactly_across_it(tmp_path):
    # 16 steps per epoch: net.0 is frozen through epoch 0 and trains from step 17 on, in a new DDP model. A rank
    # killed at step 22 resumes from step 20 (written after the unfreeze, with optimizer state for net.0).
    args = ("model._target_=components.KillableMLP", "trainer.max_steps=24", "finetune.freeze=[net.0.*]",
            "finetune.unfreeze_after_epochs=1", "finetune.lr_groups={net.0.*: 0.02}")
    recipe = write_recipe(tmp_path, *RECIPE)
    ref, _ = launch(tmp_path, recipe, *args, run="ref")
    assert "unfroze 2 parameter tensors (finetune.unfreeze_after_epochs=1, epoch 1 begins)" in ref.stdout
    assert re.search(r"net +132 +1,056\n", ref.stdout) and re.search(r"net +1,188 +0\n", ref.stdout), ref.stdout
    kill = {"KILL_AT_STEP": "22", "KILL_RANK": "1", "KILL_MARKER": str(tmp_path / "killed")}
    r, _ = launch(tmp_path, recipe, *args, env=kill, expect=1)
    assert "killed by signal SIGKILL" in r.stderr, r.stderr
    r, _ = launch(tmp_path, recipe, *args, env=kill)
    assert "step-000000020: step 20, epoch 1" in r.stdout and "the checkpoint was written after it" in r.stdout
    s4, s16, s24 = (final(tmp_path, "ref", s) for s in (4, 16, 24))
    assert torch.equal(s4["net.0.weight"], s16["net.0.weight"]), "frozen during epoch 0"
    assert not torch.equal(s16["net.0.weight"], s24["net.0.weight"]), "trained after the unfreeze"
    assert not torch.equal(s4["net.3.weight"], s16["net.3.weight"])
    resumed = final(tmp_path, "run", 24)
    for k in s24:
        assert torch.equal(resumed[k], s24[k]), f"{k} differs from the uninterrupted run"


def test_compiled_channels_last_model_trains_and_checkpoints_plain_names(tmp_path):
    # aot_eager: dynamo and AOTAutograd as with the default inductor backend, without its minute of C++ builds
    recipe = write_recipe(tmp_path, name="cnn.yaml", base=f"""\
model: {{_target_: components.LayoutProbeCNN, out: {tmp_path}}}
data: {{train: {{_target_: launcher.zoo.datasets.Digits}}, batch_size: 16, num_workers: 0}}
trainer: {{max_steps: 4, log_every_steps: 2, compile: true, compile_options: {{backend: aot_eager}},
          channels_last: true}}
""")
    r, _ = launch(tmp_path, recipe)
    assert "torch.compile: the DDP model compiles on its first step (backend=aot_eager)" in r.stdout
    compiled = re.search(r"torch.compile: (\d+) graphs compiled", r.stdout)
    assert compiled and int(compiled.group(1)) >= 1, r.stdout
    for rank in (0, 1):
        assert (tmp_path / f"layout-rank{rank}.txt").read_text() == "input True weight True\n"
    params = final(tmp_path, "run", 4)
    assert sorted(params) == ["conv.bias", "conv.weight", "head.bias", "head.weight"]
    assert all(0 < v < 5 for v in losses(tmp_path, "run").values())


def test_gradient_clipping_bounds_the_update_and_reports_the_norm(tmp_path):
    # plain SGD (lr 0.1): the update from step 1 to step 2 is exactly lr x the clipped gradient, whose global norm
    # is the clip value; the reported norm is the one before clipping
    launch(tmp_path, write_recipe(tmp_path, *RECIPE), "trainer.max_steps=2", "checkpoint.every_steps=1",
           "trainer.grad_clip_norm=1.0e-4")
    one, two = final(tmp_path, "run", 1), final(tmp_path, "run", 2)
    update = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(two[k] - one[k]) for k in one]))
    assert abs(float(update) - 0.1 * 1.0e-4) < 1e-8, f"update norm {float(update):.3g}, expected 1e-05"
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["grad_norm"] > 1e-2 for row in rows), rows

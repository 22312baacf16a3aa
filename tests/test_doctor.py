"""`launch doctor` with the real command and 2 gloo ranks: a healthy recipe passes every check and leaves nothing
behind; each planted fault fails its check, naming the cause and the advice (a learning rate of 0, a head that is
never used, a loss that cannot decrease, a NaN on one rank, a wrong sum or a late rank, a read-only checkpoint
directory, an S3 endpoint that is down); a bad recipe exits 2. And the `trainer.overfit_batches` run mode."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import launch, launch_env, require, run_launch, write_recipe


def doctor(tmp_path: Path, *args: str, env: dict | None = None, expect: int = 0, recipe: str | None = None,
           timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    """`launch doctor RECIPE --gpus 2 --run-dir TMP/run ARGS`; its exit status must be `expect`; returns doctor.json's
    results by check."""
    recipe = recipe or write_recipe(tmp_path)
    r = run_launch("doctor", recipe, "--gpus", "2", "--run-dir", str(tmp_path / "run"), *args, cwd=tmp_path,
                   env=launch_env(**(env or {})), timeout=timeout)
    assert r.returncode == expect, f"exit {r.returncode}, expected {expect}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    path = tmp_path / "run" / "doctor.json"
    results = {d["check"]: d for d in json.loads(path.read_text())["results"]} if path.exists() else {}
    return r, results


def test_a_healthy_recipe_passes_every_check_and_leaves_no_state_behind(tmp_path):
    r, results = doctor(tmp_path)
    statuses = {k: v["status"] for k, v in results.items()}
    assert statuses.pop("data") in ("pass", "warn"), r.stdout  # a loader's speed is this machine's to decide
    assert statuses == {"recipe": "pass", "overfit": "pass", "finite": "pass", "memory": "pass", "batch_size": "pass",
                        "collectives": "pass", "storage": "pass"}, r.stdout
    assert results["overfit"]["details"]["losses"][-1] <= 0.2 * results["overfit"]["details"]["losses"][0]
    assert "2 ranks" in results["collectives"]["figure"] and results["collectives"]["details"]["bus_gb_s"] > 0
    for check in results:
        assert check in r.stdout  # the table
    # the run directory holds the doctor's report, its picture and its own folder; no checkpoint, no probe, no
    # launch.json
    assert sorted(os.listdir(tmp_path / "run")) == ["doctor", "doctor.json", "doctor.png"]


def test_a_learning_rate_of_zero_fails_the_overfit_check_naming_it(tmp_path):
    _, results = doctor(tmp_path, "optimizer.lr=0", "--only", "overfit", expect=1)
    assert results["overfit"]["status"] == "fail"
    assert "optimizer.lr is 0" in results["overfit"]["advice"]


def test_a_head_that_is_never_used_is_named(tmp_path):
    recipe = write_recipe(tmp_path, "model={_target_: components.UnusedHeadMLP}")
    _, results = doctor(tmp_path, "--only", "overfit", expect=1, recipe=recipe)
    assert results["overfit"]["status"] == "fail"
    assert "aux_head.bias, aux_head.weight" in results["overfit"]["advice"]
    assert results["overfit"]["details"]["no_gradient"] == ["aux_head.bias", "aux_head.weight"]


def test_a_loss_that_cannot_decrease_fails_with_its_figures(tmp_path):
    recipe = write_recipe(tmp_path, "model={_target_: components.BiasOnly}")
    _, results = doctor(tmp_path, "--only", "overfit", "--overfit-steps", "60", expect=1, recipe=recipe)
    fit = results["overfit"]
    assert fit["status"] == "fail" and "cannot fit one batch" in fit["advice"], fit
    losses = fit["details"]["losses"]
    assert len(losses) == 60 and losses[-1] > 0.5 * losses[0]


def test_a_nan_on_one_rank_is_named_with_its_rank_and_step(tmp_path):
    recipe = write_recipe(tmp_path, "model={_target_: components.NaNAfter, step: 3, rank: 1}")
    _, results = doctor(tmp_path, "--only", "overfit,finite", expect=1, recipe=recipe)
    assert results["finite"]["status"] == "fail"
    assert "rank 1 at step 3" in results["finite"]["figure"], results["finite"]
    assert results["overfit"]["status"] == "fail"


def test_a_rank_that_returns_a_wrong_sum_is_named(tmp_path):
    _, results = doctor(tmp_path, "--only", "collectives", env={"LAUNCHER_FAULT": "doctor.wrong_sum:0:1"}, expect=1)
    c = results["collectives"]
    assert c["status"] == "fail" and "rank 1 (" in c["advice"] and "rank 0" not in c["advice"], c


def test_a_rank_that_joins_late_is_named(tmp_path):
    _, results = doctor(tmp_path, "--only", "collectives", env={"LAUNCHER_FAULT": "doctor.late:0:1"})
    c = results["collectives"]
    assert c["status"] == "warn" and "rank 1 2." in c["advice"] and "rank 0" not in c["advice"], c


def test_a_read_only_checkpoint_directory_fails_naming_it(tmp_path):
    require(os.geteuid() == 0, "mounting a read-only tmpfs needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        _, results = doctor(tmp_path, "--only", "storage", f"checkpoint.dir={ro}/ck", expect=1)
    finally:
        subprocess.run(["umount", str(ro)], check=False)
    s = results["storage"]
    assert s["status"] == "fail" and f"checkpoint.dir={ro}/ck" in s["advice"], s
    assert s["details"]["operation"].startswith("create"), s


def test_checkpoints_on_s3_pass_and_leave_no_object_and_an_endpoint_that_is_down_is_named(tmp_path, s3_server):
    bucket = s3_server.make_bucket("doctor-ok")
    assert bucket == "s3://doctor-ok"
    _, results = doctor(tmp_path, "--only", "storage", f"checkpoint.dir={bucket}/runs/a", env=s3_server.env())
    assert results["storage"]["status"] == "pass", results["storage"]
    assert s3_server.list_objects("doctor-ok") == {}  # the probes were removed
    from s3 import free_port
    down = f"checkpoint.endpoint_url=http://127.0.0.1:{free_port()}"  # nothing listens there
    _, results = doctor(tmp_path, "--only", "storage", f"checkpoint.dir={bucket}/runs/a", down, env=s3_server.env(),
                        expect=1)
    s = results["storage"]
    assert s["status"] == "fail" and f"checkpoint.dir={bucket}/runs/a" in s["advice"], s


def test_an_s3_endpoint_that_refuses_writes_is_named_with_the_refused_operation(tmp_path, s3_server):
    from s3 import ReadOnlyGateway
    bucket = s3_server.make_bucket("doctor-ro")
    gateway = ReadOnlyGateway(s3_server)
    try:
        _, results = doctor(tmp_path, "--only", "storage", f"checkpoint.dir={bucket}/runs/a",
                            f"checkpoint.endpoint_url={gateway.endpoint}", env=s3_server.env(), expect=1)
    finally:
        gateway.stop()
    s = results["storage"]
    assert s["status"] == "fail" and s["details"]["operation"].startswith(f"write {bucket}/runs/a/.doctor-"), s
    assert "AccessDenied" in s["advice"] or "Access Denied" in s["advice"], s


def test_a_bad_recipe_exits_2_and_an_unknown_check_is_refused(tmp_path):
    r, _ = doctor(tmp_path, "trainer.max_steps=-1", expect=2)
    assert "trainer.max_steps must be >= 1" in r.stdout and "nothing was started" in r.stderr
    r, _ = doctor(tmp_path, "--only", "overfit,speed", expect=2)
    assert "unknown check speed" in r.stderr
    r, _ = doctor(tmp_path, "--slurm", "--only", "slurm", r'slurm.partition="x\ntouch /tmp/owned"', expect=2)
    assert "slurm.partition holds a newline" in r.stdout  # validated as a submission before any sbatch call
    r, _ = doctor(tmp_path, "--memory-budget", "lots", expect=2)
    assert "--memory-budget 'lots' is not a size" in r.stderr and not (tmp_path / "run").exists()


def test_overfit_batches_trains_on_the_same_fixed_batches_every_epoch(tmp_path):
    out = tmp_path / "probe"
    out.mkdir()
    recipe = write_recipe(tmp_path, f"model={{_target_: components.IndexProbe, out: '{out}'}}",
                          "data={train: {_target_: components.IndexDataset, n: 64}, batch_size: 4, num_workers: 0}",
                          "trainer={max_epochs: 3, overfit_batches: 2, log_every_steps: 1}", "checkpoint={}")
    launch(tmp_path, recipe)
    for rank in (0, 1):
        lines = (out / f"indices-rank{rank}.txt").read_text().split()
        assert len(lines) == 6  # 2 batches x 3 epochs
        assert lines[0:2] == lines[2:4] == lines[4:6]  # the same batches, in the same order, every epoch
        assert sorted(int(i) for line in lines[0:2] for i in line.split(",")) == \
            sorted(range(rank, 16, 2))  # its share of the first 2 x 4 x 2 samples


def test_the_pictures_show_the_overfit_curve_and_data_rates_and_no_data_draws_nothing(tmp_path):
    import importlib.util
    from launcher.doctor import pictures
    from launcher.doctor.report import PASS, Result
    results = [Result("overfit", PASS, details={"losses": [1.4, 0.9, 0.3]}),
               Result("memory", PASS, details={"ranks": [{"points": [[64, 30.0], [16, 12.0]]}]}),
               Result("data", PASS, details={"settings": [{"num_workers": 2, "pin_memory": False, "batches_per_s": 18.5},
                                                          {"num_workers": 0, "pin_memory": False, "batches_per_s": 10.0},
                                                          {"num_workers": 0, "pin_memory": True, "batches_per_s": 9.0}]})]
    drawn = pictures.panels(results)
    assert [p[0] for p in drawn] == ["overfit one batch", "memory of a step, rank 0", "data loading"]
    assert drawn[1][3:] == ([16, 64], [12.0, 30.0]) and drawn[2][3:] == ([0, 2], [10.0, 18.5])
    assert importlib.util.find_spec("matplotlib") is not None  # a test extra
    path = pictures.write(str(tmp_path / "doctor.png"), results)
    assert path and (tmp_path / "doctor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pictures.write(str(tmp_path / "none.png"), [Result("storage", PASS)]) is None  # nothing to draw

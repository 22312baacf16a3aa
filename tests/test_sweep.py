"""`launch sweep` with the real command, real trials (each an ordinary `launch` run of 1 or 2 gloo ranks) and
Optuna: a 6-trial sweep 2 at a time whose controller is SIGKILLed mid-sweep and started again (6 complete trials in 6
run directories, none run twice, the interrupted ones resumed from their checkpoints), its status table, trials.csv,
pictures and a best.yaml that launches; a trial SIGKILLed from outside resumes from its checkpoint; a failing trial
is FAILED naming its rank, error and log while the sweep goes on; pruning stops a bad 2-rank trial on every rank at
one step with a committed checkpoint, and its run continues later; every bad input exits 2 with every problem."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import LAUNCH, launch, launch_env, run_launch, write_recipe

SWEEP = """\
seed: 3
model: {_target_: components.KillableMLP, in_features: 32, hidden: 16, out_features: 4, step_sleep: 0.02}
data:
  train: {_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 256}
  val: {_target_: launcher.zoo.datasets.SyntheticClassification, num_samples: 64}
  batch_size: 16
  num_workers: 0
trainer: {max_steps: 40, log_every_steps: 5, val_every_steps: 20}
checkpoint: {every_steps: 10, keep: 0}
logging: {tensorboard: true}
sweep:
  metric: val/loss
  sampler: random
  trials: 6
  parallel: 2
  params:
    optimizer.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
    model.hidden: {type: choice, values: [8, 16, 32]}
"""


def sweep(where: Path, recipe: str, *args: str, expect: int | None = 0, timeout: float = 300,
          env: dict | None = None) -> subprocess.CompletedProcess:
    r = run_launch("sweep", recipe, "--dir", str(where / "sw"), *args, cwd=where, timeout=timeout,
                   env=launch_env(**(env or {})))
    if expect is not None:
        assert r.returncode == expect, f"exit {r.returncode}, expected {expect}\n{r.stderr[-4000:]}\n{r.stdout[-2000:]}"
    return r


def trials(where: Path) -> list[dict]:
    return json.loads((where / "sw" / "sweep.json").read_text())["trials"]


def last_step(run_dir: str | Path) -> int | None:
    from launcher.sweep.records import last_step as step
    return step(str(run_dir))


def events(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_controller(where: Path, recipe: str) -> subprocess.Popen:
    return subprocess.Popen([LAUNCH, "sweep", recipe, "--dir", str(where / "sw"), "--gpus", "1"], cwd=where,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(ctl: subprocess.Popen, where: Path, complete: int) -> None:
    """Until `complete` trials are COMPLETE and a running one has committed a checkpoint (and is far from done)."""
    deadline = time.time() + 180
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            rows = trials(where)
        except (OSError, ValueError):
            continue
        done = [r for r in rows if r["state"] == "COMPLETE"]
        going = [r for r in rows if r["state"] == "RUNNING"
                 and list((Path(r["run_dir"]) / "checkpoints").glob("step-*/manifest.json"))
                 and (last_step(r["run_dir"]) or 0) < 25]  # well before its end at step 40
        if len(done) >= complete and going:
            return
    ctl.kill()
    pytest.fail(f"the sweep did not get going: {ctl.communicate()[1][-3000:]}")


def test_six_trials_two_at_a_time_survive_a_stopped_and_a_killed_controller(tmp_path):
    recipe = write_recipe(tmp_path, "model.step_sleep=0.05", base=SWEEP)
    # SIGTERM: every running trial checkpoints and stops at one step, and the controller exits 128 + 15
    ctl = start_controller(tmp_path, recipe)
    wait_for(ctl, tmp_path, complete=1)
    ctl.send_signal(signal.SIGTERM)
    _, err = ctl.communicate(timeout=60)
    assert ctl.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = [r for r in trials(tmp_path) if r["state"] == "PREEMPTED"]  # to resume
    assert stopped and "SIGTERM: asking" in err, err[-2000:]
    assert "PREEMPTED" in run_launch("sweep", "status", str(tmp_path / "sw"), cwd=tmp_path).stdout
    for r in stopped:
        marker = json.loads((Path(r["run_dir"]) / "stopped.json").read_text())
        assert marker["reason"] == "the sweep controller stopped (SIGTERM)", marker
        assert (Path(r["run_dir"]) / "checkpoints" / f"step-{marker['step']:09d}" / "manifest.json").exists()
    # started again, then killed outright once two trials are done and a running one has checkpointed
    ctl = start_controller(tmp_path, recipe)
    wait_for(ctl, tmp_path, complete=2 + len(stopped) // 2)
    ctl.send_signal(signal.SIGKILL)
    ctl.communicate(timeout=30)
    interrupted = {r["number"] for r in trials(tmp_path) if r["state"] in ("RUNNING", "PREEMPTED")}
    assert interrupted, "no trial was running when the controller died"
    checkpointed = {}  # trial -> its newest committed checkpoint's step when the controller died
    for n in interrupted:
        steps_ = [int(p.parent.name.split("-")[1])
                  for p in (tmp_path / "sw" / f"trial-{n:04d}" / "checkpoints").glob("step-*/manifest.json")]
        if steps_:
            checkpointed[n] = max(steps_)
    assert checkpointed
    time.sleep(1.5)  # the trials died with the controller (PR_SET_PDEATHSIG): nothing writes their runs now
    def written() -> dict[int, int]:  # a trial started just before the kill may have no metrics yet
        files = {n: tmp_path / "sw" / f"trial-{n:04d}" / "metrics.jsonl" for n in interrupted}
        return {n: f.stat().st_size if f.exists() else 0 for n, f in files.items()}
    steps = written()
    time.sleep(1.0)
    assert steps == written(), "a trial kept running without its controller"

    r = sweep(tmp_path, recipe, "--gpus", "1")  # the same command again
    rows = trials(tmp_path)
    assert [r_["state"] for r_ in rows] == ["COMPLETE"] * 6, rows
    assert sorted(r_["number"] for r_ in rows) == list(range(6))
    assert sorted(p.name for p in (tmp_path / "sw").glob("trial-*")) == [f"trial-{n:04d}" for n in range(6)]
    assert len({json.dumps(r_["params"], sort_keys=True) for r_ in rows}) == 6  # six different trials
    for n in set(checkpointed) | {r_["number"] for r_ in stopped}:  # resumed from its checkpoint, not started over
        ready = [e for e in events(tmp_path / "sw" / f"trial-{n:04d}") if e["event"] == "ready"]
        assert len(ready) >= 2 and ready[0]["resumed_step"] is None, ready
        assert all(e["resumed_step"] is not None and e["resumed_step"] >= 5 for e in ready[1:]), ready
        if n in checkpointed:  # after the kill, from the newest checkpoint it had committed
            assert ready[-1]["resumed_step"] >= checkpointed[n], (ready, checkpointed[n])
    for r_ in stopped:  # the one stopped by SIGTERM resumed from the step it stopped at
        ready = [e for e in events(r_["run_dir"]) if e["event"] == "ready"]
        assert ready[1]["resumed_step"] == json.loads((Path(r_["run_dir"]) / "stopped.json").read_text())["step"]
    assert "resuming in" in r.stderr
    values = [r_["value"] for r_ in rows]
    assert values == sorted(values)  # best first (min val/loss)
    for r_ in rows:  # each trial's value is its last recorded val/loss, with its own values set in its recipe
        run = Path(r_["run_dir"])
        last = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()][-1]
        assert last["step"] == 40 and last["val/loss"] == pytest.approx(r_["value"])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["optimizer"]["lr"] == pytest.approx(r_["params"]["optimizer.lr"])
        assert cfg["model"]["hidden"] == r_["params"]["model.hidden"]
        assert cfg["logging"]["wandb_group"] == "sw" and cfg["run"]["dir"] == str(run)

    # the status table, best first, and trials.csv beside it
    status = run_launch("sweep", "status", str(tmp_path / "sw"), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "6 of 6 trials (6 COMPLETE)" in lines[0] and "controller not running" in lines[0], lines[0]
    assert re.split(r"\s+", lines[1]) == ["#", "state", "optimizer.lr", "model.hidden", "val/loss", "steps", "run",
                                          "dir"]
    assert [int(ln.split()[0]) for ln in lines[2:8]] == [r_["number"] for r_ in rows]
    with open(tmp_path / "sw" / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(t["number"]) for t in table] == [r_["number"] for r_ in rows] and table[0]["state"] == "COMPLETE"
    assert float(table[0]["val/loss"]) == pytest.approx(rows[0]["value"])
    for picture in ("history", "parallel", "importances"):
        assert (tmp_path / "sw" / f"{picture}.png").stat().st_size > 5000, picture
    # TensorBoard: each trial's values are hparams in its own tb/, beside its scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(rows[0]["run_dir"]) / "tb"))
    acc.Reload()
    assert "val/loss" in acc.Tags()["scalars"]
    hparams = acc.PluginTagToContent("hparams")
    assert b"optimizer.lr" in hparams["_hparams_/session_start_info"], hparams
    assert "_hparams_/session_end_info" in hparams and "_hparams_/experiment" in hparams, hparams

    # the same directory with another search is refused; more trials would continue it
    other = sweep(tmp_path, recipe, "sweep.metric=train/loss", expect=2)
    assert "holds a sweep with another metric (\"val/loss\"; this command: \"train/loss\")" in other.stderr
    # best.yaml: the best trial's recipe, in a run directory of its own, launches as it is
    best = yaml.safe_load((tmp_path / "sw" / "best.yaml").read_text())
    assert best["optimizer"]["lr"] == pytest.approx(rows[0]["params"]["optimizer.lr"])
    assert best["model"]["hidden"] == rows[0]["params"]["model.hidden"] and "sweep" not in best
    assert best["run"] == {"name": "sw-best", "dir": None}
    _, run = launch(tmp_path, str(tmp_path / "sw" / "best.yaml"), "trainer.max_steps=10", run="best")
    assert [e["event"] for e in events(run)][-1] == "train_end"


def test_a_trial_killed_from_outside_resumes_from_its_checkpoint_and_every_trial_is_in_one_wandb_group(tmp_path):
    recipe = write_recipe(tmp_path, "sweep.trials=3", "sweep.parallel=1", "sweep.sampler=grid",
                          "sweep.params={model.hidden: {type: choice, values: [8, 16, 32]}}", "logging.wandb=true",
                          "logging.wandb_mode=offline", base=SWEEP)
    # rank 1 of the first trial to reach forward call 25 is SIGKILLed, once (after its checkpoint at step 10)
    marker = tmp_path / "killed"
    env = {"KILL_AT_STEP": "25", "KILL_RANK": "1", "KILL_MARKER": str(marker), "WANDB_SILENT": "true"}
    r = sweep(tmp_path, recipe, "--gpus", "2", "model.step_sleep=0.01", expect=None, env=env)
    rows = {r_["number"]: r_ for r_ in trials(tmp_path)}
    assert marker.exists()
    killed = rows[0]  # the grid runs in the order --dry-run lists it: hidden 8 first
    assert killed["params"] == {"model.hidden": 8} and killed["state"] == "COMPLETE", (killed, r.stderr[-3000:])
    ready = [e for e in events(killed["run_dir"]) if e["event"] == "ready"]
    assert len(ready) == 2 and ready[1]["resumed_step"] >= 10, ready  # from its newest checkpoint, not from 0
    assert (Path(killed["run_dir"]) / "checkpoints" / f"step-{ready[1]['resumed_step']:09d}").is_dir()
    assert re.search(r"trial 0: killed by signal SIGKILL; resuming it from its newest checkpoint", r.stderr)
    assert r.returncode == 0
    # every trial is a W&B run of its own, in the sweep's group (both attempts of the killed one: one W&B run)
    for row in rows.values():
        runs = list((Path(row["run_dir"]) / "wandb").glob("offline-run-*/run-*.wandb"))
        assert runs and {wandb_run(p) for p in runs} == {("sw", f"sw-{row['number']:04d}")}, row["run_dir"]


def wandb_run(path: Path) -> tuple[str, str]:
    """(group, name) of the run record in a W&B offline run file: W&B's 7-byte header, then LevelDB's log format
    (32 KiB blocks of records: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last), payload), each
    record one protobuf wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, off, part, block = path.read_bytes(), 7, b"", 32768
    while off + 7 <= len(data):
        if block - off % block < 7:  # a block's tail too short for a header is padding
            off += block - off % block
            continue
        _, length, kind = struct.unpack("<IHB", data[off:off + 7])
        payload, off = data[off + 7:off + 7 + length], off + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part + payload if kind == 4 else payload)
            if record.WhichOneof("record_type") == "run":
                return record.run.run_group, record.run.display_name
            part = b""
        elif kind in (2, 3):
            part = payload if kind == 2 else part + payload
    raise AssertionError(f"no run record in {path}")


def test_a_failing_trial_is_failed_and_the_sweep_goes_on(tmp_path):
    recipe = write_recipe(tmp_path, "sweep.trials=3", "sweep.parallel=1", "sweep.sampler=grid",
                          "sweep.params={model.rank: {type: choice, values: [5, 1, 6]}}",
                          "model={_target_: components.FailingMLP, step: 7, rank: 5}", base=SWEEP)
    r = sweep(tmp_path, recipe, "--gpus", "2", expect=0)
    rows = {r_["number"]: r_ for r_ in trials(tmp_path)}
    assert [rows[n]["state"] for n in range(3)] == ["COMPLETE", "FAILED", "COMPLETE"], rows
    failed = rows[1]
    assert failed["failed_rank"] == 1 and "injected failure at step 7" in failed["error"], failed
    assert failed["log"] == str(Path(failed["run_dir"]) / "logs" / "rank1.log")
    assert re.search(r"trial 1 FAILED: rank 1: .*injected failure at step 7 \(log: .*rank1\.log\)", r.stderr)
    status = run_launch("sweep", "status", str(tmp_path / "sw"), cwd=tmp_path).stdout
    assert re.search(r"^1\s+FAILED .*injected failure at step 7", status, re.M), status


def test_pruning_stops_a_bad_two_rank_trial_on_every_rank_at_one_step(tmp_path):
    recipe = write_recipe(tmp_path, "sweep.trials=2", "sweep.parallel=1", "sweep.sampler=grid",
                          "sweep.metric=train/loss", "sweep.pruner=median", "sweep.min_steps=10",
                          "sweep.pruner_args={n_startup_trials: 1}", "trainer.max_steps=120",
                          "sweep.params={optimizer.lr: {type: choice, values: [0.01, 0.0]}}", base=SWEEP)
    r = sweep(tmp_path, recipe, "--gpus", "2")
    rows = {r_["number"]: r_ for r_ in trials(tmp_path)}
    assert rows[0]["state"] == "COMPLETE" and rows[1]["state"] == "PRUNED", (rows, r.stderr[-3000:])
    run = Path(rows[1]["run_dir"])
    stopped = json.loads((run / "stopped.json").read_text())
    at = stopped["step"]
    assert 10 < at < 120 and "pruned by launch sweep (median)" in stopped["reason"], stopped
    said = [re.findall(r"checkpointing at step (\d+)", (run / "logs" / f"rank{i}.log").read_text()) for i in (0, 1)]
    assert said == [[str(at)], [str(at)]], said  # every rank stopped at that one step
    manifest = json.loads((run / "checkpoints" / f"step-{at:09d}" / "manifest.json").read_text())
    assert manifest["step"] == at  # committed
    assert not (run / "stop-request.json").exists()  # taken away: the run can go on
    assert f"trial 1 PRUNED at step {at}" in r.stderr
    # the pruned trial's run continues from that checkpoint with more budget
    _, again = launch(tmp_path, str(run / "config.yaml"), "trainer.max_steps=130", run="sw/trial-0001")
    ready = [e for e in events(again) if e["event"] == "ready"]
    assert ready[-1]["resumed_step"] == at and events(again)[-1]["event"] == "train_end"


def test_bad_input_exits_2_with_every_problem_and_starts_nothing(tmp_path):
    recipe = write_recipe(tmp_path, "sweep.sampler=grid", "sweep.metric=val/los", "sweep.params={"
                          "optimizer.lrr: {type: choice, values: [0.1]},"
                          " trainer.max_stpes: {type: int, low: 1, high: 4},"
                          " model.hidden: {type: int, low: 8, high: 4}, data.batch_size: {type: choice, values: []},"
                          " optimizer.weight_decay: {type: float, low: 0.0, high: 0.1, log: true},"
                          " optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2}}", base=SWEEP)
    r = sweep(tmp_path, recipe, expect=2)
    err = r.stderr
    for expected in ("sweep.metric: 'val/los' is not a metric a trial records",
                     "sweep.params.optimizer.lrr: torch.optim.AdamW takes no argument 'lrr'; did you mean "
                     "'optimizer.lr'?",
                     "sweep.params.trainer.max_stpes = 1: ", "did you mean 'trainer.max_steps'?",
                     "sweep.params.model.hidden: low (8) must be below high (4)",
                     "sweep.params.data.batch_size.values: a choice needs a non-empty list of values",
                     "sweep.params.optimizer.weight_decay: a log scale needs low > 0, got low 0.0",
                     "sweep.params.optimizer.lr: a grid over a float range needs a step"):
        assert expected in err, (expected, err)
    assert not (tmp_path / "sw").exists()
    # a metric that needs validation, on a recipe without it
    recipe = write_recipe(tmp_path, "data.val=null", "trainer.val_every_steps=null", base=SWEEP, name="noval.yaml")
    r = sweep(tmp_path, recipe, expect=2)
    assert "sweep.metric: val/loss needs a validation set, and the recipe has none (data.val)" in r.stderr
    # --dry-run lists a grid in the order it runs, and starts nothing
    recipe = write_recipe(tmp_path, "sweep.sampler=grid", "sweep.params={optimizer.lr: {type: float, low: 0.01, "
                          "high: 0.03, step: 0.01}, model.hidden: {type: choice, values: [8, 16]}}", base=SWEEP,
                          name="grid.yaml")
    r = sweep(tmp_path, recipe, "--dry-run")
    assert "6 trials" in r.stdout and "the grid: 6 combinations" in r.stdout, r.stdout
    assert re.search(r"^\s+0\s+optimizer.lr=0.01 model.hidden=8$", r.stdout, re.M), r.stdout
    assert re.search(r"^\s+5\s+optimizer.lr=0.03 model.hidden=16$", r.stdout, re.M), r.stdout
    assert not (tmp_path / "sw").exists()

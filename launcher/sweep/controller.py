"""The sweep controller: the one process that decides and records. It asks Optuna for a trial, starts it as an
ordinary `launch` run in DIR/trial-<NNNN>/, reports the metric the trial records to Optuna, asks the trial to stop
when the pruner says so, and tells Optuna how each trial ended. Trials write only their own run directories.

Killed at any moment and started again on the same DIR, it loses nothing and runs no trial twice: the study holds
every trial it asked for, with its values; a trial still RUNNING there is started again in its own run directory,
where `launch` resumes it from its newest committed checkpoint (a SLURM trial's job is followed again by its id).
SIGINT or SIGTERM asks every running trial to checkpoint and stop, then exits; the next start resumes them.

Pruning: the controller writes RUN_DIR/stop-request.json; the trial's rank 0 reads it at its next log step, whose
all-reduce makes every rank stop at that same step with a committed checkpoint (stopped.json), and the trial ends
PRUNED. `launch RUN_DIR/config.yaml trainer.max_steps=...` continues a pruned trial's run from that checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from typing import Any

import optuna
from optuna.trial import TrialState
from omegaconf import DictConfig

from ..errors import UsageError
from ..files import STOP_REQUEST, write_atomic
from . import records, study as study_mod
from .spec import Spec, override
from .command import CONTROLLER_ENV
from .trials import LocalTrial, Slot, SlurmTrial, failure, launch_argv, local_slots

POLL_S = 0.2  # how often the controller reads its trials' metrics and exits (a stat and a read each)


class Controller:
    def __init__(self, *, recipe_path: str, overrides: list[str], flags: list[str], cfg: DictConfig, spec: Spec,
                 sweep_dir: str, name: str, slurm: bool, procs: int) -> None:
        self.recipe_path, self.overrides, self.flags = recipe_path, overrides, flags
        self.cfg, self.spec, self.dir, self.name, self.slurm, self.procs = cfg, spec, sweep_dir, name, slurm, procs
        self.max_steps = cfg.trainer.max_steps
        self.running: dict[int, Any] = {}  # trial number -> LocalTrial | SlurmTrial
        self.attempt: dict[int, float] = {}  # trial number -> when its current attempt started
        self.reported: dict[int, int] = {}  # trial number -> the last step reported to Optuna
        self.metrics: dict[int, study_mod.MetricRows] = {}  # trial number -> its metric, read as it grows
        self.stopping: int | None = None
        self.slots: list[Slot] = []
        self.free: list[Slot] = []
        self.slot_of: dict[int, Slot] = {}

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        os.makedirs(self.dir, exist_ok=True)
        lock = self._lock()
        try:
            return self._run()
        finally:
            lock.close()

    def _run(self) -> int:
        self.study = study_mod.open_study(self.spec, self.dir, self.name, self.max_steps)
        if not self.slurm:
            self.slots, notes = local_slots(self.spec.parallel, self.procs)
            for note in notes:
                self._say(note)
            if not self.slots:
                raise UsageError(f"no trial fits on this machine: {notes[0] if notes else ''}")
            self.free = list(self.slots)
        self.own_job = os.environ.get("SLURM_JOB_ID") if os.environ.get(CONTROLLER_ENV) == "1" else None
        for sig in (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR2,) if self.own_job else ()):
            signal.signal(sig, self._on_signal)
        if self.spec.sampler == "grid":
            self._enqueue_grid()
        self._resume()
        changed = True
        while True:
            if self.stopping is None:
                changed |= self._start_new()
            if not self.running:
                break
            time.sleep(POLL_S)
            for number in list(self.running):
                changed |= self._follow(number)
            if changed:
                self._record()
                changed = False
        self._record(final=True)
        if self.own_job and self.stopping == signal.SIGUSR2:  # a cancel (SIGTERM) is not requeued
            self._requeue_own_job()
        return self._exit_code()

    def _requeue_own_job(self) -> None:
        """The controller's own SLURM job, signalled before its time limit or a preemption: requeue it; the next
        controller follows the trials again by their job ids."""
        import subprocess
        r = subprocess.run(["scontrol", "requeue", str(self.own_job)], capture_output=True, text=True)
        self._say(f"requeued this controller's job {self.own_job}" if r.returncode == 0 else
                  f"scontrol requeue {self.own_job} failed: {r.stderr.strip()}; run the same command to continue")

    def _capacity(self) -> int:
        return len(self.free) if not self.slurm else self.spec.parallel - len(self.running)

    def _start_new(self) -> bool:
        started = False
        while self._capacity() > 0:
            trials = self.study.get_trials(deepcopy=False)
            waiting = [t for t in trials if t.state == TrialState.RUNNING and t.number not in self.running]
            if waiting:  # interrupted trials first (more of them than slots at the start): they resume
                self._say(f"trial {waiting[0].number}: resuming in {self.run_dir(waiting[0].number)}")
                self._start(waiting[0].number, waiting[0].params, resumed=True)
                started = True
                continue
            failed = sum(t.state == TrialState.FAIL for t in trials)
            asked = sum(t.state != TrialState.WAITING for t in trials)
            if failed >= self.spec.max_failures or asked >= self.spec.trials:
                break
            self.study.sampler = study_mod.sampler(self.spec, len(trials))
            trial = self.study.ask(study_mod.distributions(self.spec))
            self._start(trial.number, trial.params)
            started = True
        return started

    def _enqueue_grid(self) -> None:
        """A grid's combinations go into the study in the order --dry-run lists them (WAITING until asked), up to
        sweep.trials; a later start with more trials adds the next ones."""
        have = [dict(t.params) for t in self.study.get_trials(deepcopy=False)]
        missing = [combo for combo in self.spec.grid() if combo not in have]
        for combo in missing[:max(0, self.spec.trials - len(have))]:
            self.study.enqueue_trial(combo)

    def _resume(self) -> None:
        """Trials the study holds as RUNNING: an earlier controller started them. Follow a SLURM trial's job that is
        still queued or running; start every other one again (it resumes from its own checkpoint)."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.reported[t.number] = max(t.intermediate_values, default=-1)
            run_dir = self.run_dir(t.number)
            job_id = t.user_attrs.get("job_id")
            if self.slurm and job_id:
                from ..backends.slurm_state import FINAL, job_state
                if job_state(str(job_id)) not in FINAL:
                    self._say(f"trial {t.number}: following its SLURM job {job_id} again")
                    self.running[t.number] = SlurmTrial(t.number, run_dir, str(job_id))
                    self.attempt[t.number] = float(t.user_attrs.get("attempt_started", time.time()))
                    continue
                if study_mod.last_event(run_dir) is not None:  # its job ended while no controller watched
                    self.running[t.number] = SlurmTrial(t.number, run_dir, str(job_id))
                    self.attempt[t.number] = float(t.user_attrs.get("attempt_started", 0))
                    continue
            if self._capacity() <= 0:
                break  # more interrupted trials than slots: the rest start as slots free up (in _start_new)
            self._say(f"trial {t.number}: resuming in {run_dir}")
            self._start(t.number, t.params, resumed=True)

    def run_dir(self, number: int) -> str:
        return os.path.join(self.dir, f"trial-{number:04d}")

    def trial_argv(self, number: int, params: dict[str, Any]) -> list[str]:
        """The trial's `launch`: the recipe, the sweep command's overrides, the trial's values, its own run (and
        checkpoint) directory, resume from its own checkpoint, its W&B group."""
        extra = [override(k, v) for k, v in params.items()]
        extra += [f"run.name={self.name}-{number:04d}", "resume=auto", f"logging.wandb_group={self.name}",
                  "logging.progress=lines"]
        if self.cfg.checkpoint.dir:  # the recipe names one place: every trial a folder of its own there
            extra.append(f"checkpoint.dir={str(self.cfg.checkpoint.dir).rstrip('/')}/{self.name}/{number:04d}")
        argv = [*launch_argv(), self.recipe_path, *self.overrides, *extra, "--run-dir", self.run_dir(number),
                *self.flags]
        return argv + (["--slurm"] if self.slurm else [])

    def _start(self, number: int, params: dict[str, Any], resumed: bool = False) -> None:
        run_dir = self.run_dir(number)
        trial = optuna.trial.Trial(self.study, self._trial_id(number))
        argv = self.trial_argv(number, params)
        now = time.time()
        self.attempt[number] = now
        self.reported.setdefault(number, -1)
        trial.set_user_attr("run_dir", run_dir)
        trial.set_user_attr("attempt_started", now)
        shown = " ".join(override(k, v) for k, v in params.items())
        if self.slurm:
            try:
                handle: Any = SlurmTrial.submit(number, run_dir, argv)
            except Exception as e:  # sbatch refused it: the trial fails, the sweep goes on
                self._fail(number, {"error": str(e), "log": os.path.join(run_dir, "sweep-launch.log")})
                return
            trial.set_user_attr("job_id", handle.job_id)
            where = f"SLURM job {handle.job_id}"
        else:
            slot = self.free.pop(0)
            self.slot_of[number] = slot
            handle = LocalTrial(number, run_dir, argv, slot)
            where = slot.describe()
        self.running[number] = handle
        if not resumed:
            self._say(f"trial {number} started on {where}: {shown}")
            records.write_hparams_start(run_dir, params, self.spec, self.cfg)

    def _trial_id(self, number: int) -> int:
        return self.study.get_trials(deepcopy=False)[number]._trial_id

    # ------------------------------------------------------------------ following a trial
    def _follow(self, number: int) -> bool:
        handle = self.running[number]
        run_dir = self.run_dir(number)
        changed = self._report(number, run_dir)
        rc = handle.poll()
        if rc is None:
            return changed
        optuna.trial.Trial(self.study, self._trial_id(number)).set_user_attr("exited", time.time())
        del self.running[number]
        slot = self.slot_of.pop(number, None)
        if slot is not None:
            self.free.append(slot)
            self.free.sort(key=lambda s: s.index)
        self._report(number, run_dir)
        self._judge(number, handle, rc)
        return True

    def _report(self, number: int, run_dir: str) -> bool:
        """The trial's new values of the metric, to Optuna; a stop request when the pruner says so."""
        reader = self.metrics.get(number)
        if reader is None:
            reader = self.metrics[number] = study_mod.MetricRows(run_dir, self.spec)
        rows = reader.read()
        new = sorted(s for s in rows if s > self.reported.get(number, -1))
        if not new:
            return False
        trial = optuna.trial.Trial(self.study, self._trial_id(number))
        for step in new:
            trial.report(rows[step], step)
        self.reported[number] = new[-1]
        frozen = self.study.get_trials(deepcopy=False)[number]
        if self.spec.pruner != "none" and "prune_step" not in frozen.user_attrs and trial.should_prune():
            trial.set_user_attr("prune_step", new[-1])
            write_atomic(os.path.join(run_dir, STOP_REQUEST), json.dumps(
                {"reason": f"pruned by launch sweep ({self.spec.pruner}) after step {new[-1]}: {self.spec.metric} "
                           f"{rows[new[-1]]:.6g}", "by": "launch sweep", "time": time.time()}))
            self._say(f"trial {number}: pruning after step {new[-1]} ({self.spec.metric} {rows[new[-1]]:.4g})")
        return True

    def _judge(self, number: int, handle: Any, rc: int) -> None:
        run_dir = self.run_dir(number)
        frozen = self.study.get_trials(deepcopy=False)[number]
        since = self.attempt.get(number, 0.0)
        event = study_mod.last_event(run_dir, ("train_end", "stopped", "preempted"))
        if event is not None and float(event.get("time", 0)) < since - 1:
            event = None  # an earlier attempt's
        pruned = "prune_step" in frozen.user_attrs
        if rc == 0 and event is not None and event["event"] in ("train_end", "stopped") and pruned:
            self.study.tell(number, state=TrialState.PRUNED)
            self._say(f"trial {number} PRUNED at step {event.get('step')}")
            records.write_hparams_end(run_dir, "pruned")
            return
        if rc == 0 and event is not None and event["event"] == "train_end":
            rows = self.metrics.pop(number).read() if number in self.metrics else \
                study_mod.metric_rows(run_dir, self.spec)
            value = study_mod.objective(rows, self.spec)
            if value is None:
                self._fail(number, {"error": f"the run recorded no {self.spec.metric}", "log": run_dir})
                return
            self.study.tell(number, value)
            best = self._best_number() == number
            self._say(f"trial {number} COMPLETE: {self.spec.metric} {value:.6g} ({self.spec.objective}) at step "
                      f"{event.get('step')}{' (best so far)' if best else ''}")
            records.write_hparams_end(run_dir, "success")
            return
        if self.stopping is not None and (rc == 0 or rc >= 128 or rc < 0):
            return  # interrupted on purpose: it stays RUNNING in the study and resumes with the next controller
        if rc == 0 and event is not None and event["event"] == "preempted":
            self._say(f"trial {number}: preempted at step {event.get('step')}; resuming it")
            if self.slurm or self.free:
                self._start(number, frozen.params, resumed=True)
            return
        what = failure(run_dir, rc, handle.output_tail(), since)
        killed = rc < 0 or rc >= 128 or str(what.get("how", "")).startswith("killed by signal")
        attempts = int(frozen.user_attrs.get("retries", 0))
        if killed and not self.slurm and attempts < self.spec.retries:
            # killed from outside (the kernel's out-of-memory killer, a person, a node going down): run it again,
            # from its own newest committed checkpoint; an error the run raised fails it at once
            optuna.trial.Trial(self.study, self._trial_id(number)).set_user_attr("retries", attempts + 1)
            self._say(f"trial {number}: {what.get('how') or f'exit {rc}'}; resuming it from its newest checkpoint "
                      f"(retry {attempts + 1} of {self.spec.retries})")
            if self.free:
                self._start(number, frozen.params, resumed=True)
            return
        if self.slurm and getattr(handle, "state", None) not in (None, "COMPLETED"):
            what["error"] = f"SLURM job {handle.job_id} ended {handle.state}: {what.get('error')}"
        self._fail(number, what)

    def _fail(self, number: int, what: dict[str, Any]) -> None:
        trial = optuna.trial.Trial(self.study, self._trial_id(number))
        trial.set_user_attr("failure", what)
        self.study.tell(number, state=TrialState.FAIL)
        who = f"rank {what['rank']}: " if what.get("rank") is not None else ""
        self._say(f"trial {number} FAILED: {who}{what.get('error')} (log: {what.get('log')})")
        records.write_hparams_end(self.run_dir(number), "failure")
        failed = sum(t.state == TrialState.FAIL for t in self.study.get_trials(deepcopy=False))
        if failed >= self.spec.max_failures:
            self._say(f"{failed} trials failed (sweep.max_failures={self.spec.max_failures}): no new trials")

    def _best_number(self) -> int | None:
        try:
            return self.study.best_trial.number
        except ValueError:
            return None

    # ------------------------------------------------------------------ stopping, records
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stopping is not None:  # a second signal: stop now
            for handle in self.running.values():
                if isinstance(handle, LocalTrial):
                    handle.kill()
            return
        self.stopping = signum
        name = signal.Signals(signum).name
        if self.slurm:
            self._say(f"{name}: stopping; the {len(self.running)} running SLURM trial(s) go on, and `launch sweep` "
                      f"on this directory follows them again")
        else:
            self._say(f"{name}: asking {len(self.running)} running trial(s) to checkpoint and stop; "
                      f"`launch sweep` on this directory resumes them")
        for number in self.running:
            if self.slurm:
                continue  # SLURM trials go on without the controller; the next one follows them again
            write_atomic(os.path.join(self.run_dir(number), STOP_REQUEST), json.dumps(
                {"reason": f"the sweep controller stopped ({name})", "by": "launch sweep", "time": time.time()}))
        if self.slurm:
            self.running.clear()

    def _record(self, final: bool = False) -> None:
        records.write_all(self.study, self.spec, self.dir, self.name, self, final=final)

    def _exit_code(self) -> int:
        trials = self.study.get_trials(deepcopy=False)
        if self.stopping is not None:
            return 128 + self.stopping
        if sum(t.state == TrialState.FAIL for t in trials) >= self.spec.max_failures:
            return 1
        return 0 if any(t.state == TrialState.COMPLETE for t in trials) else 1

    def _lock(self) -> Any:
        f = open(os.path.join(self.dir, "controller.lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read().strip()
            f.close()
            raise UsageError(f"another `launch sweep` is running this sweep ({self.dir}{', pid ' + who if who else ''})"
                             f"; one controller per sweep directory") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        return f

    def _say(self, text: str) -> None:
        print(f"launch sweep: {text}", file=sys.stderr, flush=True)

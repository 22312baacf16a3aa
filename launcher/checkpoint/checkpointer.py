"""Saving, committing, finding and loading checkpoints during training (every rank runs this).

Save: every rank writes its DCP shard (replicated DDP tensors are split across ranks) and its rank<r>.json; the
ranks report to rank 0, which checks every file the DCP metadata names is there and long enough, writes
train_state.json and then manifest.json last, and tells every rank the outcome. Only then is the checkpoint the
newest. Retention runs after a commit and never touches a checkpoint newer than the committed one.

Resume: rank 0 picks the checkpoint (the newest committed one whose DCP metadata reads as plain metadata; a damaged
or refused newer one is skipped with a warning that names the file and the problem, and left in place) and
broadcasts its choice, so all ranks load the same one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import __version__, dist, faults
from . import dcp_io, layout, loading, rng
from .commit import broadcast, first_failure, permanent, retain, verify_and_write_manifest
from .storage import Storage

log = logging.getLogger("launcher")

# Recipe sections that do not change what a checkpoint holds: a resumed run may change them freely.
_NOT_HASHED = ("run", "launch", "checkpoint", "resume", "trainer")


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message says which and why."""


def recipe_hash(cfg: DictConfig) -> str:
    body = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Position:
    """Where training stands: optimizer steps taken, epoch, and samples of that epoch already trained on
    (a global count over all ranks, so it means the same thing on any world size)."""

    step: int = 0
    epoch: int = 0
    sample_offset: int = 0


class Stateful(Protocol):
    """What a checkpoint keeps besides the model and optimizer tensors: an object whose state is plain JSON data
    (the LR scheduler, the gradient scaler, the trainer's own state)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


# train_state.json's own keys: a state may not take one of these names.
_TRAIN_STATE_KEYS = ("step", "epoch", "sample_offset", "world_size", "batch_size", "recipe_hash", "launcher_version",
                     "saved_at", "metrics", "extras")


class Checkpointer:
    """Saves and loads this rank's part of a run's checkpoints.

    `device` is the training device (default: the one `dist.choose_device` picks for `trainer.device`). Every
    CUDA call in checkpointing (pinned staging buffers, events, synchronisation, the CUDA RNG stream, the device
    of the background threads) follows it, not whether CUDA is available: trainer.device=cpu on a GPU host never
    touches the GPU.

    `states` are kept in train_state.json under their names, each as its `state_dict()`; a resume hands each its
    saved value through `load_state_dict()` in the order given, before the model and optimizer tensors load (so a
    state may change which parameters train). A state absent from the checkpoint is left as it is."""

    def __init__(self, cfg: DictConfig, run_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 states: Mapping[str, Stateful | None] | None = None, device: torch.device | None = None) -> None:
        c = cfg.checkpoint
        self.cfg = cfg
        self.info = dist.rank_info()
        self.device = device if device is not None else dist.choose_device(str(cfg.trainer.device))
        self.storage = Storage(c.dir or f"{run_dir}/checkpoints", c.endpoint_url)
        self.every_steps: int | None = c.every_steps
        self.every_s: float | None = c.every_minutes * 60 if c.every_minutes else None
        self.at_end: bool = c.at_end
        self.keep: int = c.keep
        self.keep_best: int = c.keep_best
        self.monitor, self.mode = str(cfg.trainer.monitor), str(cfg.trainer.monitor_mode)
        self.use_async: bool = c.async_
        self.model, self.optimizer = model, optimizer
        self.states = {name: s for name, s in (states or {}).items() if s is not None}
        taken = sorted(set(self.states) & set(_TRAIN_STATE_KEYS))
        if taken:
            raise ValueError(f"checkpoint states may not be named {', '.join(taken)} (train_state.json's own keys)")
        self.hash = recipe_hash(cfg)
        self.last_step: int | None = None  # step of the newest checkpoint this run committed or resumed from
        self.committed_step: int | None = None  # the same, but only once it is committed
        self.last_time = time.monotonic()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stager: Any = None
        # Async saves coordinate on a group of their own, so their collectives never interleave with training's.
        self._pg = tdist.new_group(backend="gloo") if (self.use_async and tdist.is_initialized()) else None
        self._refused: set[str] = set()  # step folders whose metadata rank 0 refused: never counted nor removed

    # ------------------------------------------------------------------ state
    def _app_state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _my_share(self, state: dict[str, Any]) -> dict[str, Any]:
        """The part of the (replicated) state this rank writes: parameters are dealt to ranks by size, each with
        its optimizer state, so every rank stages and writes about 1/world of it. Loading asks for everything and
        reads each tensor from whichever file holds it, on any world size."""
        world = self.info.world_size
        if world == 1:
            return state
        optim_state = state["optim"].get("state", {})
        sizes = {}
        for fqn, t in state["model"].items():
            extra = sum(v.numel() * v.element_size() for v in optim_state.get(fqn, {}).values()
                        if isinstance(v, torch.Tensor))
            sizes[fqn] = t.numel() * t.element_size() + extra
        load = [0] * world
        mine = set()
        for fqn in sorted(sizes, key=lambda k: (-sizes[k], k)):  # largest first, onto the least loaded rank
            r = load.index(min(load))
            load[r] += sizes[fqn]
            if r == self.info.rank:
                mine.add(fqn)
        share: dict[str, Any] = {"model": {k: v for k, v in state["model"].items() if k in mine},
                                 "optim": {"state": {k: v for k, v in optim_state.items() if k in mine}}}
        if self.info.rank == 0:
            share["optim"]["param_groups"] = state["optim"]["param_groups"]
        return share

    def due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0 and step != self.last_step

    def time_due(self) -> bool:
        """This rank's view of the minute interval; trainers agree on it across ranks before acting."""
        return self.every_s is not None and time.monotonic() - self.last_time >= self.every_s

    # ------------------------------------------------------------------ save
    def save(self, pos: Position, reason: str, final: bool = False, metrics: dict[str, float] | None = None) -> bool:
        """Write and commit a checkpoint of the current state at `pos` (collective: every rank calls it).

        A failed write is tried again `checkpoint.retries` times, every rank together. When it still fails, every
        rank learns it at the same point: with `checkpoint.on_save_error: continue` (and not `final`, the last
        chance to save) this logs a warning and returns False; otherwise it raises CheckpointError. The previous
        committed checkpoint is never touched by a failed save."""
        try:
            self.wait()
        except CheckpointError as e:
            if not self._tolerate(e, final):
                raise
        if self.last_step == pos.step:
            return True
        previous = self.last_step
        try:
            self._save(pos, reason, metrics)
            return True
        except CheckpointError as e:
            self.last_step = previous
            if self._tolerate(e, final):
                return False
            raise

    def _tolerate(self, e: CheckpointError, final: bool) -> bool:
        if final or self.cfg.checkpoint.on_save_error != "continue":
            return False
        if self.info.is_main:
            log.warning("CHECKPOINT NOT SAVED: %s. Training goes on (checkpoint.on_save_error=continue); the next "
                        "save is tried at the usual interval", e)
        return True

    def _intact(self) -> str:
        newest = self.committed_step
        return (f"the previous committed checkpoint (step {newest}) is intact" if newest is not None
                else "no earlier checkpoint of this run was committed")

    def _save(self, pos: Position, reason: str, metrics: dict[str, float] | None = None) -> None:
        name = layout.step_dir(pos.step)
        path = self.storage.join(name)
        problem, clash, refused = None, False, None
        if self.info.is_main:
            try:
                self.storage.makedirs(self.storage.root)
                stale = layout.inspect(self.storage, name) if self.storage.list_files(path) else None
                if stale is not None and not stale.committed:
                    self.storage.remove_tree(path)  # leftovers of a save that never committed
                clash = stale is not None and stale.committed
                refused = dcp_io.refusal(self.storage, path) if clash else None
            except OSError as e:
                problem = f"preparing {path} failed: {e}"
        problem, clash, refused = broadcast((problem, clash, refused), None)  # every rank learns what rank 0 found
        if problem:
            raise CheckpointError(f"checkpoint {path} was not saved: {problem}; {self._intact()}")
        if refused:
            raise CheckpointError(f"checkpoint {path} was not saved: the folder holds a committed checkpoint whose "
                                  f"metadata is refused ({refused}). It is never overwritten or deleted: move it "
                                  f"out of {self.storage.root} (keep it to inspect; it may be crafted) and relaunch, "
                                  f"or point checkpoint.dir at a new directory; {self._intact()}")
        if clash:
            raise CheckpointError(f"{path} already holds a committed checkpoint from another run; it is never "
                                  f"overwritten. Point checkpoint.dir at a new directory.")
        dist.barrier()
        t0 = time.perf_counter()
        per_rank = {"rank": self.info.rank, "step": pos.step, "world_size": self.info.world_size,
                    "rng": rng.capture(self.device)}
        train_state = self._train_state(pos)
        train_state["metrics"] = dict(metrics or {})
        state = self._my_share(self._app_state())
        self.last_step = pos.step
        self.last_time = time.monotonic()
        if self.use_async:
            if self._stager is None:  # staging buffers are allocated once and reused by every later save
                self._stager = dcp_io.ReusingStager(self.device)
            writer = dcp_io.writer(self.storage, path, device=self.device, staged=True)
            future = dcp.async_save(state, storage_writer=writer, process_group=self._pg, async_stager=self._stager)
            stall = time.perf_counter() - t0
            log.info("checkpoint %s: saving in the background (training stalled %.3f s)", name, stall)

            def finish() -> None:
                try:
                    dcp_io.use_device(self.device)
                    result = future.result() if hasattr(future, "result") else future.upload_completion.result()
                    self._commit(name, path, per_rank, train_state, result, t0, reason, group=self._pg)
                except BaseException as e:  # surfaced on the main thread by wait()
                    self._error = e
            self._thread = threading.Thread(target=finish, name="checkpoint-commit", daemon=True)
            self._thread.start()
            return
        retries = int(self.cfg.checkpoint.retries)
        for attempt in range(retries + 1):
            try:
                faults.point("save.before_shards", pos.step, self.info.rank)
                metadata = dcp.save(state, storage_writer=dcp_io.writer(self.storage, path, device=self.device))
                self._commit(name, path, per_rank, train_state, metadata, t0, reason, group=None)
                return
            except (CheckpointException, CheckpointError) as e:  # raised on every rank together
                cause = first_failure(e)
                lasting = permanent(e)
                if attempt == retries or lasting:
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    why = " (not retried: it will not go away by itself)" if lasting and retries else ""
                    raise CheckpointError(f"checkpoint {path} was not saved{tries}: {cause}{why}; "
                                          f"{self._intact()}") from e
                delay = min(2 ** attempt, 30)
                if self.info.is_main:
                    log.warning("checkpoint %s: write failed (%s); trying again in %d s (retry %d of %d)", name,
                                cause, delay, attempt + 1, retries)
                time.sleep(delay)

    def wait(self) -> None:
        """Block until a background save has committed (or raise its error)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"background checkpoint save failed: {err}") from err

    def _train_state(self, pos: Position) -> dict[str, Any]:
        state: dict[str, Any] = {"step": pos.step, "epoch": pos.epoch, "sample_offset": pos.sample_offset,
                                 "world_size": self.info.world_size, "batch_size": int(self.cfg.data.batch_size),
                                 "recipe_hash": self.hash, "launcher_version": __version__, "saved_at": time.time()}
        for name, obj in self.states.items():
            value = obj.state_dict()
            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"the {name} state is not plain data ({e}); the launcher stores only JSON "
                                      f"next to tensors, so it never has to unpickle on load") from e
            state[name] = value
        return state

    def _commit(self, name: str, path: str, per_rank: dict, train_state: dict, metadata: Any, t0: float,
                reason: str, group: Any) -> None:
        problem = None
        faults.point("save.after_shards", train_state["step"], self.info.rank)
        try:
            self.storage.write_text(self.storage.sub(path, layout.rank_file(self.info.rank)), json.dumps(per_rank))
        except OSError as e:
            problem = f"rank {self.info.rank} could not write {layout.rank_file(self.info.rank)}: {e}"
        reports = dist.gather_objects({"rank": self.info.rank, "problem": problem}, group)
        outcome = None
        if self.info.is_main:
            outcome = verify_and_write_manifest(self.storage, name, path, reports, train_state, metadata,
                                                self.info.world_size, self.hash)
        outcome = broadcast(outcome, group)
        if outcome["problem"]:
            raise CheckpointError(f"checkpoint {path} was not committed: {outcome['problem']}")
        log.info("checkpoint %s committed (%s): step %d, %.1f MB in %.2f s", path, reason, train_state["step"],
                 outcome["bytes"] / 1e6, time.perf_counter() - t0)
        self.committed_step = train_state["step"]
        if self.info.is_main:
            try:
                retain(self.storage, self.keep, self.keep_best, self.monitor, self.mode, self._refused)
            except OSError as e:  # the new checkpoint is committed; old ones stay until a later save
                log.warning("checkpoint retention: could not remove an old checkpoint: %s", e)

    # ------------------------------------------------------------------ resume
    def resume(self, mode: str) -> Position | None:
        """Load the checkpoint `mode` asks for ('auto', 'never' or a path) into the model, optimizer, scheduler
        and RNG streams; return where training stands, or None to start fresh."""
        choice: dict[str, Any] = {"path": None, "skipped": [], "error": None}
        if self.info.is_main:
            try:
                choice = loading.choose(self.storage, mode)
                self._refused = set(choice["refused"])
            except OSError as e:  # nothing was chosen, loaded or changed
                choice["error"] = f"resume: reading the checkpoints in {self.storage.root} failed: {e}"
        choice = broadcast(choice, None)
        for path, problem in choice["skipped"]:
            log.warning("resume: skipped %s: %s", path, problem)
        if choice["error"]:
            raise CheckpointError(choice["error"])
        if choice["path"] is None:
            if mode == "auto":
                log.info("resume: no committed checkpoint in %s; starting from step 0", self.storage.root)
            return None
        return self._load(choice["path"], choice["storage_root"])

    def _load(self, path: str, storage_root: str) -> Position:
        storage = self.storage if storage_root == self.storage.root else Storage(storage_root,
                                                                                 self.storage.endpoint_url)
        train_state = json.loads(storage.read_text(storage.sub(path, layout.TRAIN_STATE)))
        older = train_state.get("extras") or {}  # where checkpoints before states kept the trainer's own
        for name, obj in self.states.items():
            value = train_state[name] if name in train_state else older.get(name)
            if value is not None:
                obj.load_state_dict(value)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        meta = dcp_io.metadata(storage, path)
        model_sd = get_model_state_dict(self.model)
        problems = loading.shape_problems(meta, model_sd)
        if problems:
            raise CheckpointError(f"checkpoint {path} does not fit this model (was the recipe's model changed?): "
                                  + "; ".join(problems))
        loading.empty_optimizer_state(self.optimizer, meta, model_sd)
        state = {"model": model_sd, "optim": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.load(state, storage_reader=dcp_io.reader(storage, path), planner=dcp_io.SafeLoadPlanner())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        saved_world = int(train_state["world_size"])
        if saved_world == self.info.world_size:
            per_rank = json.loads(storage.read_text(storage.sub(path, layout.rank_file(self.info.rank))))
            rng.restore(per_rank["rng"], self.device, self.info.rank)
        else:
            from ..data import derive_seed
            rng.seed_all(derive_seed(int(self.cfg.seed), self.info.rank, int(train_state["step"])))
            if self.info.is_main:
                log.warning("resume: the checkpoint was written by %d ranks and this run has %d: model and "
                            "optimizer reshard, and no sample of the interrupted epoch is repeated or skipped, but "
                            "results are not bitwise equal to an uninterrupted run (that needs the same world size)",
                            saved_world, self.info.world_size)
        if train_state.get("recipe_hash") != self.hash and self.info.is_main:
            log.warning("resume: the recipe's model, data or optimizer settings differ from the ones %s was "
                        "written with (recipe hash %s, now %s)", path, train_state.get("recipe_hash"), self.hash)
        pos = Position(int(train_state["step"]), int(train_state["epoch"]), int(train_state["sample_offset"]))
        self.last_step = self.committed_step = pos.step
        log.info("resume: from %s: step %d, epoch %d, sample %d of the epoch", path, pos.step, pos.epoch,
                 pos.sample_offset)
        return pos

"""The local backend: torchrun's elastic agent (torch.distributed.launcher), in this process.

`plan()` is torch-free (it backs `--dry-run`); `run()` says what starts, then `start()` imports torch, starts
`nodes x procs_per_node` workers (forked from a fork server that imported torch once, `launcher.preload`, or
`python -m launcher.worker RUN_DIR` with launch.preload_workers=false) and turns a worker failure into a report
that names the rank, host, exit code or signal and that rank's log file.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import time
import uuid
from typing import Any, Callable, Mapping

from .. import hardware
from ..errors import UsageError
from ..files import tail_lines
from ..monitor import log_path
from . import rendezvous
from .plan import DEVICE_ENV, Options, Plan

log = logging.getLogger("launcher")


def plan(cfg: Any, run_dir: str, options: Options | None = None, *, run_id: str | None = None,
         gpus: int | None = None) -> Plan:
    """Decide devices and process counts for this node; raise UsageError when the machine cannot do it.

    One node: a private c10d rendezvous on a free local port. Several nodes: every node runs `launch` with the same
    `options.rdzv_endpoint` (HOST:PORT of one of them); node ranks come from the c10d rendezvous, or are fixed by
    `options.node_rank` (a static rendezvous, as torchrun's --node-rank). `gpus` is the number of visible GPUs
    (found on this machine when not given)."""
    options = options or Options()
    rdzv_endpoint, node_rank = options.rdzv_endpoint, options.node_rank
    launch = cfg.launch
    if launch.nodes > 1 and not rdzv_endpoint:
        raise UsageError(f"--nodes {launch.nodes} needs a rendezvous every node can reach: run the same command on "
                         f"each node with --rdzv-endpoint HOST:PORT (HOST is one of the nodes)")
    if rdzv_endpoint and not _valid_endpoint(rdzv_endpoint):
        raise UsageError(f"--rdzv-endpoint {rdzv_endpoint!r} is not HOST:PORT (for example node1:29500)")
    if node_rank is not None and not 0 <= node_rank < launch.nodes:
        raise UsageError(f"--node-rank {node_rank} is outside 0..{launch.nodes - 1} for --nodes {launch.nodes}")
    # The one device decision of the job: GPUs as the driver's files show them (torch-free, so --dry-run and the
    # submit path stay fast). Every rank follows it ($LAUNCHER_DEVICE, dist.choose_device), and `run` checks first
    # that this environment's torch can drive them.
    wanted = cfg.trainer.device
    gpus = hardware.visible_gpu_count() if gpus is None else gpus
    notes: list[str] = []
    if wanted == "cuda" and gpus == 0:
        raise UsageError("trainer.device is 'cuda' but this machine has no visible GPU (check nvidia-smi or "
                         "rocm-smi, and CUDA_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES), or set "
                         "trainer.device=cpu")
    use_cuda = gpus > 0 and wanted != "cpu"
    procs = launch.gpus_per_node
    if use_cuda:
        procs = gpus if procs is None else procs
        if procs > gpus:
            visible = hardware.visibility_settings()
            raise UsageError(
                f"--gpus {procs} asks for more GPUs than this machine has: {gpus} visible"
                f"{f' ({visible})' if visible else ''}. "
                f"Use --gpus {gpus} or fewer, or set trainer.device=cpu to run CPU processes.")
    else:
        procs = 1 if procs is None else procs
        notes.append(f"no CUDA device: running {procs} process{'es' if procs != 1 else ''} per node on the CPU "
                     f"with gloo" if gpus == 0 else f"trainer.device=cpu: running {procs} CPU processes with gloo")
    device = "cuda" if use_cuda else "cpu"
    env: dict[str, str] = {"LAUNCHER_RUN_DIR": run_dir, DEVICE_ENV: device,
                           "LAUNCHER_COLLECTIVE_TIMEOUT_S": str(int(launch.collective_timeout_s))}
    # The CPUs this process may use (affinity, SLURM's cpus per task) shared out; the user's own setting wins.
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(hardware.threads_per_process(procs))
    if use_cuda:
        env.update({k: v for k, v in nccl_flight_recorder(run_dir).items() if k not in os.environ})
    single = launch.nodes == 1 and rdzv_endpoint is None
    return Plan(
        backend="local",
        nodes=int(launch.nodes),
        procs_per_node=int(procs),
        device=device,
        dist_backend="nccl" if use_cuda else "gloo",
        rdzv_backend="static" if node_rank is not None else "c10d",
        node_rank=node_rank,
        rdzv_endpoint="localhost:0 (a free port, this node only)" if single else str(rdzv_endpoint),
        run_id=run_id or (_stable_run_id(rdzv_endpoint) if rdzv_endpoint else uuid.uuid4().hex[:12]),
        run_dir=run_dir,
        max_restarts=int(launch.max_restarts),
        rdzv_timeout_s=int(launch.rdzv_timeout_s or rdzv_timeout_default(int(launch.nodes))),
        entrypoint=[sys.executable, "-m", "launcher.worker", run_dir],
        preload_workers=bool(launch.preload_workers),
        env=env,
        notes=notes,
        name=str(cfg.run.name),
    )


def nccl_flight_recorder(run_dir: str) -> dict[str, str]:
    """NCCL's flight recorder, on: the last collectives of every rank are kept, and dumped when NCCL's watchdog
    times a collective out, one file per rank under RUN_DIR/nccl-trace/ (named in the failure report)."""
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": os.path.join(run_dir, "nccl-trace", "rank_")}


_NCCL_WATCHDOG = re.compile(r"Watchdog caught collective operation timeout|ProcessGroupNCCL's watchdog|"
                            r"NCCL watchdog|Some NCCL operations have failed or timed out")


def nccl_watchdog_note(log_lines: list[str], run_dir: str, rank: int) -> str | None:
    """When a rank's log shows that NCCL's own watchdog aborted it (a collective outlived NCCL's timeout, set a
    margin above launch.collective_timeout_s), say so and where the flight recorder wrote what each rank was in."""
    if not any(_NCCL_WATCHDOG.search(line) for line in log_lines):
        return None
    return (f"NCCL's watchdog aborted rank {rank}: a collective did not finish within NCCL's timeout "
            f"(launch.collective_timeout_s plus a margin); the flight recorder's dump of each rank's last "
            f"collectives is in {os.path.join(run_dir, 'nccl-trace')} (rank_<r>)")


def rdzv_timeout_default(nodes: int) -> int:
    """Large jobs take longer to gather: 300 s plus 1 s per node."""
    return 300 + nodes


def run(p: Plan) -> int:
    """`launch`'s start of a local run: say what starts and where its logs go, then `start` it."""
    for note in p.notes:
        print(f"launch: {note}", file=sys.stderr)
    print(f"launch: run {p.name}: {p.world_size} process{'es' if p.world_size != 1 else ''} "
          f"({p.nodes} node{'s' if p.nodes != 1 else ''} x {p.procs_per_node}), "
          f"logs in {os.path.join(p.run_dir, 'logs')}", file=sys.stderr)
    return start(p)


def start(p: Plan) -> int:
    """Start the workers of this node and wait; returns the exit code for `launch` (each SLURM node task calls
    this directly)."""
    before = dict(os.environ)  # what a refusal puts back (check_device below): nothing was started
    os.environ.update(p.env)
    # The agent's shared store outlives a restart of the group, and restarted workers then read the previous
    # attempt's gloo addresses and fail to connect. A store of their own per attempt (hosted by rank 0) avoids it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    single = p.rdzv_endpoint.startswith("localhost:0")
    endpoint = "localhost:0" if single else p.rdzv_endpoint
    local_addr = None
    if not single:
        host, _, port = endpoint.rpartition(":")
        local_addr = rendezvous.local_addr_towards(host, int(port))
        os.environ.update(socket_interface_env(local_addr, os.environ))
    os.environ["LAUNCHER_AGENT_PID"] = str(os.getpid())  # the ranks' parent may be the fork server instead
    if p.preload_workers:
        # First, with the ranks' environment complete: the server imports torch and the launcher in a process of
        # its own while this one imports torch's agent below (two imports of seconds each, side by side).
        _start_fork_server()

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    try:
        check_device(p)  # on CUDA it imports torch: side by side with the server's imports too
    except UsageError:
        _stop_fork_server()
        os.environ.clear()
        os.environ.update(before)
        raise
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    _stop_children_of_failed_ranks(os.path.join(p.run_dir, "events.jsonl"))
    # join_timeout: how long nodes wait for each other (c10d); timeout: the same for a static rendezvous;
    # read_timeout: how long a node waits for the store at the endpoint to answer (torch's 60 s is too short when
    # the host node starts late).
    t = p.rdzv_timeout_s
    rdzv_configs: dict[str, Any] = {"timeout": t, "join_timeout": t, "read_timeout": t}
    if p.node_rank is not None:
        rdzv_configs["rank"] = p.node_rank
    watch = None
    store = None
    if not single and p.rdzv_backend == "c10d":
        # Decided here, not by torch's guess from the host name: every agent on the endpoint's machine would
        # guess it hosts, and one that misses an address of a secondary interface hosts nothing.
        if rendezvous.is_local_address(host):
            store = rendezvous.claim_store(host, int(port), t)
        rdzv_configs["is_host"] = store is not None
        if store is not None:
            sys.stderr.write(f"launch: this node hosts the rendezvous store at {endpoint}\n")
        watch = rendezvous.RendezvousWatch(host, int(port), p.run_id, p.nodes, t).start()
    entrypoint: Any = p.entrypoint[0]
    args: list[Any] = p.entrypoint[1:]
    if p.preload_workers:
        from ..worker import run_rank
        entrypoint, args = run_rank, [p.run_dir]
    config = LaunchConfig(
        min_nodes=p.nodes, max_nodes=p.nodes, nproc_per_node=p.procs_per_node, run_id=p.run_id,
        rdzv_backend=p.rdzv_backend, rdzv_endpoint=endpoint, rdzv_configs=rdzv_configs,
        max_restarts=p.max_restarts, monitor_interval=0.1, start_method="forkserver", local_addr=local_addr,
    )
    try:
        elastic_launch(config, entrypoint=entrypoint)(*args)
    except ChildFailedError as e:
        sys.stderr.write(failure_report(e.failures, p.run_dir, restarts=p.max_restarts))
        _write_failure_json(e.failures, p.run_dir)
        return 1
    except RendezvousTimeoutError:
        arrived = watch.arrived if watch else []
        sys.stderr.write(f"launch: error: {rendezvous.missing_nodes_message(endpoint, p.nodes, t, arrived)}\n")
        return 1
    except SignalException as e:
        sys.stderr.write(f"launch: stopped by {signal.Signals(e.sigval).name}; workers were shut down\n")
        return 128 + int(e.sigval)
    finally:
        if watch is not None:
            watch.stop()
    return 0


def check_device(p: Plan) -> None:
    """Before any worker starts: can this environment's torch drive the GPUs the plan decided on? The plan counted
    them from the driver's files, without torch; a CPU-only torch on a GPU host would otherwise fail in every rank
    (dist.choose_device makes the same check there). Raises UsageError naming both sides."""
    if p.device != "cuda":
        return
    import torch

    from .. import dist

    # Counting initialises the CUDA driver in this process, which no rank inherits: ranks start in fresh
    # interpreters (commands, or the fork server, itself a fresh interpreter).
    try:
        dist.decide_device("auto", p.device, torch.cuda.device_count, build=dist.torch_build(),
                           local_rank=p.procs_per_node - 1, local_world_size=p.procs_per_node,
                           who=f"the ranks' Python on host {socket.gethostname()}, checked before starting them")
    except RuntimeError as e:
        raise UsageError(f"{e}; nothing was started") from None


def socket_interface_env(local_addr: str | None, environ: Mapping[str, str],
                         interface_of: Callable[[str], str | None] = rendezvous.interface_of) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME for a multi-node run: the interface holding `local_addr`, this
    node's address towards the rendezvous, for each one the user has not set. Left alone, gloo takes the interface
    its host name resolves to and NCCL the first one it likes (a docker or management network the other nodes
    may not reach). NCCL reads the name as a prefix (eth1 also matches eth10); '=' asks for exactly this one."""
    ifname = interface_of(local_addr) if local_addr else None
    if not ifname:
        return {}
    wanted = {"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": f"={ifname}"}
    return {name: value for name, value in wanted.items() if name not in environ}


def _start_fork_server() -> None:
    """Start this node's fork server now, with the environment the ranks get (the caller has set all of it): it
    imports torch and the launcher (launcher.preload) while the agents meet, and every rank is then forked from it.
    Imports nothing of torch here: the server's imports and the agent's run side by side."""
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    multiprocessing.set_forkserver_preload(["launcher.preload"])
    # The ranks inherit the server's signal mask (under SLURM SIGTERM and SIGUSR2 stay blocked from the start, see
    # slurm_node.hold_preemption_signal). multiprocessing starts its resource tracker first and then unblocks SIGINT and
    # SIGTERM in the calling thread: start the tracker alone, put the mask back, then start the server.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    forkserver.ensure_running()


def _stop_fork_server() -> None:
    """End the fork server `_start_fork_server` started (a refused launch ends it before any rank exists)."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        try:
            stop()
        except OSError:
            pass


def _stop_children_of_failed_ranks(events_path: str) -> None:
    """When the agent stops the worker group after a failure, first SIGKILL what is left of each failed rank's
    process group: its DataLoader workers. They are forked from the rank and hold its gloo sockets open, so the
    other ranks wait inside a collective (where SIGTERM cannot interrupt them) until those orphans notice their
    parent is gone, up to torch's 5 s watchdog interval later; torch's agent signals only the ranks still running.
    Each rank leads a process group of its own (the agent starts it in a new session; a forked rank makes one,
    `worker.run_rank`), and a group's id is not reused while the group has members. The stop and its end go to
    events.jsonl (`group_stop`, `group_stopped`).

    Ranks started as commands (SubprocessContext): torch signals each surviving rank's group; the failed groups
    are killed before, in its private `_close` (where it is missing, torch's close stays: recovery works, only
    slower). Ranks forked from the fork server: torch's public `ProcessContext.join` stops the surviving ranks as
    it finds a failed one; the failed groups are killed before it."""
    from torch.distributed.elastic.multiprocessing import api
    from torch.multiprocessing.spawn import ProcessContext

    sub = getattr(api, "SubprocessContext", None)
    original = getattr(sub, "_close", None)
    if original is None:
        log.debug("torch's SubprocessContext._close is not there; a failed rank's loader workers are left to torch")
    else:
        close = getattr(original, "__wrapped__", original)

        def _close(self: Any, *args: Any, **kwargs: Any) -> None:
            handlers = getattr(self, "subprocess_handlers", {})
            failed = {r: h.proc.pid for r, h in handlers.items() if h.proc.poll() not in (None, 0)}
            first = _kill_failed_groups(self, events_path, failed)
            close(self, *args, **kwargs)
            if first:
                _agent_event(events_path, "group_stopped")

        _close.__wrapped__ = close  # type: ignore[attr-defined]
        sub._close = _close  # type: ignore[union-attr]

    join = getattr(ProcessContext.join, "__wrapped__", ProcessContext.join)

    def _join(self: Any, *args: Any, **kwargs: Any) -> Any:
        failed = {i: p.pid for i, p in enumerate(self.processes) if p.exitcode not in (None, 0)}
        _first_failure_first(self, failed)
        first = _kill_failed_groups(self, events_path, failed)
        try:
            return join(self, *args, **kwargs)
        finally:
            if first:
                _agent_event(events_path, "group_stopped")

    _join.__wrapped__ = join  # type: ignore[attr-defined]
    ProcessContext.join = _join  # type: ignore[method-assign]


def _first_failure_first(context: Any, failed: dict[int, int]) -> None:
    """Make torch's join report the rank that failed first. It reports the first failed process in the order of its
    sentinels (rank order), so when a rank raises and its peer fails a moment later on the closed connection, both
    within one poll, the peer (rank 0) would be named. Of the ranks failed by now the first is one a signal killed
    from outside (no error of its own, and the others' errors follow from it; the agent has signalled none yet),
    else the one whose error file was written first; its sentinel goes first, and the other failed ones out of the
    way (they are reaped already, and join ends every process anyway)."""
    sentinels = getattr(context, "sentinels", None)
    if not failed or not isinstance(sentinels, dict):
        return

    def when(i: int) -> tuple[int, float]:
        try:  # torch.multiprocessing's error file of the rank: written when its exception reached the top
            return 1, os.path.getmtime(context.error_files[i])
        except (OSError, TypeError, IndexError, AttributeError):
            return (0, 0.0) if (context.processes[i].exitcode or 0) < 0 else (1, float("inf"))

    first = min(failed, key=lambda i: (*when(i), i))
    ordered = {s: i for s, i in sentinels.items() if i == first}
    ordered.update({s: i for s, i in sentinels.items() if i not in failed})
    sentinels.clear()
    sentinels.update(ordered)


def _kill_failed_groups(context: Any, events_path: str, failed: dict[int, int]) -> bool:
    """SIGKILL the process group of each failed rank (local rank -> pid); returns whether this is the first close of
    the group after a failure (the agent closes a group twice), which is then written to events.jsonl."""
    for pid in failed.values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # nothing of that group is left
            pass
    first = bool(failed) and not getattr(context, "_launcher_stopped", False)
    if first:
        context._launcher_stopped = True
        _agent_event(events_path, "group_stop", failed_local_ranks=sorted(failed))
    return first


def _agent_event(path: str, name: str, **extra: Any) -> None:
    """A milestone of this node's agent in events.jsonl, in the shape the ranks write theirs."""
    import json
    try:
        with open(path, "a") as f:
            f.write(json.dumps({"event": name, "time": time.time(), "host": socket.gethostname(),
                                "agent_pid": os.getpid(), **extra}) + "\n")
    except OSError:
        pass


def _valid_endpoint(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _stable_run_id(endpoint: str) -> str:
    """The same on every node of one job: nodes agree on the rendezvous id only through what they share, the
    endpoint. (An id from the run directory split two nodes given --run-dir of their own into two rendezvous
    that each waited for the other.)"""
    import hashlib
    return hashlib.sha1(endpoint.encode()).hexdigest()[:12]


def failed_ranks(failures: dict[int, Any], run_dir: str, host: str | None = None) -> list[dict[str, Any]]:
    """The failed ranks as data, first failure first: rank, local rank, pid, host, how it ended (exit code or
    signal), its error's last line (None when torch recorded none), its log, when."""
    host = host or socket.gethostname()
    out = []
    for rank, f in sorted(failures.items(), key=lambda kv: (kv[1].timestamp or 0, kv[0])):
        if f.exitcode < 0:
            try:
                how = f"killed by signal {signal.Signals(-f.exitcode).name}"
            except ValueError:
                how = f"killed by signal {-f.exitcode}"
        else:
            how = f"exit code {f.exitcode}"
        message = f.message if isinstance(f.message, str) else f.message.get("message", "")
        error = (message.strip().splitlines()[-1] if message.strip() and not message.startswith("To enable traceback")
                 else None)
        out.append({"rank": rank, "local_rank": f.local_rank, "pid": f.pid, "host": host, "how": how, "error": error,
                    "log": log_path(run_dir, rank), "time": f.timestamp})
    return out


def failure_report(failures: dict[int, Any], run_dir: str, host: str | None = None, tail: int = 12,
                   restarts: int = 0) -> str:
    """A plain report of failed ranks, first failure first: rank, host, exit code or signal, message, log."""
    ranks = failed_ranks(failures, run_dir, host)
    after = f", after {restarts} restart{'s' if restarts != 1 else ''} (launch.max_restarts)" if restarts else ""
    out = [f"launch: {len(ranks)} rank{'s' if len(ranks) != 1 else ''} failed (first failure first){after}\n"]
    for r in ranks:
        out.append(f"  rank {r['rank']} (local rank {r['local_rank']}, pid {r['pid']}) on host {r['host']}: "
                   f"{r['how']}\n")
        if r["error"]:
            out.append(f"    error: {r['error']}\n")
        out.append(f"    log: {r['log']}\n")
        recent = tail_lines(r["log"], 200)
        lines = recent[-tail:]
        note = nccl_watchdog_note(recent, run_dir, r["rank"])
        if note:
            out.append(f"    {note}\n")
        if lines:
            out.append("    last lines of the log:\n")
            out.extend(f"      | {line}\n" for line in lines)
    return "".join(out)


def _write_failure_json(failures: dict[int, Any], run_dir: str) -> None:
    """RUN_DIR/failure.json: the failed ranks as data (failed_ranks), what `launch sweep` reports of a trial."""
    import json

    from ..files import write_atomic

    try:
        write_atomic(os.path.join(run_dir, "failure.json"),
                     json.dumps({"ranks": failed_ranks(failures, run_dir)}, indent=2))
    except OSError:
        pass

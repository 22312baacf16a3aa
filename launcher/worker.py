"""What every rank runs (started by the local backend's torchrun agent): `run_rank(RUN_DIR)` in a process forked
from the node's fork server (`launch.preload_workers`, the default; see launcher.preload), or
`python -m launcher.worker RUN_DIR` in a fresh interpreter.

It reads RUN_DIR/config.yaml, sends its output to RUN_DIR/logs/rank<r>.log, then runs either the built-in trainer
or the user's own script (with the torchrun environment already set), and always tears the process group down.

A rank that finishes leaves without Python's interpreter finalization, as multiprocessing's children do: it waits
for its non-daemon threads, runs the atexit handlers (logging, W&B), flushes every open Python file, then exits.
Finalization can kill a finished rank with SIGABRT: a gloo worker thread that drops its last reference to a
completed collective while the interpreter is shutting down cannot take the GIL, and the thread's forced exit
through a C++ destructor aborts the process (more likely on a loaded machine, and also in plain torchrun scripts
that call destroy_process_group while their DDP model still holds the group).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import runpy
import signal
import sys
import traceback
from types import FrameType

from torch.distributed.elastic.multiprocessing.errors import record

from . import dist, monitor, procs, recipe

log = logging.getLogger("launcher")


_LEAVING = False  # set as the worker's `finally` begins: from then on no signal handler raises
_PRINTED: BaseException | None = None  # the error whose traceback main() wrote, so that it is written once


_DONE = False  # set once the rank has left (procs.leave ran): from then on SIGTERM ends the process at once
_TERM_PENDING: int | None = None  # a SIGTERM that came while the rank was leaving


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # The agent stops the surviving ranks with SIGTERM when one fails: unwind so `finally` blocks run. A rank that
    # is leaving already finishes that first (its files and atexit handlers), then ends: a finished rank forked
    # from the fork server waits for the agent's word that every rank is done, which never comes once a peer has
    # failed, and would otherwise sit out torch's 30 s before its SIGKILL.
    global _TERM_PENDING
    if _DONE:
        os._exit(128 + signum)
    if not _LEAVING:
        raise SystemExit(128 + signum)
    _TERM_PENDING = signum


def _left() -> None:
    """The rank has left (procs.leave ran): a SIGTERM that came meanwhile ends it now, a later one at once."""
    global _DONE
    _DONE = True
    if _TERM_PENDING is not None:
        os._exit(128 + _TERM_PENDING)


def install_signal_handlers() -> None:
    """SIGTERM unwinds the worker; SIGCHLD gets the handler torch's DataLoader installs at its first iterator
    (it raises when a loader worker died), installed now and wrapped. When one rank fails, the agent sends SIGTERM to
    the process group of every other rank, loader workers included, so a rank gets its own SIGTERM and a SIGCHLD per
    killed loader worker, in either order. Both handlers raise; one that runs inside the worker's `finally` would
    skip leaving the process group. Both go quiet once `_LEAVING` is set, which a plain assignment does: no handler
    can run before it takes effect, as one could before a call that replaces the handlers. Under SLURM only the
    agent's SIGTERM reaches `_exit_on_sigterm`; SLURM's asks for a checkpoint (`dist.StopRequest.take_slurm_sigterm`)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    dist.STOP.take_slurm_sigterm()
    try:
        from torch.utils.data._utils import signal_handling
        signal_handling._set_SIGCHLD_handler()  # once per process: later DataLoader iterators keep this one
    except (ImportError, AttributeError):
        return
    loader_handler = signal.getsignal(signal.SIGCHLD)
    if callable(loader_handler):
        def on_child_exit(signum: int, frame: FrameType | None) -> None:
            if not _LEAVING:
                loader_handler(signum, frame)
        signal.signal(signal.SIGCHLD, on_child_exit)


_SCRIPT_GLOBALS: list[dict] = []  # what a finished script left behind, kept until the process exits


def run_script(cfg: recipe.DictConfig) -> None:
    """Run a plain training script (or module) as `__main__`, as `python script.py ARGS` would.

    Its globals are kept, never freed: as in `python script.py`, whose objects live until the process ends (and
    this process ends without finalization, see `exit_now`). Freeing them here would run the destructors in the
    middle of the rank: a DDP model of a script that already called destroy_process_group holds the last
    reference to its gloo group, and that group's destructor waits, holding the GIL, for a gloo thread that needs
    the GIL to finish its last work item (the rank hangs)."""
    args = [str(a) for a in cfg.script.args]
    if cfg.script.path:
        path = os.path.abspath(cfg.script.path)
        sys.argv = [path, *args]
        sys.path.insert(0, os.path.dirname(path))
        _SCRIPT_GLOBALS.append(runpy.run_path(path, run_name="__main__"))
    else:
        sys.argv = [cfg.script.module, *args]
        sys.path.insert(0, os.getcwd())
        _SCRIPT_GLOBALS.append(runpy.run_module(cfg.script.module, run_name="__main__", alter_sys=True))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest glibc accepts on 64-bit


def keep_freed_memory() -> str:
    """Tell glibc's malloc to keep freed memory in this process: a training step allocates and frees the same
    activations, gradients and optimizer temporaries every time, and by default glibc returns them to the OS (heap
    trimming, mmap for large blocks) only to fault the pages in again, zero-filled, on the next step. Returns what
    was done, for the rank's log."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                                      "MALLOC_MMAP_MAX_")):
        return "malloc options as the environment sets them (GLIBC_TUNABLES / MALLOC_*_)"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(a in preload for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return "malloc options of the preloaded allocator"
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return "freed memory goes back to the OS (not glibc)"
        import ctypes
        libc = ctypes.CDLL(None)
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)  # the largest int: never trim
    except (OSError, ValueError, AttributeError):
        return "freed memory goes back to the OS (not glibc)"
    if not ok:
        return "freed memory goes back to the OS (mallopt refused)"
    return "freed memory kept for reuse"


def die_with_agent() -> None:
    """Ask Linux to SIGKILL this worker when the process that started it dies (the agent in `launch`, or the node's
    fork server, which exits as soon as the agent does), so that a `kill -9` of launch or a crashed agent never
    leaves orphaned ranks running (and holding GPUs)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@record
def main(argv: list[str] | None = None) -> None:
    global _LEAVING, _PRINTED
    die_with_agent()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m launcher.worker RUN_DIR")
    run_dir = argv[0]
    cfg = recipe.load_resolved(os.path.join(run_dir, "config.yaml"))
    memory = (keep_freed_memory() if cfg.launch.keep_freed_memory
              else "freed memory goes back to the OS (launch.keep_freed_memory=false)")
    info = dist.rank_info()
    monitor.setup_rank_logging(run_dir, info.rank)
    if os.environ.get("LAUNCHER_DOCTOR"):
        monitor.quiet_console()  # `launch doctor` prints its table; the rank's log keeps the start line
    install_signal_handlers()
    dist.STOP.install(signal.SIGUSR2)
    log.info("worker start: rank %d local_rank %d world_size %d node %d host %s pid %d restart %d; host memory: %s",
             info.rank, info.local_rank, info.world_size, info.node_rank, info.host, os.getpid(), info.restart_count,
             memory)
    failed = False
    try:
        if os.environ.get("LAUNCHER_DOCTOR"):  # `launch doctor`: the checks instead of training
            from .doctor.ranks import run as doctor
            doctor(cfg, run_dir)
        elif cfg.script.path or cfg.script.module:
            run_script(cfg)
        else:
            from .trainer import train
            train(cfg, run_dir)
    except SystemExit as e:
        if e.code not in (0, None):
            failed = True
            log.error("exiting with code %s", e.code)
        raise
    except BaseException as e:
        failed = True
        sys.stderr.write(traceback.format_exc())  # now: teardown below can hang until the agent kills the rank
        _PRINTED = e
        raise
    finally:
        _LEAVING = True  # first: see install_signal_handlers
        dist.teardown(abort=failed)
        # From here the process only exits. Python restores default handlers while it shuts down, and by default
        # SIGUSR2 kills: a late preemption signal must not turn a finished rank into a failed one.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def run_rank(run_dir: str) -> None:
    """A rank forked from the node's fork server (launcher.preload): the same as `python -m launcher.worker RUN_DIR`.

    First what a fresh interpreter started by torch's agent would have: a session of its own (the agent stops a
    rank by signalling its process group, loader workers included), the default dispositions of the signals the
    server ignores, the command line of `python -m launcher.worker RUN_DIR` (the import path is the agent's, which
    multiprocessing passes on), the platform's default start method (a fork server's child inherits "forkserver",
    and its DataLoader would start a fork server of its own), and numpy's global generator seeded afresh (a forked
    one would repeat the server's numbers on every rank). It returns instead of exiting, because multiprocessing
    hands the return value to the agent; multiprocessing then ends the process without the interpreter's
    finalization (see `exit_now`), after what `procs.leave` ran here."""
    die_with_agent()
    _let_the_fork_server_end_with_the_agent()
    try:
        os.setsid()
    except OSError:  # already a group leader
        pass
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    sys.argv = [os.path.abspath(__file__), run_dir]
    multiprocessing.set_start_method(None, force=True)  # the platform's default again, not the fork server
    numpy = sys.modules.get("numpy.random")
    if numpy is not None:
        numpy.seed()
    try:
        main([run_dir])
    except Exception as e:  # torch's wrapper keeps it for the agent's report and exits 1; print it as Python would
        if e is not _PRINTED:
            traceback.print_exc()
        raise
    finally:
        procs.leave(open_files=True)
        _left()


def _let_the_fork_server_end_with_the_agent() -> None:
    """Close this rank's copy of the pipe that keeps the fork server running. multiprocessing hands every child of
    the server the agent's end of that pipe (so that a child could use the same server), and the server runs until
    every copy is closed: with the ranks holding one, a killed agent would leave the server, and so the ranks (whose
    death signal comes from the server), running. The death signal is in place already (`die_with_agent`); if the
    agent died before that, this rank leaves now."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None  # type: ignore[union-attr]
    agent = os.environ.get("LAUNCHER_AGENT_PID", "")
    if agent.isdigit():
        try:
            os.kill(int(agent), 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass


def exit_now(code: int) -> None:
    """Leave the process with `code` after what a normal exit does for Python code, minus the interpreter's
    finalization: once gloo and DDP were used, that aborts the process now and then (SIGABRT, "terminate called
    without an active exception", no Python frame left), which would turn a finished rank into a failed one. A
    SIGTERM that came while it was leaving ends it as the signal asked (128 + 15), as in a forked rank."""
    procs.leave(open_files=True)
    _left()
    os._exit(code)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
        exit_now(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
    except Exception as e:  # what Python does with it, the traceback and exit code 1, minus the finalization
        if e is not _PRINTED:  # main() printed its own already; this is one raised before main()'s try
            traceback.print_exc()
        exit_now(1)
    exit_now(0)

"""The doctor's SLURM check: the recipe against the allocation it runs in, or against the cluster it would be
submitted to. No torch import here (it runs in the command, before any rank starts).

    salloc -N 2 launch doctor recipe.yaml --only slurm      # inside an allocation: nodes, GPUs, time limit, requeue
    launch doctor recipe.yaml --slurm --only slurm          # from a login node: sbatch --test-only of the real job

Inside an allocation (SLURM_JOB_ID set) the allocation SLURM granted is compared with the recipe: fewer nodes or
GPUs than it asks fail, naming the shortfall and the flag that fixes it; a time limit within the signal grace
fails, one shorter than slurm.time_min warns; a batch job that cannot requeue warns when slurm.max_requeues > 0.
From a login node the sbatch header `launch --slurm` would submit (`backends.slurm.sbatch_script`, the same
parameter table and executor) goes to `sbatch --test-only` with a body that does nothing; a refusal fails, naming
the recipe key to change. The partition's GPUs, time limit and preemption mode are checked too.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import shutil
import subprocess
import time
from typing import Any

from ..errors import LauncherError
from .report import FAIL, PASS, WARN, Result

TIMEOUT_S = 60  # per SLURM command: a controller that is down makes sbatch retry for ~20 s before it gives up
_ORDER = {PASS: 0, WARN: 1, FAIL: 2}


class _Unavailable(Exception):
    """A SLURM command is missing, timed out, or could not reach the controller; the message says which and what
    it said."""


def check(cfg: Any, submit: bool) -> Result | None:
    """The SLURM row of the doctor's table: the allocation when inside one, else (with `submit`) the job sbatch
    would be given; None when neither applies."""
    t0 = time.perf_counter()
    try:
        if os.environ.get("SLURM_JOB_ID"):
            result = _allocation(cfg)
        elif submit:
            result = _submission(cfg)
        else:
            return None
    except _Unavailable as e:
        result = Result("slurm", FAIL, "SLURM does not answer", f"{e}. Run the doctor where the SLURM commands "
                        "work (a login node of the cluster) and check the controller with `scontrol ping`")
    except Exception as e:  # a row that says what broke, not a traceback that hides the other checks' results
        result = Result("slurm", FAIL, "the check itself failed", f"{type(e).__name__}: {e} (a launcher bug: "
                        "please report it with this recipe)")
    result.seconds = round(time.perf_counter() - t0, 2)
    return result


class _Findings:
    """What one check found: a status, a short label (the figure) and advice, each; reduced to one Result whose
    status is the worst and whose figure names what is wrong."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []

    def add(self, status: str, label: str, advice: str) -> None:
        self.items.append((status, label, advice))

    def result(self, figure: str, details: dict[str, Any]) -> Result:
        status = max((s for s, _, _ in self.items), key=_ORDER.__getitem__, default=PASS)
        worst = [label for s, label, _ in self.items if s == status]
        bad = [(label, advice) for s, label, advice in self.items if s != PASS]
        details["findings"] = [{"status": s, "figure": f, "advice": a} for s, f, a in self.items]
        advice = bad[0][1] if len(bad) == 1 else "; ".join(f"{label}: {advice}" for label, advice in bad)
        return Result("slurm", status, "; ".join(worst) or figure, advice, details)


# ----------------------------------------------------------------------------------------------- in an allocation

def _allocation(cfg: Any) -> Result:
    """The allocation this process runs in (its environment and `scontrol show job`) against the recipe."""
    from ..backends.slurm_node import SlurmEnv

    try:
        env = SlurmEnv.from_environ()
    except (LauncherError, ValueError) as e:
        return Result("slurm", FAIL, "unreadable allocation", f"the SLURM variables do not parse ({e})")
    job, job_problem = _job(env.job_id)
    found = _Findings()
    nodes, procs = int(cfg.launch.nodes), cfg.launch.gpus_per_node
    if env.nnodes < nodes:
        found.add(FAIL, f"nodes {env.nnodes} < {nodes}",
                  f"the allocation has {env.nnodes} node{_s(env.nnodes)}, the recipe asks launch.nodes={nodes} "
                  f"({nodes - env.nnodes} short); allocate {nodes} (salloc -N {nodes}, sbatch --nodes={nodes}) or "
                  f"run with --nodes {env.nnodes}")
    elif env.nnodes > nodes:
        found.add(WARN, f"nodes {env.nnodes} > {nodes}",
                  f"the recipe uses {nodes} of the allocation's {env.nnodes} nodes, and the launcher's node tasks "
                  f"refuse an allocation that does not match; run with --nodes {env.nnodes} or allocate {nodes}")
    if env.ntasks_per_node != 1:
        found.add(WARN, f"{env.ntasks_per_node} tasks per node",
                  "the launcher runs one task per node, which starts the node's processes itself; use srun "
                  "--ntasks-per-node=1 (or salloc without -n)")
    gpus, gpu_source = _allocated_gpus(job, env.nnodes)
    device = cfg.trainer.device
    if device != "cpu" and procs is not None and gpus < procs:
        if gpus == 0 and device == "auto":
            found.add(WARN, "no GPUs in the allocation",
                      f"the {procs} processes per node run on the CPU (trainer.device=auto); allocate GPUs "
                      f"(salloc/sbatch --gpus-per-node={procs}) or set trainer.device=cpu")
        else:
            found.add(FAIL, f"GPUs per node {gpus} < {procs}",
                      f"the allocation has {gpus} GPU{_s(gpus)} per node ({gpu_source}), the recipe runs "
                      f"launch.gpus_per_node={procs} ({procs - gpus} short); allocate them (salloc/sbatch "
                      f"--gpus-per-node={procs}) or run with " + (f"--gpus {gpus}" if gpus else "trainer.device=cpu"))
    cpus = _allocated_cpus()
    if cpus is not None and cpus < (procs or 1):
        found.add(WARN, f"CPUs per node {cpus} < {procs} processes",
                  "the processes share CPUs; allocate more (--cpus-per-task, slurm.cpus_per_task)")
    limit = _time_limit(job, env.job_id)
    grace, wish = int(cfg.slurm.signal_grace_s), int(cfg.slurm.time_min)
    if isinstance(limit, str):
        found.add(WARN, "time limit unknown", limit)
    elif limit is not None and limit * 60 <= grace:
        found.add(FAIL, f"time limit {_fmt_min(limit)} <= signal grace {grace} s",
                  f"SLURM would ask the job to checkpoint and stop as soon as it starts; allocate longer "
                  f"(salloc/sbatch --time={wish}) or lower slurm.signal_grace_s")
    elif limit is not None and limit < wish:
        found.add(WARN, f"time limit {_fmt_min(limit)} < slurm.time_min {wish} min",
                  f"the job stops (checkpoints, requeues) sooner than the recipe plans; allocate longer "
                  f"(salloc/sbatch --time={wish}) or lower slurm.time_min")
    batch = job.get("BatchFlag") == "1"
    if job_problem:
        found.add(WARN, "requeue unknown", job_problem)
    elif batch and job.get("Requeue") == "0" and cfg.slurm.max_requeues > 0:
        found.add(WARN, f"job {env.job_id} cannot requeue (Requeue=0)",
                  f"slurm.max_requeues={cfg.slurm.max_requeues} expects it to come back after a preemption or its "
                  f"time limit; submit with --requeue (launch --slurm does) or set slurm.max_requeues=0")
    limit_text = "unknown" if isinstance(limit, str) else _fmt_min(limit)
    figure = (f"job {env.job_id}: {env.nnodes} node{_s(env.nnodes)} x {env.ntasks_per_node} task, {gpus} GPU"
              f"{_s(gpus)}/node, limit {limit_text}{'' if batch else ', interactive'}; recipe {nodes} x "
              f"{procs or 1} {'CPU' if device == 'cpu' else device}")
    details = {"job_id": env.job_id, "nodes": env.nnodes, "tasks_per_node": env.ntasks_per_node, "gpus_per_node":
               gpus, "gpus_from": gpu_source, "cpus_per_node": cpus, "time_limit_min": limit_text if isinstance(
                   limit, str) else limit, "requeue": job.get("Requeue"), "batch": batch,
               "recipe": {"nodes": nodes, "gpus_per_node": procs, "device": device, "time_min": wish,
                          "signal_grace_s": grace, "max_requeues": int(cfg.slurm.max_requeues)}}
    return found.result(figure, details)


def _job(job_id: str) -> tuple[dict[str, str], str]:
    """`scontrol show job -o JOB` as fields, and '' or what went wrong (then the fields are empty)."""
    try:
        rc, out, err = _run(["scontrol", "show", "job", "-o", job_id])
    except _Unavailable as e:
        return {}, str(e)
    if rc != 0:
        return {}, f"`scontrol show job {job_id}` said: {_said(out, err)}"
    return _fields(out), ""


def _allocated_gpus(job: dict[str, str], nodes: int) -> tuple[int, str]:
    """GPUs per node and where the number came from: SLURM's variables on a node of the job, the job's TRES
    (salloc's shell may run on the login node), or this node's driver when SLURM does not count GPUs."""
    from .. import hardware

    env = os.environ
    if env.get("SLURM_GPUS_ON_NODE", "").strip().isdigit():
        return int(env["SLURM_GPUS_ON_NODE"]), "SLURM_GPUS_ON_NODE"
    if env.get("SLURM_JOB_GPUS", "").strip():
        return len([g for g in env["SLURM_JOB_GPUS"].split(",") if g.strip()]), "SLURM_JOB_GPUS"
    tres = job.get("AllocTRES") or job.get("TRES") or ""
    m = re.search(r"gres/gpu=(\d+)", tres) or re.search(r"gres/gpu:[^=,]+=(\d+)", tres)
    if m:
        return int(m.group(1)) // max(nodes, 1), "the job's TRES"
    if env.get("SLURMD_NODENAME"):  # on a node of the job, GPUs SLURM does not track (no gres) are still usable
        return hardware.visible_gpu_count(), "this node's driver"
    return 0, "none allocated"


def _allocated_cpus() -> int | None:
    """CPUs per node SLURM gave the job (the smallest of its nodes), None when it does not say."""
    text = os.environ.get("SLURM_CPUS_ON_NODE") or os.environ.get("SLURM_JOB_CPUS_PER_NODE") or ""
    counts = [int(m) for m in re.findall(r"(\d+)(?:\(x\d+\))?", text)]
    return min(counts) if counts else None


def _time_limit(job: dict[str, str], job_id: str) -> float | None | str:
    """The job's time limit in minutes (None: unlimited), or why it is unknown: from `scontrol show job`, else
    `squeue -o %l`."""
    text = job.get("TimeLimit")
    if text is None:
        try:
            rc, out, err = _run(["squeue", "-h", "-j", job_id, "-o", "%l"])
        except _Unavailable as e:
            return str(e)
        if rc != 0 or not out.strip():
            return f"`squeue -h -j {job_id} -o %l` said: {_said(out, err) or 'nothing'}"
        text = out.strip().splitlines()[0]
    try:
        return _minutes(text)
    except ValueError:
        return f"SLURM reports the time limit as {text!r}"


# ----------------------------------------------------------------------------------------------- a submission

def _submission(cfg: Any) -> Result:
    """The job `launch --slurm` would submit, through `sbatch --test-only`, and the partition it would run in."""
    if shutil.which("sbatch") is None:
        return Result("slurm", FAIL, "sbatch not found", "sbatch is not on PATH: run `launch doctor --slurm` on a "
                      "login node of the cluster (or load its slurm module)")
    partitions = _partitions()
    try:
        header, options, notes = _job_header(cfg)
    except Exception as e:  # the recipe refused while the job is built (backends.slurm's UsageError, submitit's)
        return Result("slurm", FAIL, "the job cannot be built", str(e))
    name = cfg.slurm.partition or next((p for p, f in partitions.items() if f.get("Default") == "YES"), None)
    part = partitions.get(name or "", {})
    sizes = _node_sizes().get(name or "", {}) if part else {}
    rc, out, err = _run(["sbatch", "--test-only"], stdin=header + "\nexit 0\n")
    answer = _said(out, err)
    if "unable to contact slurm controller" in answer.lower():
        raise _Unavailable(f"`sbatch --test-only` said: {answer}")
    m = re.search(r"Job \d+ to start at (\S+) using (\d+) processors on nodes (\S+) in partition (\S+)", err + out)
    found = _Findings()
    misfits = _misfits(cfg, options, name, part, sizes, partitions)
    if rc != 0 or not m:
        found.add(FAIL, f"sbatch refuses the job: {answer}",
                  "; ".join(f"{label}: {advice}" for _, label, advice in misfits) or _by_message(answer, cfg))
    else:  # sbatch refuses what no node can give, but accepts a job over MaxTime unless the site enforces it
        for _, label, advice in (x for x in misfits if x[0] == "slurm.time_min"):
            found.add(FAIL, label, advice + " (the job would wait forever: PartitionTimeLimit)")
    if part and part.get("State", "UP") != "UP":
        found.add(WARN, f"partition {name} is {part['State']}", "the job would wait until it is UP again; pick "
                        "another partition (slurm.partition) or ask the admins")
    grace, wish = int(cfg.slurm.signal_grace_s), int(cfg.slurm.time_min)
    if grace >= wish * 60:
        found.add(FAIL, f"signal grace {grace} s >= time limit {wish} min",
                  "SLURM would ask the job to checkpoint and stop as soon as it starts; raise slurm.time_min or "
                  "lower slurm.signal_grace_s")
    if notes and cfg.trainer.device == "auto" and cfg.launch.gpus_per_node:
        found.add(WARN, notes[0], "pick a GPU partition (slurm.partition), or set trainer.device=cpu to run CPU "
                                  "processes on purpose")
    if int(cfg.slurm.max_requeues) > 0:
        _requeue(found, cfg, header, name, part)
    figure = f"would start {m.group(1)} on {m.group(3)} ({m.group(2)} CPUs) in partition {m.group(4)}" if m else ""
    details = {"sbatch": answer, "partition": name, "partition_info": {k: part[k] for k in (
        "MaxTime", "MaxNodes", "TotalNodes", "PreemptMode", "GraceTime", "State") if k in part},
        "node_sizes": sizes, "sbatch_options": options}
    return found.result(figure, details)


def _job_header(cfg: Any) -> tuple[str, dict[str, str], list[str]]:
    """The #SBATCH lines of exactly the script `launch --slurm` would submit (`backends.slurm.sbatch_script`), its
    options as {name: value} ('' for a flag), and the notes the backend printed while building it."""
    from ..backends import slurm as backend

    run_dir = os.path.abspath(cfg.run.dir or os.path.join("runs", cfg.run.name))
    said = io.StringIO()
    with contextlib.redirect_stderr(said):  # "partition debug has no GPUs: ...", folded into the result instead
        script = backend.sbatch_script(cfg, run_dir)
    header = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    options = dict(ln.removeprefix("#SBATCH --").partition("=")[::2] for ln in header)
    notes = [ln.removeprefix("launch: ") for ln in said.getvalue().splitlines() if ln.strip()]
    return "#!/bin/bash\n" + "\n".join(header), options, notes


def _misfits(cfg: Any, options: dict[str, str], name: str | None, part: dict[str, str], sizes: dict[str, int],
             partitions: dict[str, dict[str, str]]) -> list[tuple[str, str, str]]:
    """What of the job the partition cannot give, from its limits and its largest node: (the recipe key, what,
    how to change it)."""
    if not part:
        close = difflib.get_close_matches(str(name), list(partitions), n=1)
        return [("slurm.partition", f"no partition {name!r}",
                 f"set slurm.partition to one of {', '.join(partitions) or 'none'}"
                 + (f" (did you mean {close[0]}?)" if close else ""))]
    out = []
    other = "or pick another partition (slurm.partition)"
    nodes, total, most = int(cfg.launch.nodes), _int(part.get("TotalNodes", "")), _int(part.get("MaxNodes", ""))
    for limit, what in ((total, "has"), (most, "allows at most")):
        if limit and nodes > limit:
            out.append(("launch.nodes", f"nodes {nodes} > {limit}", f"partition {name} {what} {limit} "
                        f"node{_s(limit)}; run with --nodes {limit} (launch.nodes) {other}"))
            break
    for key, flag, unit, size in (("slurm.cpus_per_task", "cpus-per-task", "CPUs", "cpus"),
                                  ("launch.gpus_per_node", "gpus-per-node", "GPUs", "gpus")):
        asked, has = _int(options.get(flag, "")), sizes.get(size, 0)
        if sizes and asked > has:
            out.append((key, f"{unit} per node {has} < {asked}", f"partition {name}'s largest node has {has} "
                        f"{unit}; lower {key} to {has} {other}"))
    if cfg.slurm.mem and sizes.get("mem_mb") and _mb(str(cfg.slurm.mem)) > sizes["mem_mb"]:
        out.append(("slurm.mem", f"memory per node {sizes['mem_mb']} MB < {cfg.slurm.mem}",
                    f"partition {name}'s largest node has {sizes['mem_mb']} MB; lower slurm.mem {other}"))
    max_time = _minutes_or_none(part.get("MaxTime", ""))
    if max_time is not None and cfg.slurm.time_min > max_time:
        out.append(("slurm.time_min", f"time limit {cfg.slurm.time_min} min > MaxTime {_fmt_min(max_time)}",
                    f"partition {name} allows {_fmt_min(max_time)}; set slurm.time_min={int(max_time)} {other}"))
    return out


def _by_message(answer: str, cfg: Any) -> str:
    """The recipe key for a refusal the partition's limits do not explain, from sbatch's words."""
    low, s = answer.lower(), cfg.slurm
    for words, advice in (
            (("account",), f"slurm.account={s.account!r} is not an account you may use (sacctmgr show assoc)"),
            (("qos",), f"slurm.qos={s.qos!r} is not a QOS you may use, or the job is over its limits"),
            (("feature", "constraint"), f"slurm.constraint={s.constraint!r} names features no node of the "
                                        f"partition has (sinfo -o '%N %f')"),
            (("gres", "generic resource"), "the partition does not offer the GPUs asked: launch.gpus_per_node, "
                                           "slurm.extra_sbatch, or trainer.device=cpu"),
            (("time limit",), f"slurm.time_min={s.time_min} is over the partition's or the QOS's limit"),
            (("processors", "node configuration", "memory"), "no node offers what the job asks: slurm.cpus_per_task"
                                                             ", slurm.mem, launch.gpus_per_node, slurm.extra_sbatch"),
            (("node count", "nodes"), f"launch.nodes={cfg.launch.nodes} is more than the partition gives")):
        if any(w in low for w in words):
            return advice
    return "change the slurm section of the recipe (the option sbatch names)"


def _requeue(found: _Findings, cfg: Any, header: str, name: str | None, part: dict[str, str]) -> None:
    """Whether the job can come back after a preemption or its time limit, as slurm.max_requeues > 0 expects."""
    flags = re.findall(r"^#SBATCH --(no-requeue|requeue)\b", header, re.M)
    config: dict[str, str] = {}
    if not flags or "PreemptMode" not in part:  # the cluster's defaults decide
        try:
            rc, out, _ = _run(["scontrol", "show", "config"])
        except _Unavailable:
            rc, out = 1, ""
        pairs = (line.partition("=") for line in out.splitlines() if rc == 0)
        config = {key.strip(): value.strip() for key, _, value in pairs}
    on = flags[-1] == "requeue" if flags else config.get("JobRequeue") == "1"
    if not on:
        found.add(WARN, f"the job cannot requeue ({'--no-requeue' if flags else 'JobRequeue=0, no --requeue'})",
                  f"slurm.max_requeues={cfg.slurm.max_requeues} expects it to come back after a preemption or its "
                  f"time limit; remove no-requeue from slurm.extra_sbatch or set slurm.max_requeues=0")
    mode = part.get("PreemptMode") or config.get("PreemptMode", "")
    if "CANCEL" in mode.upper():
        found.add(WARN, f"partition {name} cancels preempted jobs (PreemptMode={mode})",
                  "a preempted job is not requeued, only one that reaches its time limit; pick another partition "
                  "(slurm.partition) if preemption is likely")


def _partitions() -> dict[str, dict[str, str]]:
    """Every partition's fields from `scontrol show partition -o`; _Unavailable when the controller does not
    answer."""
    rc, out, err = _run(["scontrol", "show", "partition", "-o"])
    if rc != 0:
        raise _Unavailable(f"`scontrol show partition` said: {_said(out, err)}")
    found = {}
    for line in out.splitlines():
        f = _fields(line)
        if f.get("PartitionName"):
            found[f["PartitionName"]] = f
    return found


def _node_sizes() -> dict[str, dict[str, int]]:
    """The largest CPUs, memory (MB) and GPUs of one node, by partition, from `sinfo -N`."""
    try:
        rc, out, _ = _run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"])
    except _Unavailable:
        return {}
    sizes: dict[str, dict[str, int]] = {}
    for line in out.splitlines() if rc == 0 else []:
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        name, cpus, mem, gres = parts[0].rstrip("*"), parts[1], parts[2], parts[3]
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,()]+)?:(\d+)", gres))
        s = sizes.setdefault(name, {"cpus": 0, "mem_mb": 0, "gpus": 0})
        s["cpus"] = max(s["cpus"], _int(cpus))
        s["mem_mb"] = max(s["mem_mb"], _int(mem))
        s["gpus"] = max(s["gpus"], gpus)
    return sizes


# ----------------------------------------------------------------------------------------------- helpers

def _run(cmd: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    try:
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        raise _Unavailable(f"{cmd[0]} is not installed here (not on PATH)") from None
    except subprocess.TimeoutExpired:
        raise _Unavailable(f"`{' '.join(cmd)}` did not answer within {TIMEOUT_S} s") from None
    except OSError as e:
        raise _Unavailable(f"`{' '.join(cmd)}` could not run: {e}") from None
    return r.returncode, r.stdout, r.stderr


def _said(out: str, err: str) -> str:
    """A SLURM command's message: its `allocation failure:` or `error:` line (the most specific), else its last
    line, without the command's own prefix."""
    lines = [ln.strip() for ln in (err + "\n" + out).splitlines() if ln.strip()]
    for pick in ("allocation failure:", "error:"):
        hits = [ln for ln in lines if pick in ln.lower()]
        if hits:
            return re.sub(r"^(sbatch: )?(error: |allocation failure: )", "", hits[-1], flags=re.I).strip()
    return lines[-1] if lines else ""


def _fields(line: str) -> dict[str, str]:
    """`Key=Value Key=Value` (scontrol's one-line form) as a dict; values with spaces are cut, none we read has
    them."""
    return dict(m.groups() for m in re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)", line))


def _minutes(text: str) -> float | None:
    """A SLURM time ([D-]HH:MM:SS, MM:SS, MM) in minutes; None for UNLIMITED/INFINITE; ValueError otherwise."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = text.rpartition("-") if "-" in text else ("", "", text)
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    else:
        raise ValueError(text)
    return (int(days or 0) * 24 + h) * 60 + m + s / 60


def _minutes_or_none(text: str) -> float | None:
    try:
        return _minutes(text)
    except ValueError:
        return None


def _fmt_min(minutes: float | None) -> str:
    return "unlimited" if minutes is None else f"{minutes:g} min"


def _mb(text: str) -> int:
    """An sbatch memory size (64G, 4096M, 4096) in MB."""
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)B?", text.strip().upper())
    if not m:
        return 0
    return int(int(m.group(1)) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[m.group(2)])


def _int(text: str) -> int:
    m = re.match(r"\d+", text.strip())
    return int(m.group()) if m else 0


def _s(n: int) -> str:
    return "" if n == 1 else "s"

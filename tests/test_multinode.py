"""Two hosts without SLURM: two network namespaces joined by a veth link, each with its own address, one `launch`
in each (2 processes per host), gloo traffic over the link. The test creates and removes the namespaces itself and
sends traffic only inside them. And two nodes on one host (two `launch` on 127.0.0.1, as from two shells): exactly
one agent hosts the rendezvous store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import LAUNCH, checkpoint_params, launch, launch_env, require, write_recipe
from s3 import free_port

# conftest.BASE with these changes
RECIPE = ("seed=5", "model.dropout=0.2", "trainer.max_steps=10", "checkpoint.every_steps=1000")


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"


@pytest.fixture
def two_hosts():
    """[(namespace, address), (namespace, address)] on a private /24, removed afterwards."""
    require(os.geteuid() == 0, "network namespaces need root")
    if not shutil.which("ip") and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "iproute2"],
                       capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    require(shutil.which("ip") is not None, "the ip command (Debian's iproute2) is missing and could not be installed")
    tag = f"{os.getpid() % 100000}"
    hosts = [(f"lnch{tag}a", "10.231.7.1"), (f"lnch{tag}b", "10.231.7.2")]
    veths = [f"lv{tag}a", f"lv{tag}b"]
    try:
        for ns, _ in hosts:
            ip("netns", "add", ns)
        ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for (ns, addr), dev in zip(hosts, veths):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_two_hosts_train_like_one_host_with_four_processes(tmp_path, two_hosts):
    recipe = write_recipe(tmp_path, *RECIPE)
    endpoint = f"{two_hosts[0][1]}:{free_port()}"
    run_dir = tmp_path / "run"
    procs = []
    for ns, _ in two_hosts:
        cmd = ["ip", "netns", "exec", ns, LAUNCH, recipe, "--nodes", "2", "--gpus", "2", "--rdzv-endpoint",
               endpoint, "--run-dir", str(run_dir), "launch.rdzv_timeout_s=60"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    for rank in range(4):
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank} of 4" in text, text[:400]
    nodes_of = {}
    for rank in range(4):  # the c10d rendezvous numbers the nodes; each node holds 2 consecutive ranks
        line = next(ln for ln in (run_dir / "logs" / f"rank{rank}.log").read_text().splitlines()
                    if "worker start:" in ln)
        nodes_of[rank] = line.split(" node ")[1].split()[0]
    assert nodes_of[0] == nodes_of[1] != nodes_of[2] == nodes_of[3], nodes_of

    _, one = launch(tmp_path, recipe, run="one", gpus=4, timeout=240)
    two_hosts_params = checkpoint_params(run_dir / "checkpoints" / "step-000000010")
    one_host_params = checkpoint_params(one / "checkpoints" / "step-000000010")
    for k in one_host_params:
        assert torch.equal(two_hosts_params[k], one_host_params[k]), f"{k} differs from the single-host run"


def test_two_nodes_on_one_host_meet_and_one_of_them_hosts_the_store(tmp_path):
    """`launch --nodes 2` twice on one machine, as from two shells (or two containers behind one address): the
    same recipe and endpoint, a run directory each, a shared checkpoint directory. Exactly one agent hosts the
    rendezvous store, whether they start together or not; the short rendezvous timeout makes a pair that never
    meets fail fast."""
    recipe = write_recipe(tmp_path, *RECIPE)
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([LAUNCH, recipe, "--nodes", "2", "--gpus", "1", "--rdzv-endpoint", endpoint,
                               "--run-dir", str(tmp_path / f"node{n}"), f"checkpoint.dir={tmp_path / 'ckpt'}",
                               "launch.rdzv_timeout_s=20"], cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    hosting = [err for _, err in outs if f"launch: this node hosts the rendezvous store at {endpoint}" in err]
    assert len(hosting) == 1, [err for _, err in outs]
    found = {p.name: p.read_text() for n in range(2) for p in (tmp_path / f"node{n}" / "logs").glob("rank*.log")}
    assert sorted(found) == ["rank0.log", "rank1.log"], "each rank logs in its own node's run directory"
    logs = [found["rank0.log"], found["rank1.log"]]
    for rank, text in enumerate(logs):
        assert f"rank {rank} of 2" in text, text[:400]
    assert "training done: 10 steps" in logs[0], logs[0][-1000:]


CLAIM = """\
import os, sys, time
from launcher.backends import rendezvous
ports, me, other = [int(p) for p in sys.argv[1].split(",")], sys.argv[2], sys.argv[3]
held = []
for i, port in enumerate(ports):
    for step in ("start", "end"):  # both decide at the same moment, as two agents started together
        open(f"{me}.{i}.{step}", "w").close()
        while not os.path.exists(f"{other}.{i}.{step}"):
            time.sleep(0.001)
        if step == "start":
            held.append(rendezvous.claim_store("127.0.0.1", port, 5))  # held until both have decided
            print("host" if held[-1] is not None else "client", flush=True)
"""


def test_agents_that_start_together_elect_exactly_one_store_host(tmp_path):
    """Deciding to host the store by checking that the port is free and binding it later lets both agents decide
    to host (one then fails); the bind itself must be the decision. Five rounds, each on a fresh port."""
    script = tmp_path / "claim.py"
    script.write_text(CLAIM)
    ports = ",".join(str(free_port()) for _ in range(5))
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [subprocess.Popen([sys.executable, str(script), ports, str(me), str(other)], env=launch_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me, other in ((a, b), (b, a))]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    rounds = list(zip(*(out.split() for out, _ in outs)))
    assert len(rounds) == 5 and all(sorted(r) == ["client", "host"] for r in rounds), rounds

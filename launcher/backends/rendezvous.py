"""Multi-node rendezvous helpers: this node's address toward the rendezvous, and a watch on who has arrived.

torchrun's c10d rendezvous waits silently and, when nodes are missing, fails with a bare timeout. The launcher
reads the rendezvous state from the store while it waits (a client connection, read-only), prints who is there,
and on a timeout says how many nodes arrived, which ones, and what to check.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import io
import pickle
import socket
import struct
import sys
import threading
import time
from datetime import timedelta
from typing import Any

_SIOCGIFADDR = 0x8915


def local_addr_towards(host: str, port: int) -> str | None:
    """The address this machine uses to reach host:port (the source address the routing table picks), or None.

    Every node publishes it as its own address: the host name can resolve to an address other nodes cannot reach
    (127.0.1.1 in /etc/hosts, or one name shared by several network namespaces)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))  # UDP: no packet is sent, the kernel only picks a route
            return s.getsockname()[0]
    except OSError:
        return None


def interface_of(addr: str) -> str | None:
    """The name of the network interface holding IPv4 address `addr`, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == addr:
                return name
    return None


def is_local_address(host: str) -> bool:
    """Whether `host` names an address of this machine (of this network namespace), secondary interfaces included:
    torch guesses from the host name alone and misses those."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr[0], 0, *addr[2:]))  # port 0: asks whether the address is ours, takes no port
                return True
            except OSError:
                continue
    return False


def claim_store(host: str, port: int, timeout_s: float) -> Any | None:
    """Host the rendezvous store on `port` unless another process already does: returns the store (keep it until
    the agent has opened its own, which then shares its server: `multi_tenant`) or None.

    Binding the port is the claim, so when several agents of one job run on one machine (two nodes tried on a
    workstation, containers sharing one network) exactly one hosts the store, also when they start together. A
    check that the port is free followed by a later bind lets two agents that start together both decide to host,
    and the second then fails. The connect first makes sure no store is there already, even one whose server
    shares its port (SO_REUSEPORT), which a bind alone would not notice."""
    from torch.distributed import TCPStore

    try:
        with socket.create_connection((host, port), timeout=2):
            return None  # something serves the port: another node's agent
    except OSError:
        pass
    try:
        return TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                        timeout=timedelta(seconds=timeout_s))
    except RuntimeError as e:  # DistNetworkError
        if errno.errorcode[errno.EADDRINUSE] in str(e) or "address already in use" in str(e).lower():
            return None  # the other agent bound it first
        raise


class _StateUnpickler(pickle.Unpickler):
    """The rendezvous state is a pickle in a network store: load only the few plain classes it is made of."""

    _ALLOWED = {("torch.distributed.elastic.rendezvous.dynamic_rendezvous", "_RendezvousState"),
                ("torch.distributed.elastic.rendezvous.dynamic_rendezvous", "_NodeDesc"),
                ("datetime", "datetime"), ("datetime", "timedelta"), ("datetime", "timezone"), ("builtins", "set"),
                ("builtins", "object"),
                ("copyreg", "_reconstructor")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in the rendezvous state")


def read_arrivals(store: Any, run_id: str) -> tuple[list[str], bool] | None:
    """(addresses of the nodes in the current round, whether the round is complete), or None when unknown."""
    key = "torch.rendezvous." + run_id
    try:
        if not store.check([key]):
            return None
        raw = store.get(key)
        state = _StateUnpickler(io.BytesIO(base64.b64decode(raw))).load()
    except Exception:  # the sentinel value, a state being rewritten, a store that went away
        return None
    nodes = list(getattr(state, "participants", {}) or {}) + list(getattr(state, "wait_list", set()) or set())
    return sorted(f"{n.addr} (pid {n.pid})" for n in nodes), bool(getattr(state, "complete", False))


class RendezvousWatch:
    """Polls the rendezvous at `host:port` from a thread until the round completes or `stop()`; prints a line
    whenever the set of arrived nodes changes."""

    def __init__(self, host: str, port: int, run_id: str, nodes: int, timeout_s: int, interval_s: float = 2.0,
                 out: Any = None) -> None:
        self.host, self.port, self.run_id, self.nodes, self.timeout_s = host, port, run_id, nodes, timeout_s
        self.interval_s = interval_s
        self.out = out or sys.stderr
        self.arrived: list[str] = []
        self.complete = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-rendezvous-watch", daemon=True)

    def start(self) -> "RendezvousWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from torch.distributed import TCPStore

        store = None
        t0 = time.monotonic()
        shown: list[str] | None = None
        while not self._stop.wait(self.interval_s):
            if store is None:
                try:
                    store = TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=5),
                                     wait_for_workers=False)
                except Exception:
                    continue  # the host node's agent has not opened the store yet
            seen = read_arrivals(store, self.run_id)
            if seen is None:
                continue
            arrived, complete = seen
            if complete:
                self.complete = True
                return
            if arrived:
                self.arrived = arrived
            if arrived != shown and arrived:
                shown = arrived
                left = max(0, int(self.timeout_s - (time.monotonic() - t0)))
                self.out.write(f"launch: rendezvous at {self.host}:{self.port}: {len(arrived)} of {self.nodes} "
                               f"nodes here ({', '.join(arrived)}); waiting up to {left} s more\n")
                self.out.flush()


def missing_nodes_message(endpoint: str, nodes: int, timeout_s: int, arrived: list[str]) -> str:
    here = (f"{len(arrived)} of {nodes} node{'s' if nodes != 1 else ''} arrived ({', '.join(arrived)})"
            if arrived else f"fewer than {nodes} nodes arrived")
    return (f"the rendezvous at {endpoint} timed out after {timeout_s} s: {here}. Check that every node runs the "
            f"same command (same recipe, --nodes {nodes}, --rdzv-endpoint {endpoint}) and has started, that "
            f"{endpoint} is reachable from each node (firewall, routes, the right address), and raise "
            f"launch.rdzv_timeout_s if nodes start slowly")

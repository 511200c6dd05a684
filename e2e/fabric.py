"""The network the e2e hosts live on: each agent in its own network namespace with its own address.

NetnsFabric makes one namespace per agent (`nve2e-<pid>-<node>`), with one veth whose root end
is a port of a bridge in the root namespace. The bridge holds the control address (etcd and the
orchestrators listen there) and each agent gets an address of the same /24: 10.77.N.11, .12, ...
(N is the first third octet no interface of this machine uses yet, so two runs do not collide).
A partition is `ip link set <root end> down`: packets to and from the agent vanish silently, as
in a real network split, instead of failing fast with an error either side could act on.

LoopbackFabric is the fallback when namespaces cannot be made (not root, no `ip`, `ip netns add`
refused, or the bridge does not carry traffic): agents get 127.0.0.11, .12, ... It cannot cut a
link, so callers use SIGSTOP as the partition stand-in and say so.

Everything a fabric creates it removes in `close()`; `sweep_stale()` removes what a run that
died without closing (SIGKILL) left behind, recognised by the dead pid in the names.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

NETNS_PREFIX = "nve2e-"
SUBNET_PREFIX = "10.77"
FIRST_AGENT_OCTET = 11
LOCK_PATH = Path("/run/lock/nvmigrate-e2e.lock")
PROBE_TIMEOUT_S = 5.0
PROBE_NODE, PROBE_OCTET = "probe", 254


class FabricError(Exception):
    pass


class Fabric(Protocol):
    mode: str  # "netns" or "loopback"
    control_host: str  # where etcd and the orchestrators listen
    can_partition: bool

    def add_host(self, node: str) -> str: ...
    def host_of(self, node: str) -> str: ...
    def command_prefix(self, node: str) -> list[str]: ...
    def cut(self, node: str) -> None: ...
    def restore(self, node: str) -> None: ...
    def close(self) -> None: ...
    def describe(self) -> str: ...


def _ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise FabricError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _tag(pid: int) -> str:
    """A short base-36 form of a pid: interface names may have at most 15 characters."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        pid, rest = divmod(pid, 36)
        out = digits[rest] + out
        if pid == 0:
            return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Removes namespaces and bridges of earlier runs whose process is gone; returns their names."""
    removed: list[str] = []
    with contextlib.suppress(FabricError, FileNotFoundError):
        for line in _ip("netns", "list").splitlines():
            name = line.split()[0] if line.strip() else ""
            m = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-.+", name)
            if m and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(FabricError):
                    _ip("netns", "del", name)
                    removed.append(name)
        for line in _ip("-o", "link", "show", "type", "bridge").splitlines():
            m = re.match(r"\d+: (nvb([0-9a-z]+))[:@]", line)
            if m and not _pid_alive(int(m.group(2), 36)):
                with contextlib.suppress(FabricError):
                    _ip("link", "del", m.group(1))
                    removed.append(m.group(1))
    return removed


@dataclass
class LoopbackFabric:
    """127.0.0.x per agent; no namespaces, no links to cut."""

    reason: str = ""
    mode: str = "loopback"
    control_host: str = "127.0.0.1"
    can_partition: bool = False
    hosts: dict[str, str] = field(default_factory=dict)

    def add_host(self, node: str) -> str:
        if node not in self.hosts:
            self.hosts[node] = f"127.0.0.{FIRST_AGENT_OCTET + len(self.hosts)}"
        return self.hosts[node]

    def host_of(self, node: str) -> str:
        return self.hosts[node]

    def command_prefix(self, node: str) -> list[str]:
        return []

    def cut(self, node: str) -> None:
        raise FabricError("loopback mode cannot cut a link; use SIGSTOP as the partition stand-in")

    def restore(self, node: str) -> None:
        raise FabricError("loopback mode cannot cut a link; use SIGSTOP as the partition stand-in")

    def close(self) -> None:
        self.hosts.clear()

    def describe(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (f"loopback mode{why}: etcd and orchestrators on {self.control_host}, agents on "
                f"{', '.join(f'{n}={h}' for n, h in self.hosts.items()) or '127.0.0.11, .12, ...'}; "
                "a partition is simulated with SIGSTOP")


@dataclass
class NetnsFabric:
    """A bridge in the root namespace and one namespace + veth per agent."""

    mode: str = "netns"
    control_host: str = ""
    can_partition: bool = True
    tag: str = field(default_factory=lambda: _tag(os.getpid()))
    bridge: str = ""
    subnet: str = ""
    hosts: dict[str, str] = field(default_factory=dict)
    namespaces: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # node -> root end of its veth
    cut_links: set[str] = field(default_factory=set)

    def open(self) -> NetnsFabric:
        self.bridge = f"nvb{self.tag}"
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        # The lock makes "pick an unused /24, put it on our bridge" atomic between parallel runs.
        with open(LOCK_PATH, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = set(re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", _ip("-o", "-4", "addr", "show")))
            octet = next((n for n in range(256) if str(n) not in used), None)
            if octet is None:
                raise FabricError(f"every {SUBNET_PREFIX}.N.0/24 is in use on this machine")
            self.subnet = f"{SUBNET_PREFIX}.{octet}"
            self.control_host = f"{self.subnet}.1"
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.control_host}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, node: str, *, octet: int = 0) -> str:
        if node in self.hosts:
            return self.hosts[node]
        index = len([n for n in self.hosts if n != PROBE_NODE])
        octet = octet or FIRST_AGENT_OCTET + index
        if octet > 254:
            raise FabricError(f"no address left in {self.subnet}.0/24 for node {node!r}")
        netns, link = f"{NETNS_PREFIX}{os.getpid()}-{node}", f"nv{self.tag}-{octet}"
        address = f"{self.subnet}.{octet}"
        _ip("netns", "add", netns)
        self.namespaces[node] = netns
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self.links[node] = link
        _ip("link", "set", link, "master", self.bridge)
        _ip("link", "set", link, "up")
        _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
        _ip("link", "set", "eth0", "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        self.hosts[node] = address
        return address

    def host_of(self, node: str) -> str:
        return self.hosts[node]

    def command_prefix(self, node: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node]]

    def cut(self, node: str) -> None:
        _ip("link", "set", self.links[node], "down")
        self.cut_links.add(node)

    def restore(self, node: str) -> None:
        _ip("link", "set", self.links[node], "up")
        self.cut_links.discard(node)

    def probe(self, node: str) -> None:
        """Checks that the bridge carries TCP from a namespace to the control address (a host
        firewall or br_netfilter rules could drop it); raises FabricError if not."""
        with socket.socket() as server:
            server.bind((self.control_host, 0))
            server.listen(1)
            server.settimeout(PROBE_TIMEOUT_S)
            port = server.getsockname()[1]
            client = subprocess.Popen(
                [*self.command_prefix(node), sys.executable, "-c",
                 f"import socket; socket.create_connection(({self.control_host!r}, {port}), timeout=3).close()"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError as exc:
                raise FabricError(f"namespace {self.namespaces[node]} cannot reach {self.control_host} over the "
                                  f"bridge: {exc}") from None
            finally:
                client.wait(timeout=10)

    def remove_host(self, node: str) -> None:
        """Deletes the veth first (both ends go at once) so its name is free again right away;
        a deleted namespace takes its devices with it only later, asynchronously."""
        link, netns = self.links.pop(node, None), self.namespaces.pop(node, None)
        self.hosts.pop(node, None)
        self.cut_links.discard(node)
        if link:
            with contextlib.suppress(FabricError):
                _ip("link", "del", link)
        if netns:
            with contextlib.suppress(FabricError):
                _ip("netns", "del", netns)

    def close(self) -> None:
        """Removes the namespaces (their veths go with them) and the bridge. The processes inside
        must be stopped first: a namespace lives on while a process is in it."""
        for node in list(self.hosts):
            self.remove_host(node)
        if self.bridge:
            with contextlib.suppress(FabricError):
                _ip("link", "del", self.bridge)
        self.bridge = ""

    def describe(self) -> str:
        agents = ", ".join(f"{n}={h} (netns {self.namespaces[n]})" for n, h in self.hosts.items())
        return (f"netns mode: bridge {self.bridge} {self.control_host}/24 (etcd, orchestrators); "
                f"agents {agents or '(none yet)'}; a partition is the agent's veth set down")


def open_fabric(mode: str = "auto") -> NetnsFabric | LoopbackFabric:
    """A NetnsFabric when this process may make namespaces (and mode allows), else loopback."""
    if mode == "loopback":
        return LoopbackFabric(reason="asked for")
    problem = ""
    if os.geteuid() != 0:
        problem = "not root"
    elif shutil.which("ip") is None:
        problem = "`ip` (iproute2) is not installed"
    if not problem:
        sweep_stale()
        fabric = NetnsFabric()
        try:
            fabric.open()
            # One throwaway namespace proves `ip netns add` works and the bridge carries TCP.
            fabric.add_host(PROBE_NODE, octet=PROBE_OCTET)
            fabric.probe(PROBE_NODE)
            fabric.remove_host(PROBE_NODE)
            return fabric
        except (FabricError, OSError, subprocess.SubprocessError) as exc:
            fabric.close()
            problem = str(exc)
    if mode == "netns":
        raise FabricError(f"network namespaces are not available: {problem}")
    return LoopbackFabric(reason=problem)

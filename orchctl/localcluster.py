"""A whole cluster on one machine: etcd, orchestrators and agents as real processes.

The demo uses it, and so do the integration tests. Every process it starts is stopped by its
pid in `stop()`; waiting is done on conditions with deadlines (a port answers, a node shows up
in etcd), never on fixed sleeps. It starts its own etcd, or uses one that runs already
(`use_etcd`, under a key prefix of its own), which it then never stops.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.identity import Identity, Role
from cluster.store import DEFAULT_PREFIX, prefix_problem
from orchctl import certs
from proto.v1 import agent_pb2_grpc, migration_pb2, migration_pb2_grpc

T = TypeVar("T")


class ClusterError(Exception):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.05,
             alive: Callable[[], str | None] | None = None) -> T:
    """Polls `probe` until it returns something truthy; `alive` reports a dead process early."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if alive is not None:
            dead = alive()
            if dead:
                raise ClusterError(f"{what}: {dead}")
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def find_etcd() -> str:
    path = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if path is None:
        raise ClusterError("etcd is not installed: `apt-get install etcd-server` (Debian) provides it")
    return path


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    http_address: str = ""  # an orchestrator's /metrics and web page, an agent's /metrics and probes: HOST:PORT

    def exited(self) -> str | None:
        code = self.popen.poll()
        if code is None:
            return None
        return f"{self.name} exited with code {code}; last log lines:\n{self.tail()}"

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        self.signal(sig)
        self.reap(timeout_s)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Asks it to stop (by pid), without waiting: `reap` waits."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)
            # a process frozen with SIGSTOP (an e2e hang) only acts on SIGTERM once continued
            os.kill(self.popen.pid, signal.SIGCONT)

    def reap(self, timeout_s: float = 10.0) -> None:
        """Waits for it to exit; SIGKILL after `timeout_s`."""
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=timeout_s)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass(frozen=True)
class EtcdServerTls:
    """An etcd member's TLS files: the CA it trusts for client certificates, its own pair."""
    ca: Path
    cert: Path
    key: Path


@dataclass
class LocalCluster:
    """Start with `start_etcd()` (or `use_etcd()`), `start_orchestrator()`, `start_agent()`;
    always `stop()`."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nvmigrate-")))
    host: str = "127.0.0.1"
    lease_ttl_s: int = 2
    agent_call_budget_s: float = 5.0  # short, so fault tests end quickly
    procs: list[Proc] = field(default_factory=list)
    etcd_endpoint: str = ""
    etcd_prefix: str = DEFAULT_PREFIX  # every key of this cluster lives under it
    orchestrator_address: str = ""
    agents: dict[str, Proc] = field(default_factory=dict)
    orchestrators: list[Proc] = field(default_factory=list)
    _etcd: Proc | None = None
    etcd_members: list[Proc] = field(default_factory=list)  # every etcd process this cluster started
    _owns_workdir: bool = True
    env: dict[str, str] = field(default_factory=dict)  # added to every process's environment (OTEL_*, ...)
    allow_fault_injection: bool = False  # agents take InjectFault (tests that inject faults)
    # Mutual TLS on every gRPC port: a directory `orchctl certs init` made (agents' certificates
    # are issued on demand, naming the host the agent advertises, so NBD clients accept them).
    # This cluster's own calls act as operator/admin to the orchestrator and as the orchestrator
    # to agents.
    tls_dir: Path | None = None

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
        log.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    # ---- etcd -------------------------------------------------------------------------------

    def use_etcd(self, endpoint: str, prefix: str) -> None:
        """Runs this cluster on an etcd that runs already, under its own key prefix; this cluster
        neither stops nor restarts that etcd."""
        if self.etcd_endpoint:
            raise ClusterError(f"use_etcd: this cluster already has etcd at {self.etcd_endpoint}")
        problem = prefix_problem(prefix)
        if problem:
            raise ClusterError(f"use_etcd: {problem}")
        self.etcd_endpoint, self.etcd_prefix = endpoint, prefix

    def _own_etcd(self, what: str) -> Proc:
        if self._etcd is None:
            whose = f"the etcd at {self.etcd_endpoint} was not started by this cluster" if self.etcd_endpoint \
                else "etcd was never started"
            raise ClusterError(f"{what}: {whose}; call start_etcd() to have one of its own")
        return self._etcd

    def start_etcd(self, timeout_s: float = 30.0, tls: EtcdServerTls | None = None) -> str:
        """One etcd member; with `tls` it serves https only and wants client certificates."""
        endpoints = self.start_etcd_cluster(1, timeout_s, tls)
        self._etcd = self.etcd_members[0]
        return endpoints

    def start_etcd_cluster(self, members: int = 3, timeout_s: float = 30.0, tls: EtcdServerTls | None = None) -> str:
        """`members` etcd processes forming one cluster; returns their endpoints, comma-separated,
        as --etcd takes them. `etcd_members[i]` is member i's process."""
        if self.etcd_endpoint:
            raise ClusterError(f"start_etcd: this cluster already has etcd at {self.etcd_endpoint}")
        # tmpfs when there is one: fsync on a slow disk would dominate the switchover time
        shm = Path("/dev/shm")
        base = Path(tempfile.mkdtemp(prefix="nvmigrate-etcd-", dir=shm if shm.is_dir() else self.workdir))
        self._etcd_dir = base
        ports = [(free_port(self.host), free_port(self.host)) for _ in range(members)]
        names = ["nvmigrate"] if members == 1 else [f"member-{i}" for i in range(members)]
        scheme = "https" if tls else "http"
        initial = ",".join(f"{name}=http://{self.host}:{peer}" for name, (_, peer) in zip(names, ports, strict=True))
        tls_args = [] if tls is None else ["--cert-file", str(tls.cert), "--key-file", str(tls.key),
                                           "--trusted-ca-file", str(tls.ca), "--client-cert-auth"]
        self._etcd_argvs = []
        for name, (client, peer) in zip(names, ports, strict=True):
            url = f"{scheme}://{self.host}:{client}"
            argv = [find_etcd(), "--name", name, "--data-dir", str(base / name),
                    "--listen-client-urls", url, "--advertise-client-urls", url,
                    "--listen-peer-urls", f"http://{self.host}:{peer}",
                    "--initial-advertise-peer-urls", f"http://{self.host}:{peer}",
                    "--initial-cluster", initial, "--log-level", "warn", *tls_args]
            self._etcd_argvs.append(argv)
            self.etcd_members.append(self._spawn("etcd" if members == 1 else f"etcd-{name}", argv))
        for member, (client, _) in zip(self.etcd_members, ports, strict=True):
            wait_for(f"{member.name} to answer", functools.partial(self._tcp_open, self.host, client), timeout_s,
                     alive=member.exited)
        prefix = "https://" if tls else ""
        self.etcd_endpoint = ",".join(f"{prefix}{self.host}:{client}" for client, _ in ports)
        self._etcd_argv = self._etcd_argvs[0]
        return self.etcd_endpoint

    @property
    def etcd_process(self) -> Proc:
        """The etcd this cluster started (e2e faults signal it by pid)."""
        return self._own_etcd("etcd_process")

    def stop_etcd(self) -> None:
        self._own_etcd("stop_etcd").stop()

    def freeze_etcd(self) -> None:
        """SIGSTOP: etcd keeps its connections but answers nothing until `thaw_etcd()`."""
        os.kill(self._own_etcd("freeze_etcd").popen.pid, signal.SIGSTOP)

    def thaw_etcd(self) -> None:
        os.kill(self._own_etcd("thaw_etcd").popen.pid, signal.SIGCONT)

    def restart_etcd(self, timeout_s: float = 30.0) -> str:
        """Starts etcd again on the same port and data dir (stopping it first if it runs), as an
        operator's restart would: clients keep their endpoint and etcd keeps its data and leases."""
        self._own_etcd("restart_etcd").stop()
        argv = self._etcd_argv
        self._etcd = self._spawn("etcd", argv)
        host, _, port = self.etcd_endpoint.rpartition(":")
        wait_for("etcd to answer again", lambda: self._tcp_open(host, int(port)), timeout_s,
                 alive=self._etcd.exited)
        return self.etcd_endpoint

    @staticmethod
    def _tcp_open(host: str, port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((host, port)) == 0

    # ---- orchestrator -----------------------------------------------------------------------

    def start_orchestrator(self, name: str = "orch-1", port: int | None = None, timeout_s: float = 30.0,
                           extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> Proc:
        """`env` is added to this orchestrator's environment only (e2e: a preloaded libfaketime)."""
        proc = self._spawn_orchestrator(name, port, extra_args, env)
        self._await_orchestrator(proc, timeout_s)
        return proc

    def _spawn_orchestrator(self, name: str, port: int | None, extra_args: list[str] | None,
                            env: dict[str, str] | None = None) -> Proc:
        port = port or free_port(self.host)
        http = f"{self.host}:{free_port(self.host)}"  # never the fixed default: several may run here
        proc = self._spawn(name, [
            sys.executable, "-m", "orchestrator.main", "--etcd", self.etcd_endpoint, "--etcd-prefix", self.etcd_prefix,
            "--listen", f"{self.host}:{port}", "--name", name, "--lease-ttl-s", str(self.lease_ttl_s),
            "--agent-call-budget-s", str(self.agent_call_budget_s), "--http", http,
            *self.tls_args(Identity(Role.ORCHESTRATOR, "orchestrator")), *(extra_args or []),
        ], env)
        proc.http_address = http
        proc.address = f"{self.host}:{port}"  # type: ignore[attr-defined]
        return proc

    def _await_orchestrator(self, proc: Proc, timeout_s: float) -> None:
        address: str = proc.address  # type: ignore[attr-defined]
        wait_for(f"orchestrator {proc.name} to serve", lambda: self._healthy(address), timeout_s, alive=proc.exited)
        self.orchestrators.append(proc)
        if not self.orchestrator_address:
            self.orchestrator_address = address

    def start_with_agents(self, names: Sequence[str], timeout_s: float = 30.0, **agent_options: Any) -> None:
        """An orchestrator and agents `names` (options as `start_agent`) spawned together, so that
        their start-ups overlap, then awaited: the orchestrator serving, each agent registered."""
        orchestrator = self._spawn_orchestrator("orch-1", None, None)
        started = self._spawn_agents(names, **agent_options)
        self._await_orchestrator(orchestrator, timeout_s)
        self._await_agents(started, timeout_s)

    def _healthy(self, address: str) -> bool:
        with self.channel(address, Identity(Role.VIEWER, "viewer")) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def migration_stub(self) -> tuple[grpc.Channel, migration_pb2_grpc.MigrationServiceStub]:
        channel = self.channel(self.orchestrator_address, Identity(Role.OPERATOR, "admin"))
        return channel, migration_pb2_grpc.MigrationServiceStub(channel)

    # ---- TLS --------------------------------------------------------------------------------

    def tls_files(self, identity: Identity, hosts: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
        """(CA, certificate, key) of `identity` in tls_dir, issued now (naming `hosts`) if it has
        none yet."""
        assert self.tls_dir is not None
        stem = certs.file_stem(identity)
        if not (self.tls_dir / f"{stem}.pem").exists():
            certs.issue(self.tls_dir, identity, hosts)
        return self.tls_dir / "ca.pem", self.tls_dir / f"{stem}.pem", self.tls_dir / f"{stem}.key"

    def tls_args(self, identity: Identity, hosts: tuple[str, ...] = ()) -> list[str]:
        if self.tls_dir is None:
            return []
        ca, cert, key = self.tls_files(identity, hosts)
        return ["--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]

    def channel(self, address: str, identity: Identity, server_name: str = "") -> grpc.Channel:
        """A channel to `address`, as `identity` when TLS is on; `server_name`: the name the
        server's certificate must carry (an agent's node name), if not the address's host."""
        if self.tls_dir is None:
            return grpc.insecure_channel(address)
        ca, cert, key = (path.read_bytes() for path in self.tls_files(identity))
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert), options=options)

    # ---- agents -----------------------------------------------------------------------------

    def start_agent(self, name: str, capacity: str | None = "4G", timeout_s: float = 30.0, *,
                    listen_host: str = "", command_prefix: Sequence[str] = (), module: str = "agent.main",
                    extra_args: Sequence[str] = (), http: bool = False) -> Proc:
        """`listen_host` gives the agent its own address (it listens and advertises there);
        `command_prefix` wraps the command, e.g. `ip netns exec NS` to run it in a namespace;
        `module` starts it through another module that takes the agent's flags (a test launcher
        over a fake device), with `extra_args` added; `capacity` None leaves --capacity out;
        `http` serves its /metrics and probes on a free port, at the returned Proc's http_address."""
        (proc,) = self.start_agents([name], capacity, timeout_s, listen_host=listen_host,
                                    command_prefix=command_prefix, module=module, extra_args=extra_args, http=http)
        return proc

    def start_agents(self, names: Sequence[str], capacity: str | None = "4G", timeout_s: float = 30.0, *,
                     listen_host: str = "", command_prefix: Sequence[str] = (), module: str = "agent.main",
                     extra_args: Sequence[str] = (), http: bool = False) -> list[Proc]:
        """Several agents (flags as `start_agent`): all spawned first, then each awaited, so their
        start-ups overlap."""
        started = self._spawn_agents(names, capacity, listen_host=listen_host, command_prefix=command_prefix,
                                     module=module, extra_args=extra_args, http=http)
        self._await_agents(started, timeout_s)
        return [proc for _, proc, _ in started]

    def _spawn_agents(self, names: Sequence[str], capacity: str | None = "4G", *, listen_host: str = "",
                      command_prefix: Sequence[str] = (), module: str = "agent.main",
                      extra_args: Sequence[str] = (), http: bool = False) -> list[tuple[str, Proc, str | None]]:
        started: list[tuple[str, Proc, str | None]] = []
        for name in names:
            argv = [
                *command_prefix, sys.executable, "-m", module, "--name", name, "--etcd", self.etcd_endpoint,
                "--etcd-prefix", self.etcd_prefix, "--listen", f"{listen_host or self.host}:0",
                "--data-dir", str(self.agent_data_dir(name)), "--lease-ttl-s", str(self.lease_ttl_s),
                *(["--capacity", capacity] if capacity is not None else []),
                *(["--allow-fault-injection"] if self.allow_fault_injection else []),
                *self.tls_args(Identity(Role.AGENT, name), (listen_host or self.host,)),
                # port 0: the agent says where in its node record, read once it registered
                *(["--http", f"{listen_host or self.host}:0"] if http else []), *extra_args,
            ]
            if listen_host:
                argv += ["--advertise-host", listen_host]
            # A restarted agent's old record lingers until its lease expires: wait for a new address.
            before = self.node(name) if self.orchestrator_address else None
            proc = self._spawn(name, argv)
            self.agents[name] = proc
            started.append((name, proc, before.address if before is not None else None))
        return started

    def agent_data_dir(self, name: str) -> Path:
        """The --data-dir agent `name` gets (the same on a restart)."""
        return self.workdir / name

    def _await_agents(self, started: list[tuple[str, Proc, str | None]], timeout_s: float) -> None:
        for name, proc, stale in started:
            node = wait_for(f"agent {name} to register", self._registered(name, stale), timeout_s,
                            alive=proc.exited)
            proc.http_address = node.http_address

    def _registered(self, name: str, stale: str | None) -> Callable[[], migration_pb2.Node | None]:
        return lambda: n if (n := self.node(name)) is not None and n.address != stale else None

    def nodes(self) -> list[migration_pb2.Node]:
        channel, stub = self.migration_stub()
        with channel:
            try:
                return list(stub.ListNodes(migration_pb2.ListNodesRequest(), timeout=5.0).nodes)
            except grpc.RpcError:
                return []

    def node(self, name: str) -> migration_pb2.Node | None:
        return next((n for n in self.nodes() if n.name == name), None)

    def agent_stub(self, name: str) -> tuple[grpc.Channel, agent_pb2_grpc.AgentServiceStub]:
        node = self.node(name)
        if node is None:
            raise ClusterError(f"agent {name!r} is not registered")
        channel = self.channel(node.address, Identity(Role.ORCHESTRATOR, "orchestrator"), server_name=name)
        return channel, agent_pb2_grpc.AgentServiceStub(channel)

    # ---- teardown ---------------------------------------------------------------------------

    def stop(self) -> None:
        # agents and orchestrators first, all at once, etcd last (they deregister through it)
        etcds = [self._etcd, *self.etcd_members]
        others = [proc for proc in reversed(self.procs) if proc not in etcds]
        for proc in others:
            proc.signal()
        for proc in others:
            proc.reap()
        for proc in {id(p): p for p in etcds if p is not None}.values():
            proc.stop()
        etcd_dir = getattr(self, "_etcd_dir", None)
        if etcd_dir is not None:
            shutil.rmtree(etcd_dir, ignore_errors=True)

    def cleanup(self) -> None:
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

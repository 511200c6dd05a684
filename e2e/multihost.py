"""A multi-host cluster on one machine for the e2e suite, and the faults it can suffer.

etcd and 2-3 orchestrators run in the root namespace on the fabric's control address; 4+ agents
each run in their own network namespace on their own address (see `e2e.fabric`; 127.0.0.x
fallback when namespaces cannot be made). Processes are started through `LocalCluster`, so the
same code paths as the integration tests start them.

Faults: SIGKILL an agent, SIGSTOP it (a hang; SIGCONT ends it), cut its link (a partition; in
loopback mode SIGSTOP stands in, and the report says so), stop and start etcd on the same port
and data dir, kill the orchestrator that holds the leader key. And:

- freeze: SIGSTOP any process of the cluster (an agent, an orchestrator, etcd) for a while, then
  SIGCONT by a timer this bed owns (a VM pause, a long GC or swap storm); `heal()` and `close()`
  cancel the timer and continue the process, so no frozen process outlives the bed.
- overload: busy-loop processes beside an agent (CPU hogs, stopped by pid on heal or close).
- disk full: with `MultiHostConfig.data_tmpfs_bytes`, each agent's --data-dir is a tmpfs of its
  own, so filling one (a filler file written until ENOSPC, removed on heal) fills only that
  node's disk; the tmpfs are unmounted in `close()`.
- clock step: with `MultiHostConfig.orchestrator_faketime`, the orchestrators run under a
  preloaded libfaketime reading one offset file of this bed (`e2e.clockstep`); writing +120 or
  -120 into it steps their wall clock at once and leaves CLOCK_MONOTONIC alone, as an NTP step
  does. The machine's clock is never touched. A step is not undone on heal: after a real step
  the clock stays where it went.
- garbage: every TCP port the orchestrators and agents listen on (read from /proc, see
  `e2e.garbage`) gets random bytes, HTTP/2 junk and undecodable gRPC calls for a few seconds.

Everything made here (processes, namespaces, links, the bridge, timers, tmpfs mounts) is torn
down in `close()`, which the context manager and an atexit hook both call, so a failing test
does not leave namespaces, mounts or processes behind.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from e2e import clockstep, garbage
from e2e.fabric import LoopbackFabric, NetnsFabric, open_fabric
from orchctl.localcluster import ClusterError, LocalCluster, Proc, wait_for
from proto.v1 import agent_pb2_grpc, migration_pb2, migration_pb2_grpc

T = TypeVar("T")

LEADER_KEY = "/nvmigrate/leader"
API_TIMEOUT_S = 5.0
ETCD = "etcd"  # the name a freeze takes for the etcd process
FILLER_NAME = "e2e-disk-filler"
BALLAST_NAME = "e2e-disk-ballast"
FILL_CHUNK_BYTES = 1 << 20
AGENT_GRPC_METHOD = "/nvmigrate.v1.AgentService/GetController"
ORCHESTRATOR_GRPC_METHOD = "/nvmigrate.v1.MigrationService/GetMigration"


def fill_until_full(path: Path, chunk_bytes: int = FILL_CHUNK_BYTES) -> int:
    """Fills the file system of `path` with that file: the free space allocated in one call
    (twice as fast as writing it, so a fault aimed at a short phase lands in it), then written
    until the file system says ENOSPC (then in 4 KiB pieces, to leave no room at all); returns
    the bytes taken. Any other error is raised."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        free = shutil.disk_usage(path.parent).free
        if free:
            try:
                os.posix_fallocate(fd, 0, free)
                written = free
            except OSError as exc:  # ENOSPC: someone took some meanwhile; EOPNOTSUPP: not here
                if exc.errno not in (errno.ENOSPC, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        os.lseek(fd, written, os.SEEK_SET)
        for size in (chunk_bytes, 4096):
            block = b"\0" * size
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


@dataclass
class FaultRecord:
    """One injected fault, for the report: what, on whom, when (monotonic and wall clock)."""

    kind: str
    target: str
    at_monotonic: float
    at_wall: float
    note: str = ""
    problems: list[str] = field(default_factory=list)  # what the fault itself saw go wrong (an expectation)
    evidence: list[str] = field(default_factory=list)  # log lines behind those problems


@dataclass
class MultiHostConfig:
    orchestrators: int = 2
    agents: int = 4
    lease_ttl_s: int = 2
    agent_capacity: str = "2G"
    job_deadline_s: float = 60.0  # the orchestrator rolls back a job not committed by then
    mode: str = "auto"  # "auto", "netns" or "loopback"
    quiet: bool = False
    data_tmpfs_bytes: int = 0  # > 0: each agent's --data-dir is a tmpfs of its own, this big (disk-full faults)
    orchestrator_faketime: bool = False  # orchestrators under libfaketime (clock-step faults)


@dataclass
class _Freeze:
    proc: Proc
    timer: threading.Timer


@dataclass
class MultiHostCluster:
    config: MultiHostConfig = field(default_factory=MultiHostConfig)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nvmigrate-e2e-")))
    keep_workdir: bool = False
    fabric: NetnsFabric | LoopbackFabric | None = None
    cluster: LocalCluster | None = None
    agent_addresses: dict[str, str] = field(default_factory=dict)
    killed_agents: set[str] = field(default_factory=set)
    hung_agents: set[str] = field(default_factory=set)
    partitioned: set[str] = field(default_factory=set)
    killed_orchestrators: set[str] = field(default_factory=set)
    faults: list[FaultRecord] = field(default_factory=list)
    frozen: dict[str, _Freeze] = field(default_factory=dict)  # process name -> its pending SIGCONT
    cpu_hogs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    mounts: dict[str, Path] = field(default_factory=dict)  # agent -> its tmpfs data dir
    fillers: dict[str, list[Path]] = field(default_factory=dict)  # agent -> the files that fill its disk
    clock_file: Path | None = None  # the orchestrators' libfaketime offset file
    clock_offset_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> MultiHostCluster:
        atexit.register(self.close)
        try:
            self.fabric = open_fabric(self.config.mode)
            self._say(f"e2e cluster: {self.fabric.describe()}")
            self.cluster = LocalCluster(workdir=self.workdir, host=self.fabric.control_host,
                                        lease_ttl_s=self.config.lease_ttl_s)
            self.cluster._owns_workdir = False  # we decide whether the logs stay
            self.cluster.start_etcd()
            orchestrator_env: dict[str, str] = {}
            if self.config.orchestrator_faketime:
                library = clockstep.find_libfaketime()
                self.clock_file = self.workdir / "orchestrator-clock.faketime"
                clockstep.write_offset(self.clock_file, 0)
                orchestrator_env = clockstep.faketime_env(library, self.clock_file)
            for i in range(self.config.orchestrators):
                # each replica its own metrics port: the default one would be taken twice
                self.cluster.start_orchestrator(name=f"orch-{i + 1}", extra_args=[
                    "--http", f"{self.fabric.control_host}:0", "--job-deadline-s", str(self.config.job_deadline_s)],
                    env=orchestrator_env)
            for name in self.agent_names:
                self.fabric.add_host(name)
                self.start_agent(name)
            self._say(f"e2e cluster up: {self.fabric.describe()}; etcd {self.cluster.etcd_endpoint}; "
                      f"orchestrators {', '.join(self.orchestrator_addresses().values())}; logs in {self.workdir}")
        except BaseException:
            self.close()
            raise
        return self

    @property
    def mode(self) -> str:
        return self.fabric.mode if self.fabric else "none"

    @property
    def agent_names(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.config.agents)]

    @property
    def c(self) -> LocalCluster:
        if self.cluster is None:
            raise ClusterError("the e2e cluster is not started")
        return self.cluster

    def _say(self, text: str) -> None:
        if not self.config.quiet:
            print(text, flush=True)

    def close(self) -> None:
        """Stops every process by pid, then removes namespaces, links and the bridge. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        self._thaw_all()
        self.stop_cpu_hogs()
        if self.cluster is not None:
            for proc in self.cluster.procs:
                # a frozen process would sit out SIGTERM's grace period; kill what hangs at once
                if proc.name in self.hung_agents:
                    proc.kill()
            self.cluster.stop()
        if self.fabric is not None:
            self.fabric.close()
        self._unmount_all()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MultiHostCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- processes --------------------------------------------------------------------------

    def start_agent(self, name: str) -> Proc:
        assert self.fabric is not None
        if self.config.data_tmpfs_bytes and name not in self.mounts:
            self._mount_tmpfs(name)
        host = self.fabric.host_of(name)
        proc = self.c.start_agent(name, self.config.agent_capacity, listen_host=host,
                                  command_prefix=self.fabric.command_prefix(name))
        node = self.c.node(name)
        assert node is not None
        self.agent_addresses[name] = node.address
        self.killed_agents.discard(name)
        return proc

    def agent_proc(self, name: str) -> Proc:
        return self.c.agents[name]

    def live_orchestrators(self) -> list[Proc]:
        return [p for p in self.c.orchestrators if p.popen.poll() is None]

    def orchestrator_addresses(self) -> dict[str, str]:
        return {p.name: str(getattr(p, "address", "")) for p in self.live_orchestrators()}

    def orchestrator_logs(self) -> dict[str, Path]:
        return {p.name: p.log_path for p in self.c.orchestrators}

    def agent_logs(self) -> dict[str, Path]:
        return {p.name: p.log_path for p in self.c.procs if p.name in self.agent_names}

    def process(self, name: str) -> Proc:
        """An agent ("n1"), an orchestrator ("orch-2") or etcd ("etcd"), by name."""
        if name == ETCD:
            return self.c.etcd_process
        if name in self.c.agents:
            return self.c.agents[name]
        found = next((p for p in self.c.orchestrators if p.name == name), None)
        if found is None:
            raise ClusterError(f"no process {name!r} in this cluster (agents {', '.join(self.c.agents)}, "
                               f"orchestrators {', '.join(p.name for p in self.c.orchestrators)}, {ETCD})")
        return found

    def leader_proc(self) -> Proc:
        name = self.leader()
        proc = next((p for p in self.live_orchestrators() if p.name == name), None)
        if proc is None:
            raise ClusterError(f"the leader key names {name!r}, which is not a live orchestrator of this cluster")
        return proc

    def _avoid_orchestrator(self, name: str) -> None:
        """LocalCluster's own calls (ListNodes when an agent starts) go to another replica."""
        live = {n: a for n, a in self.orchestrator_addresses().items() if n != name}
        if live:
            self.c.orchestrator_address = next(iter(live.values()))

    # ---- clients ----------------------------------------------------------------------------

    def api(self, call: Callable[[migration_pb2_grpc.MigrationServiceStub], T]) -> T:
        """Calls MigrationService on a live orchestrator (every replica answers the API), trying
        the others when one does not answer."""
        last: grpc.RpcError | None = None
        addresses = list(self.orchestrator_addresses().values())
        if self.c.orchestrator_address in addresses:  # the last one that answered goes first
            addresses.remove(self.c.orchestrator_address)
            addresses.insert(0, self.c.orchestrator_address)
        for address in addresses:
            with grpc.insecure_channel(address) as channel:
                try:
                    result = call(migration_pb2_grpc.MigrationServiceStub(channel))
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE,  # type: ignore[attr-defined]
                                          grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    last = exc
                    continue
            self.c.orchestrator_address = address
            return result
        if last is not None:
            raise last
        raise ClusterError("no orchestrator is running")

    def job(self, job_id: str) -> migration_pb2.Migration:
        return self.api(lambda s: s.GetMigration(migration_pb2.GetMigrationRequest(id=job_id), timeout=API_TIMEOUT_S))

    def agent(self, name: str, call: Callable[[agent_pb2_grpc.AgentServiceStub], T],
              address: str | None = None) -> T:
        """Calls one agent directly at the address it registered with (cached, so this works
        while etcd or the orchestrators are down)."""
        with grpc.insecure_channel(address or self.agent_addresses[name]) as channel:
            return call(agent_pb2_grpc.AgentServiceStub(channel))

    # ---- etcd, read with clients that are not ours -------------------------------------------

    def etcd_url(self) -> str:
        return f"http://{self.c.etcd_endpoint}"

    def etcd_range(self, key: str, revision: int = 0, prefix: bool = False,
                   timeout_s: float = 5.0) -> list[dict[str, object]]:
        """etcd's own JSON gateway (/v3/kv/range): values decoded, revisions as ints."""
        body: dict[str, object] = {"key": base64.b64encode(key.encode()).decode()}
        if revision:
            body["revision"] = revision
        if prefix:
            end = key[:-1] + chr(ord(key[-1]) + 1)
            body["range_end"] = base64.b64encode(end.encode()).decode()
        request = urllib.request.Request(f"{self.etcd_url()}/v3/kv/range", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            data = json.loads(reply.read())
        kvs = []
        for kv in data.get("kvs", []):
            kvs.append({"key": base64.b64decode(kv["key"]).decode(),
                        "value": base64.b64decode(kv.get("value", "")).decode(errors="replace"),
                        "mod_revision": int(kv.get("mod_revision", 0)),
                        "create_revision": int(kv.get("create_revision", 0)),
                        "version": int(kv.get("version", 0))})
        return kvs

    def etcd_history(self, key: str) -> list[dict[str, object]]:
        """Every version of a key still in etcd's history, oldest first (etcd here never
        compacts, so that is every write since the key was created)."""
        versions: list[dict[str, object]] = []
        current = self.etcd_range(key)
        if not current:
            return versions
        kv = current[0]
        while True:
            versions.append(kv)
            if int(kv["version"]) <= 1:  # type: ignore[call-overload]
                break
            older = self.etcd_range(key, revision=int(kv["mod_revision"]) - 1)  # type: ignore[call-overload]
            if not older or older[0]["create_revision"] != kv["create_revision"]:
                break
            kv = older[0]
        return list(reversed(versions))

    def leader(self) -> str | None:
        """The orchestrator named by the leader key, or None (no leader, or etcd down)."""
        try:
            got = self.etcd_range(LEADER_KEY, timeout_s=2.0)
        except (OSError, urllib.error.URLError, ValueError):
            return None
        return str(got[0]["value"]) if got else None

    def wait_leader(self, timeout_s: float = 30.0, other_than: str = "") -> str:
        def probe() -> str | None:
            name = self.leader()
            return name if name and name != other_than else None
        return wait_for("an orchestrator to hold the leader key" + (f" (not {other_than})" if other_than else ""),
                        probe, timeout_s)

    def etcd_revision(self) -> int:
        """etcd's revision now (`etcdctl get -w json`'s header)."""
        done = subprocess.run(["etcdctl", f"--endpoints={self.c.etcd_endpoint}", "get", "/nvmigrate/", "--prefix",
                               "--keys-only", "--limit", "1", "-w", "json"], capture_output=True, text=True,
                              timeout=30, check=True, env={**os.environ, "ETCDCTL_API": "3"})
        return int(json.loads(done.stdout)["header"]["revision"])

    def watch_prefix(self, prefix: str, since_revision: int | None = None) -> subprocess.Popen[str]:
        """`etcdctl watch --prefix KEY -w json`: one JSON line per write, as it happens (a fault
        trigger reacts within milliseconds of a phase change instead of a polling interval); with
        `since_revision`, every write from that revision on, made before the watch started or not."""
        since = ["--rev", str(since_revision)] if since_revision is not None else []
        return subprocess.Popen(["etcdctl", f"--endpoints={self.c.etcd_endpoint}", "watch", "--prefix", prefix,
                                 *since, "-w", "json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "ETCDCTL_API": "3"})

    # ---- faults -----------------------------------------------------------------------------

    def _record(self, kind: str, target: str, note: str = "") -> FaultRecord:
        fault = FaultRecord(kind, target, time.monotonic(), time.time(), note)
        self.faults.append(fault)
        self._say(f"fault: {kind} {target}" + (f" ({note})" if note else ""))
        return fault

    def kill_agent(self, name: str) -> FaultRecord:
        fault = self._record("SIGKILL agent", name)
        self.agent_proc(name).kill()
        self.killed_agents.add(name)
        return fault

    def hang_agent(self, name: str, note: str = "") -> FaultRecord:
        fault = self._record("SIGSTOP agent", name, note)
        os.kill(self.agent_proc(name).popen.pid, signal.SIGSTOP)
        self.hung_agents.add(name)
        return fault

    def unhang_agent(self, name: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.agent_proc(name).popen.pid, signal.SIGCONT)
        self.hung_agents.discard(name)

    def partition_agent(self, name: str) -> FaultRecord:
        """Cuts the agent's link; in loopback mode SIGSTOP stands in (the agent cannot act on its
        own either, unlike a real partitioned host, which keeps running its guest)."""
        assert self.fabric is not None
        if not self.fabric.can_partition:
            return self.hang_agent(name, note="partition stand-in: loopback mode cannot cut links")
        fault = self._record("partition agent", name, f"veth {self.fabric.links[name]} down")  # type: ignore[union-attr]
        self.fabric.cut(name)
        self.partitioned.add(name)
        return fault

    def heal(self) -> list[str]:
        """Ends every hang, partition, freeze, overload and full disk; returns what was healed.
        (A clock step stays: see the module's docstring.)"""
        healed = []
        for name in sorted(self.hung_agents):
            self.unhang_agent(name)
            healed.append(f"SIGCONT {name}")
        for name in sorted(self.partitioned):
            assert self.fabric is not None
            self.fabric.restore(name)
            healed.append(f"link of {name} up")
        self.partitioned.clear()
        healed += [f"SIGCONT {name} (before its timer)" for name in self._thaw_all()]
        hogs = self.stop_cpu_hogs()
        if hogs:
            healed.append(f"{hogs} CPU hogs stopped")
        for name in sorted(self.fillers):
            for path in self.fillers.pop(name):
                path.unlink(missing_ok=True)
            healed.append(f"disk of {name} freed")
        if healed:
            self._say(f"healed: {', '.join(healed)}")
        return healed

    # ---- freeze: SIGSTOP, then SIGCONT by a timer ---------------------------------------------

    def freeze(self, name: str, duration_s: float, note: str = "") -> FaultRecord:
        """SIGSTOPs process `name` (see `process`) and continues it `duration_s` later."""
        proc = self.process(name)
        if proc.popen.poll() is not None:
            raise ClusterError(f"cannot freeze {name}: it is not running")
        fault = self._record("SIGSTOP", name, note or f"continued by SIGCONT after {duration_s:g} s")
        timer = threading.Timer(duration_s, self._thaw, args=(name,))
        timer.daemon = True
        timer.name = f"thaw-{name}"
        with self._lock:
            if name in self.frozen:
                raise ClusterError(f"{name} is frozen already")
            os.kill(proc.popen.pid, signal.SIGSTOP)
            self.frozen[name] = _Freeze(proc, timer)
        if proc in self.c.orchestrators:
            self._avoid_orchestrator(name)
        timer.start()
        return fault

    def _thaw(self, name: str) -> bool:
        """SIGCONT for `name` if still frozen (by its timer, or early); True if it was."""
        with self._lock:
            frozen = self.frozen.pop(name, None)
            if frozen is None:
                return False
            frozen.timer.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen.proc.popen.pid, signal.SIGCONT)
        self._say(f"SIGCONT {name}")
        return True

    def _thaw_all(self) -> list[str]:
        return [name for name in sorted(self.frozen) if self._thaw(name)]

    # ---- overload: CPU hogs ---------------------------------------------------------------------

    def overload(self, name: str, hogs: int, note: str = "") -> FaultRecord:
        """`hogs` busy-loop processes beside agent `name` (the CPU is the machine's: they compete
        with every process here, the agent first among them)."""
        fault = self._record("overload", name, note or f"{hogs} busy-loop processes")
        self.start_cpu_hogs(hogs)
        return fault

    def start_cpu_hogs(self, count: int) -> None:
        """`count` busy-loop processes, each its own session (signalled only by pid)."""
        for _ in range(count):
            self.cpu_hogs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL, start_new_session=True))

    def stop_cpu_hogs(self) -> int:
        hogs, self.cpu_hogs = self.cpu_hogs, []
        for hog in hogs:
            with contextlib.suppress(ProcessLookupError):
                hog.kill()
        for hog in hogs:
            hog.wait(timeout=10)
        return len(hogs)

    # ---- disk full: a tmpfs per agent -------------------------------------------------------------

    def _mount_tmpfs(self, name: str) -> None:
        path = self.c.agent_data_dir(name)
        path.mkdir(parents=True, exist_ok=True)
        size = self.config.data_tmpfs_bytes
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "nvmigrate-e2e", str(path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ClusterError(f"cannot mount a {size >> 20} MiB tmpfs on {path} for agent {name}'s data dir "
                               f"({done.stderr.strip()}); disk-full faults need root")
        self.mounts[name] = path

    def _unmount_all(self) -> None:
        for path in sorted(self.mounts.values()):
            done = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                # something still holds it open: detach it now, the kernel frees it when let go
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
        self.mounts.clear()

    def ballast_disk(self, name: str, leave_bytes: int) -> int:
        """Takes all but `leave_bytes` of agent `name`'s tmpfs (a ballast file, removed on heal),
        so that filling the rest later takes a millisecond; returns the bytes taken."""
        if name not in self.mounts:
            raise ClusterError(f"agent {name}'s data dir is not a tmpfs of its own: start the bed with "
                               "MultiHostConfig(data_tmpfs_bytes=...)")
        ballast = self.mounts[name] / BALLAST_NAME
        self.fillers.setdefault(name, []).append(ballast)
        take = max(0, shutil.disk_usage(self.mounts[name]).free - leave_bytes)
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if take:
                os.posix_fallocate(fd, 0, take)
        finally:
            os.close(fd)
        return take

    def fill_disk(self, name: str) -> FaultRecord:
        """Fills agent `name`'s tmpfs data dir until ENOSPC."""
        if name not in self.mounts:
            raise ClusterError(f"agent {name}'s data dir is not a tmpfs of its own: start the bed with "
                               "MultiHostConfig(data_tmpfs_bytes=...)")
        filler = self.mounts[name] / FILLER_NAME
        self.fillers.setdefault(name, []).append(filler)
        written = fill_until_full(filler)
        free = shutil.disk_usage(self.mounts[name]).free
        return self._record("disk full", name, f"{written >> 20} MiB filler written to its "
                                               f"{self.config.data_tmpfs_bytes >> 20} MiB tmpfs data dir until "
                                               f"ENOSPC ({free} bytes left)")

    # ---- clock step -------------------------------------------------------------------------------

    def step_orchestrator_clocks(self, offset_s: float) -> FaultRecord:
        """Steps every orchestrator's wall clock by `offset_s` (from real time), at once."""
        if self.clock_file is None:
            raise ClusterError("the orchestrators were not started under libfaketime: start the bed with "
                               "MultiHostConfig(orchestrator_faketime=True)")
        fault = self._record("wall clock step", "orchestrators",
                             f"{clockstep.offset_text(offset_s)} s by libfaketime; CLOCK_MONOTONIC unchanged")
        clockstep.write_offset(self.clock_file, offset_s)
        self.clock_offset_s = offset_s
        return fault

    # ---- garbage at every listening port -----------------------------------------------------------

    def garbage_targets(self) -> tuple[list[garbage.Target], list[str]]:
        """Every TCP port a live orchestrator or agent listens on, and the ones that cannot be
        reached from here (bound to loopback inside a namespace)."""
        assert self.fabric is not None
        targets: list[garbage.Target] = []
        skipped: list[str] = []
        owners = [(p, self.fabric.control_host, p.address, ORCHESTRATOR_GRPC_METHOD)  # type: ignore[attr-defined]
                  for p in self.live_orchestrators()]
        owners += [(self.agent_proc(n), self.fabric.host_of(n), self.agent_addresses.get(n, ""), AGENT_GRPC_METHOD)
                   for n in self.agent_names if n not in self.killed_agents]
        for proc, host, grpc_address, method in owners:
            for bound_ip, port in garbage.listening_addresses(proc.popen.pid):
                where = garbage.reachable_host(bound_ip, host)
                if where.startswith("127.") and not host.startswith("127."):
                    skipped.append(f"{proc.name} {bound_ip}:{port} (loopback in its namespace)")
                    continue
                targets.append(garbage.Target(proc.name, where, port,
                                              method if f"{where}:{port}" == grpc_address else ""))
        return targets, skipped

    def throw_garbage(self, duration_s: float) -> tuple[FaultRecord, dict[str, garbage.Tally]]:
        targets, skipped = self.garbage_targets()
        if not targets:
            raise ClusterError("found no listening port of any orchestrator or agent to throw garbage at")
        ports = ", ".join(f"{t.owner}:{t.port}{'(gRPC)' if t.grpc_method else ''}" for t in targets)
        fault = self._record("garbage", f"{len(targets)} ports", f"{duration_s:g} s at {ports}"
                             + (f"; not reachable: {', '.join(skipped)}" if skipped else ""))
        return fault, garbage.burst(targets, duration_s)

    def restart_killed_agents(self) -> list[str]:
        restarted = sorted(self.killed_agents)
        for name in restarted:
            self.start_agent(name)
        if restarted:
            self._say(f"recovery: restarted agents {', '.join(restarted)} (same name, data dir, address)")
        return restarted

    def stop_etcd(self) -> FaultRecord:
        fault = self._record("etcd stop", self.c.etcd_endpoint)
        self.c.stop_etcd()
        return fault

    def start_etcd_again(self) -> None:
        self.c.restart_etcd()
        self._say(f"etcd started again on {self.c.etcd_endpoint} (same data dir)")

    def kill_leader(self) -> FaultRecord:
        proc = self.leader_proc()
        fault = self._record("SIGKILL orchestrator leader", proc.name)
        proc.kill()
        self.killed_orchestrators.add(proc.name)
        self._avoid_orchestrator(proc.name)
        return fault

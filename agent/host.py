"""The host an agent runs on: its controllers (with their guest workloads), its migration
sessions, its data-plane listener, its NBD server, and its registration in etcd under a
liveness lease.

Controllers come from the backend's hosting (agent.backends.hosting) and are used through the
backend contract (agent.backend) alone; what a backend lacks (a built-in guest, an NBD export) is
refused with a SessionError that names the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from agent.backend import BLOCK_BYTES, GuestDrivenController, MigratableController
from agent.backends.hosting import ControllerHosting, HostingError
from agent.controller_errors import ControllerError
from agent.datadir import free_bytes, no_space, no_space_message, sweep_temp_files
from agent.dataplane.receiver import DataReceiver
from agent.dataplane.sender import FrameFaults
from agent.guest.map_journal import SUFFIX as MAP_JOURNAL_SUFFIX
from agent.guest.map_journal import journal_path
from agent.guest.workload import GuestWorkload, WorkloadSpec
from agent.nbd.server import NbdServer
from agent.node_lease import NodeLease, await_name_free
from agent.nvme.smart import SmartLogError, parse_smart_log
from agent.nvme.state_format import STATE_FORMAT_VERSION
from agent.qos import GuestIoPolicy, IoLimiter, MigrationPacer
from agent.session_states import ENDED_STAGES, DestinationStage, ErrorKind, SessionError, SourceStage
from agent.sessions import DestinationSession, Session, SourceSession
from agent.vfio_states import VfioState
from cluster.grpc_tls import TlsFiles, agent_channel
from cluster.io_limits import IoLimits
from cluster.records import COMMITTED, LOST, RUNNING, ControllerRecord, DriveHealth, NodeRecord
from cluster.store import ConflictError, EtcdError, EtcdStore
from cluster.switchover_marks import mark
from proto.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)
MAX_SESSIONS = 64  # migrations a node takes part in at once, as source or destination
FAULT_EXIT_CODE = 86  # how the process ends when a test asked it to exit after a commit


@dataclass
class SwitchoverFaults:
    """Faults a test injects into this node's next switchover as its destination (InjectFault)."""

    hold_final_s: float = 0.0  # wait this long once FINAL arrived, before loading it and asking etcd
    hold_commit_s: float = 0.0  # wait this long right before sending the commit
    exit_after_commit: bool = False  # the process exits right after the commit landed

    def take_final_hold(self) -> float:
        taken, self.hold_final_s = self.hold_final_s, 0.0
        return taken

    def take(self) -> tuple[float, bool]:
        taken = (self.hold_commit_s, self.exit_after_commit)
        self.hold_commit_s, self.exit_after_commit = 0.0, False
        return taken


@dataclass
class HostedController:
    controller: MigratableController
    guest: GuestDrivenController | None = None  # its guest-driver role, when the backend has one
    workload: GuestWorkload | None = None
    migrating_job: str = ""


# Free space that moved less than this since the record was written is not worth an etcd write.
FREE_SPACE_REPUBLISH_BYTES = 1 << 20
FREE_SPACE_POLL_S = 1.0
HEALTH_POLL_S = 5.0  # a SMART log read is cheap, but not worth doing every second


def _worth_publishing(published: NodeRecord, current: NodeRecord) -> bool:
    before, now = published.data_dir_free_bytes, current.data_dir_free_bytes
    if replace(published, data_dir_free_bytes=None) != replace(current, data_dir_free_bytes=None):
        return True
    if before is None or now is None:
        return before != now
    return abs(before - now) >= FREE_SPACE_REPUBLISH_BYTES


class Host:
    def __init__(self, name: str, store: EtcdStore, data_dir: Path, hosting: ControllerHosting,
                 address: str, data_host: str, data_port: int, lease_ttl_s: int, *,
                 tls: TlsFiles | None = None, migration_yield: bool = True) -> None:
        self.name = name
        self.tls = tls  # mutual TLS: how this agent reaches its peers' gRPC (and proves it is `name`)
        self.store = store
        self.data_dir = data_dir
        self.hosting = hosting
        self.address = address
        self.http_address = ""  # /metrics and the probes, HOST:PORT, when agent.web serves them
        self.lease_ttl_s = lease_ttl_s
        # With TLS the data plane is TLS 1.3 both ways: each end proves its node name
        self.receiver = DataReceiver(data_host, data_port, ssl=tls.ssl_context(server=True) if tls else None)
        self.data_client_ssl = tls.ssl_context(server=False) if tls else None
        self.controllers: dict[str, HostedController] = {}
        # Each controller's guest I/O limits, by id: made before its guest runs (a destination's
        # before resume), dropped when it leaves or is deleted.
        self.io_limiters: dict[str, IoLimiter] = {}
        # Migration reads from this node's namespaces yield to its guests' I/O (agent/qos.py).
        self.migration_pacer = MigrationPacer(enabled=migration_yield)
        # NBD listens beside the data plane (the data-path network) on a port picked at start;
        # its URIs name the host peers use to reach this agent.
        self.nbd = NbdServer(data_host, 0, address.rpartition(":")[0], self._running_controller, tls=tls,
                             guest_io=GuestIoPolicy(self.io_limiters.get, self.migration_pacer))
        self.sessions: dict[str, Session] = {}
        self.creating: dict[str, int] = {}  # controller id -> namespace bytes, claimed in etcd, not running yet
        self.pending_frame_faults = FrameFaults()  # InjectFault (tests): for the next source session
        self.switchover_faults = SwitchoverFaults()
        # the liveness lease, kept alive from a thread of its own: a busy loop must not starve it
        self.lease = NodeLease(store.config, store.prefix, name, lease_ttl_s)
        self._republisher: asyncio.Task[None] | None = None  # publishes the node record once etcd answers
        self._publish_wanted = False
        self._published: NodeRecord | None = None  # the record etcd has, as far as we know
        self._free_space_watch: asyncio.Task[None] | None = None
        self.health: DriveHealth | None = None  # the backend's SMART / Health log, as last read
        self._health_problem = ""
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()  # short tasks of this host, cancelled by stop
        self.started_at = time.time()

    # ---- lifecycle --------------------------------------------------------------------------

    async def await_name_free(self) -> None:
        """Waits until no other agent holds this node's name (one that crashed: its lease runs
        out); raises NodeNameHeld if one that answers does. Called before this agent serves."""
        await await_name_free(self.store, self.name, functools.partial(_node_answering_at, tls=self.tls,
                                                                       node=self.name))

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(sweep_temp_files, self.data_dir)  # writes a crash interrupted
        await self.recover()
        await self.receiver.start()
        await self.nbd.start()
        await self.read_health()
        self._published = self.record()
        await self.lease.start(self._published)
        self._free_space_watch = asyncio.create_task(self._republish_on_change(), name="free-space-watch")

    # ---- restart recovery ---------------------------------------------------------------------
    #
    # The hosting keeps which controllers and destinations this node has (agent.backends.hosting);
    # beside a destination the agent keeps <cid>.<job>.state, its controller and guest state once
    # loaded, so that a destination restarted after COMMIT can still resume.

    @property
    def capacity_bytes(self) -> int:
        return self.hosting.capacity_bytes

    def _state_path(self, controller_id: str, job_id: str) -> Path:
        return self.data_dir / f"{controller_id}.{job_id}.state"

    def _hosted(self, controller: MigratableController, workload: GuestWorkload | None = None) -> HostedController:
        return HostedController(controller, self.hosting.guest(controller), workload)

    async def recover(self) -> None:
        """After a restart: reopen the controllers this node still owns (etcd decides), sanitize
        copies another node now owns, reload destinations whose state had arrived, and discard
        migrations that never got that far."""
        await self._unadopt_unclaimed()
        for cid in await asyncio.to_thread(self.hosting.hosted_ids):
            owner = await self.store.get_controller(cid)
            elsewhere = owner is not None and owner[0].node != self.name
            if elsewhere and owner is not None and owner[0].state != COMMITTED:
                log.warning("controller %s now belongs to %s: sanitizing the stale copy here", cid, owner[0].node)
                await asyncio.to_thread(self.hosting.discard, cid)
                continue
            controller = await asyncio.to_thread(self.hosting.reopen, cid)
            if elsewhere or (owner is not None and owner[0].state == LOST):
                # Given up while we were gone (LOST: kept for an operator), or committed to another
                # node that has not run it yet (COMMITTED: this copy is the way back if that node
                # is lost). Either way it stays suspended here.
                if controller.vfio_state is not VfioState.STOP:
                    await asyncio.to_thread(controller.set_state, VfioState.STOP)
            elif controller.vfio_state is not VfioState.RUNNING:
                # Ours, and suspended by a migration that died with the agent (a device keeps its
                # state across our restart): it runs again, as a rebuilt emulated controller does.
                await asyncio.to_thread(controller.set_state, VfioState.RUNNING)
            self.controllers[cid] = self._hosted(controller)
            self.limiter(cid).set_limits(owner[0].limits if owner is not None else IoLimits())
            log.info("recovered controller %s (%s)", cid, controller.vfio_state.name)
        pending = set(await asyncio.to_thread(self.hosting.pending_destinations))
        for cid, job_id in sorted(pending):
            state_path = self._state_path(cid, job_id)
            if not state_path.exists():
                # never loaded: the orchestrator will redo or abandon it
                await asyncio.to_thread(self.hosting.discard, cid, job_id)
                journal_path(state_path).unlink(missing_ok=True)
                continue
            controller = await asyncio.to_thread(self.hosting.reload_destination, cid, job_id)
            session = await DestinationSession.reload(controller, state_path, cid, job_id,
                                                      guest=self.hosting.guest(controller), backend=self.hosting.kind)
            self.sessions[job_id] = session
            log.info("recovered destination of job %s for %s, ready to resume", job_id, cid)
        for state_path in [*self.data_dir.glob("*.state"), *self.data_dir.glob(f"*{MAP_JOURNAL_SUFFIX}")]:
            cid, job_id = state_path.name.split(".")[:2]
            if (cid, job_id) not in pending:
                state_path.unlink()  # its destination runs here already, or never will

    async def _unadopt_unclaimed(self) -> None:
        """A destination recorded as hosted whose claim of RUNNING never reached etcd (the agent
        stopped between the two): it never ran, so it goes back to a loaded destination."""
        hosted = set(await asyncio.to_thread(self.hosting.hosted_ids))
        for state_path in sorted(self.data_dir.glob("*.state")):
            cid, job_id = state_path.name.split(".")[:2]
            if cid not in hosted:
                continue
            owner = await self.store.get_controller(cid)
            if owner is not None and owner[0].node == self.name and owner[0].state == RUNNING:
                continue  # claimed: it runs here
            try:
                await asyncio.to_thread(self.hosting.unadopt_destination, cid, job_id)
            except HostingError as exc:
                log.warning("%s left as it is: %s", state_path, exc)
                continue
            log.info("controller %s was recorded but never claimed: back to the loaded destination of job %s",
                     cid, job_id)

    async def _republish_on_change(self) -> None:
        """The data dir's free space and the drive's health move without us (guest writes fill
        sparse namespaces, other programs share the filesystem, a drive wears out): the record is
        written again once either moved enough. Health is read every HEALTH_POLL_S."""
        last_health_read = float("-inf")
        while True:
            if time.monotonic() - last_health_read >= HEALTH_POLL_S:
                last_health_read = time.monotonic()
                await self.read_health()
            if self._published is None or _worth_publishing(self._published, self.record()):
                self.publish_soon()
            await asyncio.sleep(FREE_SPACE_POLL_S)

    async def read_health(self) -> DriveHealth | None:
        """Reads the backend's SMART / Health log into the node record's health."""
        try:
            page = await asyncio.to_thread(self.hosting.health_log)
            health = parse_smart_log(page) if page is not None else None
        except SmartLogError as exc:
            health = None
            problem = str(exc)
        else:
            problem = ""
        if problem and problem != self._health_problem:
            log.warning("drive health not known: %s", problem)
        self._health_problem = problem
        self.health = health
        return health

    async def stop(self) -> None:
        for task in (self._free_space_watch, self._republisher, *self._background):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await session.close()  # type: ignore[attr-defined]
        await self.nbd.close()
        for hosted in self.controllers.values():
            if hosted.workload is not None:
                await asyncio.to_thread(hosted.workload.stop)
            hosted.controller.close()
        await self.receiver.close()
        self.hosting.close()
        await self.lease.stop()

    @property
    def allocated_bytes(self) -> int:
        """Controllers and destinations not yet running, as the hosting counts them (for a slot
        backend, the slots taken)."""
        return self.hosting.allocated_bytes()

    def data_dir_free_bytes(self) -> int | None:
        """The data dir's free space when namespaces live there (the scheduler's real bound)."""
        if not self.hosting.capabilities.namespaces_in_data_dir:
            return None
        try:
            return free_bytes(self.data_dir)
        except OSError as exc:
            log.warning("free space of %s unknown: %s", self.data_dir, exc)
            return None

    def record(self) -> NodeRecord:
        return NodeRecord(name=self.name, address=self.address, data_address=self.receiver.address,
                          capacity_bytes=self.capacity_bytes, allocated_bytes=self.allocated_bytes,
                          controllers=tuple(sorted(self.controllers)),
                          state_format_version=STATE_FORMAT_VERSION, started_at=self.started_at,
                          data_dir_free_bytes=self.data_dir_free_bytes(), health=self.health,
                          backend=self.hosting.kind, http_address=self.http_address)

    async def publish(self) -> None:
        """The node record changed: the lease thread writes it (and registers again with it if
        the lease expired)."""
        record = self.record()
        await self.lease.publish(record)
        self._published = record

    # ---- controllers ------------------------------------------------------------------------

    def _running_controller(self, controller_id: str) -> GuestDrivenController | None:
        hosted = self.controllers.get(controller_id)
        return hosted.guest if hosted is not None else None

    def limiter(self, controller_id: str) -> IoLimiter:
        """The controller's I/O limiter (made, unlimited, on first use)."""
        limiter = self.io_limiters.get(controller_id)
        if limiter is None:
            limiter = self.io_limiters[controller_id] = IoLimiter()
        return limiter

    def write_admission(self, controller_id: str) -> functools.partial[float]:
        """What the built-in guest asks before each write: its controller's write limits."""
        return functools.partial(self.limiter(controller_id).reserve, "write")

    def limits(self, controller_id: str) -> IoLimits:
        limiter = self.io_limiters.get(controller_id)
        return limiter.limits if limiter is not None else IoLimits()

    async def set_limits(self, controller_id: str, changes: dict[str, int], clear: bool) -> HostedController:
        """Applies `changes` (field -> value, 0 removes) to the controller's limits, after `clear`
        removed them all: first in its etcd record (so they move with it), then here."""
        async with self._lock:
            hosted = self.hosted(controller_id)
            moving = self._moving_job(controller_id)
            if moving:
                raise SessionError(ErrorKind.PRECONDITION, f"controller {controller_id!r} is being moved by job "
                                                           f"{moving}; change its limits once the job ended")
            try:
                limits = (IoLimits() if clear else self.limits(controller_id)).merged(changes)
            except ValueError as exc:
                raise SessionError(ErrorKind.INVALID, str(exc)) from None
            problem = limits.problem()
            if problem:
                raise SessionError(ErrorKind.INVALID, problem)
            problem = await self.store.set_controller_limits(controller_id, self.name, limits)
            if problem:
                raise SessionError(ErrorKind.PRECONDITION, problem)
            self.limiter(controller_id).set_limits(limits)
            log.info("controller %s: I/O limits now %s", controller_id, limits.shown())
        return hosted

    def _lacks(self, what: str, controller_id: str, hint: str) -> SessionError:
        return SessionError(ErrorKind.PRECONDITION,
                            f"controller {controller_id!r} runs on node {self.name!r}, whose backend "
                            f"{self.hosting.kind} has no {what}; {hint}")

    def export_controller(self, controller_id: str) -> str:
        """Serves the controller over NBD; returns its nbd:// URI, nbds:// with TLS (idempotent)."""
        self.hosted(controller_id)
        if not self.hosting.capabilities.nbd_export:
            raise self._lacks("NBD export", controller_id, "its guest is the VM the VF is passed to; migrate it to "
                                                           "a node with the emulated backend to export it")
        return self.nbd.export(controller_id)

    def hosted(self, controller_id: str) -> HostedController:
        hosted = self.controllers.get(controller_id)
        if hosted is None:
            raise SessionError(ErrorKind.NOT_FOUND, f"controller {controller_id!r} does not run on node {self.name!r}")
        return hosted

    def guest_of(self, controller_id: str, what: str) -> tuple[HostedController, GuestDrivenController]:
        """The controller and its built-in guest, or a refusal naming the backend."""
        hosted = self.hosted(controller_id)
        if hosted.guest is None:
            raise self._lacks(f"built-in guest for {what}", controller_id,
                              "its guest is the VM the VF is passed to; check the data from there")
        return hosted, hosted.guest

    async def create_controller(self, controller_id: str, namespace_bytes: int, prefill: bool,
                                spec: WorkloadSpec | None, limits: IoLimits | None = None) -> HostedController:
        limits = limits or IoLimits()
        async with self._lock:
            if controller_id in self.controllers:
                raise SessionError(ErrorKind.EXISTS, f"controller {controller_id!r} already runs on node {self.name!r}")
            if namespace_bytes <= 0 or namespace_bytes % BLOCK_BYTES:
                raise SessionError(ErrorKind.INVALID, f"namespace_bytes {namespace_bytes} must be a positive multiple "
                                                      f"of {BLOCK_BYTES}")
            if (prefill or spec is not None) and not self.hosting.capabilities.guest_workload:
                raise SessionError(ErrorKind.PRECONDITION,
                                   f"node {self.name!r} runs backend {self.hosting.kind}, which has "
                                   "no built-in guest to prefill or run a workload; create the "
                                   "controller without them (its guest is the VM the VF is "
                                   "passed to)")
            problem = self.hosting.capacity_problem(controller_id, namespace_bytes)
            if problem:
                raise SessionError(ErrorKind.PRECONDITION, f"node {self.name!r}: {problem}")
            if spec is not None:
                try:
                    spec.validate(namespace_bytes)
                except ValueError as exc:
                    raise SessionError(ErrorKind.INVALID, str(exc)) from None
            problem = limits.problem()
            if problem:
                raise SessionError(ErrorKind.INVALID, problem)
            claimed = await self.store.claim_controller(
                ControllerRecord(controller_id=controller_id, node=self.name, namespace_bytes=namespace_bytes,
                                 limits=limits))
            if not claimed:
                owner = await self.store.get_controller(controller_id)
                where = owner[0].node if owner else "another node"
                raise SessionError(ErrorKind.EXISTS, f"controller {controller_id!r} already exists on node {where!r}")
            # Reported as CREATING until it runs: etcd already names this node its owner, and a
            # reconciler pass in between must not take its absence for a controller gone MISSING.
            self.creating[controller_id] = namespace_bytes
            hosted = None
            try:
                try:
                    controller = await asyncio.to_thread(self.hosting.create, controller_id, namespace_bytes)
                except HostingError as exc:
                    raise SessionError(ErrorKind.PRECONDITION, f"node {self.name!r}: {exc}") from None
                except OSError as exc:
                    raise self._write_refusal(exc, f"creating controller {controller_id!r}") from exc
                hosted = self._hosted(controller)
                if hosted.guest is not None and (prefill or spec is not None):
                    hosted.workload = GuestWorkload(hosted.guest, spec or WorkloadSpec())
                    if prefill:
                        try:
                            await asyncio.to_thread(hosted.workload.prefill)
                        except OSError as exc:
                            raise self._write_refusal(exc, f"prefilling controller {controller_id!r}") from exc
                        except ControllerError as exc:
                            # The guest's write failed inside the device model (a full disk shows
                            # as a short write there): the create fails, and is undone below.
                            free = self.data_dir_free_bytes()
                            on_disk = f" ({free} bytes free on its data dir)" if free is not None else ""
                            raise SessionError(ErrorKind.PRECONDITION,
                                               f"node {self.name!r}: prefilling controller {controller_id!r} failed"
                                               f"{on_disk}: {exc}; free space there or choose another node"
                                               ) from None
                    hosted.workload.set_admission(self.write_admission(controller_id))
                self.limiter(controller_id).set_limits(limits)  # after the prefill: that is not the guest
                if hosted.workload is not None and spec is not None:
                    hosted.workload.start()
                self.controllers[controller_id] = hosted
            except BaseException:
                # Nothing half-created: what was made here goes, and so does the claim in etcd
                # (a create that failed must not leave an owner record for a controller nobody runs).
                await self._undo_create(controller_id, hosted)
                raise
            finally:
                del self.creating[controller_id]
        await self.publish()
        return hosted

    async def _undo_create(self, controller_id: str, hosted: HostedController | None) -> None:
        self.io_limiters.pop(controller_id, None)
        try:
            if hosted is not None:
                await asyncio.to_thread(self._destroy, controller_id, hosted)
        except Exception:
            log.exception("controller %s: could not undo its failed creation here", controller_id)
        try:
            problem = await self.store.delete_controller(controller_id, self.name)
            if problem:
                log.warning("controller %s: its claim stays in etcd after a failed create: %s", controller_id, problem)
        except EtcdError as exc:
            log.warning("controller %s: its claim stays in etcd after a failed create (etcd: %s); "
                        "`orchctl controllers delete %s` removes it", controller_id, exc, controller_id)

    def _destroy(self, controller_id: str, hosted: HostedController) -> None:
        """Stops the guest, sanitizes the controller and gives its resources back (blocking)."""
        if hosted.workload is not None:
            hosted.workload.stop()
        hosted.controller.release()
        self.hosting.release(controller_id)

    def _moving_job(self, controller_id: str) -> str | None:
        """The job of a migration session here that still holds the controller, if any."""
        for job_id, session in self.sessions.items():
            if session.controller_id == controller_id and session.current not in ENDED_STAGES:
                return job_id
        return None

    async def delete_controller(self, controller_id: str) -> int | None:
        """Stops the guest, sanitizes the controller, gives its resources back, then deletes its
        etcd record (only while it names this node). Local first: a record left behind by a failed
        etcd write is removed by calling this again (the controller gone from here, the record
        naming this node), while the reverse order could leave a controller nobody owns.
        Returns the namespace size of what was deleted here, None when only the record was left."""
        async with self._lock:
            moving = self._moving_job(controller_id)
            if moving is None:
                moving = await self.store.active_job_for(controller_id)
            if moving:
                raise SessionError(ErrorKind.PRECONDITION,
                                   f"controller {controller_id!r} is being moved by job {moving}; "
                                   "wait for it or cancel it, then delete")
            hosted = self.controllers.get(controller_id)
            deleted: int | None = None
            if hosted is None:
                owned = await self.store.get_controller(controller_id)
                if owned is None or owned[0].node != self.name:
                    raise SessionError(ErrorKind.NOT_FOUND,
                                       f"controller {controller_id!r} does not run on node {self.name!r}")
            else:
                deleted = hosted.controller.namespace_bytes
                self.nbd.unexport(controller_id)  # its NBD clients' connections end here
                await asyncio.to_thread(self._destroy, controller_id, hosted)
                del self.controllers[controller_id]
                self.io_limiters.pop(controller_id, None)
            problem = await self.store.delete_controller(controller_id, self.name)
            if problem:
                raise SessionError(ErrorKind.PRECONDITION, f"controller {controller_id!r} was deleted on node "
                                                           f"{self.name!r} but its etcd record stays: {problem}")
        await self.publish()
        return deleted

    async def start_workload(self, controller_id: str, spec: WorkloadSpec) -> HostedController:
        hosted, guest = self.guest_of(controller_id, "a workload")
        try:
            spec.validate(hosted.controller.namespace_bytes)
        except ValueError as exc:
            raise SessionError(ErrorKind.INVALID, str(exc)) from None
        if hosted.workload is not None and hosted.workload.status().running:
            raise SessionError(ErrorKind.PRECONDITION, f"controller {controller_id!r} already has a running workload")
        if hosted.workload is not None:
            hosted.workload = GuestWorkload.from_state(guest, hosted.workload.export_state(), spec=spec)
        else:
            hosted.workload = GuestWorkload(guest, spec)
        hosted.workload.set_admission(self.write_admission(controller_id))
        hosted.workload.start()
        return hosted

    # ---- sessions ---------------------------------------------------------------------------

    def _session(self, job_id: str, epoch: int, kind: type[Session]) -> Session | None:
        session = self.sessions.get(job_id)
        if session is None:
            return None
        if not isinstance(session, kind):
            raise SessionError(ErrorKind.PRECONDITION,
                               f"job {job_id} is a {type(session).__name__} on node {self.name!r}")
        session.check_epoch(epoch)
        return session

    def session(self, job_id: str) -> Session:
        session = self.sessions.get(job_id)
        if session is None:
            raise SessionError(ErrorKind.NOT_FOUND, f"job {job_id} has no session on node {self.name!r}")
        return session

    def _refuse_if_too_many_sessions(self) -> None:
        """A node takes part in at most MAX_SESSIONS migrations at once: each holds a connection,
        buffers and, as a destination, a namespace being written."""
        active = sum(1 for s in self.sessions.values() if s.current not in ENDED_STAGES)
        if active >= MAX_SESSIONS:
            raise SessionError(ErrorKind.PRECONDITION,
                               f"node {self.name!r} already takes part in {active} migrations (at most {MAX_SESSIONS} "
                               "at once); choose another node or wait for one to end")

    async def source_session(self, job_id: str, epoch: int, controller_id: str, token: str) -> SourceSession:
        found = self._session(job_id, epoch, SourceSession)
        assert found is None or isinstance(found, SourceSession)
        # A new token means a new destination for the same job (the old one was lost): start over.
        if found is not None and not (found.stage is SourceStage.ABORTED and found.token != token):
            return found
        self._refuse_if_too_many_sessions()
        hosted = self.hosted(controller_id)
        if hosted.controller.vfio_state != VfioState.RUNNING:
            raise SessionError(ErrorKind.PRECONDITION,
                               f"controller {controller_id!r} is {hosted.controller.vfio_state.name} "
                               f"on node {self.name!r}, not RUNNING: it cannot be migrated")
        if hosted.migrating_job and hosted.migrating_job != job_id:
            other = self.sessions.get(hosted.migrating_job)
            if other is not None and other.current not in (SourceStage.ABORTED, SourceStage.RELEASED):
                raise SessionError(ErrorKind.PRECONDITION, f"controller {controller_id!r} is being moved by job "
                                                           f"{hosted.migrating_job}")
        session = SourceSession(job_id=job_id, epoch=epoch, controller_id=controller_id,
                                controller=hosted.controller, workload=hosted.workload,
                                frame_faults=self.pending_frame_faults, token=token, data_ssl=self.data_client_ssl,
                                pacer=self.migration_pacer)
        self.pending_frame_faults = FrameFaults()
        hosted.migrating_job = job_id
        self.sessions[job_id] = session
        return session

    async def prepare_destination(self, job_id: str, epoch: int, controller_id: str, namespace_bytes: int,
                                  state_format_version: int, *, source_node: str = "") -> DestinationSession:
        found = self._session(job_id, epoch, DestinationSession)
        if found is not None:
            assert isinstance(found, DestinationSession)
            if found.stage is DestinationStage.ABORTED:
                raise SessionError(ErrorKind.PRECONDITION, f"job {job_id} was aborted on node {self.name!r}")
            return found
        if state_format_version != STATE_FORMAT_VERSION:
            raise SessionError(ErrorKind.PRECONDITION,
                               f"controller-state format version {state_format_version} is not supported on node "
                               f"{self.name!r} (supported: {STATE_FORMAT_VERSION})")
        if controller_id in self.controllers:
            raise SessionError(ErrorKind.PRECONDITION,
                               f"controller {controller_id!r} already runs on node {self.name!r}")
        self._refuse_if_too_many_sessions()
        async with self._lock:
            problem = self.hosting.capacity_problem(controller_id, namespace_bytes)
            if problem:
                raise SessionError(ErrorKind.PRECONDITION, f"node {self.name!r}: {problem}")
            try:
                controller = await asyncio.to_thread(self.hosting.create_destination, controller_id, job_id,
                                                     namespace_bytes)
            except HostingError as exc:
                raise SessionError(ErrorKind.PRECONDITION, f"node {self.name!r}: {exc}") from None
            session = DestinationSession(job_id=job_id, epoch=epoch, controller_id=controller_id,
                                         controller=controller, token=secrets.token_hex(16), node=self.name,
                                         state_path=self._state_path(controller_id, job_id),
                                         guest=self.hosting.guest(controller), backend=self.hosting.kind,
                                         switch_over=self.switch_over)
            self.receiver.register(job_id, session.token, session, source_node=source_node)
            self.sessions[job_id] = session
        await self.publish()
        return session

    async def destination_running(self, session: DestinationSession) -> None:
        """Runs the destination's controller, each step undone when a later one fails, so that a
        controller runs only once it is durably listed: first the hosting's record (a restarted
        agent finds it), then the claim of RUNNING in etcd (after which ownership cannot go back
        to the source, and if it already went back we must not run it), then the controller and
        its guest. A refusal before the claim leaves the destination loaded and resumable."""
        async with session.resume_lock:
            if session.stage is DestinationStage.RUNNING:
                return
            session.check_resumable()
            mark(session.job_id, "dst.resume_received")
            # The claim's read goes to etcd while the record is written (the claim itself, a CAS
            # on what was read, still comes after the record).
            reading = asyncio.ensure_future(self.store.get_controller(session.controller_id))
            try:
                await asyncio.to_thread(self.hosting.adopt_destination, session.controller_id, session.job_id)
            except BaseException as exc:
                reading.cancel()
                with contextlib.suppress(BaseException):
                    await reading
                if isinstance(exc, OSError):
                    raise self._write_refusal(exc, f"recording controller {session.controller_id!r}") from exc
                raise
            mark(session.job_id, "dst.adopted")
            try:
                read = await reading
                problem = await self.store.claim_running(session.controller_id, self.name, read)
            except BaseException:
                await self._unadopt(session)
                raise
            if problem:
                await self._unadopt(session)
                raise SessionError(ErrorKind.PRECONDITION, problem)
            mark(session.job_id, "dst.claimed")
            await self._adopt_limits(session, read)

            async def on_running(controller: MigratableController, workload: GuestWorkload | None) -> None:
                self.controllers[session.controller_id] = self._hosted(controller, workload)
                self.receiver.unregister(session.job_id)
                await self.publish()
            await session.resume(on_running)

    async def switch_over(self, session: DestinationSession, plan: agent_pb2.SwitchoverPlan,
                          loading: Awaitable[None]) -> dict[str, Any]:
        """The switchover, taken here as the state arrives (the source waits for its answer with
        the guest paused): whether etcd answers is asked while `loading` loads the state; then
        the hosting's record (a restarted agent finds the controller), then ONE etcd transaction
        that moves ownership here and claims RUNNING, fenced as the orchestrator's own writes (job
        and controller revisions, leader term), then the controller and its guest run. Returns
        what FINAL's ACK says of it.

        A refusal (raised: a not-ok ACK) comes only before the commit was sent (etcd silent or
        led by another term, a load or a record that failed) or when etcd refused it: the source
        then resumes at once. An etcd that goes silent after it answered leaves the commit's outcome
        unknown: nothing runs here, the source stays paused, and the orchestrator settles it in
        etcd (then ResumeDestination runs it here if the commit landed)."""
        async with session.resume_lock:  # an abort waits for the outcome (and is refused if it committed)
            hold_final_s = self.switchover_faults.take_final_hold()
            if hold_final_s:
                log.warning("job %s: holding FINAL %.1f s before loading it (injected fault)", session.job_id,
                            hold_final_s)
                await asyncio.sleep(hold_final_s)
            # Both alongside the load: etcd's answer, and the hosting's record in a thread of its
            # own (undone below if anything before the commit fails).
            checking = asyncio.ensure_future(self.store.answers(plan.commit_timeout_s))
            adopting = asyncio.ensure_future(asyncio.to_thread(self.hosting.adopt_destination, session.controller_id,
                                                               session.job_id))
            try:
                await loading
                term = await checking
            except BaseException as exc:
                checking.cancel()
                with contextlib.suppress(BaseException):
                    await checking
                await self._undo_adopting(session, adopting)
                if isinstance(exc, EtcdError):
                    raise SessionError(ErrorKind.PRECONDITION, f"etcd did not answer before the switchover's "
                                                               f"commit ({exc}); nothing was committed") from exc
                raise
            if term != plan.leader_term:
                await self._undo_adopting(session, adopting)
                raise SessionError(ErrorKind.PRECONDITION, f"the orchestrator leader of term {plan.leader_term} "
                                                           f"that planned the switchover no longer leads (term "
                                                           f"{term}); nothing was committed")
            mark(session.job_id, "dst.etcd_checked")
            try:
                await adopting
            except OSError as exc:
                raise self._write_refusal(exc, f"recording controller {session.controller_id!r}") from exc
            mark(session.job_id, "dst.adopted")
            controller = ControllerRecord.from_bytes(plan.controller_record)
            hold_s, exit_after_commit = self.switchover_faults.take()
            if hold_s:
                log.warning("job %s: holding the commit %.1f s (injected fault)", session.job_id, hold_s)
                await asyncio.sleep(hold_s)
            # The switchover image's snapshot is taken while the commit is in etcd: nothing writes
            # the namespace before the controller runs, which waits for both.
            snapshotting = asyncio.ensure_future(session.take_snapshot())
            session.commit_sent = True
            commit_started = time.monotonic()
            try:
                revision = await asyncio.wait_for(
                    self.store.commit_switchover(session.job_id, plan.job_record, plan.job_revision, controller,
                                                 plan.controller_revision, self.name, plan.leader_term),
                    plan.commit_timeout_s)
            except ConflictError as exc:
                session.commit_sent = False  # refused: it can never land
                await self._snapshot_taken(session, snapshotting)
                await self._unadopt(session)
                raise SessionError(ErrorKind.PRECONDITION, f"switchover refused by etcd: {exc}") from exc
            except (EtcdError, TimeoutError) as exc:
                await self._snapshot_taken(session, snapshotting)
                await self._unadopt(session)  # loaded, not running: ResumeDestination records it again
                note = (f"etcd did not confirm the switchover's commit within {plan.commit_timeout_s:g} s "
                        f"({type(exc).__name__}: {exc}); it may have landed")
                log.warning("job %s: %s", session.job_id, note)
                return {"switchover": "UNKNOWN", "note": note}
            commit_ms = round((time.monotonic() - commit_started) * 1000.0, 3)
            mark(session.job_id, "dst.committed")
            if exit_after_commit:
                log.warning("job %s: exiting right after the commit (injected fault)", session.job_id)
                logging.shutdown()
                os._exit(FAULT_EXIT_CODE)
            await self._snapshot_taken(session, snapshotting)
            await self._adopt_limits(session, (controller, plan.controller_revision))
            job_id = session.job_id

            async def on_running(controller: MigratableController, workload: GuestWorkload | None) -> None:
                self.controllers[session.controller_id] = self._hosted(controller, workload)
                self.publish_soon()  # the guest does not wait on the node record's write
                # The data connection ends with FINAL's ACK, after this: its registration goes then.
                self._unregister_when_done(job_id)
            try:
                await session.resume(on_running)
            except Exception as exc:
                # Committed: the controller is ours whatever happens; a retried ResumeDestination runs it.
                log.exception("job %s: committed, but the controller did not start here", job_id)
                return {"switchover": "COMMITTED", "revision": revision, "commit_ms": commit_ms,
                        "note": f"committed, but the controller did not start on {self.name}: {exc}"}
            return {"switchover": "COMMITTED", "revision": revision, "commit_ms": commit_ms}

    @staticmethod
    async def _snapshot_taken(session: DestinationSession, snapshotting: asyncio.Future[None]) -> None:
        """Waits for the switchover image's snapshot; one that failed leaves the digest unknown
        (verification then keeps the source's copy), not the switchover undone."""
        try:
            await snapshotting
        except Exception:
            log.exception("job %s: no snapshot of the switchover image; its digest will be missing", session.job_id)

    async def _undo_adopting(self, session: DestinationSession, adopting: asyncio.Future[None]) -> None:
        """The switchover stops before its commit: the hosting's record, if written, goes again."""
        try:
            await adopting
        except BaseException:  # not written: nothing to undo
            return
        await self._unadopt(session)

    def _unregister_when_done(self, job_id: str) -> None:
        async def unregister() -> None:
            with contextlib.suppress(KeyError):
                await asyncio.wait_for(self.receiver.wait_session_end(job_id), 10.0)
            self.receiver.unregister(job_id)
        task = asyncio.create_task(unregister(), name=f"unregister-{job_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _adopt_limits(self, session: DestinationSession,
                            read: tuple[ControllerRecord, int] | None = None) -> None:
        """The limits the controller's etcd record carries (set on the source) apply here before
        its guest runs again. `read`: the record the claim was granted on (limits cannot change
        while a job moves the controller), which saves a round trip inside the blackout."""
        cid = session.controller_id
        try:
            owned = read or await self.store.get_controller(cid)
        except EtcdError as exc:
            # It was claimed a moment ago; running it unlimited beats not running it.
            log.warning("controller %s: its I/O limits could not be read (etcd: %s); it runs without them until "
                        "`orchctl controllers limit` sets them again", cid, exc)
            owned = None
        self.limiter(cid).set_limits(owned[0].limits if owned is not None else IoLimits())
        session.guest_admission = self.write_admission(cid)

    async def _unadopt(self, session: DestinationSession) -> None:
        try:
            await asyncio.to_thread(self.hosting.unadopt_destination, session.controller_id, session.job_id)
        except Exception:
            # Left recorded: a restarted agent un-adopts it then, as etcd never saw the claim.
            log.exception("job %s: could not undo the record of controller %s", session.job_id,
                          session.controller_id)

    def _write_refusal(self, exc: OSError, what: str) -> SessionError:
        full = no_space(exc)
        where = Path(exc.filename) if exc.filename else self.data_dir
        if full is not None:
            return SessionError(ErrorKind.NO_SPACE, no_space_message(self.name, where, full))
        return SessionError(ErrorKind.PRECONDITION, f"node {self.name!r}: {what} failed writing {where}: "
                                                    f"{exc.strerror or exc}; check its data dir")

    async def source_released(self, session: SourceSession) -> str:
        async def on_released() -> None:
            self.controllers.pop(session.controller_id, None)
            self.io_limiters.pop(session.controller_id, None)
            # The destination runs it now: NBD clients must go there, so their connections end.
            self.nbd.unexport(session.controller_id)
            await asyncio.to_thread(self.hosting.release, session.controller_id)
            await self.publish()
        return await session.release(on_released)

    async def _owned_here(self, controller_id: str) -> str | None:
        """None when etcd says this node owns the controller, else why not."""
        owner = await self.store.get_controller(controller_id)
        if owner is None:
            return f"controller {controller_id!r} is not known to etcd"
        if owner[0].node != self.name:
            return (f"controller {controller_id!r} belongs to {owner[0].node!r} since COMMIT; "
                    f"the source must not run it again")
        return None

    async def abort(self, job_id: str, epoch: int, reason: str, controller_id: str = "", *,
                    commit_never_sent: bool = False) -> Session | None:
        """Undoes a job here. A stopped source resumes only when etcd says it still owns the
        controller, or when the orchestrator (of the session's epoch, checked first) says it never
        sent the COMMIT: then no switchover can have happened and etcd need not answer."""
        session = self.sessions.get(job_id)
        if session is None:
            # Unknown job: nothing to undo, unless we restarted holding the source's suspended
            # copy and ownership came back to us (a destination lost after COMMIT): run it again.
            hosted = self.controllers.get(controller_id)
            if hosted is not None and hosted.controller.vfio_state != VfioState.RUNNING \
                    and await self._owned_here(controller_id) is None:
                await asyncio.to_thread(hosted.controller.set_state, VfioState.RUNNING)
                await self.publish()
            return None
        session.check_epoch(epoch)
        if isinstance(session, SourceSession) and session.stage is SourceStage.STOPPED and not commit_never_sent:
            # Past stop-and-copy the switchover may have committed: etcd decides who runs it.
            problem = await self._owned_here(session.controller_id)
            if problem:
                raise SessionError(ErrorKind.PRECONDITION, problem)
        if isinstance(session, DestinationSession):
            async with session.resume_lock:  # not under a resume that is adopting or claiming
                if session.commit_sent and session.stage is not DestinationStage.RUNNING:
                    # Its commit may have landed: the copy goes only while etcd says it is not ours.
                    if await self._owned_here(session.controller_id) is None:
                        raise SessionError(ErrorKind.PRECONDITION,
                                           f"controller {session.controller_id!r} belongs to {self.name!r} since "
                                           f"job {job_id}'s switchover committed here; it is not discarded")
                self.receiver.unregister(job_id)
                released = session.current not in (SourceStage.ABORTED, DestinationStage.ABORTED)
                await session.abort(reason)
                if released and session.controller is not None:
                    await asyncio.to_thread(self.hosting.release, session.controller_id, job_id)
        else:
            await session.abort(reason)  # type: ignore[attr-defined]
        # A rolled-back source runs again: NBD requests stalled by the suspend go on now.
        self.nbd.controller_changed(session.controller_id)
        self.publish_soon()  # the abort itself is done: an etcd outage must neither fail nor delay it
        return session

    def publish_soon(self) -> None:
        """The node record changed, but the caller must not wait on etcd (an abort that resumes a
        guest during an etcd outage): it is written in the background, retried until it lands."""
        self._publish_wanted = True
        if self._republisher is None or self._republisher.done():
            self._republisher = asyncio.create_task(self._publish_until_done(), name="publish-node")

    async def _publish_until_done(self) -> None:
        delay_s = 0.2
        while self._publish_wanted:
            self._publish_wanted = False  # a change made while this write runs asks for another
            try:
                await self.publish()
            except EtcdError as exc:
                self._publish_wanted = True
                log.warning("node record not updated, etcd did not answer (%s); retrying in %.1f s", exc, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)



NAME_PING_TIMEOUT_S = 1.0


async def _node_answering_at(address: str, *, tls: TlsFiles | None = None, node: str = "") -> str | None:
    """The node name the agent at `address` gives, None when nothing answers there. With TLS, only
    an agent holding `node`'s certificate can answer."""
    if not address:
        return None
    async with agent_channel(address, node, tls) as channel:
        try:
            info = await agent_pb2_grpc.AgentServiceStub(channel).GetInfo(agent_pb2.GetInfoRequest(),
                                                                         timeout=NAME_PING_TIMEOUT_S)
        except grpc.RpcError:
            return None
    return str(info.node)

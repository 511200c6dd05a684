"""The host an agent runs on: its controllers (with their guest workloads), its migration
sessions, its data-plane listener, its NBD server, and its registration in etcd under a
liveness lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from agent.dataplane.receiver import DataReceiver
from agent.emulated.controller import BLOCK_BYTES, EmulatedController
from agent.guest.workload import GuestWorkload, WorkloadSpec
from agent.nbd.server import NbdServer
from agent.nvme.state_format import STATE_FORMAT_VERSION
from agent.sessions import DestinationSession, Session, SessionError, SourceSession
from agent.vfio_states import VfioState
from cluster.records import COMMITTED, LOST, ControllerRecord, NodeRecord
from cluster.store import EtcdError, EtcdStore

log = logging.getLogger(__name__)


@dataclass
class HostedController:
    controller: EmulatedController
    workload: GuestWorkload | None = None
    migrating_job: str = ""


class Host:
    def __init__(self, name: str, store: EtcdStore, data_dir: Path, capacity_bytes: int,
                 address: str, data_host: str, data_port: int, lease_ttl_s: int) -> None:
        self.name = name
        self.store = store
        self.data_dir = data_dir
        self.capacity_bytes = capacity_bytes
        self.address = address
        self.lease_ttl_s = lease_ttl_s
        self.receiver = DataReceiver(data_host, data_port)
        self.controllers: dict[str, HostedController] = {}
        # NBD listens beside the data plane (the data-path network) on a port picked at start;
        # its URIs name the host peers use to reach this agent.
        self.nbd = NbdServer(data_host, 0, address.rpartition(":")[0], self._running_controller)
        self.sessions: dict[str, Session] = {}
        self.pending_corrupt_frame = 0
        self._lease_id = 0
        self._keeper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.started_at = time.time()

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self.recover()
        await self.receiver.start()
        await self.nbd.start()
        await self._register()
        self._keeper = asyncio.create_task(self._keep_registered(), name="node-lease")

    # ---- restart recovery ---------------------------------------------------------------------
    #
    # Files in the data dir:  <cid>.json            a controller this node runs (its metadata)
    #                         <ns file>             its namespace (sparse)
    #                         <cid>.<job>.incoming  a namespace arriving for a migration
    #                         <cid>.<job>.state     its controller and guest state, once loaded

    def _meta_path(self, controller_id: str) -> Path:
        return self.data_dir / f"{controller_id}.json"

    def _write_meta(self, controller: EmulatedController) -> None:
        meta = {"controller_id": controller.controller_id, "namespace_bytes": controller.namespace_bytes,
                "namespace_file": controller.namespace_path.name}
        tmp = self._meta_path(controller.controller_id).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(self._meta_path(controller.controller_id))  # atomic: never a half-written record

    async def recover(self) -> None:
        """After a restart: reopen the controllers this node still owns (etcd decides), sanitize
        copies another node now owns, reload destinations whose state had arrived, and discard
        migrations that never got that far."""
        in_use: set[str] = set()
        for meta_path in sorted(self.data_dir.glob("*.json")):
            meta = json.loads(meta_path.read_text())
            cid, ns_path = meta["controller_id"], self.data_dir / meta["namespace_file"]
            in_use.add(ns_path.name)
            owner = await self.store.get_controller(cid)
            elsewhere = owner is not None and owner[0].node != self.name
            if elsewhere and owner is not None and owner[0].state != COMMITTED:
                log.warning("controller %s now belongs to %s: sanitizing the stale copy here", cid, owner[0].node)
                ns_path.unlink(missing_ok=True)
                meta_path.unlink()
                continue
            controller = await asyncio.to_thread(EmulatedController, cid, ns_path, meta["namespace_bytes"],
                                                 create=False)
            if elsewhere or (owner is not None and owner[0].state == LOST):
                # Given up while we were gone (LOST: kept for an operator), or committed to another
                # node that has not run it yet (COMMITTED: this copy is the way back if that node
                # is lost). Either way it stays suspended here.
                await asyncio.to_thread(controller.set_state, VfioState.STOP)
            self.controllers[cid] = HostedController(controller)
            log.info("recovered controller %s (%s)", cid, controller.vfio_state.name)
        for incoming in sorted(self.data_dir.glob("*.incoming")):
            if incoming.name in in_use:
                continue  # a migration that completed here: the controller runs from this file
            cid, job_id = incoming.name.split(".")[:2]
            state_path = incoming.with_suffix(".state")
            if not state_path.exists():
                incoming.unlink()  # never loaded: the orchestrator will redo or abandon it
                continue
            session = await DestinationSession.reload(incoming, state_path, cid, job_id)
            self.sessions[job_id] = session
            log.info("recovered destination of job %s for %s, ready to resume", job_id, cid)

    async def _register(self) -> None:
        self._lease_id = await self.store.grant_lease(self.lease_ttl_s)
        await self.store.put_node(self.record(), self._lease_id)

    async def _keep_registered(self) -> None:
        """Refreshes the liveness lease at a third of its TTL; when etcd has expired it (we were
        paused, partitioned, or etcd restarted), registers again under a new one."""
        while True:
            await asyncio.sleep(max(self.lease_ttl_s / 3.0, 0.2))
            try:
                if not await self.store.refresh_lease(self._lease_id):
                    log.warning("node lease expired; registering again")
                    await self._register()
            except EtcdError as exc:
                log.warning("etcd unavailable for the node lease, retrying: %s", exc)

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        for session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await session.close()  # type: ignore[attr-defined]
        await self.nbd.close()
        for hosted in self.controllers.values():
            if hosted.workload is not None:
                await asyncio.to_thread(hosted.workload.stop)
            hosted.controller.close()
        await self.receiver.close()
        with contextlib.suppress(EtcdError):
            await self.store.revoke_lease(self._lease_id)

    @property
    def allocated_bytes(self) -> int:
        incoming = sum(s.ctrl.namespace_bytes for s in self.sessions.values()
                       if isinstance(s, DestinationSession) and s.controller is not None
                       and s.stage not in ("aborted", "running"))
        return sum(h.controller.namespace_bytes for h in self.controllers.values()) + incoming

    def record(self) -> NodeRecord:
        return NodeRecord(name=self.name, address=self.address, data_address=self.receiver.address,
                          capacity_bytes=self.capacity_bytes, allocated_bytes=self.allocated_bytes,
                          controllers=tuple(sorted(self.controllers)),
                          state_format_version=STATE_FORMAT_VERSION, started_at=self.started_at)

    async def publish(self) -> None:
        try:
            await self.store.put_node(self.record(), self._lease_id)
        except EtcdError as exc:
            if "lease not found" not in str(exc):
                raise
            await self._register()  # expired under us (e.g. a long prefill starved the loop)

    # ---- controllers ------------------------------------------------------------------------

    def _running_controller(self, controller_id: str) -> EmulatedController | None:
        hosted = self.controllers.get(controller_id)
        return hosted.controller if hosted is not None else None

    def export_controller(self, controller_id: str) -> str:
        """Serves the controller over NBD; returns its nbd:// URI (idempotent)."""
        self.hosted(controller_id)
        return self.nbd.export(controller_id)

    def hosted(self, controller_id: str) -> HostedController:
        hosted = self.controllers.get(controller_id)
        if hosted is None:
            raise SessionError("not_found", f"controller {controller_id!r} does not run on node {self.name!r}")
        return hosted

    async def create_controller(self, controller_id: str, namespace_bytes: int, prefill: bool,
                                spec: WorkloadSpec | None) -> HostedController:
        async with self._lock:
            if controller_id in self.controllers:
                raise SessionError("exists", f"controller {controller_id!r} already runs on node {self.name!r}")
            if namespace_bytes <= 0 or namespace_bytes % BLOCK_BYTES:
                raise SessionError("invalid", f"namespace_bytes {namespace_bytes} must be a positive multiple "
                                              f"of {BLOCK_BYTES}")
            if self.allocated_bytes + namespace_bytes > self.capacity_bytes:
                raise SessionError("precondition",
                                   f"node {self.name!r} has {self.capacity_bytes - self.allocated_bytes} bytes "
                                   f"free; controller {controller_id!r} needs {namespace_bytes}")
            if spec is not None:
                try:
                    spec.validate(namespace_bytes)
                except ValueError as exc:
                    raise SessionError("invalid", str(exc)) from None
            claimed = await self.store.claim_controller(
                ControllerRecord(controller_id=controller_id, node=self.name, namespace_bytes=namespace_bytes))
            if not claimed:
                owner = await self.store.get_controller(controller_id)
                where = owner[0].node if owner else "another node"
                raise SessionError("exists", f"controller {controller_id!r} already exists on node {where!r}")
            path = self.data_dir / f"{controller_id}.ns"
            controller = await asyncio.to_thread(EmulatedController, controller_id, path, namespace_bytes,
                                                 create=True)
            await asyncio.to_thread(self._write_meta, controller)
            hosted = HostedController(controller)
            if prefill or spec is not None:
                hosted.workload = GuestWorkload(controller, spec or WorkloadSpec())
                if prefill:
                    await asyncio.to_thread(hosted.workload.prefill)
                if spec is not None:
                    hosted.workload.start()
            self.controllers[controller_id] = hosted
        await self.publish()
        return hosted

    async def start_workload(self, controller_id: str, spec: WorkloadSpec) -> HostedController:
        hosted = self.hosted(controller_id)
        try:
            spec.validate(hosted.controller.namespace_bytes)
        except ValueError as exc:
            raise SessionError("invalid", str(exc)) from None
        if hosted.workload is not None and hosted.workload.status().running:
            raise SessionError("precondition", f"controller {controller_id!r} already has a running workload")
        if hosted.workload is not None:
            hosted.workload = GuestWorkload.from_state(hosted.controller, hosted.workload.export_state(),
                                                       spec=spec)
        else:
            hosted.workload = GuestWorkload(hosted.controller, spec)
        hosted.workload.start()
        return hosted

    # ---- sessions ---------------------------------------------------------------------------

    def _session(self, job_id: str, epoch: int, kind: type[Session]) -> Session | None:
        session = self.sessions.get(job_id)
        if session is None:
            return None
        if not isinstance(session, kind):
            raise SessionError("precondition", f"job {job_id} is a {type(session).__name__} on node {self.name!r}")
        session.check_epoch(epoch)
        return session

    def session(self, job_id: str) -> Session:
        session = self.sessions.get(job_id)
        if session is None:
            raise SessionError("not_found", f"job {job_id} has no session on node {self.name!r}")
        return session

    async def source_session(self, job_id: str, epoch: int, controller_id: str, token: str) -> SourceSession:
        found = self._session(job_id, epoch, SourceSession)
        assert found is None or isinstance(found, SourceSession)
        # A new token means a new destination for the same job (the old one was lost): start over.
        if found is not None and not (found.stage == "aborted" and found.token != token):
            return found
        hosted = self.hosted(controller_id)
        if hosted.controller.vfio_state != VfioState.RUNNING:
            raise SessionError("precondition", f"controller {controller_id!r} is {hosted.controller.vfio_state.name} "
                                               f"on node {self.name!r}, not RUNNING: it cannot be migrated")
        if hosted.migrating_job and hosted.migrating_job != job_id:
            other = self.sessions.get(hosted.migrating_job)
            if other is not None and other.stage not in ("aborted", "released"):
                raise SessionError("precondition", f"controller {controller_id!r} is being moved by job "
                                                   f"{hosted.migrating_job}")
        session = SourceSession(job_id=job_id, epoch=epoch, controller_id=controller_id,
                                controller=hosted.controller, workload=hosted.workload,
                                corrupt_frame=self.pending_corrupt_frame, token=token)
        self.pending_corrupt_frame = 0
        hosted.migrating_job = job_id
        self.sessions[job_id] = session
        return session

    async def prepare_destination(self, job_id: str, epoch: int, controller_id: str, namespace_bytes: int,
                                  state_format_version: int) -> DestinationSession:
        found = self._session(job_id, epoch, DestinationSession)
        if found is not None:
            assert isinstance(found, DestinationSession)
            if found.stage == "aborted":
                raise SessionError("precondition", f"job {job_id} was aborted on node {self.name!r}")
            return found
        if state_format_version != STATE_FORMAT_VERSION:
            raise SessionError("precondition", f"controller-state format version {state_format_version} is not "
                                               f"supported on node {self.name!r} (supported: {STATE_FORMAT_VERSION})")
        if controller_id in self.controllers:
            raise SessionError("precondition", f"controller {controller_id!r} already runs on node {self.name!r}")
        async with self._lock:
            if self.allocated_bytes + namespace_bytes > self.capacity_bytes:
                raise SessionError("precondition",
                                   f"node {self.name!r} has {self.capacity_bytes - self.allocated_bytes} bytes free; "
                                   f"controller {controller_id!r} needs {namespace_bytes}")
            path = self.data_dir / f"{controller_id}.{job_id}.incoming"
            controller = await asyncio.to_thread(EmulatedController.for_resuming, controller_id, path,
                                                 namespace_bytes, create=True)
            session = DestinationSession(job_id=job_id, epoch=epoch, controller_id=controller_id,
                                         controller=controller, token=secrets.token_hex(16), stage="resuming")
            self.receiver.register(job_id, session.token, session)
            self.sessions[job_id] = session
        await self.publish()
        return session

    async def destination_running(self, session: DestinationSession) -> None:
        if session.stage != "running":
            # Claim RUNNING in etcd before running it: after this, ownership can no longer go
            # back to the source, and if it already went back, we must not run it.
            problem = await self.store.claim_running(session.controller_id, self.name)
            if problem:
                raise SessionError("precondition", problem)
        async def on_running(controller: EmulatedController, workload: GuestWorkload | None) -> None:
            await asyncio.to_thread(self._write_meta, controller)
            self.controllers[session.controller_id] = HostedController(controller, workload)
            self.receiver.unregister(session.job_id)
            await self.publish()
        await session.resume(on_running)

    async def source_released(self, session: SourceSession) -> str:
        async def on_released() -> None:
            self.controllers.pop(session.controller_id, None)
            # The destination runs it now: NBD clients must go there, so their connections end.
            self.nbd.unexport(session.controller_id)
            self._meta_path(session.controller_id).unlink(missing_ok=True)
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

    async def abort(self, job_id: str, epoch: int, reason: str, controller_id: str = "") -> Session | None:
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
        if isinstance(session, SourceSession) and session.stage == "stopped":
            # Past stop-and-copy the switchover may have committed: etcd decides who runs it.
            problem = await self._owned_here(session.controller_id)
            if problem:
                raise SessionError("precondition", problem)
        if isinstance(session, DestinationSession):
            self.receiver.unregister(job_id)
        await session.abort(reason)  # type: ignore[attr-defined]
        # A rolled-back source runs again: NBD requests stalled by the suspend go on now.
        self.nbd.controller_changed(session.controller_id)
        await self.publish()
        return session

"""One migration as one agent sees it: the source session (copy out) and the destination session
(copy in). Both are keyed by job id and remember the highest epoch seen, so a repeated command
attaches to the work in flight or returns its result, and a command from a stale orchestrator is
refused.

The source follows the vfio-nvme mapping: RUNNING -> PRE_COPY (user-data change tracking on),
rounds of changed blocks, guest paused and PRE_COPY -> STOP_COPY (Suspend, then Get Controller
State), and on rollback back to RUNNING (Resume). The destination is created in RESUMING, loads
the data and the state (Set Controller State, RESUMING -> STOP), then STOP -> RUNNING (Resume).

Sessions drive controllers through the backend contract (agent.backend) alone.  The guest's own
state travels beside the controller state; a destination whose backend has no built-in guest
refuses a guest that was running on the source, with a message the source reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from agent.backend import BLOCK_BYTES, GuestDrivenController, MigratableController
from agent.datadir import no_space, no_space_message, write_atomically
from agent.dataplane.receiver import decode_final_payload, encode_final_payload
from agent.dataplane.sender import CAUSE_NO_SPACE, DataPlaneError, DataSender, FrameFaults
from agent.guest.map_journal import MapJournal, journal_path, read_journal
from agent.guest.map_sync import MapAssembly, MapSyncError, base_pieces, delta_piece
from agent.guest.workload import GuestState, GuestWorkload
from agent.qos import MigrationPacer
from agent.session_states import DestinationStage, ErrorKind, SessionError, SourceStage, Stage, move_problem
from agent.vfio_states import VfioState
from cluster.agent_errors import StaleEpochDetail
from cluster.switchover_marks import mark
from proto.v1 import agent_pb2

log = logging.getLogger(__name__)

# A destination that stops reading (hung, partitioned) fails the transfer after this long, so
# the orchestrator can pick another destination instead of waiting on TCP.
DATA_STALL_TIMEOUT_S = 10.0
# How long the destination may take to acknowledge a round or the final state once everything is
# sent. During stop-and-copy the guest is paused for this long at worst, so it stays short.
ACK_TIMEOUT_S = 10.0
SMALL_WRITE_BYTES = 64 * 1024
# Stop-and-copy first sends what changed since the last round while the guest still runs, again
# until no more than this many blocks changed meanwhile (at most PRE_PAUSE_PASSES times): the
# last round's blocks then go without a round trip to the orchestrator and the destination, and
# the paused guest waits only for what it wrote during the last of these passes.
PRE_PAUSE_SETTLED_BLOCKS = 64
PRE_PAUSE_PASSES = 3
# A pass goes only if what changed takes at most this long at the bandwidth limit (and is at most
# PRE_PAUSE_MAX_BLOCKS without one): the switchover was planned with the etcd revisions of now,
# and a slow pass would leave the blocks to the pause anyway.
PRE_PAUSE_MAX_S = 0.02
PRE_PAUSE_MAX_BLOCKS = 4096


@dataclass
class TransferFacts:
    bytes_sent: int = 0
    blocks_sent: int = 0
    duration_s: float = 0.0
    dirty_bytes_remaining: int = 0
    dirty_rate_bytes_per_s: float = 0.0
    state_bytes: int = 0
    round: int = 0
    total_bytes_sent: int = 0  # the session's whole count after this step (data and state)
    # Stop-and-copy with a plan: how the switchover ended (agent_pb2.Switchover), the commit's
    # etcd revision, and what went wrong around it.
    switchover: int = agent_pb2.SWITCHOVER_UNREPORTED
    commit_revision: int = 0
    switchover_note: str = ""
    commit_ms: float = 0.0
    # Stop-and-copy: the changed blocks sent just before the guest paused (part of bytes_sent).
    pre_pause_ms: float = 0.0
    pre_pause_bytes: int = 0


def encode_guest(workload: GuestWorkload | None, map_sync: int = 0) -> bytes:
    """The guest's state for the destination, led by one byte saying whether it was running:
    a guest that only prefilled (no workload asked for) must not start writing over there.
    `map_sync`: the map sync whose pieces the destination holds; only the map's last changes go."""
    if workload is None:
        return b""
    running = bytes([1 if workload.status().running else 0])
    synced = workload.export_synced_state(map_sync) if map_sync else None
    return running + (synced if synced is not None else workload.export_state())


def decode_guest(controller: GuestDrivenController, blob: bytes, synced: MapAssembly | None = None
                 ) -> tuple[GuestWorkload, bool]:
    """The guest to continue here and whether it was running. With `synced`, the map is that
    assembly's, completed in place and now the guest's own: not to be used after."""
    state = GuestState.decode(blob[1:], synced)
    return GuestWorkload(controller, state.spec, state, adopt_map=synced is not None), blob[0] == 1


def guest_was_running(blob: bytes) -> bool:
    return bool(blob) and blob[0] == 1


def lbas_to_extents(lbas: list[int]) -> list[tuple[int, int]]:
    """Sorted block numbers to (offset, length) runs, so neighbours travel in one frame."""
    extents: list[tuple[int, int]] = []
    start = prev = -2
    for lba in lbas:
        if lba == prev + 1:
            prev = lba
            continue
        if start >= 0:
            extents.append((start * BLOCK_BYTES, (prev - start + 1) * BLOCK_BYTES))
        start = prev = lba
    if start >= 0:
        extents.append((start * BLOCK_BYTES, (prev - start + 1) * BLOCK_BYTES))
    return extents


_SWITCHOVER_OUTCOMES = {"COMMITTED": agent_pb2.SWITCHOVER_COMMITTED, "UNKNOWN": agent_pb2.SWITCHOVER_UNKNOWN}


def _switchover_outcome(ack: dict[str, Any]) -> tuple[int, int, str, float]:
    """(agent_pb2.Switchover, commit revision, note, commit ms) from the ACK of a FINAL sent with a plan. An
    ACK that does not say (an older destination that only loaded) committed nothing: reported as
    such, and the orchestrator settles it in etcd like an unknown outcome."""
    outcome = _SWITCHOVER_OUTCOMES.get(str(ack.get("switchover", "")), agent_pb2.SWITCHOVER_UNREPORTED)
    note = str(ack.get("note", ""))
    if outcome == agent_pb2.SWITCHOVER_UNREPORTED:
        note = "the destination's agent does not commit switchovers (an older version?); upgrade it"
    revision, commit_ms = ack.get("revision", 0), ack.get("commit_ms", 0.0)
    return (outcome, revision if isinstance(revision, int) else 0, note,
            float(commit_ms) if isinstance(commit_ms, int | float) else 0.0)


@dataclass
class Session:
    job_id: str
    epoch: int
    controller_id: str
    error: str = ""
    digest: str = ""
    digest_error: str = ""  # why the switchover digest could not be computed

    role: ClassVar[str] = ""

    @property
    def current(self) -> Stage:
        raise NotImplementedError

    def check_epoch(self, epoch: int) -> None:
        if epoch < self.epoch:
            raise SessionError(ErrorKind.STALE_EPOCH, f"stale epoch {epoch} for job {self.job_id}: epoch {self.epoch} "
                                                      "already drives it",
                               stale=StaleEpochDetail(self.job_id, epoch, self.epoch))
        self.epoch = epoch

    def _require(self, target: Stage) -> None:
        problem = move_problem(self.job_id, self.role, self.current, target)
        if problem:
            raise SessionError(ErrorKind.PRECONDITION, problem)

    def _digest_done(self, task: asyncio.Task[str]) -> None:
        """The switchover digest, visible to GetSession as soon as it is computed."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.digest_error = f"{type(exc).__name__}: {exc}"
        else:
            self.digest = task.result()


@dataclass
class SourceSession(Session):
    stage: SourceStage = SourceStage.NEW
    round_no: int = 0  # the dirty round running or last run
    controller: MigratableController | None = None
    token: str = ""  # names the destination attempt this session streams to
    workload: GuestWorkload | None = None
    frame_faults: FrameFaults = field(default_factory=FrameFaults)  # tests only (InjectFault)
    data_ssl: ssl.SSLContext | None = None  # TLS to the destination's data plane
    pacer: MigrationPacer | None = None  # the node's: reads before stop-and-copy yield to guest I/O
    sender: DataSender | None = None
    precopy_task: asyncio.Task[TransferFacts] | None = None
    round_tasks: dict[int, asyncio.Task[TransferFacts]] = field(default_factory=dict)
    stop_copy_task: asyncio.Task[TransferFacts] | None = None
    digest_task: asyncio.Task[str] | None = None
    closing: asyncio.Task[None] | None = None  # the data connection closing after stop-and-copy
    bytes_sent_before: int = 0  # sent by senders that are gone (a rollback and a new attempt)
    state_bytes_sent: int = 0  # controller and guest state (and the guest's map pieces), once sent
    map_sync: int = 0  # the guest's map sync whose pieces went to this attempt's destination (0: none)
    map_blocks: int = 0  # the size of that map
    bandwidth: int = 0  # the last round's bandwidth limit, bytes/s (0: none)

    role: ClassVar[str] = "source"

    @property
    def current(self) -> Stage:
        return self.stage

    @property
    def label(self) -> str:
        """The stage as GetSession shows it ('round 3' for a dirty round)."""
        return f"round {self.round_no}" if self.stage is SourceStage.ROUND else self.stage.value

    def _move(self, target: SourceStage) -> None:
        self._require(target)
        self.stage = target

    def _refuse_if_ended(self) -> None:
        if self.stage in (SourceStage.ABORTED, SourceStage.RELEASED):
            raise SessionError(ErrorKind.PRECONDITION, f"job {self.job_id} is {self.stage.value} on the source")

    @property
    def ctrl(self) -> MigratableController:
        assert self.controller is not None
        return self.controller

    @property
    def bytes_sent(self) -> int:
        return self.bytes_sent_before + self.state_bytes_sent + (self.sender.bytes_sent if self.sender else 0)

    async def _attach(self, task: asyncio.Task[TransferFacts]) -> TransferFacts:
        # shield: a caller that gives up (deadline) must not cancel the transfer itself
        try:
            return await asyncio.shield(task)
        except DataPlaneError as exc:
            if exc.cause == CAUSE_NO_SPACE:
                raise SessionError(ErrorKind.NO_SPACE, f"the destination has no space left for job {self.job_id}: "
                                                       f"{exc}") from exc
            raise SessionError(ErrorKind.DATA_LOSS, f"data plane failed: {exc}") from exc
        except asyncio.CancelledError:
            if task.cancelled():
                raise SessionError(ErrorKind.ABORTED, f"job {self.job_id} was aborted on the source") from None
            raise

    async def start_precopy(self, address: str, token: str, bandwidth: int,
                            destination_node: str = "") -> TransferFacts:
        self._refuse_if_ended()
        if self.precopy_task is None:
            self._require(SourceStage.PRECOPY)
            self.precopy_task = asyncio.create_task(self._precopy(address, token, bandwidth, destination_node),
                                                    name=f"precopy-{self.job_id}")
        return await self._attach(self.precopy_task)

    async def _precopy(self, address: str, token: str, bandwidth: int, destination_node: str) -> TransferFacts:
        self._move(SourceStage.PRECOPY)
        self.bandwidth = bandwidth
        started = time.monotonic()
        if self.data_ssl is not None and not destination_node:
            raise SessionError(ErrorKind.PRECONDITION, f"job {self.job_id}: the data plane is TLS here, and "
                                                       "StartPrecopy named no destination node to check")
        self.sender = await DataSender.connect(address, self.job_id, token,
                                               bandwidth_bytes_per_s=bandwidth or None,
                                               stall_timeout_s=DATA_STALL_TIMEOUT_S,
                                               ssl=self.data_ssl, server_hostname=destination_node or None)
        self.sender.faults = self.frame_faults
        self._end_map_sync()  # an attempt before this one synced to another destination
        # Tracking starts before the first read, so every later guest write is sent again.
        await asyncio.to_thread(self.ctrl.set_state, VfioState.PRE_COPY)
        extents = await asyncio.to_thread(self.ctrl.data_extents)
        # Read, checksummed and sent by the sender's thread, each batch after the node's pacer.
        sent = await self.sender.send_ranges(self.ctrl.read_raw_into, extents, admit=self._admit(yielding=True))
        map_bytes = await self._sync_guest_map()
        await self.sender.end_round(0, timeout_s=ACK_TIMEOUT_S)
        return await self._facts(0, sent, started, map_bytes)

    async def _sync_guest_map(self) -> int:
        """After a round's blocks: the running guest's map of acknowledged blocks, whole after
        precopy, then what changed since; at the switchover only the last changes go (with the
        state), not the whole map. Returns the bytes sent."""
        assert self.sender is not None
        workload = self.workload
        if workload is None or not self.sender.takes_guest_map:
            return 0
        if not self.map_sync:
            if not workload.status().running:
                return 0  # a guest that does not write: its map does not change, it goes at the end

            def base() -> tuple[int, int, list[bytes]]:
                sync_id, acked = workload.begin_map_sync()
                return sync_id, len(acked), list(base_pieces(sync_id, acked))

            self.map_sync, self.map_blocks, pieces = await asyncio.to_thread(base)
        else:
            sync_id, blocks = self.map_sync, self.map_blocks

            def changes() -> list[bytes] | None:
                changed = workload.map_changes(sync_id)
                return None if changed is None else [delta_piece(sync_id, blocks, *changed)]

            delta = await asyncio.to_thread(changes)
            if delta is None:
                self.map_sync = 0  # the guest was replaced: its state goes whole at the switchover
                return 0
            pieces = delta
        sent = 0
        for piece in pieces:
            await self.sender.send_guest_map(piece)
            sent += len(piece)
        self.state_bytes_sent += sent
        return sent

    def _admit(self, *, yielding: bool) -> Callable[[int], Awaitable[None]] | None:
        """What a batch of migration reads waits for: the node's pacer (not in stop-and-copy)."""
        return self.pacer.acquire if yielding and self.pacer is not None else None

    async def _send_changed(self, lbas: list[int], *, yielding: bool = True) -> int:
        """Sends changed blocks. They are scattered: the sender's thread reads and sends up to a
        few MiB of them (hundreds of frames) per batch, so no block costs a thread hop of its own.
        `yielding`: each batch waits for the node's migration pacer first."""
        assert self.sender is not None
        return await self.sender.send_ranges(self.ctrl.read_raw_into, lbas_to_extents(lbas),
                                             admit=self._admit(yielding=yielding))

    async def _facts(self, round_no: int, sent: int, started: float, map_bytes: int = 0) -> TransferFacts:
        """`sent`: the round's block bytes; `map_bytes`: the guest map's pieces sent after them."""
        duration = max(time.monotonic() - started, 1e-6)
        dirty = await asyncio.to_thread(self.ctrl.dirty_block_count) * BLOCK_BYTES
        return TransferFacts(bytes_sent=sent + map_bytes, blocks_sent=sent // BLOCK_BYTES, duration_s=duration,
                             dirty_bytes_remaining=dirty, dirty_rate_bytes_per_s=dirty / duration, round=round_no,
                             total_bytes_sent=self.bytes_sent)

    async def dirty_round(self, round_no: int, bandwidth: int, throttle_percent: int) -> TransferFacts:
        if self.precopy_task is None or not self.precopy_task.done():
            raise SessionError(ErrorKind.PRECONDITION, f"job {self.job_id}: dirty round {round_no} before precopy "
                                                       "ended")
        self._refuse_if_ended()
        task = self.round_tasks.get(round_no)
        if task is None:
            self._require(SourceStage.ROUND)
            task = asyncio.create_task(self._round(round_no, bandwidth, throttle_percent),
                                       name=f"round-{self.job_id}-{round_no}")
            self.round_tasks[round_no] = task
        return await self._attach(task)

    async def _round(self, round_no: int, bandwidth: int, throttle_percent: int) -> TransferFacts:
        assert self.sender is not None
        self._move(SourceStage.ROUND)
        self.round_no = round_no
        if self.workload is not None:
            self.workload.set_throttle(throttle_percent)
        self.sender.set_bandwidth(bandwidth or None)
        self.bandwidth = bandwidth
        started = time.monotonic()
        lbas = await asyncio.to_thread(self.ctrl.take_dirty_lbas)
        sent = await self._send_changed(lbas)
        map_bytes = await self._sync_guest_map()
        await self.sender.end_round(round_no, timeout_s=ACK_TIMEOUT_S)
        return await self._facts(round_no, sent, started, map_bytes)

    async def stop_and_copy(self, plan: bytes = b"") -> TransferFacts:
        """`plan`: a serialized agent_pb2.SwitchoverPlan, for the destination to commit the
        switchover itself; without one it only loads (and waits for ResumeDestination). A repeated
        call returns the first one's outcome, whatever plan it carries."""
        done = self.stop_copy_task
        if done is not None and done.done() and not done.cancelled() and done.exception() is None:
            return done.result()  # its outcome, even when that ended the session (the guest resumed here)
        self._refuse_if_ended()
        if self.precopy_task is None or not self.precopy_task.done():
            raise SessionError(ErrorKind.PRECONDITION, f"job {self.job_id}: stop-and-copy before precopy ended")
        if self.stop_copy_task is None:
            self._require(SourceStage.STOP_AND_COPY)
            self.stop_copy_task = asyncio.create_task(self._stop_and_copy(plan), name=f"stopcopy-{self.job_id}")
        return await self._attach(self.stop_copy_task)

    async def _stop_and_copy(self, plan: bytes) -> TransferFacts:
        assert self.sender is not None
        # A round still sending finishes first. If this task is cancelled meanwhile (an abort),
        # the CancelledError goes up from here: the guest is never paused for a stop-and-copy
        # that will not happen. A round that was cancelled means the same.
        running = [task for task in self.round_tasks.values() if not task.done()]
        if running:
            await asyncio.wait(running)
        if any(task.cancelled() for task in self.round_tasks.values()):
            raise SessionError(ErrorKind.ABORTED, f"job {self.job_id} was aborted on the source during a round")
        self._move(SourceStage.STOP_AND_COPY)
        if plan:
            await self.sender.send_plan(plan)  # before the pause: it waits at the destination for FINAL
        started = time.monotonic()
        steps: list[tuple[str, float]] = []

        def step(name: str, marked: str) -> None:
            steps.append((name, time.monotonic()))
            mark(self.job_id, marked)

        mark(self.job_id, "src.stop_and_copy_started")
        workload = self.workload
        pre_pause_bytes = 0
        most = PRE_PAUSE_MAX_BLOCKS if not self.bandwidth else int(self.bandwidth * PRE_PAUSE_MAX_S) // BLOCK_BYTES
        for _ in range(PRE_PAUSE_PASSES):
            changed = await asyncio.to_thread(self._dirty_if_at_most, most)
            if changed is None:
                break
            pre_pause_bytes += await self._send_changed(changed, yielding=False)
            if len(changed) <= PRE_PAUSE_SETTLED_BLOCKS:
                break
        pre_pause_ms = (time.monotonic() - started) * 1000.0
        step(f"{pre_pause_bytes // BLOCK_BYTES} blocks before the pause", "src.pre_pause_sent")

        def suspend() -> list[int]:
            # One thread hop for the three: each hop costs the paused guest a scheduling delay.
            if workload is not None:
                workload.pause()  # the guest's I/O stalls from here
            step("pause guest", "src.guest_paused")
            self.ctrl.set_state(VfioState.STOP_COPY)  # Suspend
            return self.ctrl.take_dirty_lbas()

        map_sync = self.map_sync

        def states() -> tuple[bytes, bytes]:
            return self.ctrl.save_state(), encode_guest(workload, map_sync)  # Get Controller State; the guest's

        lbas = await asyncio.to_thread(suspend)
        step("suspend", "src.suspended")
        # Both are frozen now: they are encoded while the last blocks go out, not after.
        saving = asyncio.ensure_future(asyncio.to_thread(states))
        sent, final_sent = 0, False
        try:
            try:
                self.sender.set_bandwidth(None)  # the guest is stopped: downtime beats the bandwidth cap
                sent = await self._send_changed(lbas, yielding=False)  # the guest waits: no yielding now
                step(f"last {len(lbas)} blocks", "src.final_delta_sent")
                state, guest = await saving
            finally:
                if not saving.done():
                    saving.cancel()
                    with contextlib.suppress(BaseException):
                        await saving
            step("states", "src.state_saved")
            final_sent = True
            ack = await self.sender.send_final(state, guest, timeout_s=ACK_TIMEOUT_S)
        except DataPlaneError as exc:
            if not plan:
                raise
            if exc.refused or not final_sent:
                # The destination refused (it does so only before it sent its commit, or when
                # etcd refused the commit), or never got the state: nothing can switch over, the
                # guest goes on here now.
                await self._resume_here(f"the destination did not take the switchover: {exc.reason}")
                return TransferFacts(bytes_sent=pre_pause_bytes + sent, blocks_sent=len(lbas),
                                     duration_s=time.monotonic() - started,
                                     total_bytes_sent=self.bytes_sent, switchover=agent_pb2.SWITCHOVER_NOT_COMMITTED,
                                     switchover_note=self.error)
            # FINAL went out, no answer came back: the destination may have committed. Frozen
            # here until etcd (fenced by the orchestrator) says who owns the controller.
            ack = {"switchover": "UNKNOWN", "note": f"the destination did not answer after the last state went "
                                                    f"across: {exc.reason}"}
        self.state_bytes_sent += len(state) + len(guest)
        switchover, revision, note, commit_ms = _switchover_outcome(ack) if plan \
            else (agent_pb2.SWITCHOVER_UNREPORTED, 0, "", 0.0)
        step("destination loaded" if not plan else "destination switched over", "src.destination_loaded")
        # Everything is across and acknowledged: the connection closes after the reply, not before.
        sender, self.sender = self.sender, None
        self.bytes_sent_before += sender.bytes_sent
        self.closing = asyncio.create_task(sender.close(), name=f"close-{self.job_id}")
        step("close", "src.closed")
        self._move(SourceStage.STOPPED)
        marks = [started, *(t for _, t in steps)]
        log.info("job %s stop-and-copy %.1f ms: %s", self.job_id, (marks[-1] - started) * 1000,
                 ", ".join(f"{name} {(marks[i + 1] - marks[i]) * 1000:.1f} ms" for i, (name, _) in enumerate(steps)))
        if note:
            log.warning("job %s: %s", self.job_id, note)
        # The source is frozen from here until release: its digest is the switchover digest.
        self.digest_task = asyncio.create_task(asyncio.to_thread(self.ctrl.digest),
                                               name=f"digest-{self.job_id}")
        self.digest_task.add_done_callback(self._digest_done)
        return TransferFacts(bytes_sent=pre_pause_bytes + sent, blocks_sent=(pre_pause_bytes + sent) // BLOCK_BYTES,
                             duration_s=time.monotonic() - started, state_bytes=len(state) + len(guest),
                             total_bytes_sent=self.bytes_sent, switchover=switchover, commit_revision=revision,
                             switchover_note=note, commit_ms=commit_ms, pre_pause_ms=pre_pause_ms,
                             pre_pause_bytes=pre_pause_bytes)

    def _dirty_if_at_most(self, most: int) -> list[int] | None:
        """The blocks changed since they were last taken, if there are at most `most` (else they
        stay marked and None comes back)."""
        if self.ctrl.dirty_block_count() > most:
            return None
        return self.ctrl.take_dirty_lbas()

    async def _resume_here(self, reason: str) -> None:
        """Back to RUNNING at once, from within stop-and-copy: the switchover cannot happen."""
        await self._drop_sender()
        await self._run_here_again(reason)
        mark(self.job_id, "src.resumed_here")

    def _end_map_sync(self) -> None:
        if self.map_sync and self.workload is not None:
            self.workload.end_map_sync(self.map_sync)
        self.map_sync = 0

    async def _run_here_again(self, reason: str) -> None:
        if self.controller is not None and self.ctrl.vfio_state != VfioState.RUNNING:
            await asyncio.to_thread(self.ctrl.set_state, VfioState.RUNNING)  # Resume / tracking off
        self._end_map_sync()
        if self.workload is not None:
            self.workload.set_throttle(0)
            self.workload.unpause()
        self._move(SourceStage.ABORTED)
        self.error = reason

    async def _cancel_tasks(self, *extra: asyncio.Task[Any] | None) -> None:
        tasks = [t for t in (self.precopy_task, self.stop_copy_task, *self.round_tasks.values(), *extra) if t]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def _drop_sender(self, abort_reason: str = "") -> None:
        if self.closing is not None:
            await asyncio.wait({self.closing})  # its own errors do not matter: everything was acknowledged
        if self.sender is None:
            return
        if abort_reason:
            with contextlib.suppress(Exception):
                await self.sender.abort(abort_reason)
        with contextlib.suppress(Exception):
            await self.sender.close()
        self.bytes_sent_before += self.sender.bytes_sent
        self.sender = None

    async def abort(self, reason: str) -> None:
        """Back to RUNNING with the guest going; idempotent. Refused once released (after COMMIT)."""
        if self.stage is SourceStage.RELEASED:
            raise SessionError(ErrorKind.PRECONDITION, f"job {self.job_id} already released the source after COMMIT")
        if self.stage is SourceStage.ABORTED:
            return
        await self._cancel_tasks()
        await self._drop_sender(abort_reason=reason)
        await self._run_here_again(reason)

    async def release(self, on_released: Callable[[], Awaitable[None]]) -> str:
        """After COMMIT: the destination owns the controller; sanitize ours. Returns the digest."""
        if self.stage is SourceStage.RELEASED:
            return self.digest
        if self.stage is not SourceStage.STOPPED:
            raise SessionError(ErrorKind.PRECONDITION, f"job {self.job_id}: release before stop-and-copy finished "
                                                       f"(stage {self.label})")
        if self.digest_task is not None:
            # Sanitizing under a hashing thread would pull the file from under it; its outcome is
            # recorded by _digest_done either way.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.digest_task)
        await self._drop_sender()
        if self.workload is not None:
            await asyncio.to_thread(self.workload.stop)
        await asyncio.to_thread(self.ctrl.release)
        self._move(SourceStage.RELEASED)
        await on_released()
        return self.digest

    async def close(self) -> None:
        await self._cancel_tasks(self.digest_task)
        await self._drop_sender()


@dataclass
class DestinationSession(Session):
    stage: DestinationStage = DestinationStage.RESUMING
    received_round: int = 0  # the last round acknowledged
    controller: MigratableController | None = None
    token: str = ""
    state_path: Path | None = None  # where the loaded controller and guest state is kept until it runs
    guest: GuestDrivenController | None = None  # the controller's guest-driver role, if its backend has one
    backend: str = ""  # the backend kind, for messages
    workload: GuestWorkload | None = None
    snapshot: Any = None
    digest_task: asyncio.Task[str] | None = None
    bytes_received: int = 0
    guest_blob: bytes = b""
    guest_was_running: bool = False  # with `workload` decoded from guest_blob: start it on resume
    guest_map: MapAssembly | None = None  # the guest's map as its pieces came, for FINAL
    guest_map_journal: MapJournal | None = None  # the same pieces on disk, beside the state file
    node: str = ""  # the node it runs on, for messages
    # What the guest asks before each write once it runs here (its controller's I/O limits).
    guest_admission: Callable[[int], float] | None = None
    # One resume at a time: a retried ResumeDestination waits for the one in flight.
    resume_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    plan: agent_pb2.SwitchoverPlan | None = None  # the switchover to commit once the state is loaded
    # Loads the state (the awaitable given), commits the plan and runs the controller
    # (Host.switch_over); returns what FINAL's ACK says.
    switch_over: Callable[[DestinationSession, agent_pb2.SwitchoverPlan, Awaitable[None]],
                          Awaitable[dict[str, Any]]] | None = field(default=None, repr=False)
    # The plan's commit went to etcd and was not refused: it may have landed (or did), so the copy
    # here is discarded only once etcd says another node owns the controller.
    commit_sent: bool = False

    role: ClassVar[str] = "destination"

    @property
    def current(self) -> Stage:
        return self.stage

    @property
    def label(self) -> str:
        """The stage as GetSession shows it ('received round 2' while data arrives)."""
        if self.stage is DestinationStage.RECEIVING:
            return f"received round {self.received_round}"
        return self.stage.value

    def _move(self, target: DestinationStage) -> None:
        self._require(target)
        self.stage = target

    @property
    def ctrl(self) -> MigratableController:
        assert self.controller is not None
        return self.controller

    def _no_space(self, exc: BaseException, path: Path | None) -> SessionError | None:
        """A refusal naming this node and the file, when ``exc`` is a full disk."""
        full = no_space(exc)
        if full is None:
            return None
        where = Path(full.filename) if full.filename else path
        if where is None:
            where = self.state_path.parent if self.state_path is not None else Path(".")
        return SessionError(ErrorKind.NO_SPACE, no_space_message(self.node, where, full))

    # DestinationSink: the data plane calls these as frames arrive.
    async def apply_extent(self, offset: int, data: bytes) -> None:
        try:
            if len(data) <= SMALL_WRITE_BYTES:
                # A small pwrite into the page cache takes microseconds, a thread hop far longer;
                # during stop-and-copy thousands of 4 KiB blocks arrive and the guest is waiting.
                self.ctrl.write_raw(offset, data)
            else:
                await asyncio.to_thread(self.ctrl.write_raw, offset, data)
        except OSError as exc:
            refusal = self._no_space(exc, None)
            if refusal is None:
                raise
            raise refusal from exc
        self.bytes_received += len(data)

    async def apply_round_end(self, round: int) -> None:
        self._move(DestinationStage.RECEIVING)
        self.received_round = round

    async def apply_guest_map(self, piece: bytes) -> None:
        if self.guest_map is None:
            self.guest_map = MapAssembly()
            if self.state_path is not None:
                self.guest_map_journal = MapJournal(journal_path(self.state_path))
        assembly, journal = self.guest_map, self.guest_map_journal

        def apply() -> None:
            assembly.apply(piece)
            if journal is not None:
                journal.append(piece)  # before the round's ACK: FINAL finds every piece on disk

        try:
            if len(piece) <= SMALL_WRITE_BYTES:
                apply()
            else:
                await asyncio.to_thread(apply)  # up to 4 MiB, or a long delta
        except OSError as exc:
            refusal = self._no_space(exc, journal.path if journal is not None else None)
            if refusal is None:
                raise
            raise refusal from exc

    def _remove_state_files(self) -> None:
        if self.guest_map_journal is not None:
            self.guest_map_journal.remove()
        if self.state_path is not None:
            self.state_path.unlink(missing_ok=True)
            journal_path(self.state_path).unlink(missing_ok=True)

    async def apply_plan(self, payload: bytes) -> None:
        if self.switch_over is None:
            raise SessionError(ErrorKind.PRECONDITION, f"job {self.job_id}: node {self.node!r} cannot commit a "
                                                       "switchover for this destination")
        plan = agent_pb2.SwitchoverPlan.FromString(payload)
        if plan.job_revision <= 0 or plan.controller_revision <= 0 or plan.leader_term <= 0 \
                or not plan.job_record or not plan.controller_record or plan.commit_timeout_s <= 0:
            raise SessionError(ErrorKind.INVALID, f"job {self.job_id}: the switchover plan lacks a revision, term, "
                                                  "record or timeout")
        self.plan = plan

    async def apply_final(self, state_blob: bytes, guest_blob: bytes) -> dict[str, Any]:
        if self.plan is None or self.switch_over is None:
            await self._load(state_blob, guest_blob, snapshot=True)
            return {}  # loaded: it runs when ResumeDestination comes
        # The snapshot is taken alongside the commit (take_snapshot), not before it.
        return await self.switch_over(self, self.plan, self._load(state_blob, guest_blob, snapshot=False))

    async def take_snapshot(self) -> None:
        """The namespace as loaded is the switchover image: a copy-on-write view of it, for its
        digest. It must be taken before the controller runs; nothing writes the namespace before."""
        if self.snapshot is None:
            self.snapshot = await asyncio.to_thread(self.ctrl.begin_snapshot)

    async def _load(self, state_blob: bytes, guest_blob: bytes, *, snapshot: bool) -> None:
        self._require(DestinationStage.LOADED)
        if self.guest is None and guest_was_running(guest_blob):
            raise SessionError(ErrorKind.PRECONDITION,
                               f"controller {self.controller_id} has a guest workload running on "
                               f"the source, and this destination's backend {self.backend} has no "
                               "built-in guest to continue it; stop the workload or migrate to a "
                               "node with the emulated backend")
        mark(self.job_id, "dst.final_received")
        state_path, guest, guest_map, journal = self.state_path, self.guest, self.guest_map, self.guest_map_journal
        job_id = self.job_id

        def load() -> tuple[Any, GuestWorkload | None, bool]:
            # One thread hop for the lot: each hop costs the paused guest a scheduling delay.
            self.ctrl.load_state(state_blob)  # Set Controller State: verifies it
            self.ctrl.set_state(VfioState.STOP)
            mark(job_id, "dst.state_loaded")
            # The guest is decoded now, so that the resume only starts it (and a blob it cannot
            # take is refused before COMMIT, not after).
            workload, was_running = None, False
            if guest_blob and guest is not None:
                # With a map sync, only the map's last changes came (the rest is in the journal).
                workload, was_running = decode_guest(guest, guest_blob, guest_map)
            if journal is not None:
                journal.close()
            # Kept on disk before we acknowledge, so an agent restarted after COMMIT can still
            # resume. Not fsynced: the namespace beside it arrived through the page cache, unsynced,
            # so the pair survives the agent's process, not the machine, with or without it.
            if state_path is not None:
                write_atomically(state_path, encode_final_payload(state_blob, guest_blob), durable=False)
            mark(job_id, "dst.state_file_written")
            # The namespace as loaded is the switchover image: keep a copy-on-write view for its digest.
            return (self.ctrl.begin_snapshot() if snapshot else None), workload, was_running

        try:
            self.snapshot, self.workload, self.guest_was_running = await asyncio.to_thread(load)
        except OSError as exc:
            refusal = self._no_space(exc, self.state_path)
            if refusal is None:
                raise
            raise refusal from exc
        self.guest_blob = guest_blob
        self._move(DestinationStage.LOADED)
        mark(self.job_id, "dst.loaded")

    @classmethod
    async def reload(cls, controller: MigratableController, state_path: Path, controller_id: str, job_id: str, *,
                     guest: GuestDrivenController | None, backend: str) -> DestinationSession:
        """A destination whose data and state had fully arrived before the agent restarted;
        ``controller`` is it, opened again in RESUMING."""
        def load() -> tuple[bytes, MapAssembly | None]:
            state_blob, guest_blob = decode_final_payload(state_path.read_bytes())
            controller.load_state(state_blob)
            controller.set_state(VfioState.STOP)
            journal = journal_path(state_path)
            if not journal.exists():
                return guest_blob, None
            try:
                return guest_blob, read_journal(journal)
            except MapSyncError as exc:
                # The controller can still resume; its guest cannot (the resume says why).
                log.warning("job %s: %s", job_id, exc)
                return guest_blob, None

        guest_blob, guest_map = await asyncio.to_thread(load)
        session = cls(job_id=job_id, epoch=0, controller_id=controller_id, controller=controller,
                      stage=DestinationStage.LOADED, state_path=state_path, guest=guest, backend=backend,
                      guest_blob=guest_blob, guest_map=guest_map)
        session.snapshot = await asyncio.to_thread(controller.begin_snapshot)
        return session

    def check_resumable(self) -> None:
        if self.stage is not DestinationStage.LOADED:
            raise SessionError(ErrorKind.PRECONDITION, f"job {self.job_id}: cannot resume the destination in stage "
                                                       f"{self.label!r}; the controller state has not been loaded")

    async def resume(self, on_running: Callable[[MigratableController, GuestWorkload | None], Awaitable[None]]
                     ) -> None:
        """Runs the controller. The caller has recorded it with the hosting and claimed it in
        etcd first (Host.destination_running): a controller runs only once it is durably listed."""
        if self.stage is DestinationStage.RUNNING:
            return
        self.check_resumable()
        await asyncio.to_thread(self.ctrl.set_state, VfioState.RUNNING)  # Resume
        if self.workload is None and self.guest_blob and self.guest is not None:  # reloaded after a restart
            self.workload, self.guest_was_running = decode_guest(self.guest, self.guest_blob, self.guest_map)
        if self.workload is not None:
            job_id = self.job_id

            def marked(last: float, first: float) -> None:
                mark(job_id, "guest.last_write_source", last)
                mark(job_id, "guest.first_write_destination", first)
            self.workload.on_blackout = marked
            self.workload.set_admission(self.guest_admission)
            if self.guest_was_running:
                self.workload.start()
        self._move(DestinationStage.RUNNING)
        mark(self.job_id, "dst.running")
        snapshot = self.snapshot

        def digest_and_close() -> str:
            try:
                return str(snapshot.digest())
            finally:
                snapshot.close()

        if snapshot is None:
            self.digest_error = "no snapshot of the switchover image was taken here (see the agent's log)"
        else:
            self.digest_task = asyncio.create_task(asyncio.to_thread(digest_and_close),
                                                   name=f"digest-{self.job_id}")
            self.digest_task.add_done_callback(self._digest_done)
        await on_running(self.ctrl, self.workload)
        self._remove_state_files()  # the hosting's record of the controller now stands for them

    def guest_blackout_ms(self) -> float:
        if self.workload is None:
            return 0.0
        return float(self.workload.status().blackout_ms)

    async def abort(self, reason: str) -> None:
        if self.stage is DestinationStage.RUNNING:
            raise SessionError(ErrorKind.PRECONDITION, f"job {self.job_id}: the destination already runs the "
                                                       "controller (after COMMIT); it cannot be discarded")
        if self.stage is DestinationStage.ABORTED:
            return
        if self.snapshot is not None:
            with contextlib.suppress(Exception):
                self.snapshot.close()
        if self.controller is not None:
            self._remove_state_files()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.ctrl.release)
        self._move(DestinationStage.ABORTED)
        self.error = reason

    async def close(self) -> None:
        if self.guest_map_journal is not None:
            self.guest_map_journal.close()
        if self.digest_task is not None:
            self.digest_task.cancel()
            with contextlib.suppress(BaseException):
                await self.digest_task


__all__ = ["DestinationSession", "SessionError", "SourceSession", "TransferFacts"]

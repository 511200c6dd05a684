"""The guest: a thread that writes self-describing blocks to a controller, standing in for the VM.

Every write carries a fresh sequence number (``seq``, from 1; prefilled blocks are seq 0) in each
of its 4 KiB blocks.  Once ``write_blocks`` returns, the write is acknowledged: its seq is
recorded per LBA, which is what the verifier later checks against the namespace (invariant 2:
no acknowledged write is lost).  Completion times give the blackout the guest saw, measured
here rather than in the orchestrator.

The LBA of write ``seq`` is a pure function of (spec, seq), so the destination continues the
same sequence of writes after ``export_state`` / ``from_state`` without carrying RNG state.  That
also means a guest restored from an older image would replay byte-identical writes over the ones
it lost; so each start after ``from_state`` (and each new guest) draws a fresh random run id that
every block it writes carries, and the run lineage (``agent.guest.lineage``) travels with the
state.  The status reports a receipt (the highest acknowledged seq and its run) that whoever saw it
can later hand to the verifier.
"""

from __future__ import annotations

import logging
import secrets
import struct
import sys
import threading
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.backend import BLOCK_BYTES, GuestDrivenController
from agent.controller_errors import ControllerGoneError, NotRunningError
from agent.guest.blocks import LEGACY_RUN_ID, make_block
from agent.guest.lineage import Lineage, Receipt, Segment, draw_run_id
from agent.guest.map_sync import MapAssembly, MapSyncError, delta_body

log = logging.getLogger(__name__)

PATTERNS = ("random", "sequential", "hot")
CHUNK_BYTES = 1 << 20
STATE_VERSION = 2  # 2: the run lineage; 1 (no lineage: its blocks are of the legacy run) is still read
# 3: version 2 and a byte saying how the map is encoded: zlib, raw, or only the entries changed since
# the last piece of a map sync (agent.guest.map_sync) the destination holds. Written only to a
# destination that said it takes it, and to the destination's own state file.
MAP_STATE_VERSION = 3
MAP_ZLIB, MAP_RAW, MAP_SYNCED = 0, 1, 2
_RATE_WINDOW_S = 1.0
_STALL_RETRY_S = 0.005
# How far pacing may fall behind schedule before it gives up catching up (no long bursts).
_MAX_BEHIND_S = 0.1
_MASK64 = (1 << 64) - 1


def _mix64(seed: int, seq: int) -> int:
    """splitmix64 of (seed, seq): a stateless, well-spread choice of LBA per write."""
    z = (seed * 0x9E3779B97F4A7C15 + seq * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class WorkloadSpec:
    """What the guest does: rate (0 = as fast as it can), write size, where it writes."""

    write_iops: int = 0
    block_bytes: int = 4096
    pattern: str = "random"
    hot_fraction: float = 0.1
    seed: int = 0

    def validate(self, namespace_bytes: int) -> None:
        """Raise ValueError naming the first field that cannot work on this namespace."""
        if not isinstance(self.write_iops, int) or not 0 <= self.write_iops <= 0xFFFF_FFFF:
            raise ValueError(f"write_iops={self.write_iops!r} must be an integer >= 0 (0 = unlimited)")
        if (
            not isinstance(self.block_bytes, int)
            or self.block_bytes <= 0
            or self.block_bytes % BLOCK_BYTES
        ):
            raise ValueError(f"block_bytes={self.block_bytes!r} must be a positive multiple of {BLOCK_BYTES}")
        if self.block_bytes > namespace_bytes:
            raise ValueError(
                f"block_bytes={self.block_bytes} is larger than the {namespace_bytes}-byte namespace"
            )
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern={self.pattern!r} is unknown; use one of {', '.join(PATTERNS)}")
        if not 0.0 < self.hot_fraction <= 1.0:
            raise ValueError(f"hot_fraction={self.hot_fraction!r} must be in (0, 1]")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= _MASK64:
            raise ValueError(f"seed={self.seed!r} must be an integer in 0..2**64-1")


@dataclass(frozen=True)
class WorkloadStats:
    """A consistent snapshot of the guest's counters."""

    running: bool  # the thread is alive (possibly paused or stalled)
    paused: bool
    acked_writes: int
    throttle_percent: int
    max_gap_ms: float  # longest time between two successive completions, migrations included
    blackout_ms: float  # first completion after from_state().start() minus the last before; 0 = not yet
    next_seq: int
    writes_per_s: float  # completions over the last second
    pauses: int
    io_errors: int  # writes refused (controller suspended under a running guest) and retried
    failure: str  # why the thread ended early, "" if it did not
    run_id: int  # the run writing now (before a restored guest starts: the last run of its image)
    receipt: Receipt | None  # the highest acknowledged seq and its run; None before any write


class AckedMap:
    """Which seq each LBA of a range last acknowledged, copied at one instant."""

    def __init__(self, first_lba: int, plus_one: array[int], next_seq: int, lineage: Lineage) -> None:
        self.first_lba = first_lba
        self.next_seq = next_seq  # the seq of the next write; a write in flight carries it
        self.lineage = lineage
        # seq + 1 per LBA, so that 0 can mean "never written" while seq 0 means "prefilled".
        self._plus_one = plus_one

    def __len__(self) -> int:
        return len(self._plus_one)

    def seq(self, lba: int) -> int | None:
        """The acknowledged seq at ``lba``, or None if the guest never wrote it."""
        value = self._plus_one[lba - self.first_lba]
        return value - 1 if value else None

    def acked_count(self) -> int:
        return len(self._plus_one) - self._plus_one.count(0)


class GuestStateError(ValueError):
    """An exported guest state blob that cannot be decoded."""


# version, write_iops, block_bytes, pattern, hot_fraction, seed, block_count, next_seq,
# last_completion, max_gap_s, acked_writes, io_errors, pauses, compressed map length;
# from version 2 followed by the segment count and (run id, first seq) per segment, then the map.
_STATE_HEAD = struct.Struct("<BIIBdQQQddQQII")
_SEGMENT_COUNT = struct.Struct("<I")
_SEGMENT = struct.Struct("<QQ")
_MAP_ENCODING = struct.Struct("<B")
_SYNC_ID = struct.Struct("<Q")
_LEGACY_LINEAGE = Lineage((Segment(LEGACY_RUN_ID, 0),))
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class GuestState:
    """What moves with the guest: its spec, where its seq sequence stands, what it acked, and
    which runs wrote which seqs."""

    spec: WorkloadSpec
    block_count: int
    next_seq: int
    acked: array[int]  # seq + 1 per LBA, 0 = never written
    last_completion: float = 0.0  # time.time() of the last acknowledged write, 0 = none yet
    max_gap_s: float = 0.0
    acked_writes: int = 0
    io_errors: int = 0
    pauses: int = 0
    lineage: Lineage = _LEGACY_LINEAGE

    def encode(self) -> bytes:
        """Version 2, the map compressed: what any agent since version 2 reads."""
        acked = array("Q", self.acked)
        if sys.byteorder == "big":
            acked.byteswap()  # the wire format is little-endian
        return self._encode(STATE_VERSION, None, zlib.compress(acked.tobytes(), 1))

    def encode_raw(self) -> bytes:
        """Version 3, the map as it is: 2 MiB per GiB, but no time spent compressing it."""
        if sys.byteorder == "big":
            acked = array("Q", self.acked)
            acked.byteswap()
            return self._encode(MAP_STATE_VERSION, MAP_RAW, acked.tobytes())
        return self._encode(MAP_STATE_VERSION, MAP_RAW, memoryview(self.acked).cast("B"))

    def encode_synced(self, sync_id: int, changed_lbas: list[int], changed_values: list[int]) -> bytes:
        """Version 3 with only the map entries changed since the last piece of sync `sync_id`,
        for a destination that holds the rest (its ``MapAssembly``); `acked` is not read."""
        return self._encode(MAP_STATE_VERSION, MAP_SYNCED,
                            _SYNC_ID.pack(sync_id) + delta_body(changed_lbas, changed_values))

    def _encode(self, version: int, encoding: int | None, map_bytes: bytes | memoryview) -> bytes:
        head = _STATE_HEAD.pack(
            version, self.spec.write_iops, self.spec.block_bytes, PATTERNS.index(self.spec.pattern),
            self.spec.hot_fraction, self.spec.seed, self.block_count, self.next_seq, self.last_completion,
            self.max_gap_s, self.acked_writes, self.io_errors, self.pauses, len(map_bytes),
        )
        segments = self.lineage.segments
        parts: list[bytes | memoryview] = [head, _SEGMENT_COUNT.pack(len(segments)),
                                           *(_SEGMENT.pack(s.run_id, s.first_seq) for s in segments)]
        if encoding is not None:
            parts.append(_MAP_ENCODING.pack(encoding))
        parts.append(map_bytes)
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        parts.append(_CRC.pack(crc))
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: bytes, synced: MapAssembly | None = None) -> GuestState:
        """`synced`: the destination's map assembled from a sync's pieces, needed by a blob that
        carries only the last changes (it is completed in place and becomes the state's map)."""
        if len(blob) < 1:
            raise GuestStateError("guest state is empty")
        if blob[0] not in (1, STATE_VERSION, MAP_STATE_VERSION):
            raise GuestStateError(f"guest state version {blob[0]} is unsupported (supported: 1, {STATE_VERSION}, "
                                  f"{MAP_STATE_VERSION})")
        if len(blob) < _STATE_HEAD.size + _CRC.size:
            raise GuestStateError(f"guest state truncated: {len(blob)} bytes, the header alone is "
                                  f"{_STATE_HEAD.size + _CRC.size}")
        view = memoryview(blob)
        body, (crc,) = view[: -_CRC.size], _CRC.unpack(blob[-_CRC.size :])
        if zlib.crc32(body) != crc:
            raise GuestStateError("guest state checksum mismatch: it was truncated or corrupted")
        (version, iops, block_bytes, pattern, hot, seed, block_count, next_seq, last, max_gap, acked_writes,
         io_errors, pauses, packed_len) = _STATE_HEAD.unpack_from(body)
        at = _STATE_HEAD.size
        lineage = _LEGACY_LINEAGE
        if version >= 2:
            lineage, at = cls._decode_lineage(body, at)
        encoding = MAP_ZLIB
        if version >= MAP_STATE_VERSION:
            if len(body) < at + _MAP_ENCODING.size:
                raise GuestStateError("guest state truncated before its map encoding")
            (encoding,) = _MAP_ENCODING.unpack_from(body, at)
            at += _MAP_ENCODING.size
        if len(body) != at + packed_len:
            raise GuestStateError(f"guest state map is {len(body) - at} bytes, header says {packed_len}")
        if pattern >= len(PATTERNS):
            raise GuestStateError(f"guest state names unknown pattern code {pattern}")
        acked = cls._decode_map(encoding, body[at:], block_count, synced)
        spec = WorkloadSpec(iops, block_bytes, PATTERNS[pattern], hot, seed)
        return cls(spec, block_count, next_seq, acked, last, max_gap, acked_writes, io_errors, pauses, lineage)

    @staticmethod
    def _decode_map(encoding: int, section: memoryview, block_count: int, synced: MapAssembly | None) -> array[int]:
        if encoding == MAP_SYNCED:
            if len(section) < _SYNC_ID.size:
                raise GuestStateError("guest state map sync id truncated")
            (sync_id,) = _SYNC_ID.unpack_from(section)
            if synced is None or not synced.complete or synced.sync_id != sync_id:
                held = f"sync {synced.sync_id:#x} ({len(synced.acked)} of {synced.block_count} blocks)" \
                    if synced is not None and synced.sync_id else "none"
                raise GuestStateError(f"guest state carries the map changes since sync {sync_id:#x}, and the "
                                      f"map this destination assembled is {held}")
            if synced.block_count != block_count:
                raise GuestStateError(f"guest state covers {block_count} blocks, its synced map {synced.block_count}")
            try:
                synced.apply_delta(section[_SYNC_ID.size :])
            except MapSyncError as exc:
                raise GuestStateError(f"guest state map changes are invalid: {exc}") from None
            return synced.acked
        if encoding == MAP_ZLIB:
            try:
                raw: bytes | memoryview = zlib.decompress(section)
            except zlib.error as exc:
                raise GuestStateError(f"guest state map does not decompress: {exc}") from exc
        elif encoding == MAP_RAW:
            raw = section
        else:
            raise GuestStateError(f"guest state map encoding {encoding} is unknown")
        if len(raw) != 8 * block_count:
            raise GuestStateError(f"guest state map covers {len(raw) // 8} blocks, header says {block_count}")
        acked = array("Q")
        acked.frombytes(raw)
        if sys.byteorder == "big":
            acked.byteswap()
        return acked

    @staticmethod
    def _decode_lineage(body: bytes | memoryview, at: int) -> tuple[Lineage, int]:
        if len(body) < at + _SEGMENT_COUNT.size:
            raise GuestStateError("guest state truncated before its run lineage")
        (count,) = _SEGMENT_COUNT.unpack_from(body, at)
        at += _SEGMENT_COUNT.size
        if count == 0 or len(body) < at + count * _SEGMENT.size:
            raise GuestStateError(f"guest state lineage of {count} segments does not fit its "
                                  f"{len(body) - at} remaining bytes")
        segments = tuple(Segment(*_SEGMENT.unpack_from(body, at + i * _SEGMENT.size)) for i in range(count))
        try:
            lineage = Lineage(segments)
        except ValueError as exc:
            raise GuestStateError(f"guest state lineage is invalid: {exc}") from None
        return lineage, at + count * _SEGMENT.size


class GuestWorkload:
    """One daemon thread writing to a controller; the owner must call ``stop()``."""

    def __init__(self, controller: GuestDrivenController, spec: WorkloadSpec, state: GuestState | None = None, *,
                 adopt_map: bool = False) -> None:
        """`adopt_map`: `state`'s map becomes this guest's own, not a copy (nobody else may use it
        after; it saves the paused guest a copy of 2 MiB per GiB at a switchover)."""
        spec.validate(controller.namespace_bytes)
        blocks = controller.block_count
        if state is not None and state.block_count != blocks:
            raise ValueError(
                f"guest state covers {state.block_count} blocks but controller {controller.controller_id} "
                f"has {blocks}; restore it onto a controller of the same size"
            )
        self._ctrl = controller
        self._spec = spec
        self._per_write = spec.block_bytes // BLOCK_BYTES
        self._slots = blocks // self._per_write
        self._hot_slots = max(1, int(self._slots * spec.hot_fraction))
        self._cond = threading.Condition()
        self._acked: array[int] = array("Q", bytes(8 * blocks)) if state is None else \
            state.acked if adopt_map else array("Q", state.acked)
        self._next_seq = state.next_seq if state else 1
        self._last_completion: float | None = (state.last_completion or None) if state else None
        self._max_gap_s = state.max_gap_s if state else 0.0
        self._acked_writes = state.acked_writes if state else 0
        self._io_errors = state.io_errors if state else 0
        self._pauses = state.pauses if state else 0
        # A new guest's first run covers its prefill (seq 0) too; a restored guest opens its own
        # run when it starts, so that nothing it writes can pass for a write of the image's runs.
        self._lineage = state.lineage if state else Lineage((Segment(draw_run_id(), 0),))
        self._restored = state is not None
        # The first completion after a restore measures the blackout across the switchover.
        self._blackout_pending = self._last_completion is not None
        self._blackout_ms = 0.0
        # Told (last completion before, first after; wall clock) when the blackout is measured.
        self.on_blackout: Callable[[float, float], None] | None = None
        self._throttle = 0
        self._pause_requested = False
        self._parked = False
        self._stop_requested = False
        self._done = False
        self._failure = ""
        self._thread: threading.Thread | None = None
        self._recent: deque[float] = deque()
        self._started_at = 0.0
        self._next_due = 0.0
        self._admission: Callable[[int], float] | None = None
        # A map sync (agent.guest.map_sync) in progress: its id, and the LBAs acknowledged since
        # its last piece was taken.
        self._map_sync_id = 0
        self._map_changed: set[int] = set()

    @classmethod
    def from_state(
        cls, controller: GuestDrivenController, blob: bytes, *, spec: WorkloadSpec | None = None
    ) -> GuestWorkload:
        """Continue the guest exported by ``export_state`` (optionally with a new spec)."""
        state = GuestState.decode(blob)
        return cls(controller, spec or state.spec, state)

    @property
    def spec(self) -> WorkloadSpec:
        return self._spec

    # ----- control ----------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError(
                    "workload already started; to run it again use GuestWorkload.from_state(ctrl, export_state())"
                )
            if self._restored:
                run_id = draw_run_id(s.run_id for s in self._lineage.segments)
                self._lineage = self._lineage.with_run(run_id, self._next_seq)
            self._started_at = time.monotonic()
            self._thread = threading.Thread(
                target=self._run, name=f"guest-{self._ctrl.controller_id}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread and join it (idempotent)."""
        with self._cond:
            self._stop_requested = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"guest thread {thread.name} did not stop within {timeout}s")

    def pause(self, timeout: float = 10.0) -> None:
        """Return once the thread is parked between writes: nothing is in flight."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._pause_requested:
                self._pauses += 1
            self._pause_requested = True
            self._cond.notify_all()
            while self._active_locked() and not self._parked:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"guest did not park within {timeout}s (a write is stuck in flight)")
                self._cond.wait(remaining)

    def unpause(self) -> None:
        """Let a paused guest continue (harmless if it is not paused)."""
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    def set_throttle(self, percent: int) -> None:
        """Slow the guest to (100 - percent)% of its unthrottled rate; 0 turns throttling off."""
        if not isinstance(percent, int) or not 0 <= percent <= 99:
            raise ValueError(f"throttle percent={percent!r} must be an integer in 0..99")
        with self._cond:
            self._throttle = percent
            self._cond.notify_all()

    def set_admission(self, admission: Callable[[int], float] | None) -> None:
        """`admission(nbytes)`: how long a write must wait before it goes (the controller's I/O
        limits, agent/qos.py); None: writes go at once. Prefill does not ask."""
        with self._cond:
            self._admission = admission

    def prefill(self) -> None:
        """Before start: write seq 0 to every block, so every block is acknowledged and checkable."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("prefill() must run before start()")
            run_id = self._lineage.run_of(0)
        per_chunk = CHUNK_BYTES // BLOCK_BYTES
        blocks = self._ctrl.block_count
        for first in range(0, blocks, per_chunk):
            count = min(per_chunk, blocks - first)
            self._ctrl.write_blocks(first, b"".join(make_block(lba, 0, run_id) for lba in range(first, first + count)))
            with self._cond:
                for lba in range(first, first + count):
                    self._acked[lba] = 1

    # ----- observation ------------------------------------------------------------------------

    def export_state(self) -> bytes:
        """The guest's state for the destination; only while paused (parked) or stopped."""
        with self._cond:
            if self._active_locked() and not self._parked:
                raise RuntimeError("export_state() needs the guest paused or stopped; call pause() first")
            return self._state_locked().encode()

    def export_synced_state(self, sync_id: int) -> bytes | None:
        """Like ``export_state``, with only the map entries changed since the last piece of map
        sync `sync_id` (``map_changes``), for a destination that holds the rest; None when that
        sync is no longer the guest's (export the whole state then)."""
        with self._cond:
            if self._active_locked() and not self._parked:
                raise RuntimeError("export_synced_state() needs the guest paused or stopped; call pause() first")
            if sync_id == 0 or sync_id != self._map_sync_id:
                return None
            lbas, values = self._take_map_changes_locked()
            state = self._state_locked()
        return state.encode_synced(sync_id, lbas, values)

    def begin_map_sync(self) -> tuple[int, array[int]]:
        """Start a map sync (ending any before it): its id and a copy of the map as of now, to send
        as its base. From here every acknowledged LBA is remembered for ``map_changes``."""
        with self._cond:
            self._map_sync_id = secrets.randbits(64) or 1
            self._map_changed = set()
            return self._map_sync_id, array("Q", self._acked)

    def map_changes(self, sync_id: int) -> tuple[list[int], list[int]] | None:
        """The map entries (LBAs, values) changed since the last piece of sync `sync_id`, which
        they become; None when that sync is no longer the guest's."""
        with self._cond:
            if sync_id == 0 or sync_id != self._map_sync_id:
                return None
            return self._take_map_changes_locked()

    def end_map_sync(self, sync_id: int) -> None:
        """Stop remembering changes for sync `sync_id` (harmless if it already ended)."""
        with self._cond:
            if sync_id == self._map_sync_id:
                self._map_sync_id = 0
                self._map_changed = set()

    def _take_map_changes_locked(self) -> tuple[list[int], list[int]]:
        lbas = sorted(self._map_changed)
        self._map_changed = set()
        acked = self._acked
        return lbas, [acked[lba] for lba in lbas]

    def acked_map(self, first_lba: int = 0, count: int | None = None) -> AckedMap:
        """A copy of the acknowledged seqs of ``count`` LBAs from ``first_lba`` (default: all)."""
        blocks = self._ctrl.block_count
        if count is None:
            count = blocks - first_lba
        if first_lba < 0 or count < 0 or first_lba + count > blocks:
            raise ValueError(f"lba range {first_lba}+{count} is outside the namespace of {blocks} blocks")
        with self._cond:
            return AckedMap(first_lba, self._acked[first_lba : first_lba + count], self._next_seq, self._lineage)

    def lineage(self) -> Lineage:
        with self._cond:
            return self._lineage

    def status(self) -> WorkloadStats:
        with self._cond:
            return self._status_locked()

    def wait_for(self, predicate: Callable[[WorkloadStats], bool], timeout: float) -> WorkloadStats:
        """Block until ``predicate(status())`` holds; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                stats = self._status_locked()
                if predicate(stats):
                    return stats
                if self._done:
                    raise RuntimeError(f"guest thread ended before the condition held: {stats}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout}s: {stats}")
                self._cond.wait(remaining)

    def wait_acked(self, count: int, timeout: float) -> WorkloadStats:
        """Block until at least ``count`` writes are acknowledged in total."""
        return self.wait_for(lambda s: s.acked_writes >= count, timeout)

    def _state_locked(self) -> GuestState:
        return GuestState(
            spec=self._spec,
            block_count=self._ctrl.block_count,
            next_seq=self._next_seq,
            acked=self._acked,
            last_completion=self._last_completion or 0.0,
            max_gap_s=self._max_gap_s,
            acked_writes=self._acked_writes,
            io_errors=self._io_errors,
            pauses=self._pauses,
            lineage=self._lineage,
        )

    def _active_locked(self) -> bool:
        return self._thread is not None and not self._done

    def _status_locked(self) -> WorkloadStats:
        now = time.monotonic()
        while self._recent and self._recent[0] < now - _RATE_WINDOW_S:
            self._recent.popleft()
        span = min(_RATE_WINDOW_S, now - self._started_at) if self._thread is not None else 0.0
        return WorkloadStats(
            running=self._active_locked(),
            paused=self._pause_requested,
            acked_writes=self._acked_writes,
            throttle_percent=self._throttle,
            max_gap_ms=self._max_gap_s * 1000.0,
            blackout_ms=self._blackout_ms,
            next_seq=self._next_seq,
            writes_per_s=len(self._recent) / span if span > 0 else 0.0,
            pauses=self._pauses,
            io_errors=self._io_errors,
            failure=self._failure,
            run_id=self._lineage.current_run,
            receipt=self._lineage.receipt_for(self._next_seq - 1) if self._next_seq > 1 else None,
        )

    # ----- the guest thread -------------------------------------------------------------------

    def _lba_for(self, seq: int) -> int:
        if self._spec.pattern == "sequential":
            slot = (seq - 1) % self._slots
        elif self._spec.pattern == "hot":
            slot = _mix64(self._spec.seed, seq) % self._hot_slots
        else:
            slot = _mix64(self._spec.seed, seq) % self._slots
        return slot * self._per_write

    def _run(self) -> None:
        failure = ""
        try:
            self._loop()
        except ControllerGoneError:
            pass  # the controller was released or closed under the guest: it simply ends
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            log.exception("guest workload on controller %s failed", self._ctrl.controller_id)
        finally:
            with self._cond:
                self._failure = failure
                self._done = True
                self._parked = False
                self._cond.notify_all()

    def _loop(self) -> None:
        self._next_due = time.monotonic()
        while True:
            with self._cond:
                if self._pause_requested and not self._stop_requested:
                    self._parked = True
                    self._cond.notify_all()
                    while self._pause_requested and not self._stop_requested:
                        self._cond.wait()
                    self._parked = False
                    self._next_due = time.monotonic()  # no catch-up burst after a pause
                if self._stop_requested:
                    return
                # next_seq advances only on acknowledgement, so a write abandoned during a stall
                # is the same write (same seq, same LBA) when the guest continues.
                seq = self._next_seq
                run_id = self._lineage.current_run
            started = time.monotonic()
            lba = self._lba_for(seq)
            data = b"".join(make_block(lba + i, seq, run_id) for i in range(self._per_write))
            if not self._admitted(len(data)) or not self._write(lba, data):
                continue
            completed = time.time()
            with self._cond:
                self._ack(lba, seq, completed)
                self._pace_locked(started)

    def _admitted(self, nbytes: int) -> bool:
        """Waits as long as the admission says; False when paused or stopped meanwhile."""
        with self._cond:
            admission = self._admission
        if admission is None:
            return True
        due = time.monotonic() + admission(nbytes)
        with self._cond:
            while not (self._pause_requested or self._stop_requested):
                remaining = due - time.monotonic()
                if remaining <= 0:
                    return True
                self._cond.wait(remaining)
        return False

    def _write(self, lba: int, data: bytes) -> bool:
        """Issue one write, retrying while the controller refuses I/O; False if abandoned."""
        while True:
            try:
                self._ctrl.write_blocks(lba, data)
                return True
            except NotRunningError:
                # A suspended controller stalls the guest's I/O; it is not an error the guest
                # can see as a failed write, so retry until resumed (or paused/stopped).
                with self._cond:
                    self._io_errors += 1
                    self._cond.notify_all()
                    if not (self._pause_requested or self._stop_requested):
                        self._cond.wait(_STALL_RETRY_S)
                    if self._pause_requested or self._stop_requested:
                        return False

    def _ack(self, lba: int, seq: int, completed: float) -> None:
        for i in range(self._per_write):
            self._acked[lba + i] = seq + 1
        if self._map_sync_id:
            self._map_changed.update(range(lba, lba + self._per_write))
        self._acked_writes += 1
        self._next_seq = seq + 1
        if self._last_completion is not None:
            gap = completed - self._last_completion
            self._max_gap_s = max(self._max_gap_s, gap)
            if self._blackout_pending:
                self._blackout_ms = gap * 1000.0
                self._blackout_pending = False
                if self.on_blackout is not None:
                    self.on_blackout(self._last_completion, completed)
        self._last_completion = completed
        self._recent.append(time.monotonic())
        self._cond.notify_all()

    def _pace_locked(self, started: float) -> None:
        """Sleep so that writes follow write_iops and the throttle, on an absolute schedule."""
        now = time.monotonic()
        if not self._spec.write_iops and not self._throttle:
            self._next_due = now  # unpaced: keep the schedule current so a throttle applies at once
            return
        natural = now - started
        if self._spec.write_iops:
            natural = max(natural, 1.0 / self._spec.write_iops)
        # Scheduling against an absolute due time absorbs timer overshoot: after a long sleep
        # the next waits are shorter, so the average rate is right even for tiny periods.
        self._next_due += natural * 100.0 / (100 - self._throttle)
        if self._next_due < now - _MAX_BEHIND_S:
            self._next_due = now
        while not (self._pause_requested or self._stop_requested):
            remaining = self._next_due - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

"""Guest I/O isolation on one node: each controller's I/O limits, and migration reads that yield
to guest I/O.

Limits (`IoLimiter`, one per controller): token buckets, one per limit that is set, charged when a
request arrives. A request that finds a bucket in debt waits until that debt is paid, so the
average rate holds whatever the request sizes; the buckets hold BURST_S of their rate, so a burst
after a quiet spell is small. `reserve()` only says how long to wait: the NBD server sleeps on its
event loop (a throttled client must not hold one of its I/O threads), the built-in guest in its
own thread.

Yielding (`MigrationPacer`, one per node): the NBD server reports how long each small guest
request took to serve (`observe`); every WINDOW_S the pacer compares the window's 99th percentile
with the guests' latency when no migration reads ran (the reference), and sets the rate of this
node's migration reads: halved when guests see their p99 rise more than TOLERANCE over the
reference, raised by INCREASE_BYTES_PER_S otherwise, doubled (up to unlimited) while no guest does
I/O worth protecting. A migration that starts while guests are busy starts at START_RATE, not
flat out. The decision is `next_rate`, pure. Stop-and-copy does not yield (the guest of the
controller being moved is paused then: downtime comes first).
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.dataplane.ratelimit import TokenBucket
from cluster.io_limits import OPS, IoLimits

MiB = 1 << 20
BURST_S = 0.1  # a bucket holds this long of its rate

# ---- limits -----------------------------------------------------------------------------------


class _Bucket:
    """One rate (IOPS or bytes/s) as a token bucket that may go into debt."""

    def __init__(self, rate: int, now: float) -> None:
        self.rate = float(rate)
        self.capacity = max(self.rate * BURST_S, 1.0)
        self.tokens = self.capacity
        self.last = now

    def reserve(self, now: float, amount: float) -> float:
        """Charges `amount`; the seconds until the bucket is out of debt (0: go now)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= amount
        return max(0.0, -self.tokens / self.rate)


class IoLimiter:
    """A controller's limits; thread-safe (the NBD event loop and the guest thread both ask)."""

    def __init__(self, limits: IoLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._limits = IoLimits()
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self.waited_s: dict[str, float] = dict.fromkeys(OPS, 0.0)  # by op: how long requests were held
        self.set_limits(limits or IoLimits())

    @property
    def limits(self) -> IoLimits:
        return self._limits

    def set_limits(self, limits: IoLimits) -> None:
        """Applies new limits at once; a limit that did not change keeps its bucket (and debt)."""
        problem = limits.problem()
        if problem:
            raise ValueError(problem)
        with self._lock:
            now = self._clock()
            buckets: dict[tuple[str, str], _Bucket] = {}
            for op in OPS:
                for unit, rate in (("iops", limits.iops(op)), ("bytes", limits.bytes_per_s(op))):
                    if not rate:
                        continue
                    old = self._buckets.get((op, unit))
                    buckets[(op, unit)] = old if old is not None and old.rate == rate else _Bucket(rate, now)
            self._buckets = buckets
            self._limits = limits

    def reserve(self, op: str, nbytes: int) -> float:
        """Charges one `op` request of `nbytes`; returns how long it must wait before it runs."""
        if not self._buckets:
            return 0.0
        with self._lock:
            now = self._clock()
            wait = 0.0
            iops, size = self._buckets.get((op, "iops")), self._buckets.get((op, "bytes"))
            if iops is not None:
                wait = iops.reserve(now, 1)
            if size is not None:
                wait = max(wait, size.reserve(now, nbytes))
            if wait:
                self.waited_s[op] += wait
            return wait


# ---- migration reads yield to guest I/O ------------------------------------------------------

WINDOW_S = 0.25
MIN_SAMPLES = 20  # fewer small guest requests in a window: nobody to protect
SMALL_IO_BYTES = 64 << 10  # larger requests are throughput, not latency: not watched
TOLERANCE = 1.2  # a window's p99 may be this much above the reference before migration backs off
SLACK_S = 0.0001  # and this much more (timer noise at tiny latencies)
START_RATE = 16 * MiB  # a migration starting beside busy guests starts here, not flat out
MIN_RATE = 1 * MiB  # never lower: the migration must end
MAX_RATE = 8 << 30  # above this: unlimited
INCREASE_BYTES_PER_S = 4 * MiB  # per calm window (16 MiB/s more each second)
DECREASE = 0.5
REFERENCE_WINDOWS = 40  # idle windows kept for the reference (their median)
SAMPLES_PER_WINDOW = 20_000  # beyond this a window keeps no more samples (memory bound)


@dataclass(frozen=True)
class Window:
    """What one window saw: guest requests and their p99, migration bytes read."""

    samples: int
    p99_s: float
    migration_bytes: int
    seconds: float


def p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile (the largest of fewer than 100)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]


def next_rate(rate: float | None, window: Window, reference_s: float | None) -> float | None:
    """The migration read rate (bytes/s, None: unlimited) after `window`, given the guests'
    p99 without migration (`reference_s`, None: not known yet)."""
    if window.samples < MIN_SAMPLES:
        if rate is None or rate * 2 >= MAX_RATE:
            return None
        return rate * 2
    current = rate if rate is not None else max(window.migration_bytes / max(window.seconds, 1e-3), START_RATE)
    if reference_s is not None and window.p99_s > reference_s * TOLERANCE + SLACK_S:
        return max(MIN_RATE, current * DECREASE)
    if rate is None:
        return None  # flat out and nobody suffers
    raised = rate + INCREASE_BYTES_PER_S
    return None if raised >= MAX_RATE else raised


class MigrationPacer:
    """The node's migration reads, paced by what its guests' latency says (see the module doc).
    Used from the event loop only."""

    def __init__(self, enabled: bool = True, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.enabled = enabled
        self._clock = clock
        self._bucket = TokenBucket(None, clock=clock, sleep=sleep)
        self._rate: float | None = None
        self._window_start = clock()
        self._samples: list[float] = []
        self._seen = 0
        self._migration_bytes = 0
        self._waiting = 0  # migration reads waiting for the bucket: a migration is on
        self._idle_p99s: collections.deque[float] = collections.deque(maxlen=REFERENCE_WINDOWS)
        self._recent_p99s: collections.deque[float] = collections.deque(maxlen=REFERENCE_WINDOWS)
        self.last_window: Window | None = None
        self.backoffs = 0  # windows that halved the rate

    @property
    def rate(self) -> float | None:
        """Bytes/s migration reads may take now; None: unlimited."""
        return self._rate

    def reference_s(self) -> float | None:
        """The guests' p99 without migration: the median of recent idle windows; before there
        are a few, the lowest recent window (a backed-off migration's is close to idle)."""
        if len(self._idle_p99s) >= 4:
            return float(statistics.median(self._idle_p99s))
        return min(self._recent_p99s) if self._recent_p99s else None

    def observe(self, nbytes: int, seconds: float) -> None:
        """One guest request served in `seconds` (the NBD server calls this)."""
        if nbytes > SMALL_IO_BYTES:
            return
        self._roll()
        self._seen += 1
        if len(self._samples) < SAMPLES_PER_WINDOW:
            self._samples.append(seconds)

    async def acquire(self, nbytes: int) -> None:
        """Before a migration read of `nbytes`: waits as long as the current rate says."""
        if not self.enabled:
            return
        self._roll()
        if self._rate is None and self._migration_bytes == 0 and self._busy_guests():
            self._set_rate(START_RATE)  # a migration begins beside busy guests
        self._migration_bytes += nbytes
        self._waiting += 1
        try:
            await self._bucket.acquire(nbytes)
        finally:
            self._waiting -= 1

    def _busy_guests(self) -> bool:
        last = self.last_window
        return self._seen >= MIN_SAMPLES or (last is not None and last.samples >= MIN_SAMPLES
                                             and self._clock() - self._window_start < 2 * WINDOW_S)

    def _set_rate(self, rate: float | None) -> None:
        self._rate = rate
        self._bucket.set_rate(int(rate) if rate is not None else None)

    def _roll(self) -> None:
        now = self._clock()
        seconds = now - self._window_start
        if seconds < WINDOW_S:
            return
        window = Window(self._seen, p99(self._samples), self._migration_bytes, seconds)
        self.last_window = window
        migrating = bool(window.migration_bytes or self._waiting)
        if window.samples >= MIN_SAMPLES:
            (self._recent_p99s if migrating else self._idle_p99s).append(window.p99_s)
        if migrating:
            rate = next_rate(self._rate, window, self.reference_s())
            if rate is not None and (self._rate is None or rate < self._rate):
                self.backoffs += 1
            self._set_rate(rate)
        elif self._rate is not None:
            self._set_rate(None)  # no migration read in a whole window: the next one starts afresh
        self._window_start = now
        self._samples = []
        self._seen = 0
        self._migration_bytes = 0


class GuestIoPolicy:
    """What the NBD server asks of the node for each guest request: how long to hold it (the
    controller's limits), and where to report how long it took (the migration pacer)."""

    def __init__(self, limiter_of: Callable[[str], IoLimiter | None], pacer: MigrationPacer) -> None:
        self._limiter_of = limiter_of
        self.pacer = pacer

    def admit(self, controller_id: str, op: str, nbytes: int) -> float:
        limiter = self._limiter_of(controller_id)
        return limiter.reserve(op, nbytes) if limiter is not None else 0.0

    def completed(self, nbytes: int, seconds: float) -> None:
        self.pacer.observe(nbytes, seconds)

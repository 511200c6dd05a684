"""Token-bucket bandwidth limiter for the data plane.

Migration traffic shares the host's NIC with guest traffic, so the source caps its send rate.
The bucket holds up to ``burst_bytes`` tokens and refills at ``rate_bytes_per_s``. A request
larger than the bucket is allowed: the caller waits until the debt it created is paid back, which
keeps the *average* rate exact even with 1 MiB chunks and a small burst.

Clock and sleep are injectable so the unit tests are deterministic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["MAX_SLEEP_SLICE_S", "TokenBucket"]

# A waiter re-reads the rate at least this often, so set_rate() (throttling up or down during a
# migration) takes effect within this bound even for a waiter with a long debt.
MAX_SLEEP_SLICE_S = 0.1

# Float noise in refill arithmetic; a debt smaller than this counts as paid (prevents spinning on
# sleeps so short that a coarse or fake clock does not advance).
_EPSILON_BYTES = 0.5


class TokenBucket:
    """Average-rate limiter. ``rate_bytes_per_s`` None or 0 means unlimited."""

    def __init__(
        self,
        rate_bytes_per_s: int | None,
        burst_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        # Serialises waiters: each one pays its own debt in arrival order, so two concurrent
        # callers cannot both see the same tokens.
        self._lock = asyncio.Lock()
        self._rate: float = 0.0
        self._burst: float = 0.0
        self._tokens: float = 0.0
        self._last = clock()
        self.set_rate(rate_bytes_per_s, burst_bytes)

    @property
    def rate(self) -> int | None:
        """Current rate in bytes/s, None when unlimited."""
        return int(self._rate) if self._rate else None

    @property
    def burst(self) -> int:
        """Bucket capacity in bytes (0 when unlimited)."""
        return int(self._burst)

    def set_rate(self, rate_bytes_per_s: int | None, burst_bytes: int | None = None) -> None:
        """Change the rate (None/0 = unlimited). Waiters pick it up within MAX_SLEEP_SLICE_S.

        ``burst_bytes`` defaults to 100 ms worth of the rate: small enough that a transfer of a
        few seconds is held close to the rate from its start.
        """
        if rate_bytes_per_s is not None and rate_bytes_per_s < 0:
            raise ValueError(f"rate_bytes_per_s={rate_bytes_per_s} is negative; use None or 0 for unlimited")
        if burst_bytes is not None and burst_bytes <= 0:
            raise ValueError(f"burst_bytes={burst_bytes} must be positive (or None for rate/10)")
        # Account the time that passed at the old rate before switching.
        self._refill()
        was_unlimited = not self._rate
        if not rate_bytes_per_s:
            self._rate = 0.0
            self._burst = 0.0
            self._tokens = 0.0
            return
        self._rate = float(rate_bytes_per_s)
        self._burst = float(burst_bytes if burst_bytes is not None else max(rate_bytes_per_s // 10, 1))
        # Coming from unlimited (or at construction) start with a full bucket; otherwise keep the
        # current debt/credit, capped to the new capacity.
        self._tokens = self._burst if was_unlimited else min(self._tokens, self._burst)

    def _refill(self) -> None:
        now = self._clock()
        if self._rate:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    async def acquire(self, n: int) -> None:
        """Take ``n`` tokens, sleeping just long enough to keep the average rate."""
        if n < 0:
            raise ValueError(f"cannot acquire a negative number of bytes ({n})")
        if not self._rate or n == 0:
            return
        async with self._lock:
            self._refill()
            if not self._rate:
                return
            self._tokens -= n
            try:
                while self._tokens < -_EPSILON_BYTES:
                    if not self._rate:
                        # Switched to unlimited while we waited: forgive the debt.
                        self._tokens = 0.0
                        return
                    await self._sleep(min(-self._tokens / self._rate, MAX_SLEEP_SLICE_S))
                    self._refill()
            except asyncio.CancelledError:
                # The bytes will not be sent: give them back so the next caller is not charged.
                self._tokens = min(self._burst, self._tokens + n)
                raise

"""How many migration bytes crossed this agent's data plane, in total and lately: what the agent's
/metrics reports (agent.metrics). Pure bookkeeping, a clock passed in.

What counts is the migration's payload, the same bytes a job's `bytes_transferred` counts:
namespace data (EXTENT frames) and the controller and guest state (FINAL), never the framing
(headers, HELLO, ROUND_END, ACK, ABORT, the FINAL length prefix). `SENT` counts what the source
side handed to its connections; `RECEIVED` what the destination side read off them with a good
checksum. Each frame counts once where it was sent and once where it arrived; nothing is resent
by the data plane itself, so a block counts again only when a later dirty round (or a new
attempt to another destination) truly sends it again.

Only the event loop touches them (the sender and receiver run there, and so does a scrape).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

RATE_WINDOW_S = 5  # the current rate is the average over the last this many whole seconds


class Traffic:
    """A byte count, and the rate over the last `window_s` whole seconds (the running second is
    left out: it would read low until it ends)."""

    def __init__(self, window_s: int = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s < 1:
            raise ValueError(f"window_s={window_s} must be at least 1")
        self.window_s = window_s
        self._clock = clock
        self.total_bytes = 0
        self._seconds: collections.deque[list[int]] = collections.deque()  # [whole second, bytes in it]

    def add(self, count: int) -> None:
        if count <= 0:
            return
        self.total_bytes += count
        second = int(self._clock())
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += count
        else:
            self._seconds.append([second, count])
            self._forget_before(second - self.window_s)

    def _forget_before(self, second: int) -> None:
        while self._seconds and self._seconds[0][0] < second:
            self._seconds.popleft()

    def rate_bytes_per_s(self) -> float:
        now = int(self._clock())
        self._forget_before(now - self.window_s)
        recent = sum(count for second, count in self._seconds if second < now)
        return recent / self.window_s


SENT = Traffic()
RECEIVED = Traffic()

"""One log line per kind of noise per window: what a process logs about malformed input.

Anyone can reach our ports, and a scanner or a confused client sends garbage far faster than
anyone reads logs: logging each malformed request (gRPC bodies that do not decode, data-plane
peers without a valid HELLO, NBD clients without the handshake, bad HTTP requests) would bury
what matters. So each *kind* of malformed input (e.g. "grpc", "data-plane", "nbd", "http") logs
at most one line per window (10 s by default); the requests dropped silently meanwhile are
counted, and the next line of that kind says how many:

    malformed gRPC request from ipv4:127.0.0.1:5123: request body is not a valid
    nvmigrate.v1.GetMigrationRequest (dropped 312 malformed requests from grpc in the last 10 s)

`LogWindows` is the decision (pure: the clock is passed in); `RateLimitedLog` writes the lines.
A count still pending when the garbage stops is written with the next line of that kind, or by
`flush()` (called at shutdown).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_WINDOW_S = 10.0


@dataclass(frozen=True)
class Verdict:
    """Whether to log this event, and how many of its kind were dropped since the last line."""

    log: bool
    dropped: int = 0
    window_s: float = 0.0  # how long the dropped ones were counted over


@dataclass
class _Window:
    started: float
    dropped: int = 0


class LogWindows:
    """Per kind: the first event of a window is logged, the rest of that window only counted."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        if window_s <= 0:
            raise ValueError(f"log window must be positive, got {window_s} s")
        self.window_s = window_s
        self._windows: dict[str, _Window] = {}

    def event(self, kind: str, now: float) -> Verdict:
        window = self._windows.get(kind)
        if window is None or now - window.started >= self.window_s:
            dropped = window.dropped if window is not None else 0
            counted_s = now - window.started if window is not None else 0.0
            self._windows[kind] = _Window(started=now)
            return Verdict(True, dropped, counted_s)
        window.dropped += 1
        return Verdict(False)

    def pending(self) -> dict[str, int]:
        """Dropped events not yet reported, by kind; reading them resets the counts."""
        counts = {kind: w.dropped for kind, w in self._windows.items() if w.dropped}
        for kind in counts:
            self._windows[kind].dropped = 0
        return counts


class RateLimitedLog:
    """Writes `LogWindows`' verdicts to a logger (thread-safe: the NBD server's threads use it)."""

    def __init__(self, logger: logging.Logger, window_s: float = DEFAULT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.windows = LogWindows(window_s)
        self.clock = clock
        self._lock = threading.Lock()

    def malformed(self, kind: str, message: str, *args: object, level: int = logging.WARNING) -> bool:
        """Logs `message % args` unless a line of this `kind` went out within the window; True if logged."""
        with self._lock:
            verdict = self.windows.event(kind, self.clock())
        if not verdict.log:
            return False
        if verdict.dropped:
            message += " (dropped %d malformed requests from %s in the last %.0f s)"
            args = (*args, verdict.dropped, kind, verdict.window_s)
        self.logger.log(level, message, *args)
        return True

    def flush(self) -> None:
        """Reports the counts still pending (at shutdown)."""
        with self._lock:
            pending = self.windows.pending()
        for kind, dropped in sorted(pending.items()):
            self.logger.warning("dropped %d malformed requests from %s since the last report", dropped, kind)


# One per process: every listener of the process shares the windows of its kinds.
malformed_input = RateLimitedLog(logging.getLogger("nvmigrate.malformed"))

"""Whether a transfer still makes progress: the rule behind the progress timeout. Pure.

A job whose bytes stop moving (a destination that stopped reading, a link that carries nothing)
would otherwise hold its controller until the job's deadline, an hour by default. KubeVirt rolls
such a migration back after its progressTimeout (150 s); so do we. Progress is a step that
started, or the source's count of bytes sent growing; the clock is the monotonic one.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PROGRESS_TIMEOUT_S = 150.0


@dataclass
class ProgressWatch:
    timeout_s: float
    _bytes: int = -1
    _since: float = 0.0

    def step_started(self, now: float) -> None:
        """A transfer step began: that is progress, and its byte count starts anew."""
        self._bytes, self._since = -1, now

    def observe(self, bytes_sent: int, now: float) -> float | None:
        """The source's count at `now`; returns how long nothing has moved when that is past the
        timeout (the job should roll back), else None."""
        if bytes_sent != self._bytes:
            self._bytes, self._since = bytes_sent, now
            return None
        stalled_s = now - self._since
        return stalled_s if stalled_s >= self.timeout_s else None

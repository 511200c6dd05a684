"""Wall-clock marks of the steps of a switchover, one log line each, so that the steps of one job
taken in several processes (source agent, orchestrator, destination agent, the guest) can be put
on one time line: `e2e/bench_switchover.py` reads them from the processes' logs.

A mark is the wall clock (`time.time()`), not the monotonic one, because it is compared across
processes; on one machine they share it, across machines the breakdown is only as good as their
clock sync. Line format (after the logger's own prefix):

    switchover-mark job=<job id> step=<step name> t=<seconds since the epoch, 6 decimals>
"""

from __future__ import annotations

import logging
import re
import time

log = logging.getLogger("nvmigrate.switchover")

MARK_RE = re.compile(r"switchover-mark job=(?P<job>\S+) step=(?P<step>\S+) t=(?P<t>[0-9.]+)")


def mark(job_id: str, step: str, at: float | None = None) -> None:
    """Logs that `step` of `job_id`'s switchover happened now (or at wall-clock time `at`)."""
    log.info("switchover-mark job=%s step=%s t=%.6f", job_id, step, time.time() if at is None else at)


def parse(lines: list[str]) -> dict[str, dict[str, float]]:
    """job id -> step -> wall-clock time, from log lines (the first mark of a step wins)."""
    marks: dict[str, dict[str, float]] = {}
    for line in lines:
        found = MARK_RE.search(line)
        if found is not None:
            marks.setdefault(found["job"], {}).setdefault(found["step"], float(found["t"]))
    return marks

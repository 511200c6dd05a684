"""What a job runner reports about its job: the trace (spans), the metrics, and the log context.

The runner calls these few hooks around its etcd writes and agent calls; the work is done in
`orchestrator.tracing` and `orchestrator.metrics`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from cluster import logs
from orchestrator import metrics
from orchestrator.jobs import Job
from orchestrator.tracing import JobTrace, RoundSpan

log = logging.getLogger(__name__)


class JobObserver:
    """Also the log context of the runner's task: `job_id` and `trace_id` as logs.LogContext."""

    def __init__(self, job_id: str, epoch: int) -> None:
        self.job_id = job_id
        self.epoch = epoch
        self.trace_id = ""
        self.trace = JobTrace(job_id, epoch)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around the runner's whole run: log records carry the job id and trace id, and agent
        calls for the job are placed in its trace."""
        with logs.context(self), self.trace.running():
            yield

    def adopt(self, job: Job) -> None:
        """The runner loaded the job; a different epoch means another leader drove it before."""
        self.trace_id = job.trace_context.get("trace_id", "")
        self.trace.loaded(job)
        if job.epoch and job.epoch != self.epoch and not job.terminal:
            self.trace.took_over(job.epoch)

    def prepare(self, new: Job) -> Job:
        """Before a write: the record gets its trace ids."""
        return self.trace.prepare(new)

    def progressed(self, old: Job, new: Job) -> None:
        """The job moved on in memory (bytes, rounds), not written yet: its metrics move now."""
        metrics.job_progressed(old, new)

    def written(self, old: Job, new: Job) -> None:
        """After a write: the spans it settled (finished phases and rounds, the root), exported
        at once so that a leader killed next does not take them along; metrics of what changed."""
        self.trace_id = new.trace_context.get("trace_id", "")
        self.trace.written(old, new)
        metrics.job_written(old, new)
        for index in range(len(old.phases) - 1 if old.phases else len(new.phases) - 1, len(new.phases) - 1):
            # One line per phase change: with the log context, grep or a log store follows a job.
            closed, following = new.phases[index], new.phases[index + 1]
            why = f": {new.reason}" if following.phase is new.phase and new.terminal and new.reason else ""
            log.info("job %s: %s -> %s after %.0f ms%s", new.id, closed.phase, following.phase, closed.duration_ms,
                     why)

    def over_budget(self, message: str) -> None:
        """A completed switchover broke its downtime budget (the job record says so too)."""
        self.trace.over_budget(message)

    def round(self, job: Job, number: int) -> contextlib.AbstractContextManager[RoundSpan]:
        """Around dirty round `number`: agent calls made in it go under its span, whose id any
        leader running this round derives alike; the span goes out with the write recording it."""
        return self.trace.round(job, number)

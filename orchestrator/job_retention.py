"""Which finished jobs to delete from etcd: pure (the jobs and the wall clock in, ids out).

A terminal job goes once it ended more than `retention_s` ago, and beyond the newest
`keep_count` terminal jobs. Some terminal jobs never go, whatever their age or number:
- a COMPLETED job whose verification is PENDING: the verifier still has to judge it, and the
  source copy is released only on its verdict;
- a COMPLETED job whose verification FAILED: the source copy is kept for an operator, and the
  reconciler reads the job to keep it (a source session whose job etcd no longer knows is
  released, i.e. sanitized).
They still count towards `keep_count`, so a backlog of them makes older deletable jobs go sooner.

Ages are read off the wall clock (when the job ended, as written in it, to now), clamped at 0:
a backward step of the clock keeps jobs longer (never deletes one early), a forward step makes
jobs look older and can delete them up to that step early. A retention period is days, a step
is seconds, so neither matters; the running jobs, whose ages do matter, use `Job.age_at_load`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from orchestrator.jobs import Job, Phase, Verification

DEFAULT_RETENTION_S = 7 * 24 * 3600.0
DEFAULT_KEEP_COUNT = 1000


@dataclass(frozen=True)
class Retention:
    retention_s: float = DEFAULT_RETENTION_S
    keep_count: int = DEFAULT_KEEP_COUNT


def ended_at(job: Job) -> float:
    """When the job entered its terminal phase (its last phase's start), as written in it."""
    return job.phases[-1].started_at if job.phases else job.updated_at


def age_s(job: Job, wall_now: float) -> float:
    """Seconds since the job ended by the wall clock, never negative (see the module docstring)."""
    return max(0.0, wall_now - ended_at(job))


def may_delete(job: Job) -> bool:
    """Terminal, and nothing still depends on its record."""
    if not job.terminal:
        return False
    return not (job.phase is Phase.COMPLETED
                and job.verification in (Verification.PENDING, Verification.FAILED))


def to_delete(jobs: Iterable[Job], wall_now: float, retention: Retention, *,
              kept: Collection[str] = ()) -> list[Job]:
    """The jobs to delete now, oldest first. `kept`: ids something still reads (an unfinished
    evacuation tells a job that ended from one never created by whether its record exists)."""
    terminal = sorted((j for j in jobs if j.terminal), key=lambda j: (-ended_at(j), j.id))  # newest first
    doomed = [job for rank, job in enumerate(terminal)
              if may_delete(job) and job.id not in kept
              and (rank >= retention.keep_count or age_s(job, wall_now) > retention.retention_s)]
    return doomed[::-1]

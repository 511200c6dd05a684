"""Whether a completed migration moved the namespace intact. Pure: digests and time in, a verdict out.

After the switchover the source hashes its frozen copy and the destination a copy-on-write
snapshot of what it loaded (both over the allocated blocks, in chunks, off the guest's path). The
job completed when the destination ran the controller; verification ends later, PASSED when both
digests are in and equal, FAILED when they differ, when a side reports that hashing failed, or when
the digests are not in by a deadline that scales with the bytes to hash. Only a PASSED job lets
the source copy go: after a failure it is kept for an operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from orchestrator.jobs import Job

# Hashing reads the allocated blocks once on each side; a slow disk still manages this rate.
MIN_HASH_RATE_BYTES_PER_S = 20 * 1000 * 1000
BASE_DEADLINE_S = 30.0


class Verdict(StrEnum):
    WAIT = "WAIT"
    PASSED = "PASSED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class DigestReport:
    """What one side reports: its digest once computed, or why it could not compute one."""

    digest: str = ""
    error: str = ""
    reachable: bool = True


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str


def deadline_s(job: Job) -> float:
    """How long both digests may take: a base for the round trips plus the bytes at a slow rate."""
    hashed = max(job.bytes_transferred, 0)
    return BASE_DEADLINE_S + hashed / MIN_HASH_RATE_BYTES_PER_S


def digest_algorithm(digest: str) -> str:
    """What an agent's namespace digest was made with: its prefix (agent.namespace_digest), or
    sha256 for the bare hex of agents from before 2026-12."""
    algorithm, sep, _ = digest.partition(":")
    return algorithm if sep else "sha256"


def judge(source: DigestReport, destination: DigestReport, *, elapsed_s: float, deadline: float) -> Judgement:
    if source.error:
        return Judgement(Verdict.FAILED, f"the source could not hash its copy: {source.error}")
    if destination.error:
        return Judgement(Verdict.FAILED, f"the destination could not hash its copy: {destination.error}")
    if source.digest and destination.digest:
        if source.digest == destination.digest:
            return Judgement(Verdict.PASSED, "namespace digests equal")
        ours, theirs = digest_algorithm(source.digest), digest_algorithm(destination.digest)
        if ours != theirs:
            return Judgement(Verdict.FAILED, f"the digests cannot be compared: the source made a {ours} digest, the "
                                             f"destination a {theirs} one (agents of different versions); the source "
                                             "copy is kept: upgrade both agents")
        return Judgement(Verdict.FAILED, f"namespace digest differs: source {source.digest[:16]} destination "
                                         f"{destination.digest[:16]}")
    if elapsed_s > deadline:
        missing = [side for side, report in (("source", source), ("destination", destination))
                   if not report.digest]
        unreachable = [side for side, report in (("source", source), ("destination", destination))
                       if not report.reachable]
        why = f" ({' and '.join(unreachable)} not answering)" if unreachable else ""
        return Judgement(Verdict.FAILED, f"no {' or '.join(missing)} digest within {deadline:.0f} s{why}; "
                                         "the source copy is kept")
    return Judgement(Verdict.WAIT, "")

"""Which finished jobs go (orchestrator.job_retention, pure): by age, by count, never the ones
something still depends on."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.job_retention import Retention, age_s, may_delete, to_delete
from orchestrator.jobs import Job, Phase, PhaseEntry, Policy, Verification

NOW = 1_000_000.0
DAY_S = 86400.0


def ended(job_id: str, phase: Phase, at: float, verification: Verification | None = None) -> Job:
    """A job in `phase` since `at` (a record as the runner leaves it; the path there does not matter)."""
    if verification is None:
        verification = Verification.PENDING if phase is Phase.COMPLETED else Verification.NONE
    return Job(id=job_id, controller_id=f"c-{job_id}", source_node="n1", namespace_bytes=4096, policy=Policy(),
               created_at=at - 10, phase=phase, phases=(PhaseEntry(Phase.PENDING, at - 10, 1.0),
                                                        PhaseEntry(phase, at)),
               updated_at=at + 1, verification=verification)


def test_old_terminal_jobs_go_and_recent_ones_stay() -> None:
    jobs = [ended("old-rb", Phase.ROLLED_BACK, NOW - 8 * DAY_S), ended("old-ok", Phase.COMPLETED, NOW - 8 * DAY_S,
                                                                       Verification.PASSED),
            ended("new-f", Phase.FAILED, NOW - DAY_S), ended("running", Phase.PRECOPY, NOW - 30 * DAY_S)]
    assert {j.id for j in to_delete(jobs, NOW, Retention())} == {"old-rb", "old-ok"}


def test_a_completed_job_pending_or_failing_verification_never_goes() -> None:
    pending = ended("pending", Phase.COMPLETED, NOW - 30 * DAY_S)
    failed = ended("failed", Phase.COMPLETED, NOW - 30 * DAY_S, Verification.FAILED)
    assert pending.verification is Verification.PENDING
    assert to_delete([pending, failed], NOW, Retention(retention_s=1, keep_count=0)) == []


def test_beyond_the_count_the_oldest_go_first_and_protected_jobs_count() -> None:
    jobs = [ended(f"j{i}", Phase.CANCELLED, NOW - 100 + i) for i in range(5)]  # j4 the newest
    jobs.append(ended("pending", Phase.COMPLETED, NOW))  # the newest of all, never deleted
    assert [j.id for j in to_delete(jobs, NOW, Retention(keep_count=3))] == ["j0", "j1", "j2"]


def test_a_clock_stepped_back_makes_jobs_young_not_negative() -> None:
    job = ended("future", Phase.FAILED, NOW + 3600)
    assert age_s(job, NOW) == 0.0
    assert to_delete([job], NOW, Retention(retention_s=1)) == []


phases = st.sampled_from(list(Phase))
verifications = st.sampled_from([None, Verification.PASSED, Verification.FAILED])
job_specs = st.lists(st.tuples(phases, st.floats(min_value=-1e6, max_value=1e6), verifications),
                     max_size=30)


@settings(max_examples=300, deadline=None)
@given(job_specs, st.floats(min_value=0.001, max_value=1e7), st.integers(min_value=0, max_value=40))
def test_properties(specs: list[tuple[Phase, float, Verification | None]], retention_s: float, keep: int) -> None:
    jobs = [ended(f"j{i}", phase, NOW + offset, verification if phase is Phase.COMPLETED else None)
            for i, (phase, offset, verification) in enumerate(specs)]
    doomed = to_delete(jobs, NOW, Retention(retention_s, keep))
    doomed_ids = {j.id for j in doomed}
    assert len(doomed_ids) == len(doomed)
    assert all(may_delete(j) for j in doomed)  # never an active or still-needed job
    kept_terminal = [j for j in jobs if j.terminal and j.id not in doomed_ids]
    kept_deletable = [j for j in kept_terminal if may_delete(j)]
    # what stays is young enough and within the count (protected jobs aside)
    assert all(age_s(j, NOW) <= retention_s for j in kept_deletable)
    assert len(kept_deletable) <= keep or all(not may_delete(j) for j in kept_deletable)
    # nothing deleted that was both young and within the newest `keep`
    newest = sorted((j for j in jobs if j.terminal), key=lambda j: (-j.phases[-1].started_at, j.id))[:keep]
    assert not any(j.id in doomed_ids and age_s(j, NOW) <= retention_s for j in newest)


def test_a_job_an_unfinished_evacuation_names_stays_however_old() -> None:
    old = ended("mig-old", Phase.ROLLED_BACK, at=0.0)
    assert to_delete([old], wall_now=10_000.0, retention=Retention(retention_s=60.0)) == [old]
    assert to_delete([old], wall_now=10_000.0, retention=Retention(retention_s=60.0), kept={"mig-old"}) == []

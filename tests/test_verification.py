"""The verification verdict: equal digests pass, anything else fails or waits, the deadline scales."""

from __future__ import annotations

import pytest

from orchestrator.jobs import Job, Policy
from orchestrator.verification import BASE_DEADLINE_S, DigestReport, Verdict, deadline_s, judge

D1, D2 = "xxh3-128:" + "1" * 32, "xxh3-128:" + "2" * 32
OLD = "1" * 64  # an agent from before 2026-12: bare sha256 hex


@pytest.mark.parametrize(("source", "destination", "elapsed", "verdict", "words"), [
    (DigestReport(D1), DigestReport(D1), 1.0, Verdict.PASSED, "equal"),
    (DigestReport(D1), DigestReport(D2), 1.0, Verdict.FAILED, "differs: source xxh3-128:111111"),
    (DigestReport(OLD), DigestReport(OLD), 1.0, Verdict.PASSED, "equal"),
    (DigestReport(OLD), DigestReport(D1), 1.0, Verdict.FAILED,
     "cannot be compared: the source made a sha256 digest, the destination a xxh3-128 one"),
    (DigestReport(error="EIO reading block 7"), DigestReport(D1), 1.0, Verdict.FAILED, "source could not hash"),
    (DigestReport(D1), DigestReport(error="disk gone"), 1.0, Verdict.FAILED, "destination could not hash"),
    (DigestReport(D1), DigestReport(), 1.0, Verdict.WAIT, ""),
    (DigestReport(), DigestReport(), 99.0, Verdict.WAIT, ""),
    (DigestReport(D1), DigestReport(), 101.0, Verdict.FAILED, "no destination digest within 100 s"),
    (DigestReport(reachable=False), DigestReport(D1), 101.0, Verdict.FAILED, "(source not answering)"),
    (DigestReport(), DigestReport(reachable=False), 101.0, Verdict.FAILED, "no source or destination digest"),
])
def test_the_verdict(source: DigestReport, destination: DigestReport, elapsed: float, verdict: Verdict,
                     words: str) -> None:
    judged = judge(source, destination, elapsed_s=elapsed, deadline=100.0)
    assert judged.verdict is verdict
    assert words in judged.reason


def test_the_deadline_scales_with_the_bytes_moved() -> None:
    def moved(n: int) -> Job:
        return Job(id="mig-0123456789ab", controller_id="c1", source_node="n1", namespace_bytes=200 << 30,
                   policy=Policy(), created_at=1.0, bytes_transferred=n)
    small, one_gib, ten_gib = deadline_s(moved(1 << 20)), deadline_s(moved(1 << 30)), deadline_s(moved(10 << 30))
    assert BASE_DEADLINE_S <= small < one_gib < ten_gib
    assert ten_gib - BASE_DEADLINE_S == pytest.approx(10 * (one_gib - BASE_DEADLINE_S))
    # The namespace's size does not matter, only what was written: a sparse 200 GiB namespace is cheap.
    assert one_gib < 120.0


def test_a_verdict_is_counted_once_by_outcome_and_a_failure_is_the_alarm() -> None:
    from orchestrator import metrics
    from orchestrator.jobs import Phase

    def count(outcome: str) -> float:
        return metrics.REGISTRY.get_sample_value("nvmigrate_verifications_total", {"outcome": outcome}) or 0.0

    done = Job(id="mig-0123456789ab", controller_id="c1", source_node="n1", namespace_bytes=1 << 20, policy=Policy(),
               created_at=1.0, phase=Phase.RESUMING).end(Phase.COMPLETED, 2.0, "")
    before = (count("PASSED"), count("FAILED"))
    failed = done.verification_failed("namespace digest differs", D1, D2, 3.0)
    metrics.job_written(done, failed)
    metrics.job_written(failed, failed)  # written again: not counted again
    passed = done.verified(D1, D1, 3.0)
    metrics.job_written(done, passed)
    assert (count("PASSED") - before[0], count("FAILED") - before[1]) == (1, 1)

"""The job state machine: every phase change checked against the table, records round-trip."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.jobs import (
    ALLOWED,
    BEFORE_COMMIT,
    MAX_UNWATCHED_GAP_S,
    TERMINAL,
    IllegalPhaseChange,
    Job,
    OnNoConvergence,
    ParsedJobs,
    Phase,
    Policy,
    Verification,
    _changed,
)

# Written out independently of ALLOWED: what an operator may see a job do.
EXPECTED = {
    ("PENDING", "PREPARING"), ("PREPARING", "PRECOPY"), ("PREPARING", "PREPARING"),
    ("PRECOPY", "DIRTY_ITERATION"), ("PRECOPY", "PREPARING"),
    ("DIRTY_ITERATION", "STOP_AND_COPY"), ("DIRTY_ITERATION", "PREPARING"),
    ("STOP_AND_COPY", "COMMIT"), ("COMMIT", "RESUMING"), ("RESUMING", "COMPLETED"), ("RESUMING", "FAILED"),
    ("RESUMING", "ROLLED_BACK"),
} | {(a, b) for a in ("PENDING", "PREPARING", "PRECOPY", "DIRTY_ITERATION", "STOP_AND_COPY")
     for b in ("ROLLED_BACK", "FAILED", "CANCELLED")}


def job(**fields: object) -> Job:
    return Job(id="mig-0123456789ab", controller_id="c1", source_node="n1", namespace_bytes=4096,
               policy=Policy(), created_at=100.0, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(Phase, Phase)))
def test_every_phase_change_follows_the_table(src: Phase, dst: Phase) -> None:
    start = job(phase=src)
    if (src.value, dst.value) in EXPECTED:
        moved = start.enter(dst, now=101.0)
        assert moved.phase is dst and moved.phases[-1].phase is dst
    else:
        with pytest.raises(IllegalPhaseChange, match=f"{src} -> {dst}"):
            start.enter(dst, now=101.0)
    assert set(ALLOWED) == set(Phase)


def test_after_commit_only_a_lost_destination_can_send_the_job_back() -> None:
    assert Phase.COMMIT not in BEFORE_COMMIT and Phase.RESUMING not in BEFORE_COMMIT
    assert ALLOWED[Phase.COMMIT] == {Phase.RESUMING}
    assert Phase.CANCELLED not in ALLOWED[Phase.RESUMING]
    assert all(not ALLOWED[t] for t in TERMINAL)


def test_phase_timings_close_when_the_next_phase_starts() -> None:
    j = job().enter(Phase.PREPARING, now=100.0).enter(Phase.PRECOPY, now=100.25)
    j = j.record(100.5, add_bytes=4096, add_rounds=0)
    j = j.enter(Phase.DIRTY_ITERATION, now=101.0)
    prep, pre, dirty = j.phases
    assert prep.duration_ms == pytest.approx(250.0)
    assert pre.duration_ms == pytest.approx(750.0) and pre.bytes == 4096
    assert dirty.duration_ms == 0.0
    assert j.bytes_transferred == 0  # the total comes from the source's count (`progressed`), not the phases


def test_the_total_only_grows_and_counts_replaced_destinations_once() -> None:
    j = job().enter(Phase.PREPARING, 1.0)
    j = j.destination_chosen("n2", 1.1).destination_prepared("10.0.0.2:7000", "t1", 1.2).enter(Phase.PRECOPY, 1.3)
    j = j.progressed(1000, 2.0)
    assert j.progressed(900, 2.1) is j  # an older reading changes nothing
    j = j.progressed(3000, 2.2)
    assert j.bytes_transferred == 3000
    replaced = j.destination_replaced("n2 did not answer", 3.0)
    assert replaced.phase is Phase.PREPARING and replaced.attempt_base_bytes == 3000
    assert (replaced.destination_node, replaced.destination_data_address, replaced.destination_token) == ("", "", "")
    assert replaced.excluded_destinations == ("n2",) and replaced.throttle_percent == 0
    assert "destination n2 lost (n2 did not answer)" in replaced.phases[-1].note
    # The new destination's session counts from zero again: the total goes on from 3000.
    again = replaced.destination_chosen("n3", 3.1).enter(Phase.PRECOPY, 3.2).progressed(500, 3.3)
    assert again.bytes_transferred == 3500
    assert again.destination_node == "n3" and again.excluded_destinations == ("n2",)


def test_a_destination_given_up_in_preparing_is_excluded_once() -> None:
    j = job().enter(Phase.PREPARING, 1.0).destination_chosen("n2", 1.1)
    dropped = j.without_destination(1.2)
    assert dropped.destination_node == "" and dropped.excluded_destinations == ("n2",)
    assert dropped.phase is Phase.PREPARING and dropped.without_destination(1.3).excluded_destinations == ("n2",)


def test_completion_starts_verification_and_its_verdict_is_recorded() -> None:
    resuming = job().enter(Phase.PREPARING, 1.0).enter(Phase.PRECOPY, 1.1).enter(Phase.DIRTY_ITERATION, 1.2) \
        .enter(Phase.STOP_AND_COPY, 1.3).enter(Phase.COMMIT, 1.4).enter(Phase.RESUMING, 1.5)
    done = resuming.switched_over(12.3456, 9.5, 1.6).end(Phase.COMPLETED, 1.6, "")
    assert done.verification is Verification.PENDING and (done.downtime_ms, done.guest_blackout_ms) == (12.346, 9.5)
    assert done.verified("a" * 64, "a" * 64, 2.0).verification is Verification.PASSED
    failed = done.verification_failed("digests differ", "a" * 64, "b" * 64, 2.0)
    assert failed.verification is Verification.FAILED and failed.verification_note == "digests differ"
    assert Job.from_bytes(failed.to_bytes()) == failed
    assert resuming.end(Phase.FAILED, 1.6, "lost").verification is Verification.NONE


def test_a_phase_duration_can_come_from_the_monotonic_clock() -> None:
    j = job().enter(Phase.PREPARING, 100.0).enter(Phase.PRECOPY, 50.0)  # the wall clock stepped back
    assert j.phases[0].duration_ms == 0.0
    assert j.with_phase_duration(0, 250.0).phases[0].duration_ms == 250.0


def test_end_requires_a_terminal_phase_and_keeps_the_reason() -> None:
    with pytest.raises(IllegalPhaseChange):
        job().end(Phase.PRECOPY, now=1.0, reason="x")
    ended = job().enter(Phase.PREPARING, 1.0).end(Phase.FAILED, 2.0, reason="no room")
    assert ended.terminal and ended.reason == "no room" and ended.phases[-1].note == "no room"


@given(
    phases=st.lists(st.sampled_from([Phase.PREPARING, Phase.PRECOPY, Phase.DIRTY_ITERATION]), max_size=5),
    policy=st.builds(Policy, max_downtime_ms=st.integers(1, 10_000), max_rounds=st.integers(1, 100),
                     bandwidth_bytes_per_s=st.integers(0, 10**10), on_no_convergence=st.sampled_from(OnNoConvergence)),
    cancel=st.booleans(), added=st.integers(0, 2**40),
)
def test_records_round_trip_through_json(phases: list[Phase], policy: Policy, cancel: bool, added: int) -> None:
    j = Job(id="mig-0123456789ab", controller_id="c1", source_node="n1", namespace_bytes=4096, policy=policy,
            created_at=1.5, cancel_requested=cancel, excluded_destinations=("n2",))
    now = 2.0
    for p in phases:
        if p in ALLOWED[j.phase]:
            j = j.enter(p, now).record(now, add_bytes=added, add_rounds=1)
            now += 0.5
    assert Job.from_bytes(j.to_bytes()) == j
    # The format on etcd is what earlier versions wrote (dataclasses.asdict), byte for byte: a
    # record written by either version reads the same in the other.
    assert j.to_bytes() == json.dumps(asdict(j), sort_keys=True).encode()


def test_a_full_record_keeps_the_format_earlier_versions_wrote() -> None:
    full = job(trace_context={"traceparent": "00-ab-cd-01"}, excluded_destinations=("n2", "n3"),
               requested_destination="n4").enter(Phase.PREPARING, 1.0).destination_chosen("n5", 1.1) \
        .enter(Phase.PRECOPY, 1.2).record(1.3, add_bytes=4096, add_rounds=1, note="a round") \
        .throttled(20, "dirty rate", 1.4).aged(3.25)
    assert full.to_bytes() == json.dumps(asdict(full), sort_keys=True).encode()
    assert Job.from_bytes(full.to_bytes()) == full


def test_parsed_jobs_parse_a_record_once_and_keep_the_last_listing_only() -> None:
    parsed = ParsedJobs()
    a, b = job().to_bytes(), replace(job(), id="mig-ba9876543210").to_bytes()
    first = parsed.parse([a, b])
    assert [j.id for j in first] == ["mig-0123456789ab", "mig-ba9876543210"]
    again = parsed.parse([a])
    assert again[0] is first[0]  # unchanged record: the same (frozen) Job, not parsed again
    changed = job().enter(Phase.PREPARING, 1.0).to_bytes()
    assert parsed.parse([changed, b])[1] is not first[1]  # b left the last listing: parsed afresh
    with pytest.raises(ValueError):
        Job.from_bytes(changed.replace(b'"PREPARING"', b'"NO_SUCH_PHASE"'))


def test_a_loaded_job_is_as_old_as_its_monotonic_age_plus_a_bounded_wall_gap() -> None:
    # The record says 40 s of driven age, last written at wall time 1000.
    saved = job(updated_at=1000.0).aged(40.0)
    loaded = Job.from_bytes(saved.to_bytes())
    assert loaded.age_at_load(1005.0) == pytest.approx(45.0)  # 5 s unwatched, believed
    # The wall clock stepped forward 2 hours: the gap counts at most MAX_UNWATCHED_GAP_S.
    assert loaded.age_at_load(1000.0 + 7200.0) == pytest.approx(40.0 + MAX_UNWATCHED_GAP_S)
    # Stepped back: the job does not get younger than what was measured.
    assert loaded.age_at_load(1000.0 - 7200.0) == pytest.approx(40.0)


def test_a_record_from_before_ages_were_kept_falls_back_to_its_creation_time() -> None:
    old = job(updated_at=150.0)  # age_s left at -1, as an older orchestrator wrote it
    assert old.age_at_load(110.0) == pytest.approx(10.0)
    assert old.age_at_load(100.0 + 86400.0) == pytest.approx(MAX_UNWATCHED_GAP_S)


def test_failure_reasons_become_a_bounded_set_of_causes() -> None:
    from orchestrator.metrics import failure_cause
    assert failure_cause("cancelled by operator") == "cancelled"
    assert failure_cause("StartPrecopy: agent n1 did not answer for 5 s; source n1 lost: controller c1 marked lost") \
        == "source_lost"
    assert failure_cause("x; source n1 is alive (its lease is kept) but too busy to answer: it keeps the controller") \
        == "source_busy"
    assert failure_cause("node 'n2': no space left on device writing /d/c1.state") == "no_space"
    assert failure_cause("job deadline of 60 s passed before COMMIT") == "deadline"
    assert failure_cause("something new") == "other"


def test_the_remaining_bytes_a_step_measured_are_kept_and_never_negative() -> None:
    assert job().remaining_bytes == -1  # not measured yet
    assert job().remaining(4096, 1.0).remaining_bytes == 4096
    assert job().remaining(-5, 1.0).remaining_bytes == 0


@given(rounds=st.integers(0, 100), note=st.text(max_size=20), epoch=st.integers(0, 2**40))
def test_a_job_changes_as_dataclasses_replace_would_change_it(rounds: int, note: str, epoch: int) -> None:
    base = job(trace_context={"traceparent": "x"}).enter(Phase.PREPARING, 1.0)
    changes = {"rounds": rounds, "reason": note, "epoch": epoch}
    changed = _changed(base, **changes)
    assert changed == replace(base, **changes)  # type: ignore[arg-type]
    assert base.rounds == 0 and base.epoch == 0  # the original is left as it was
    with pytest.raises(TypeError, match="no_such_field"):
        _changed(base, no_such_field=1)

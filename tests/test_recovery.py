"""The recovery decision: every phase against every kind of failure, from a table written out here
independently of orchestrator.recovery, and the facts that change a decision after COMMIT."""

from __future__ import annotations

import pytest

from orchestrator.jobs import Job, Phase, Policy
from orchestrator.recovery import MAX_DESTINATION_ATTEMPTS, Action, Failure, FailureKind, decide

K = FailureKind
RB, FSL, REP = Action.ROLL_BACK, Action.FAIL_SOURCE_LOST, Action.REPLACE_DESTINATION
RETRY, MOVE, DONE = Action.RETRY, Action.MOVE_BACK, Action.COMPLETE_CLAIMED

# (phase, failure kind) -> (action, ending) for a job whose destination the scheduler chose and
# that has attempts left. Before COMMIT the source owns the controller; after it, the destination.
TABLE: dict[tuple[Phase, FailureKind], tuple[Action, Phase | None]] = {}
for phase in (Phase.PENDING, Phase.PREPARING, Phase.PRECOPY, Phase.DIRTY_ITERATION, Phase.STOP_AND_COPY):
    replaceable = phase in (Phase.PREPARING, Phase.PRECOPY, Phase.DIRTY_ITERATION)
    TABLE[phase, K.CANCELLED] = (RB, Phase.CANCELLED)
    TABLE[phase, K.SOURCE_LOST] = (FSL, Phase.FAILED)
    TABLE[phase, K.DESTINATION_LOST] = (REP, None) if replaceable else (RB, Phase.ROLLED_BACK)
    TABLE[phase, K.DESTINATION_UNFIT] = (REP, None) if replaceable else (RB, Phase.ROLLED_BACK)
    TABLE[phase, K.STEP_FAILED] = (RB, Phase.ROLLED_BACK)
for phase in (Phase.COMMIT, Phase.RESUMING):
    TABLE[phase, K.CANCELLED] = (RETRY, None)  # the API refuses a cancel after COMMIT
    TABLE[phase, K.SOURCE_LOST] = (RETRY, None)  # the source matters only if ownership comes back
    TABLE[phase, K.DESTINATION_LOST] = (RETRY, None)  # silent, not declared lost: try again
    TABLE[phase, K.DESTINATION_UNFIT] = (MOVE, Phase.ROLLED_BACK)
    TABLE[phase, K.STEP_FAILED] = (MOVE, Phase.ROLLED_BACK)  # it answered that it cannot resume


def job(phase: Phase, **fields: object) -> Job:
    defaults: dict[str, object] = {"destination_node": "n2"}
    return Job(id="mig-0123456789ab", controller_id="c1", source_node="n1", namespace_bytes=4096,
               policy=Policy(), created_at=1.0, phase=phase, **{**defaults, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(("phase", "kind"), sorted(TABLE, key=str))
def test_each_phase_and_failure_has_its_recovery(phase: Phase, kind: FailureKind) -> None:
    decided = decide(job(phase), Failure(kind, "what went wrong"))
    assert (decided.action, decided.ending) == TABLE[phase, kind]
    if decided.action is not Action.REPLACE_DESTINATION:
        assert "what went wrong" in decided.reason or kind is K.CANCELLED


def test_the_table_covers_every_live_phase_and_kind() -> None:
    live = [p for p in Phase if p not in (Phase.COMPLETED, Phase.ROLLED_BACK, Phase.FAILED, Phase.CANCELLED)]
    assert set(TABLE) == {(p, k) for p in live for k in FailureKind}


@pytest.mark.parametrize("phase", [Phase.PREPARING, Phase.PRECOPY, Phase.DIRTY_ITERATION])
def test_a_destination_the_operator_named_is_not_replaced(phase: Phase) -> None:
    decided = decide(job(phase, requested_destination="n2"), Failure(K.DESTINATION_LOST, "n2 gone"))
    assert (decided.action, decided.ending) == (RB, Phase.ROLLED_BACK)


def test_replacement_stops_after_the_last_attempt() -> None:
    tried = tuple(f"n{i}" for i in range(3, 3 + MAX_DESTINATION_ATTEMPTS - 2))
    assert decide(job(Phase.PRECOPY, excluded_destinations=tried), Failure(K.DESTINATION_LOST, "x")).action is REP
    spent = (*tried, "n9")
    decided = decide(job(Phase.PRECOPY, excluded_destinations=spent), Failure(K.DESTINATION_LOST, "x"))
    assert (decided.action, decided.ending) == (RB, Phase.ROLLED_BACK)


def test_source_lost_names_the_controller_marked_lost() -> None:
    decided = decide(job(Phase.DIRTY_ITERATION), Failure(K.SOURCE_LOST, "n1 silent for 5 s"))
    assert decided.reason.startswith("n1 silent for 5 s") and "controller c1 marked lost" in decided.reason


@pytest.mark.parametrize("phase", [Phase.COMMIT, Phase.RESUMING])
def test_after_commit_a_declared_lost_destination_hands_ownership_back(phase: Phase) -> None:
    decided = decide(job(phase), Failure(K.DESTINATION_LOST, "lease expired", destination_declared_lost=True))
    assert (decided.action, decided.ending) == (MOVE, Phase.ROLLED_BACK)
    assert "ownership went back to n1" in decided.reason


@pytest.mark.parametrize("kind", list(FailureKind))
def test_after_the_claim_the_switchover_happened_and_the_job_completes(kind: FailureKind) -> None:
    # The destination lists the controller durably, claims it, then runs it: once claimed, a
    # silent destination is a node problem after a migration that happened, not a failed one.
    decided = decide(job(Phase.RESUMING), Failure(kind, "x", destination_declared_lost=True,
                                                   destination_claimed=True))
    assert decided.action is DONE and decided.ending is Phase.COMPLETED
    assert "claimed controller c1" in decided.reason and "verification will check it" in decided.reason


def test_a_source_that_does_not_resume_after_the_move_back_fails_the_job() -> None:
    decided = decide(job(Phase.RESUMING), Failure(K.SOURCE_LOST, "n1 silent", moved_back=True))
    assert (decided.action, decided.ending) == (FSL, Phase.FAILED)
    assert "ownership went back to n1" in decided.reason and "marked lost" in decided.reason


@pytest.mark.parametrize("phase", [Phase.PRECOPY, Phase.DIRTY_ITERATION])
def test_a_destination_whose_disk_fills_during_the_copy_is_replaced(phase: Phase) -> None:
    decided = decide(job(phase), Failure(K.DESTINATION_UNFIT, "node 'n2': no space left on device writing x"))
    assert (decided.action, decided.ending) == (REP, None)


def test_a_destination_whose_disk_fills_at_stop_and_copy_rolls_back_to_the_source() -> None:
    decided = decide(job(Phase.STOP_AND_COPY), Failure(K.DESTINATION_UNFIT, "node 'n2': no space left on device"))
    assert (decided.action, decided.ending) == (RB, Phase.ROLLED_BACK)


def test_a_destination_with_no_space_to_resume_hands_ownership_back_before_it_claims() -> None:
    decided = decide(job(Phase.RESUMING), Failure(K.DESTINATION_UNFIT, "node 'n2': no space left on device writing "
                                                                       "/d/c1.json.tmp"))
    assert (decided.action, decided.ending) == (MOVE, Phase.ROLLED_BACK)
    assert decided.reason.startswith("destination n2 cannot take the controller after COMMIT (node 'n2': no space")
    assert "ownership went back to n1" in decided.reason
    # had its claim landed after all, the move back fails: it runs there, the job completes
    claimed = decide(job(Phase.RESUMING), Failure(K.DESTINATION_UNFIT, "no space", destination_claimed=True))
    assert claimed.action is DONE


@pytest.mark.parametrize("kind", [K.STEP_FAILED, K.DESTINATION_LOST, K.DESTINATION_UNFIT])
def test_a_switchover_the_destination_did_not_commit_rolls_back_without_etcd(kind: FailureKind) -> None:
    # The source reported that the destination refused (or never got the state) and resumed the
    # guest already: no commit can land, so the rollback needs no word from etcd.
    decided = decide(job(Phase.STOP_AND_COPY), Failure(kind, "switchover refused by etcd", commit_never_sent=True))
    assert (decided.action, decided.ending, decided.commit_never_sent) == (RB, Phase.ROLLED_BACK, True)


@pytest.mark.parametrize("kind", [K.STEP_FAILED, K.DESTINATION_LOST, K.DESTINATION_UNFIT])
def test_a_switchover_settled_in_etcd_as_not_landed_rolls_back_through_etcd(kind: FailureKind) -> None:
    # Its outcome was unknown; the runner fenced the job's revision first, then found it still in
    # STOP_AND_COPY: the stopped source resumes once etcd says it still owns the controller.
    decided = decide(job(Phase.STOP_AND_COPY), Failure(kind, "commit outcome unknown; fenced"))
    assert (decided.action, decided.ending, decided.commit_never_sent) == (RB, Phase.ROLLED_BACK, False)


def test_a_switchover_settled_in_etcd_as_landed_is_finished_on_the_destination() -> None:
    # The fence lost to the destination's commit: the job is RESUMING in etcd, claimed there; a
    # destination that then stays silent has switched over all the same.
    assert decide(job(Phase.RESUMING), Failure(K.DESTINATION_LOST, "silent")).action is RETRY
    claimed = decide(job(Phase.RESUMING), Failure(K.DESTINATION_LOST, "silent", destination_claimed=True))
    assert (claimed.action, claimed.ending) == (DONE, Phase.COMPLETED)

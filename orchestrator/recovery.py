"""What to do when a job's step fails. Pure: the job and the failure in, a recovery out.

The runner finds out what failed (which agent was lost, whether the destination was declared
lost or had claimed the controller) and carries out the recovery this module chooses; a recovery
step that fails in turn (the source does not answer its abort) is decided again with that new
failure. The table, by phase:

- before COMMIT the source still owns the controller: cancel and ordinary failures roll back to
  it; a lost or unfit destination is replaced by another one (precopy starts over) while the
  operator did not name it and attempts remain; a lost source ends the job FAILED with the
  controller marked LOST there, never resumed elsewhere without an operator;
- a switchover whose outcome the runner did not learn is settled in etcd first (the runner fences
  the job's record, then reads whether the destination's commit landed): these decisions see the
  job as etcd has it afterwards;
- after COMMIT only the destination may run the controller: resuming it is retried while the
  destination is merely silent. The destination's own commit claims RUNNING in the same
  transaction, so once committed the switchover has happened; only a commit of the
  orchestrator-driven protocol of earlier versions (a rolling upgrade may find one) leaves the
  controller COMMITTED, unclaimed: then a destination declared lost, or that answers it cannot
  resume (unfit: its disk is full; or any other refusal), hands ownership back to the
  still-frozen source (MOVE_BACK). Once it had claimed, the switchover has happened (it lists
  the controller durably before it claims, and runs it right after): the job completes, with
  the destination's silence in its reason, and verification follows (a destination that stays
  gone fails verification, which keeps the source copy for an operator).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from orchestrator.jobs import BEFORE_COMMIT, Job, Phase

MAX_DESTINATION_ATTEMPTS = 3
# Phases in which a lost destination can be replaced (nothing of the switchover has happened).
REPLACEABLE_DESTINATION = frozenset({Phase.PREPARING, Phase.PRECOPY, Phase.DIRTY_ITERATION})


class FailureKind(StrEnum):
    CANCELLED = "CANCELLED"  # the operator asked
    SOURCE_LOST = "SOURCE_LOST"  # the source is gone, or did not take the controller back
    DESTINATION_LOST = "DESTINATION_LOST"  # not registered, silent past the budget, or forgot the job
    # Answered, but cannot take this controller: no room (its disk full, before or after
    # COMMIT), an unknown state format.
    DESTINATION_UNFIT = "DESTINATION_UNFIT"
    STEP_FAILED = "STEP_FAILED"  # anything else: corrupt data, no convergence, deadline, a refusal


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    reason: str
    # After COMMIT: the destination's lease expired (or it answered that it cannot resume).
    destination_declared_lost: bool = False
    # After COMMIT: the destination claimed RUNNING in etcd, so ownership can no longer go back.
    destination_claimed: bool = False
    # After a MOVE_BACK: etcd gives the controller to the source again.
    moved_back: bool = False
    # In STOP_AND_COPY: the source reported that the destination did not commit and never will
    # (it refused, or never got the state) and resumed the guest already: the rollback needs no
    # word from etcd (etcd may be what failed).
    commit_never_sent: bool = False


class Action(StrEnum):
    REPLACE_DESTINATION = "REPLACE_DESTINATION"  # source back to RUNNING, another destination, precopy again
    ROLL_BACK = "ROLL_BACK"  # destination discards, source runs the controller again
    FAIL_SOURCE_LOST = "FAIL_SOURCE_LOST"  # FAILED; the controller marked LOST on the source
    RETRY = "RETRY"  # after COMMIT: try the destination's resume again
    MOVE_BACK = "MOVE_BACK"  # after COMMIT, before the claim: ownership back to the source, which resumes
    COMPLETE_CLAIMED = "COMPLETE_CLAIMED"  # COMPLETED: the destination claimed the controller, then went silent


@dataclass(frozen=True)
class Recovery:
    action: Action
    ending: Phase | None  # the terminal phase it ends the job with (None: the job goes on)
    reason: str
    commit_never_sent: bool = False  # ROLL_BACK in STOP_AND_COPY: the source may resume without etcd


def destination_replaceable(job: Job, *, max_attempts: int = MAX_DESTINATION_ATTEMPTS) -> bool:
    """Could a lost destination be replaced now? (Worth asking the destination whether it is lost.)"""
    return (job.phase in REPLACEABLE_DESTINATION and not job.requested_destination
            and len(job.excluded_destinations) + 1 < max_attempts)


def decide(job: Job, failure: Failure, *, max_attempts: int = MAX_DESTINATION_ATTEMPTS) -> Recovery:
    reason = failure.reason
    if job.phase in BEFORE_COMMIT:
        return _before_commit(job, failure, max_attempts)
    if failure.kind is FailureKind.SOURCE_LOST and failure.moved_back:
        return Recovery(Action.FAIL_SOURCE_LOST, Phase.FAILED,
                        f"{reason}; ownership went back to {job.source_node}, which did not resume it: "
                        f"controller {job.controller_id} marked lost")
    if failure.destination_claimed:
        return Recovery(Action.COMPLETE_CLAIMED, Phase.COMPLETED,
                        f"destination {job.destination_node} claimed controller {job.controller_id} and runs it, "
                        f"but did not confirm the resume ({reason}); verification will check it")
    silent = failure.kind is FailureKind.DESTINATION_LOST and not failure.destination_declared_lost
    if silent or failure.kind in (FailureKind.CANCELLED, FailureKind.SOURCE_LOST):
        # Only the destination may run it now; a cancel cannot be asked after COMMIT, and the
        # source matters again only if ownership comes back to it.
        return Recovery(Action.RETRY, None, f"destination {job.destination_node} not answering after COMMIT, "
                                            f"retrying: {reason}")
    # Declared lost, or it answered that it cannot resume: it refuses before it claims, so
    # the controller never ran there and the still-frozen source can take it back.
    unfit = "cannot take the controller" if failure.kind is FailureKind.DESTINATION_UNFIT else "cannot resume"
    return Recovery(Action.MOVE_BACK, Phase.ROLLED_BACK,
                    f"destination {job.destination_node} {unfit} after COMMIT ({reason}); it never ran the "
                    f"controller, so ownership went back to {job.source_node}, which runs it again")


def _before_commit(job: Job, failure: Failure, max_attempts: int) -> Recovery:
    kind, reason = failure.kind, failure.reason
    if kind is FailureKind.CANCELLED:
        return Recovery(Action.ROLL_BACK, Phase.CANCELLED, reason or "cancelled by operator")
    if kind is FailureKind.SOURCE_LOST:
        return Recovery(Action.FAIL_SOURCE_LOST, Phase.FAILED,
                        f"{reason}; source {job.source_node} lost: controller {job.controller_id} marked lost")
    if kind in (FailureKind.DESTINATION_LOST, FailureKind.DESTINATION_UNFIT) \
            and destination_replaceable(job, max_attempts=max_attempts):
        return Recovery(Action.REPLACE_DESTINATION, None, reason)
    return Recovery(Action.ROLL_BACK, Phase.ROLLED_BACK, reason, commit_never_sent=failure.commit_never_sent)

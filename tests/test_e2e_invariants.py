"""The invariant checker's own logic (e2e/invariants.py), on made-up observations: a checker
that cannot see a violation would make every green e2e cell meaningless."""

from __future__ import annotations

from pathlib import Path

from e2e.invariants import (
    NodeView,
    Round,
    hidden_double_runs,
    history_problems,
    leadership_terms,
    overlaps,
    placement_problems,
    runner_segments,
)

RUN, STOP, GONE, DEAD = NodeView("RUNNING", 10), NodeView("STOP"), NodeView("ABSENT"), NodeView(error="UNAVAILABLE")


def rounds(*states: dict[str, NodeView]) -> list[Round]:
    return [Round(at=float(i), nodes=s) for i, s in enumerate(states)]


def test_a_handover_between_two_answers_is_not_a_double_run_but_a_lasting_one_is() -> None:
    handover = rounds({"n1": RUN, "n2": STOP}, {"n1": RUN, "n2": RUN}, {"n1": GONE, "n2": RUN})
    assert overlaps(handover) == []
    lasting = rounds({"n1": RUN, "n2": RUN}, {"n1": NodeView("PRE_COPY", 11), "n2": RUN})
    (found,) = overlaps(lasting)
    assert "['n1', 'n2']" in found


def test_writes_taken_by_an_unreachable_node_while_another_ran_are_found() -> None:
    seen = rounds({"n1": NodeView("RUNNING", 10), "n2": STOP},
                  {"n1": DEAD, "n2": RUN}, {"n1": DEAD, "n2": RUN},
                  {"n1": NodeView("RUNNING", 40), "n2": RUN})
    (found,) = hidden_double_runs(seen)
    assert "n1" in found and "30 writes" in found and "['n2']" in found
    # frozen (SIGSTOP): its guest took no writes while it could not be asked
    frozen = rounds({"n1": NodeView("RUNNING", 10), "n2": STOP},
                    {"n1": DEAD, "n2": RUN}, {"n1": DEAD, "n2": RUN},
                    {"n1": NodeView("RUNNING", 10), "n2": RUN})
    assert hidden_double_runs(frozen) == []


def test_placement_must_match_the_owner_unless_the_owner_died() -> None:
    assert placement_problems(["n2"], "n2", set(), "end") == []
    assert placement_problems([], "n1", {"n1"}, "end") == []
    assert "2 nodes" in placement_problems(["n1", "n2"], "n2", set(), "end")[0]
    assert "etcd says n1" in placement_problems(["n2"], "n1", set(), "end")[0]
    assert "did not die" in placement_problems([], "n1", {"n3"}, "end")[0]


def test_one_driver_history_checks_epochs_phase_changes_and_who_announced_them() -> None:
    owners = {2: {"orch-1"}, 9: {"orch-2"}}
    forward = ("PENDING", "PREPARING", "PRECOPY", "DIRTY_ITERATION", "STOP_AND_COPY", "COMMIT", "RESUMING",
               "COMPLETED")

    def upto(n: int) -> tuple[str, ...]:
        return forward[:n]

    good = [(10, 2, upto(1)), (11, 2, upto(2)), (12, 2, upto(3)), (20, 9, upto(3)), (21, 9, upto(4))]
    assert history_problems(good, owners) == []
    back = [*good, (22, 2, upto(4))]
    assert any("epoch went back 9 -> 2" in p for p in history_problems(back, owners))
    illegal = [*good, (22, 9, (*upto(4), "PRECOPY")), (23, 9, (*upto(4), "PRECOPY", "COMPLETED"))]
    assert any("DIRTY_ITERATION -> PRECOPY" in p for p in history_problems(illegal, owners))
    assert any("PRECOPY -> COMPLETED" in p for p in history_problems(illegal, owners))
    # the destination's commit enters COMMIT and RESUMING in one write: each step is checked
    committed = [*good, (22, 9, upto(5)), (23, 9, upto(7)), (24, 9, upto(8))]
    assert history_problems(committed, owners) == []
    skipped = [*good, (22, 9, upto(5)), (23, 9, (*upto(5), "RESUMING"))]
    assert any("STOP_AND_COPY -> RESUMING" in p for p in history_problems(skipped, owners))
    assert any("claimed by" in p for p in history_problems(good, {2: {"orch-1", "orch-2"}, 9: {"orch-2"}}))
    assert any("announced by no" in p for p in history_problems(good, {2: {"orch-1"}}))


def test_leadership_and_runner_hand_overs_are_read_from_orchestrator_logs(tmp_path: Path) -> None:
    one, two = tmp_path / "orch-1.log", tmp_path / "orch-2.log"
    one.write_text(
        "orchestrator orch-1 serving on 10.77.0.1:5000\n"
        "2026-01-01 10:00:00,000 INFO orchestrator[orch-1] orchestrator orch-1 leads with epoch 2\n"
        "2026-01-01 10:00:01,000 INFO orchestrator[orch-1] orchestrator.observer [job=mig-1] "
        "job mig-1: PENDING -> PREPARING after 3 ms\n"
        "2026-01-01 10:00:02,000 INFO orchestrator[orch-1] orchestrator.observer [job=mig-1] "
        "job mig-1: PREPARING -> PRECOPY after 9 ms\n"
        "2026-01-01 10:00:03,000 ERROR orchestrator[orch-1] orchestrator orch-1 lost the leader lease; stopping\n")
    two.write_text(
        "2026-01-01 10:00:04,000 INFO orchestrator[orch-2] orchestrator orch-2 leads with epoch 7\n"
        "2026-01-01 10:00:05,000 INFO orchestrator[orch-2] orchestrator.observer [job=mig-1] "
        "job mig-1: PRECOPY -> DIRTY_ITERATION after 4000 ms\n"
        "2026-01-01 10:00:05,500 INFO orchestrator[orch-2] orchestrator.observer [job=mig-2] "
        "job mig-2: PENDING -> PREPARING after 1 ms\n")
    terms = leadership_terms({"orch-1": one, "orch-2": two})
    assert [(who, epoch) for who, epoch, _, _ in terms] == [("orch-1", 2), ("orch-2", 7)]
    assert terms[0][3] is not None and terms[0][3] - terms[0][2] == 3.0  # led for 3 s, then lost the lease
    assert terms[1][3] is None  # still leading
    assert runner_segments({"orch-1": one, "orch-2": two}, "mig-1") == [("orch-1", 2), ("orch-2", 1)]

"""Evacuation planning (orchestrator/evacuation.py): limits, priority, round-robin fairness,
retries, failover, all as pure decisions over records."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.records import ControllerRecord, NodeRecord
from orchestrator.evacuation import (
    GAVE_UP,
    MOVED,
    Decision,
    Evacuation,
    EvacuationState,
    Limits,
    Reason,
    new_evacuation,
    step,
)
from orchestrator.jobs import Job, Phase, PhaseEntry, Policy

GiB = 1 << 30
DEFAULT_LIMITS = Limits()


def node(name: str, free: int = 100 * GiB, fmt: int = 1) -> NodeRecord:
    return NodeRecord(name=name, address="a", data_address="d", capacity_bytes=100 * GiB,
                      allocated_bytes=100 * GiB - free, state_format_version=fmt, backend="emulated")


def ctrls(node_name: str, count: int, prefix: str | None = None) -> list[ControllerRecord]:
    return [ControllerRecord(f"{prefix or node_name}-c{i}", node_name, GiB) for i in range(count)]


def job(job_id: str, controller: str, source: str, dest: str, phase: Phase = Phase.PRECOPY, reason: str = "") -> Job:
    return Job(id=job_id, controller_id=controller, source_node=source, namespace_bytes=GiB, policy=Policy(),
               created_at=0.0, destination_node=dest, phase=phase, reason=reason,
               phases=(PhaseEntry(phase, 0.0),))


def ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"mig-{next(counter)}"


def plan(evs: Sequence[Evacuation], nodes: Sequence[NodeRecord], controllers: Sequence[ControllerRecord],
         jobs: Sequence[Job] = (), limits: Limits = DEFAULT_LIMITS, cordoned: Sequence[str] = (),
         now: float = 10.0) -> Decision:
    return step(evs, nodes=nodes, controllers={c.controller_id: c for c in controllers},
                jobs={j.id: j for j in jobs}, cordoned=cordoned, limits=limits, now=now, new_job_id=ids())


def test_outbound_limit_holds_and_destinations_spread_within_inbound_limit() -> None:
    cs = ctrls("n1", 6)
    ev = new_evacuation("n1", Reason.MANUAL, cs, 1.0)
    d = plan([ev], [node("n1"), node("n2"), node("n3")], cs, cordoned=["n1"])
    assert len(d.starts) == 2  # outbound limit 2
    assert all(s.destination in ("n2", "n3") for s in d.starts)
    assert len({s.destination for s in d.starts}) == 2  # the first one took room on n2 (or n3)
    assert {w.why for w in d.waiting} == {"outbound limit 2 reached on n1"}
    assert d.evacuations[0].state is EvacuationState.RUNNING
    assert [a.job_id for m in d.evacuations[0].moves for a in m.attempts] == [s.job_id for s in d.starts]


def test_inbound_limit_holds_across_two_evacuations() -> None:
    cs = ctrls("n1", 3) + ctrls("n2", 3)
    evs = [new_evacuation("n1", Reason.MANUAL, cs, 1.0), new_evacuation("n2", Reason.MANUAL, cs, 2.0)]
    d = plan(evs, [node("n1"), node("n2"), node("n3")], cs, limits=Limits(cluster=10, outbound_per_node=5,
                                                                           inbound_per_node=2))
    assert [s.destination for s in d.starts] == ["n3", "n3"]
    assert any("inbound limit 2 reached" in w.why for w in d.waiting)
    # never onto the other draining node
    assert any("n1: being evacuated" in w.why or "n2: being evacuated" in w.why for w in d.waiting)


def test_round_robin_one_draining_node_does_not_starve_another() -> None:
    cs = ctrls("n1", 4) + ctrls("n2", 4)
    evs = [new_evacuation("n1", Reason.MANUAL, cs, 1.0), new_evacuation("n2", Reason.MANUAL, cs, 2.0)]
    nodes = [node(n) for n in ("n1", "n2", "n3", "n4", "n5")]
    d = plan(evs, nodes, cs, limits=Limits(cluster=2, outbound_per_node=5, inbound_per_node=5))
    assert sorted(s.node for s in d.starts) == ["n1", "n2"]
    # next tick with one free slot: the evacuation that started longest ago goes first (n1 started
    # before n2 within the tick), then the other takes its turn
    first = [job(s.job_id, s.controller_id, s.node, s.destination) for s in d.starts if s.node == "n1"]
    finished = [job(first[0].id, first[0].controller_id, "n1", first[0].destination_node, Phase.COMPLETED)]
    moved = {c.controller_id: c for c in cs}
    moved[first[0].controller_id] = ControllerRecord(first[0].controller_id, first[0].destination_node, GiB)
    others = [job(s.job_id, s.controller_id, s.node, s.destination) for s in d.starts if s.node == "n2"]
    d2 = plan(d.evacuations, nodes, list(moved.values()), jobs=finished + others,
              limits=Limits(cluster=2, outbound_per_node=5, inbound_per_node=5), now=11.0)
    assert [s.node for s in d2.starts] == ["n1"]


def test_priority_predicted_failure_before_manual_before_rebalance() -> None:
    cs = ctrls("n1", 2) + ctrls("n2", 2) + ctrls("n3", 2)
    evs = [new_evacuation("n1", Reason.REBALANCE, cs, 1.0), new_evacuation("n2", Reason.MANUAL, cs, 2.0),
           new_evacuation("n3", Reason.PREDICTED_FAILURE, cs, 3.0)]
    nodes = [node(n) for n in ("n1", "n2", "n3", "n4", "n5", "n6")]
    d = plan(evs, nodes, cs, limits=Limits(cluster=3, outbound_per_node=2, inbound_per_node=5))
    assert [s.node for s in d.starts] == ["n3", "n3", "n2"]
    assert any(w.node == "n1" and "cluster limit" in w.why for w in d.waiting)


def test_cluster_limit_counts_every_active_job() -> None:
    cs = ctrls("n1", 3)
    ev = new_evacuation("n1", Reason.MANUAL, cs, 1.0)
    busy = [job(f"other-{i}", f"x{i}", "n4", "n5") for i in range(5)]
    d = plan([ev], [node(n) for n in ("n1", "n2", "n3", "n4", "n5")], cs, jobs=busy)
    assert d.starts == ()
    assert all("cluster limit of 5" in w.why for w in d.waiting)


def test_never_onto_an_incompatible_or_cordoned_node_and_says_why() -> None:
    cs = ctrls("n1", 1)
    ev = new_evacuation("n1", Reason.MANUAL, cs, 1.0)
    d = plan([ev], [node("n1"), node("n2", fmt=2), node("n3")], cs, cordoned=["n1", "n3"])
    assert d.starts == ()
    (wait,) = d.waiting
    assert "n2: state format 2, source needs 1" in wait.why and "n3: cordoned" in wait.why


def test_failover_a_recorded_job_without_a_job_record_is_created_under_the_same_id() -> None:
    cs = ctrls("n1", 1)
    ev = new_evacuation("n1", Reason.MANUAL, cs, 1.0).started("n1-c0", "mig-recorded", "n2", 2.0)
    d = plan([ev], [node("n1"), node("n2")], cs)
    (start,) = d.starts
    assert start.create_only and start.job_id == "mig-recorded" and start.destination == "n2"
    # and once the job exists (active), nothing more is started for that controller
    d2 = plan(d.evacuations, [node("n1"), node("n2")], cs, jobs=[job("mig-recorded", "n1-c0", "n1", "n2")])
    assert d2.starts == ()


def test_an_unrecorded_active_job_is_adopted_not_doubled() -> None:
    cs = ctrls("n1", 2)
    ev = new_evacuation("n1", Reason.MANUAL, cs, 1.0)
    d = plan([ev], [node("n1"), node("n2")], cs, jobs=[job("mig-x", "n1-c0", "n1", "n2")])
    assert [s.controller_id for s in d.starts] == ["n1-c1"]
    assert d.evacuations[0].move("n1-c0").attempts[0].job_id == "mig-x"  # type: ignore[union-attr]


def test_failed_migrations_are_retried_then_the_evacuation_fails_naming_the_controller() -> None:
    cs = ctrls("n1", 1)
    nodes = [node("n1"), node("n2")]
    evs: Sequence[Evacuation] = [new_evacuation("n1", Reason.MANUAL, cs, 1.0, max_attempts=2)]
    jobs: list[Job] = []
    for attempt in range(2):
        d = plan(evs, nodes, cs, jobs=jobs, now=10.0 + attempt)
        (start,) = d.starts
        jobs.append(job(start.job_id, "n1-c0", "n1", "n2", Phase.ROLLED_BACK, "destination lost"))
        evs = d.evacuations
    d = plan(evs, nodes, cs, jobs=jobs, now=20.0)
    (ev,) = d.evacuations
    assert d.starts == ()
    assert ev.state is EvacuationState.FAILED and ev.finished_at == 20.0
    assert "n1-c0" in ev.failure and "2 migrations failed" in ev.failure and "destination lost" in ev.failure
    assert ev.move("n1-c0").result == GAVE_UP  # type: ignore[union-attr]


def test_done_when_every_controller_left_and_the_record_round_trips() -> None:
    cs = ctrls("n1", 2)
    ev = new_evacuation("n1", Reason.PREDICTED_FAILURE, cs, 1.0, note="disk SMART warning")
    d = plan([ev], [node("n1"), node("n2")], cs)
    moved = [ControllerRecord(c.controller_id, "n2", GiB) for c in cs]
    done = [job(s.job_id, s.controller_id, "n1", "n2", Phase.COMPLETED) for s in d.starts]
    d2 = plan(d.evacuations, [node("n1"), node("n2")], moved, jobs=done, now=30.0)
    (ev2,) = d2.evacuations
    assert ev2.state is EvacuationState.DONE and ev2.finished_at == 30.0
    assert all(m.result == MOVED for m in ev2.moves)
    assert ev2.counts() == {"moved": 2, "in_flight": 0, "failed": 0, "waiting": 0, "total": 2}
    assert Evacuation.from_bytes(ev2.to_bytes()) == ev2


def test_a_controller_moved_only_once_its_job_ended_not_at_commit() -> None:
    cs = ctrls("n1", 1)
    nodes = [node("n1"), node("n2")]
    d = plan([new_evacuation("n1", Reason.MANUAL, cs, 1.0)], nodes, cs)
    (start,) = d.starts
    on_n2 = [ControllerRecord("n1-c0", "n2", GiB)]  # etcd says so from COMMIT on
    resuming = plan(d.evacuations, nodes, on_n2, jobs=[job(start.job_id, "n1-c0", "n1", "n2", Phase.RESUMING)])
    (ev,) = resuming.evacuations
    assert ev.state is EvacuationState.RUNNING and ev.move("n1-c0").result == ""  # type: ignore[union-attr]
    assert ev.counts()["in_flight"] == 1
    done = plan(resuming.evacuations, nodes, on_n2, jobs=[job(start.job_id, "n1-c0", "n1", "n2", Phase.COMPLETED)])
    (ev,) = done.evacuations
    assert ev.state is EvacuationState.DONE and ev.move("n1-c0").result == MOVED  # type: ignore[union-attr]


# ---- properties: any fleet, any evacuations, any jobs in flight --------------------------------

NAMES = ("n1", "n2", "n3", "n4", "n5")


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[Evacuation], list[NodeRecord], list[ControllerRecord], list[Job],
                                     Limits, set[str]]:
    nodes = [node(n, free=draw(st.sampled_from((0, 2 * GiB, 50 * GiB))), fmt=draw(st.sampled_from((1, 1, 2))))
             for n in NAMES]
    controllers = [c for n in NAMES for c in ctrls(n, draw(st.integers(0, 4)))]
    draining = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3))
    evs = [new_evacuation(n, draw(st.sampled_from(list(Reason))), controllers, float(i))
           for i, n in enumerate(draining)]
    jobs = []
    for i, c in enumerate(controllers):
        if draw(st.booleans()) and draw(st.booleans()):
            jobs.append(job(f"j{i}", c.controller_id, c.node, draw(st.sampled_from(NAMES))))
    limits = Limits(draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    cordoned = set(draining) | set(draw(st.lists(st.sampled_from(NAMES), max_size=2)))
    return evs, nodes, controllers, jobs, limits, cordoned


@settings(max_examples=300, deadline=None)
@given(fleets())
def test_starts_never_break_a_limit_nor_land_where_they_must_not(case: tuple) -> None:  # type: ignore[type-arg]
    evs, nodes, controllers, jobs, limits, cordoned = case
    d = plan(evs, nodes, controllers, jobs=jobs, limits=limits, cordoned=sorted(cordoned))
    active = [j for j in jobs if not j.terminal]
    total = len(active) + len(d.starts)
    # limits may already be exceeded by jobs started elsewhere; the plan never adds beyond them
    assert not d.starts or total <= limits.cluster
    out = Counter(j.source_node for j in active) + Counter(s.node for s in d.starts)
    inn = Counter(j.destination_node for j in active) + Counter(s.destination for s in d.starts)
    for s in d.starts:
        assert out[s.node] <= limits.outbound_per_node
        assert inn[s.destination] <= limits.inbound_per_node
        assert s.destination not in cordoned and s.destination != s.node
        assert s.destination not in {e.node for e in evs}
        src_fmt = next(n.state_format_version for n in nodes if n.name == s.node)
        assert next(n.state_format_version for n in nodes if n.name == s.destination) == src_fmt
    busy = {j.controller_id for j in active}
    started = [s.controller_id for s in d.starts]
    assert len(started) == len(set(started)) and not busy & set(started)
    # strict priority: a lower-priority evacuation starts nothing while a higher one waits on the
    # cluster limit
    prio = {e.node: e.priority for e in evs}
    for w in d.waiting:
        if "cluster limit" in w.why:
            assert all(prio[s.node] <= prio[w.node] for s in d.starts)

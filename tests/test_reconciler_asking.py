"""Which agents the reconciler asks each pass: the pure choice (`nodes_to_ask`, `due_next`), and
the Reconciler against real etcd and simulated agents (e2e/sim_agents.py: real gRPC servers, real
leases), where a session nobody drives is found by the turn and a job's nodes at its end."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.store import EtcdStore
from e2e.sim_agents import SimProcess
from orchestrator import reconciler
from orchestrator.agent_calls import AgentCalls
from orchestrator.jobs import Job, Phase, Policy, pending_job
from orchestrator.reconciler import Reconciler, due_next, nodes_to_ask, sweep_size
from proto.v1 import agent_pb2

MiB = 1 << 20


@given(count=st.integers(1, 300), sweep=st.integers(1, 100), cursor=st.integers(0, 1000),
       due=st.sets(st.integers(0, 400), max_size=20))
def test_every_node_is_asked_within_its_turn_and_every_due_live_node_at_once(
        count: int, sweep: int, cursor: int, due: set[int]) -> None:
    live = [f"n{i:03d}" for i in range(count)]
    due_names = {f"n{i:03d}" for i in due}
    asked_in_turn: set[str] = set()
    for n in range(math.ceil(count / sweep)):
        asked, cursor = nodes_to_ask(live, due_names if n == 0 else set(), sweep, cursor)
        assert asked <= set(live)
        assert len(asked - (due_names if n == 0 else set())) <= sweep
        if n == 0:
            assert due_names & set(live) <= asked  # due and live: asked now; due but gone: not
        asked_in_turn |= asked
    assert asked_in_turn == set(live)


def test_the_turn_covers_a_thousand_nodes_per_full_sweep() -> None:
    assert sweep_size(3) == reconciler.MIN_ASKED_PER_PASS  # small clusters: every node every pass
    per_pass = sweep_size(1000)
    assert per_pass < 1000 / 10
    assert math.ceil(1000 / per_pass) * reconciler.RECONCILE_INTERVAL_S <= reconciler.FULL_SWEEP_S


def session(job_id: str, stage: str, role: str = "source") -> agent_pb2.SessionStatus:
    return agent_pb2.SessionStatus(job_id=job_id, stage=stage, role=role, epoch=1)


def job(job_id: str, phase: Phase, *, source: str = "n1", destination: str = "n2",
        excluded: tuple[str, ...] = ()) -> Job:
    return Job(id=job_id, controller_id="c1", source_node=source, destination_node=destination,
               excluded_destinations=excluded, namespace_bytes=MiB, policy=Policy(), created_at=1.0, phase=phase)


def test_due_next_pass_silent_nodes_unsettled_sessions_of_ended_jobs_and_the_nodes_of_jobs_just_ended() -> None:
    jobs = {j.id: j for j in (job("mig-a", Phase.PRECOPY),
                              job("mig-b", Phase.ROLLED_BACK), job("mig-c", Phase.COMPLETED))}
    reports = {
        "n1": agent_pb2.AgentInfo(node="n1", sessions=[session("mig-a", "precopy")]),  # its job runs: not due
        "n2": agent_pb2.AgentInfo(node="n2", sessions=[session("mig-b", "prepared", "destination")]),  # ended
        "n3": agent_pb2.AgentInfo(node="n3", sessions=[session("mig-gone", "precopy")]),  # job unknown
        "n4": agent_pb2.AgentInfo(node="n4", sessions=[session("mig-c", "released")]),  # settled
    }
    ended = [job("mig-d", Phase.FAILED, source="n6", destination="n7", excluded=("n8",))]
    assert due_next(["n1", "n2", "n3", "n4", "n5"], reports, jobs, ended) == {"n2", "n3", "n5", "n6", "n7", "n8"}


@pytest.fixture
async def sims(shared_etcd: str, etcd_prefix: str) -> AsyncIterator[SimProcess]:
    sim = SimProcess([f"sim-{i:04d}" for i in range(8)], shared_etcd, etcd_prefix, lease_ttl_s=5)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


async def test_a_pass_asks_its_turn_the_due_nodes_and_still_finds_an_orphan_on_any_node(
        store: EtcdStore, sims: SimProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconciler, "MIN_ASKED_PER_PASS", 2)  # 8 nodes, 2 a pass in turn
    agents = AgentCalls(store)
    try:
        rec = Reconciler(store, agents)
        await rec.reconcile_once()
        everyone = {a.name for a in sims.agents}
        assert rec.asked == everyone  # a leader's first pass asks every node

        # A session for a job etcd never heard of, on a node the turn reaches last.
        orphan_node = sims.agents[7]
        ghost = agent_pb2.MigrationRef(job_id="mig-00000000dead", epoch=1, controller_id="c9")
        await agents.call(orphan_node.name, "PrepareDestination", lambda s: s.PrepareDestination(
            agent_pb2.PrepareDestinationRequest(ref=ghost, namespace_bytes=MiB, state_format_version=1),
            timeout=5), budget_s=5)
        # A job that ended between two passes: its nodes are asked at the pass after the one that saw it.
        ended = pending_job("mig-0000000000e1", controller_id="c8", source_node="sim-0004", namespace_bytes=MiB,
                            policy=Policy(), now=1.0).enter(Phase.PREPARING, 1.0).destination_chosen("sim-0005", 1.0) \
            .end(Phase.FAILED, 2.0, "for the test")
        await store.create_job(ended.id, ended.controller_id, ended.to_bytes())

        passes: list[set[str]] = []
        while orphan_node.sessions[ghost.job_id].stage != "aborted":
            assert len(passes) < 8 / 2, f"the orphan on {orphan_node.name} was not aborted within a full turn"
            await rec.reconcile_once()
            passes.append(set(rec.asked))
        assert all(len(asked) <= 2 + 2 for asked in passes)  # the turn, and the ended job's two nodes
        assert {"sim-0004", "sim-0005"} <= passes[1]
    finally:
        await agents.close()

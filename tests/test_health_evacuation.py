"""A drive that predicts a failure empties its node automatically. Real processes: one
orchestrator, four agents, eight controllers with guests writing on n1; a failing SMART / Health
log injected on n1's emulated drive. The limits are checked from the job records etcd kept."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2
from tests.clusterprobe import create_controller, etcd_json, etcd_keys, owners, verify
from tests.test_evacuation import LIMIT_ARGS, etcd_raw, job, max_overlap, node_cordoned, orchctl

MiB = 1 << 20
CONTROLLERS = tuple(f"h{i}" for i in range(1, 9))
OTHERS = ("n2", "n3", "n4")
DEADLINE_S = 300.0


@pytest.fixture
def health_cluster(shared_etcd: str, etcd_prefix: str) -> Iterator[LocalCluster]:
    with LocalCluster(allow_fault_injection=True) as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        c.start_orchestrator("orch-1", extra_args=[*LIMIT_ARGS, "--auto-evacuate-max", "1"])
        c.start_agents(["n1", *OTHERS])
        yield c


def test_a_failing_drive_evacuates_its_node_within_the_limits(health_cluster: LocalCluster) -> None:
    c = health_cluster
    for cid in CONTROLLERS:
        create_controller(c, "n1", cid, 4 * MiB, write_iops=100)
    assert etcd_json(c, f"{c.etcd_prefix}evacuations/n1") is None  # a healthy drive asks nothing

    inject_failing_drive(c, "n1")

    def ended() -> dict[str, object] | None:
        ev = etcd_json(c, f"{c.etcd_prefix}evacuations/n1")
        return ev if ev is not None and ev["state"] in ("DONE", "FAILED", "CANCELLED") else None
    ev = wait_for("n1's automatic evacuation to end", ended, DEADLINE_S, interval_s=0.5)
    check_emptied_within_the_limits(c, ev)

    with urllib.request.urlopen(f"http://{c.orchestrators[0].http_address}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    fired = [ln for ln in metrics.splitlines() if ln.startswith("nvmigrate_evacuation_triggers_fired_total")]
    assert fired == ["nvmigrate_evacuation_triggers_fired_total 1.0"]  # an emptied, cordoned node is not asked again
    final = etcd_json(c, f"{c.etcd_prefix}evacuations/n1")
    assert final is not None and final["state"] == "DONE" and final["created_at"] == ev["created_at"]


def inject_failing_drive(c: LocalCluster, node: str) -> None:
    channel, stub = c.agent_stub(node)
    with channel:
        stub.InjectFault(agent_pb2.InjectFaultRequest(health=agent_pb2.DriveHealthFault(
            available_spare=3, media_errors=2)), timeout=5)


def check_emptied_within_the_limits(c: LocalCluster, ev: dict[str, Any]) -> None:
    assert ev["state"] == "DONE", ev
    assert ev["automatic"] is True and ev["reason"] == "PREDICTED_FAILURE"
    assert "available spare 3% at or below its threshold 10%" in str(ev["note"])
    assert "2 media errors" in str(ev["note"])
    assert node_cordoned(c, "n1")

    # every controller moved once, off n1, and reads back every acknowledged write
    jobs = [job(c, a["job_id"]) for m in ev["moves"] for a in m["attempts"]]  # type: ignore[attr-defined]
    where = owners(c)
    for cid in CONTROLLERS:
        done = [j for j in jobs if j["controller_id"] == cid and j["phase"] == "COMPLETED"]
        assert len(done) == 1, f"{cid} completed {len(done)} migrations"
        assert where[cid] in OTHERS and where[cid] == done[0]["destination_node"]
        result = verify(c, where[cid], cid)
        assert result.ok and result.mismatches == 0, result.first_mismatch

    # the limits held at every moment: from each job's creation to its end, as etcd kept them
    spans = {j["id"]: (j["created_at"], j["phases"][-1]["started_at"]) for j in jobs}
    assert max_overlap(list(spans.values())) <= 5
    assert max_overlap([spans[j["id"]] for j in jobs if j["source_node"] == "n1"]) == 2  # used, never passed
    for dest in OTHERS:
        assert max_overlap([spans[j["id"]] for j in jobs if j["destination_node"] == dest]) <= 2
    assert "n1" not in {j["destination_node"] for j in jobs}
    # no job of any kind completed a second move of these controllers
    everything = [job(c, key.rsplit("/", 1)[1]) for key in etcd_keys(c, f"{c.etcd_prefix}jobs/")]
    completed = sorted(j["controller_id"] for j in everything if j["controller_id"] in CONTROLLERS
                       and j["phase"] == "COMPLETED")
    assert completed == sorted(CONTROLLERS)


def test_the_automatic_evacuation_survives_the_leader_being_killed(shared_etcd: str, etcd_prefix: str) -> None:
    with LocalCluster(allow_fault_injection=True) as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        for name in ("orch-1", "orch-2"):
            c.start_orchestrator(name, extra_args=[*LIMIT_ARGS, "--auto-evacuate-max", "1"])
        c.start_agents(["n1", *OTHERS])
        for cid in CONTROLLERS:
            create_controller(c, "n1", cid, 4 * MiB, write_iops=100)
        inject_failing_drive(c, "n1")

        def some_moved_some_not() -> bool:
            ev: Any = etcd_json(c, f"{c.etcd_prefix}evacuations/n1")
            moved = sum(1 for m in ev["moves"] if m["result"] == "MOVED") if ev else 0
            return bool(ev and ev["state"] == "RUNNING" and 1 <= moved < len(CONTROLLERS))
        wait_for("the automatic evacuation midway", some_moved_some_not, DEADLINE_S, interval_s=0.05)
        leader = etcd_raw(c, f"{c.etcd_prefix}leader")
        next(p for p in c.orchestrators if p.name == leader).kill()
        survivor = next(p for p in c.orchestrators if p.name != leader)
        c.orchestrator_address = survivor.address  # type: ignore[attr-defined]

        def ended() -> dict[str, Any] | None:
            ev = etcd_json(c, f"{c.etcd_prefix}evacuations/n1")
            return ev if ev is not None and ev["state"] in ("DONE", "FAILED", "CANCELLED") else None
        ev = wait_for("the evacuation to end under the new leader", ended, DEADLINE_S, interval_s=0.2)
        assert etcd_raw(c, f"{c.etcd_prefix}leader") == survivor.name
        check_emptied_within_the_limits(c, ev)


def test_an_external_predictor_marks_a_node_and_it_is_emptied(health_cluster: LocalCluster) -> None:
    c = health_cluster
    for cid in ("p1", "p2"):
        create_controller(c, "n2", cid, 4 * MiB, write_iops=100)
    refused = orchctl(c, "predict-failure", "n2", "--reason", "  ")
    assert refused.returncode != 0 and "needs a reason" in refused.stderr
    marked = orchctl(c, "predict-failure", "n2", "--reason", "fleet model: 92% failure in 7 days")
    assert marked.returncode == 0, marked.stderr
    assert "node n2 marked as predicted to fail: fleet model: 92% failure in 7 days" in marked.stdout

    def ended() -> dict[str, object] | None:
        ev = etcd_json(c, f"{c.etcd_prefix}evacuations/n2")
        return ev if ev is not None and ev["state"] in ("DONE", "FAILED", "CANCELLED") else None
    ev = wait_for("n2's automatic evacuation to end", ended, DEADLINE_S, interval_s=0.5)
    assert ev["state"] == "DONE" and ev["automatic"] is True
    assert "predicted by an external predictor: fleet model: 92% failure in 7 days" in str(ev["note"])
    where = owners(c)
    assert {where["p1"], where["p2"]} <= {"n1", "n3", "n4"}
    cleared = orchctl(c, "predict-failure", "n2", "--clear")
    assert cleared.returncode == 0 and "failure prediction cleared" in cleared.stdout

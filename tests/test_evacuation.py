"""Node evacuation with real processes: an orchestrator (or two), agents n1..n3, guests writing.

The limits are checked from what etcd kept: every job's creation and end times. A job counts
against the limits from its creation to its terminal phase, as the planner counts it."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import migration_pb2
from tests.clusterprobe import create_controller, etcd_json, orchctl, owners, verify

MiB = 1 << 20
CONTROLLERS = ("e1", "e2", "e3", "e4", "e5")
LIMIT_ARGS = ["--evacuation-max-parallel", "5", "--evacuation-outbound-per-node", "2",
              "--evacuation-inbound-per-node", "2"]
DEADLINE_S = 300.0


@pytest.fixture
def evac_cluster(shared_etcd: str, etcd_prefix: str) -> Iterator[LocalCluster]:
    with LocalCluster() as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        c.start_orchestrator("orch-1", extra_args=LIMIT_ARGS)
        c.start_agents(["n1", "n2", "n3"])
        yield c


def evacuation(cluster: LocalCluster, node: str) -> dict[str, Any]:
    record = etcd_json(cluster, f"{cluster.etcd_prefix}evacuations/{node}")
    assert record is not None, f"no evacuation record for {node}"
    return record


def job(cluster: LocalCluster, job_id: str) -> dict[str, Any]:
    record = etcd_json(cluster, f"{cluster.etcd_prefix}jobs/{job_id}")
    assert record is not None, f"job {job_id} is recorded in the evacuation but not in etcd"
    return record


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    # ends sort before starts at the same instant: the planner saw the end before it started another
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


def check_limits(cluster: LocalCluster, jobs: list[dict[str, Any]]) -> None:
    spans = {j["id"]: (j["created_at"], j["phases"][-1]["started_at"]) for j in jobs}
    assert max_overlap(list(spans.values())) <= 5
    from_n1 = [spans[j["id"]] for j in jobs if j["source_node"] == "n1"]
    assert 2 <= max_overlap(from_n1) <= 2, "outbound limit 2: at most 2 at once (and it was used)"
    for dest in ("n2", "n3"):
        assert max_overlap([spans[j["id"]] for j in jobs if j["destination_node"] == dest]) <= 2


def check_moved_once_and_verified(cluster: LocalCluster, ev: dict[str, Any]) -> list[dict[str, Any]]:
    jobs = [job(cluster, a["job_id"]) for m in ev["moves"] for a in m["attempts"]]
    where = owners(cluster)
    for cid in CONTROLLERS:
        done = [j for j in jobs if j["controller_id"] == cid and j["phase"] == "COMPLETED"]
        assert len(done) == 1, f"{cid} completed {len(done)} migrations"
        assert where[cid] in ("n2", "n3") and where[cid] == done[0]["destination_node"]
        result = verify(cluster, where[cid], cid)
        assert result.ok and result.mismatches == 0, result.first_mismatch
    # no job of any kind moved a controller twice: every job in etcd for these controllers
    everything = [j for j in (job(cluster, key.rsplit("/", 1)[1]) for key in _job_keys(cluster))
                  if j["controller_id"] in CONTROLLERS]
    assert sorted(j["controller_id"] for j in everything if j["phase"] == "COMPLETED") == sorted(CONTROLLERS)
    return jobs


def _job_keys(cluster: LocalCluster) -> list[str]:
    from tests.clusterprobe import etcd_keys
    return etcd_keys(cluster, f"{cluster.etcd_prefix}jobs/")


def node_cordoned(cluster: LocalCluster, name: str) -> bool:
    channel, api = cluster.migration_stub()
    with channel:
        nodes = api.ListNodes(migration_pb2.ListNodesRequest(), timeout=10).nodes
    return any(n.name == name and n.cordoned for n in nodes)


def test_evacuating_a_node_moves_every_controller_within_the_limits(evac_cluster: LocalCluster) -> None:
    c = evac_cluster
    for cid in CONTROLLERS:
        # big enough that the --wait poll (once a second) sees a migration in flight
        create_controller(c, "n1", cid, 48 * MiB, write_iops=200)

    dry = orchctl(c, "evacuate", "node", "n1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: evacuation of n1 (MANUAL)" in dry.stdout and "5 controllers" in dry.stdout
    assert dry.stdout.count(" now ") == 2 and "outbound limit 2 reached on n1" in dry.stdout
    assert "nothing was cordoned or started (dry run)" in dry.stdout
    assert not node_cordoned(c, "n1")
    assert etcd_json(c, f"{c.etcd_prefix}evacuations/n1") is None

    run = orchctl(c, "evacuate", "node", "n1", "--wait", "--timeout", str(DEADLINE_S), "--reason", "firmware",
                  timeout_s=DEADLINE_S + 60)
    assert run.returncode == 0, run.stdout + run.stderr
    # progress, one line per status change of each controller, then the outcome
    phases = ("PENDING", "PREPARING", "PRECOPY", "DIRTY_ITERATION", "STOP_AND_COPY", "COMMIT", "RESUMING")
    assert any(f" {phase} -> n" in run.stdout for phase in phases), run.stdout  # a job seen in flight
    for cid in CONTROLLERS:
        assert f"n1 {cid} WAITING" in run.stdout or f"n1 {cid} " in run.stdout
        assert f"n1 {cid} MOVED -> n" in run.stdout, run.stdout
    assert "evacuation of n1 DONE: 5/5 moved" in run.stdout

    ev = evacuation(c, "n1")
    assert ev["state"] == "DONE" and ev["note"] == "firmware" and ev["finished_at"] >= ev["created_at"]
    assert node_cordoned(c, "n1")
    check_limits(c, check_moved_once_and_verified(c, ev))

    with urllib.request.urlopen(f"http://{c.orchestrators[0].http_address}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    assert 'nvmigrate_evacuations_finished_total{outcome="DONE"} 1.0' in metrics
    assert "nvmigrate_evacuations_total 1.0" in metrics
    assert "nvmigrate_controllers_evacuated_total 5.0" in metrics
    assert "nvmigrate_evacuation_makespan_seconds_count 1.0" in metrics

    listed = orchctl(c, "evacuations", "-o", "json")
    assert listed.returncode == 0 and '"node": "n1"' in listed.stdout and "EVACUATION_DONE" in listed.stdout


def test_an_evacuation_survives_the_leader_being_killed(shared_etcd: str, etcd_prefix: str) -> None:
    with LocalCluster() as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        c.start_orchestrator("orch-1", extra_args=LIMIT_ARGS)
        c.start_orchestrator("orch-2", extra_args=LIMIT_ARGS)
        c.start_agents(["n1", "n2", "n3"])
        for cid in CONTROLLERS:
            create_controller(c, "n1", cid, 8 * MiB, write_iops=200)
        channel, api = c.migration_stub()
        with channel:
            api.EvacuateNode(migration_pb2.EvacuateNodeRequest(node="n1"), timeout=30)

        def some_moved_some_not() -> bool:
            ev = evacuation(c, "n1")
            moved = sum(1 for m in ev["moves"] if m["result"] == "MOVED")
            return bool(ev["state"] == "RUNNING" and 1 <= moved < len(CONTROLLERS))
        wait_for("the evacuation midway", some_moved_some_not, DEADLINE_S, interval_s=0.05)

        leader = etcd_raw(c, f"{c.etcd_prefix}leader")
        proc = next(p for p in c.orchestrators if p.name == leader)
        proc.kill()
        survivor = next(p for p in c.orchestrators if p.name != leader)
        c.orchestrator_address = survivor.address  # type: ignore[attr-defined]

        def ended() -> dict[str, Any] | None:
            ev = evacuation(c, "n1")
            return ev if ev["state"] in ("DONE", "FAILED") else None
        ev = wait_for("the evacuation to end under the new leader", ended, DEADLINE_S, interval_s=0.2)
        assert ev["state"] == "DONE", ev.get("failure")
        assert etcd_raw(c, f"{c.etcd_prefix}leader") == survivor.name
        check_moved_once_and_verified(c, ev)


def etcd_raw(cluster: LocalCluster, key: str) -> str:
    done = subprocess.run(["etcdctl", f"--endpoints={cluster.etcd_endpoint}", "get", key, "--print-value-only"],
                          capture_output=True, text=True, check=True, env={"ETCDCTL_API": "3"})
    return done.stdout.strip()

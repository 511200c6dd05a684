"""Controllers as API objects: MigrationService CreateController / DeleteController and
`orchctl controllers create|delete`, against a real etcd, orchestrator and agents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2
from tests.conftest import api

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def refusal(c: LocalCluster, method: str, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        api(c)(method, request)
    return caught.value


def create(cid: str, size: int, node: str = "", *, prefill: bool = False,
           guest: migration_pb2.GuestOptions | None = None) -> migration_pb2.NewControllerRequest:
    return migration_pb2.NewControllerRequest(controller_id=cid, namespace_bytes=size, node=node, prefill=prefill,
                                              guest=guest)


def records(c: LocalCluster) -> dict[str, migration_pb2.Controller]:
    listed = api(c)("ListControllers", migration_pb2.ListControllersRequest())
    assert isinstance(listed, migration_pb2.ListControllersResponse)
    return {x.id: x for x in listed.controllers}


def on_agent(c: LocalCluster, node: str, cid: str) -> agent_pb2.ControllerStatus | None:
    channel, stub = c.agent_stub(node)
    with channel:
        try:
            request = agent_pb2.GetControllerRequest(controller_id=cid, with_stored_bytes=True)
            status = stub.GetController(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc.details()
            return None
    assert isinstance(status, agent_pb2.ControllerStatus)
    return status


def delete(c: LocalCluster, cid: str) -> migration_pb2.Controller:
    deleted = api(c)("DeleteController", migration_pb2.DeleteControllerRequest(controller_id=cid))
    assert isinstance(deleted, migration_pb2.Controller)
    return deleted


def test_create_placed_by_the_scheduler_then_on_a_named_node_with_a_guest_then_delete(fleet: LocalCluster) -> None:
    # Equal nodes: the tie goes to the one with fewer controllers, then by name.
    first = api(fleet)("CreateController", create("p1", 16 * MiB))
    assert isinstance(first, migration_pb2.Controller)
    assert (first.node, first.state, first.namespace_bytes) == ("n1", "RUNNING", 16 * MiB)
    second = api(fleet)("CreateController", create("p2", 16 * MiB))
    assert isinstance(second, migration_pb2.Controller)
    assert second.node == "n2"  # n1 has less room now
    named = api(fleet)("CreateController", create("p3", 8 * MiB, "n1", prefill=True,
                                                  guest=migration_pb2.GuestOptions(write_iops=200, seed=7)))
    assert isinstance(named, migration_pb2.Controller) and named.node == "n1"
    status = on_agent(fleet, "n1", "p3")
    assert status is not None and status.vfio_state == "RUNNING"
    assert status.stored_bytes == 8 * MiB  # prefilled
    wait_for("p3's guest to write", lambda: (s := on_agent(fleet, "n1", "p3")) is not None
             and s.workload.running and s.workload.acked_writes > 0, 60)
    assert {k: v.node for k, v in records(fleet).items()} == {"p1": "n1", "p2": "n2", "p3": "n1"}

    namespace = fleet.agent_data_dir("n1") / "p3.ns"
    assert namespace.exists()
    deleted = delete(fleet, "p3")
    assert (deleted.id, deleted.node) == ("p3", "n1")
    assert on_agent(fleet, "n1", "p3") is None
    assert not namespace.exists()  # sanitized, not only forgotten
    assert "p3" not in records(fleet)
    gone = refusal(fleet, "DeleteController", migration_pb2.DeleteControllerRequest(controller_id="p3"))
    assert gone.code() == grpc.StatusCode.NOT_FOUND and "'p3'" in (gone.details() or "")
    for cid in ("p1", "p2"):
        delete(fleet, cid)
    assert records(fleet) == {}
    # The id is free again once deleted.
    again = api(fleet)("CreateController", create("p3", 4 * MiB, "n2"))
    assert isinstance(again, migration_pb2.Controller) and again.node == "n2"
    delete(fleet, "p3")


def test_refusals_name_the_bad_value_and_write_nothing(fleet: LocalCluster) -> None:
    def refused(request: migration_pb2.NewControllerRequest, code: grpc.StatusCode, *words: str) -> None:
        exc = refusal(fleet, "CreateController", request)
        details = exc.details() or ""
        assert exc.code() == code, details
        assert "\n" not in details and "Traceback" not in details
        for word in words:
            assert word in details, (word, details)

    refused(create("r1", 1000), grpc.StatusCode.INVALID_ARGUMENT, "1000", "4096")
    refused(create("r1", 0), grpc.StatusCode.INVALID_ARGUMENT, "namespace size 0")
    refused(create("R_1", 4 * MiB), grpc.StatusCode.INVALID_ARGUMENT, "'R_1'")
    refused(create("r1", 4 * MiB, "n9"), grpc.StatusCode.NOT_FOUND, "'n9'", "orchctl nodes")
    refused(create("r1", 4 * MiB, "n1", guest=migration_pb2.GuestOptions(pattern="zigzag")),
            grpc.StatusCode.INVALID_ARGUMENT, "'zigzag'", "random")
    # No room anywhere: the reason names every node and what binds it.
    api(fleet)("CordonNode", migration_pb2.CordonNodeRequest(name="n2"))
    try:
        refused(create("r1", 2 << 30), grpc.StatusCode.FAILED_PRECONDITION, "n1: 1 GiB free", "needs 2 GiB",
                "n2: cordoned")
        refused(create("r1", 4 * MiB, "n2"), grpc.StatusCode.FAILED_PRECONDITION, "'n2' is cordoned")
    finally:
        api(fleet)("UncordonNode", migration_pb2.CordonNodeRequest(name="n2"))
    refused(create("r1", 2 << 30, "n1"), grpc.StatusCode.FAILED_PRECONDITION, "'n1'", "needs 2 GiB")
    assert records(fleet) == {}  # none of these wrote anything

    api(fleet)("CreateController", create("r1", 4 * MiB, "n1"))
    try:
        refused(create("r1", 4 * MiB, "n2"), grpc.StatusCode.ALREADY_EXISTS, "'r1'", "'n1'")
    finally:
        delete(fleet, "r1")


def test_delete_is_refused_while_a_migration_moves_the_controller(fleet: LocalCluster) -> None:
    api(fleet)("CreateController", create("m1", 32 * MiB, "n1", prefill=True))
    # 32 MiB at 256 KiB/s: two minutes of precopy, time enough to be refused and cancel.
    job = api(fleet)("CreateMigration", migration_pb2.CreateMigrationRequest(
        controller_id="m1", destination_node="n2",
        policy=migration_pb2.ConvergencePolicy(bandwidth_bytes_per_s=256 << 10)))
    assert isinstance(job, migration_pb2.Migration)
    exc = refusal(fleet, "DeleteController", migration_pb2.DeleteControllerRequest(controller_id="m1"))
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert job.id in (exc.details() or "") and "cancel" in (exc.details() or "")
    assert on_agent(fleet, "n1", "m1") is not None and "m1" in records(fleet)

    api(fleet)("CancelMigration", migration_pb2.CancelMigrationRequest(id=job.id))

    def ended() -> bool:
        got = api(fleet)("GetMigration", migration_pb2.GetMigrationRequest(id=job.id))
        assert isinstance(got, migration_pb2.Migration)
        return got.phase == migration_pb2.CANCELLED

    wait_for(f"job {job.id} to end CANCELLED", ended, 120)
    delete(fleet, "m1")
    assert on_agent(fleet, "n1", "m1") is None and "m1" not in records(fleet)


def test_a_create_that_fails_on_the_agent_leaves_no_claim_in_etcd(
        fleet: LocalCluster, tmpfs: Callable[..., Path]) -> None:
    # An agent whose data dir is an 8 MiB disk but which declares 1 GiB: asked directly (past
    # the scheduler, which would refuse), its prefill of 16 MiB runs out of space mid-way.
    small = tmpfs("small", size="8m")
    proc = fleet.start_agent("n3", capacity="1G", extra_args=["--data-dir", str(small)])
    try:
        channel, n3 = fleet.agent_stub("n3")
        with channel, pytest.raises(grpc.RpcError) as caught:
            n3.CreateController(agent_pb2.CreateControllerRequest(controller_id="f1", namespace_bytes=16 * MiB,
                                                                  prefill=True), timeout=60)
        assert caught.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION), \
            caught.value.details()
        assert "f1" not in records(fleet)  # the claim went with the failed create
        assert on_agent(fleet, "n3", "f1") is None
        assert not list(small.glob("f1*"))
        # Through the API the scheduler refuses it up front, naming the disk.
        exc = refusal(fleet, "CreateController", create("f1", 16 * MiB, "n3", prefill=True))
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "data dir" in (exc.details() or "")
    finally:
        proc.stop()


def run_cli(c: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "orchctl.cli", "--server", c.orchestrator_address, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_orchctl_controllers_create_list_delete_in_json_and_tables(fleet: LocalCluster) -> None:
    done = run_cli(fleet, "controllers", "create", "j1", "--size", "8M", "--on", "n2", "--prefill",
                   "--write-iops", "50", "--pattern", "sequential", "--seed", "3", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"id": "j1", "node": "n2", "namespace_bytes": str(8 * MiB),
                                       "state": "RUNNING"}
    listed = run_cli(fleet, "-o", "json", "controllers")
    assert listed.returncode == 0, listed.stderr
    assert [c["id"] for c in json.loads(listed.stdout)["controllers"]] == ["j1"]
    table = run_cli(fleet, "controllers")
    assert table.returncode == 0 and "j1" in table.stdout and "n2" in table.stdout

    no_room = run_cli(fleet, "controllers", "create", "j2", "--size", "2G")
    assert no_room.returncode == 2
    assert no_room.stderr.startswith("error: no live node can take a new 2 GiB controller: n1:")
    assert "n2:" in no_room.stderr and no_room.stderr.count("\n") == 1
    bad = run_cli(fleet, "controllers", "create", "j2", "--size", "lots")
    assert bad.returncode == 2 and "invalid size 'lots'" in bad.stderr

    gone = run_cli(fleet, "controllers", "delete", "j1", "-o", "json")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["id"] == "j1"
    again = run_cli(fleet, "controllers", "delete", "j1")
    assert again.returncode == 2 and "'j1' is not known" in again.stderr
    empty = run_cli(fleet, "controllers")
    assert empty.returncode == 0 and "no controllers registered" in empty.stderr

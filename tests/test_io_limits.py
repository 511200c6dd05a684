"""Per-controller guest I/O limits and migration reads that yield to guest I/O.

The pure parts (validation, the token buckets, the pacer's decision) with a fake clock; then
against a real etcd, orchestrator and agents: limits set at create time and changed later are
honoured by fio over NBD and by the built-in guest (upper bounds only: a functional check, not a
timing target), refused with the bad value named, shown by `orchctl controllers`, and carried
to the destination of a migration.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from agent.qos import (
    MIN_RATE,
    MIN_SAMPLES,
    START_RATE,
    WINDOW_S,
    IoLimiter,
    MigrationPacer,
    Window,
    next_rate,
)
from cluster.io_limits import IoLimits, value_problem
from cluster.records import ControllerRecord
from orchctl import fio
from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2, migration_pb2
from tests.conftest import api

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


# ---- pure ------------------------------------------------------------------------------------


def test_limit_values_are_checked_and_name_the_field() -> None:
    assert value_problem("read_iops", 0) is None and value_problem("read_iops", 200) is None
    assert "read_iops -1" in (value_problem("read_iops", -1) or "")
    assert "write_bytes_per_s 100 is below 4096" in (value_problem("write_bytes_per_s", 100) or "")
    assert "trim_iops 20000000 is above" in (value_problem("trim_iops", 20_000_000) or "")
    assert "whole number" in (value_problem("read_iops", 1.5) or "")
    limits = IoLimits(read_iops=200).merged({"write_bytes_per_s": 10 * MiB})
    assert limits == IoLimits(read_iops=200, write_bytes_per_s=10 * MiB)
    assert limits.merged({"read_iops": 0}) == IoLimits(write_bytes_per_s=10 * MiB)
    with pytest.raises(ValueError, match="unknown I/O limit"):
        limits.merged({"read_latency": 3})
    assert limits.shown() == "read 200 IOPS, write 10 MiB/s" and IoLimits().shown() == "-"
    # etcd keeps them in the controller's record, so they move with it
    record = ControllerRecord("c1", "n1", 4096, limits=limits)
    assert ControllerRecord.from_bytes(record.to_bytes()) == record
    assert record.moved_to("n2", "job").limits == limits
    legacy = b'{"controller_id": "c1", "node": "n1", "namespace_bytes": 4096, "history": []}'
    assert ControllerRecord.from_bytes(legacy).limits == IoLimits()


def test_limiter_holds_each_op_to_its_rate_after_a_small_burst() -> None:
    clock = FakeClock()
    limiter = IoLimiter(IoLimits(read_iops=100, write_bytes_per_s=4096 * 10), clock=clock)
    # 1000 reads as fast as the limiter lets them go take ~10 s: 100 IOPS plus a 10-I/O burst.
    for _ in range(1000):
        clock.now += limiter.reserve("read", 4096)
    assert 9.8 <= clock.now - 100.0 <= 10.0
    assert limiter.reserve("trim", 1 << 30) == 0.0  # no trim limit
    # bytes: a 40 KiB/s write limit makes a 400 KiB write (after the 4 KiB burst) wait ~9.9 s
    assert 9.8 < limiter.reserve("write", 400 * 1024) < 10.0
    limiter.set_limits(IoLimits())
    assert limiter.reserve("read", 4096) == 0.0 and limiter.reserve("write", 1 << 30) == 0.0
    with pytest.raises(ValueError, match="read_iops -5"):
        limiter.set_limits(IoLimits(read_iops=-5))


def test_pacer_decision_backs_off_when_guests_suffer_and_recovers_when_they_do_not() -> None:
    hurt = Window(samples=500, p99_s=0.004, migration_bytes=100 * MiB, seconds=WINDOW_S)
    calm = Window(samples=500, p99_s=0.001, migration_bytes=8 * MiB, seconds=WINDOW_S)
    nobody = Window(samples=MIN_SAMPLES - 1, p99_s=0.0, migration_bytes=8 * MiB, seconds=WINDOW_S)
    # flat out and guests' p99 went from 1 ms to 4 ms: half of what it was doing (400 MB/s)
    assert next_rate(None, hurt, 0.001) == pytest.approx(200 * MiB)
    assert next_rate(16 * MiB, hurt, 0.001) == 8 * MiB
    assert next_rate(MIN_RATE, hurt, 0.001) == MIN_RATE  # never stops
    raised = next_rate(16 * MiB, calm, 0.001)
    assert raised is not None and raised > 16 * MiB
    assert next_rate(None, calm, 0.001) is None  # unlimited and harmless stays unlimited
    assert next_rate(16 * MiB, nobody, 0.001) == 32 * MiB  # nobody to protect: speed up fast
    assert next_rate(16 * MiB, hurt, None) is not None  # no reference yet: no verdict either way


def test_pacer_slows_migration_reads_while_guest_latency_is_up() -> None:
    clock = FakeClock()
    pacer = MigrationPacer(clock=clock, sleep=clock.sleep)

    def guests(latency_s: float, seconds: float) -> None:
        """Guest requests at 2000/s for `seconds`, each served in `latency_s`."""
        for _ in range(int(seconds * 2000)):
            clock.now += 1 / 2000
            pacer.observe(4096, latency_s)

    async def migrate(seconds: float) -> int:
        """Migration reads of 1 MiB, guests at 2000/s with 3 ms in between; returns bytes read."""
        end, read = clock.now + seconds, 0
        while clock.now < end:
            await pacer.acquire(MiB)
            read += MiB
            guests(0.003, 0.01)
        return read

    guests(0.001, 2.0)  # idle: the reference is 1 ms
    assert pacer.rate is None
    read = asyncio.run(migrate(3.0))
    assert pacer.rate is not None and pacer.rate < START_RATE and pacer.backoffs >= 1
    assert read < 3.0 * START_RATE  # it started low and went lower
    guests(0.001, 1.0)  # migration over: the next one starts afresh
    assert pacer.rate is None
    # Disabled: never waits.
    off = MigrationPacer(enabled=False, clock=clock, sleep=clock.sleep)
    before = clock.now
    asyncio.run(off.acquire(1 << 30))
    assert clock.now == before


# ---- against real agents ---------------------------------------------------------------------

needs_fio = pytest.mark.skipif(not shutil.which("fio"), reason="needs fio (scripts/setup.sh installs it)")


def listed(c: LocalCluster) -> dict[str, migration_pb2.Controller]:
    response = api(c)("ListControllers", migration_pb2.ListControllersRequest())
    assert isinstance(response, migration_pb2.ListControllersResponse)
    return {x.id: x for x in response.controllers}


def on_agent(c: LocalCluster, node: str, cid: str) -> agent_pb2.ControllerStatus:
    channel, stub = c.agent_stub(node)
    with channel:
        status = stub.GetController(agent_pb2.GetControllerRequest(controller_id=cid), timeout=30)
    assert isinstance(status, agent_pb2.ControllerStatus)
    return status


def create(c: LocalCluster, cid: str, node: str = "n1", size: int = 16 * MiB, **limits: int) -> None:
    request = migration_pb2.NewControllerRequest(controller_id=cid, namespace_bytes=size, node=node,
                                                 limits=migration_pb2.ControllerIoLimits(**limits))
    api(c)("CreateController", request)


def delete(c: LocalCluster, cid: str) -> None:
    api(c)("DeleteController", migration_pb2.DeleteControllerRequest(controller_id=cid))


def uri_of(c: LocalCluster, cid: str) -> str:
    exported = api(c)("ExportController", migration_pb2.ExportControllerRequest(controller_id=cid))
    assert isinstance(exported, migration_pb2.ControllerExport)
    return exported.uri


def run_cli(c: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "orchctl.cli", "--server", c.orchestrator_address, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


@needs_fio
def test_fio_over_nbd_is_held_to_the_limits_set_at_create_and_changed_later(fleet: LocalCluster) -> None:
    create(fleet, "lim1", read_iops=200)
    try:
        assert listed(fleet)["lim1"].limits.read_iops == 200
        assert on_agent(fleet, "n1", "lim1").limits.read_iops == 200
        uri = uri_of(fleet, "lim1")
        # iodepth 8: the client would go far faster than 200 IOPS unthrottled
        reads = fio.run(fio.FioJob(uri=uri, size_bytes=16 * MiB, rw="randread", iodepth=8, verify="",
                                   runtime_s=3, name="limited-read"), timeout_s=60)
        assert reads.ok, reads.messages
        assert reads.read.ios > 100  # it did run
        assert reads.read.iops <= 200 * 1.1 + 20 / 3, reads.read  # the rate, plus the 0.1 s burst over 3 s

        # Changed while it runs: writes limited to 1 MiB/s, reads no longer limited.
        changed = api(fleet)("SetControllerLimits", migration_pb2.ControllerLimitsRequest(
            controller_id="lim1", limits=migration_pb2.ControllerIoLimits(read_iops=0, write_bytes_per_s=MiB)))
        assert isinstance(changed, migration_pb2.Controller)
        assert not changed.limits.HasField("read_iops") and changed.limits.write_bytes_per_s == MiB
        writes = fio.run(fio.FioJob(uri=uri, size_bytes=16 * MiB, rw="randwrite", block_bytes=64 << 10,
                                    iodepth=4, verify="", runtime_s=3, name="limited-write"), timeout_s=60)
        assert writes.ok, writes.messages
        assert writes.write.ios > 10
        assert writes.write.bw_bytes_per_s <= MiB * 1.1 + (64 << 10) * 4 / 3, writes.write
        assert on_agent(fleet, "n1", "lim1").limits.write_bytes_per_s == MiB
    finally:
        delete(fleet, "lim1")


def test_the_built_in_guest_is_held_to_the_write_limit(fleet: LocalCluster) -> None:
    request = migration_pb2.NewControllerRequest(
        controller_id="lim2", namespace_bytes=16 * MiB, node="n2", guest=migration_pb2.GuestOptions(write_iops=0),
        limits=migration_pb2.ControllerIoLimits(write_iops=100))
    api(fleet)("CreateController", request)
    try:
        wait_for("lim2's guest to write", lambda: on_agent(fleet, "n2", "lim2").workload.acked_writes > 20, 30)
        first, started = on_agent(fleet, "n2", "lim2").workload.acked_writes, time.monotonic()
        wait_for("two seconds of guest writes", lambda: time.monotonic() - started >= 2.0, 10)
        last, ended = on_agent(fleet, "n2", "lim2").workload.acked_writes, time.monotonic()
        assert 0 < (last - first) / (ended - started) <= 100 * 1.1 + 10 / 2
    finally:
        delete(fleet, "lim2")


def test_bad_limits_are_refused_with_the_value_named(fleet: LocalCluster) -> None:
    def refused(method: str, request: object, *words: str) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            api(fleet)(method, request)
        details = caught.value.details() or ""
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "Traceback" not in details and "\n" not in details
        for word in words:
            assert word in details, (word, details)

    refused("CreateController", migration_pb2.NewControllerRequest(
        controller_id="bad1", namespace_bytes=4 * MiB, node="n1",
        limits=migration_pb2.ControllerIoLimits(read_iops=-3)), "read_iops -3", "negative")
    refused("CreateController", migration_pb2.NewControllerRequest(
        controller_id="bad1", namespace_bytes=4 * MiB, node="n1",
        limits=migration_pb2.ControllerIoLimits(trim_bytes_per_s=10)), "trim_bytes_per_s 10", "4096")
    assert "bad1" not in listed(fleet)
    # the agent checks too (it is called directly by the orchestrator only, but still)
    channel, n1 = fleet.agent_stub("n1")
    with channel, pytest.raises(grpc.RpcError) as caught:
        n1.CreateController(agent_pb2.CreateControllerRequest(
            controller_id="bad1", namespace_bytes=4 * MiB, limits=agent_pb2.IoLimits(write_iops=10**9)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "write_iops 1000000000" in (
        caught.value.details() or "")
    create(fleet, "bad2")
    try:
        refused("SetControllerLimits", migration_pb2.ControllerLimitsRequest(
            controller_id="bad2", limits=migration_pb2.ControllerIoLimits(write_iops=-1)), "write_iops -1")
        refused("SetControllerLimits", migration_pb2.ControllerLimitsRequest(controller_id="bad2"),
                "no limit given", "'bad2'")
        with pytest.raises(grpc.RpcError) as missing:
            api(fleet)("SetControllerLimits", migration_pb2.ControllerLimitsRequest(
                controller_id="nope", limits=migration_pb2.ControllerIoLimits(read_iops=5)))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in (missing.value.details() or "")
        # orchctl: bad values are usage errors naming the value, before any call
        for flags, words in ((["--read-iops-limit", "-5"], "'-5'"), (["--write-bps-limit", "12"], "below 4096"),
                             (["--trim-bps-limit", "lots"], "'lots'")):
            done = run_cli(fleet, "controllers", "limit", "bad2", *flags)
            assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
        none = run_cli(fleet, "controllers", "limit", "bad2")
        assert none.returncode == 2 and "--read-iops-limit" in none.stderr
    finally:
        delete(fleet, "bad2")


def test_orchctl_sets_shows_and_clears_limits(fleet: LocalCluster) -> None:
    done = run_cli(fleet, "controllers", "create", "cli1", "--size", "8M", "--on", "n1", "--read-iops-limit", "200",
                   "--write-bps-limit", "10M", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["limits"] == {"read_iops": "200", "write_bytes_per_s": str(10 * MiB)}
    try:
        table = run_cli(fleet, "controllers")
        assert table.returncode == 0 and "I/O LIMITS" in table.stdout
        assert "read 200 IOPS, write 10 MiB/s" in table.stdout, table.stdout
        changed = run_cli(fleet, "controllers", "limit", "cli1", "--trim-iops-limit", "50", "--read-iops-limit", "0")
        assert changed.returncode == 0, changed.stderr
        assert "write 10 MiB/s, trim 50 IOPS" in changed.stdout, changed.stdout
        cleared = run_cli(fleet, "controllers", "limit", "cli1", "--clear", "-o", "json")
        assert cleared.returncode == 0, cleared.stderr
        assert "limits" not in json.loads(cleared.stdout)
        assert on_agent(fleet, "n1", "cli1").limits == agent_pb2.IoLimits()
    finally:
        delete(fleet, "cli1")


def test_limits_move_with_the_controller_and_cannot_change_mid_migration(fleet: LocalCluster) -> None:
    create(fleet, "mv1", node="n1", size=32 * MiB, read_iops=300, trim_bytes_per_s=MiB)
    channel, n1 = fleet.agent_stub("n1")
    with channel:  # data to copy, so the migration lasts while we ask
        n1.StartWorkload(agent_pb2.StartWorkloadRequest(controller_id="mv1",
                                                        workload=agent_pb2.WorkloadSpec(write_iops=200)), timeout=30)
    job = api(fleet)("CreateMigration", migration_pb2.CreateMigrationRequest(
        controller_id="mv1", destination_node="n2",
        policy=migration_pb2.ConvergencePolicy(bandwidth_bytes_per_s=2 * MiB)))
    assert isinstance(job, migration_pb2.Migration)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            api(fleet)("SetControllerLimits", migration_pb2.ControllerLimitsRequest(
                controller_id="mv1", limits=migration_pb2.ControllerIoLimits(read_iops=5)))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and job.id in (caught.value.details() or "")

        def ended() -> migration_pb2.Migration | None:
            got = api(fleet)("GetMigration", migration_pb2.GetMigrationRequest(id=job.id))
            assert isinstance(got, migration_pb2.Migration)
            return got if got.phase in (migration_pb2.COMPLETED, migration_pb2.FAILED,
                                        migration_pb2.ROLLED_BACK) else None

        done = wait_for(f"job {job.id} to end", ended, 180)
        assert done.phase == migration_pb2.COMPLETED, done.reason
        record = listed(fleet)["mv1"]
        assert record.node == "n2"
        assert (record.limits.read_iops, record.limits.trim_bytes_per_s) == (300, MiB)
        status = on_agent(fleet, "n2", "mv1")
        assert (status.limits.read_iops, status.limits.trim_bytes_per_s) == (300, MiB)
        assert status.workload.running
    finally:
        delete(fleet, "mv1")

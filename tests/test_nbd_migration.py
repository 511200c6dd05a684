"""NBD clients across a live migration: what fio wrote through NBD on the source verifies through
NBD on the destination, and a client writing through the switchover stalls, is disconnected when
the source releases the controller, and loses no acknowledged write; and `orchctl demo --workload
fio` checks fio's data on the destination."""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from orchctl import fio
from orchctl.localcluster import LocalCluster
from proto.v1 import agent_pb2, migration_pb2
from tests.clusterprobe import TERMINAL, get_job, migrate, wait_phase, wait_verified
from tests.nbdprobe import RawNbd, create, export, qemu_io, two_agents

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not (shutil.which("fio") and shutil.which("qemu-io")),
                                reason="needs fio and qemu-utils (scripts/setup.sh installs them)")


@pytest.fixture(scope="module")
def pair() -> Iterator[LocalCluster]:
    """etcd, an orchestrator and agents n1, n2; each test migrates its own controller n1 -> n2."""
    yield from two_agents()


def phase_bytes(job: migration_pb2.Migration, phase: int) -> int:
    return sum(p.bytes for p in job.phases if p.phase == phase)


def test_fio_writes_during_precopy_verify_with_fio_on_the_destination(pair: LocalCluster) -> None:
    create(pair, "m1", namespace_bytes=32 * MiB)
    source = export(pair, "m1")
    # Fill the namespace so the precopy has 32 MiB to move; at 4 MiB/s that takes about 8 s, and
    # the fio run below (well under a second here) lands inside it, under change tracking.
    filled = qemu_io(source.uri, "write -P 0x5a 0 32M")
    assert filled.returncode == 0, filled.stderr
    job = migrate(pair, "m1", to="n2", bandwidth_bytes_per_s=4 * MiB)
    wait_phase(pair, job.id, {migration_pb2.PRECOPY}, also=lambda j: j.bytes_transferred > 0)

    writer = fio.FioJob(uri=source.uri, size_bytes=8 * MiB, iodepth=8)  # random 4k writes, crc32c headers
    written = fio.run(writer, timeout_s=120)
    assert written.ok, written.messages
    assert written.write.ios == 2048 and written.read.ios == 2048  # written, then checked on the source
    during = get_job(pair, job.id).phase
    assert during in (migration_pb2.PRECOPY, migration_pb2.DIRTY_ITERATION), migration_pb2.Phase.Name(during)

    job = wait_phase(pair, job.id, TERMINAL)
    assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
    job = wait_verified(pair, job.id)
    assert job.verification == migration_pb2.VERIFICATION_PASSED, job.verification_note
    assert job.source_digest and job.source_digest == job.destination_digest
    # fio's blocks were changed under tracking, so the dirty rounds carried them again
    assert phase_bytes(job, migration_pb2.DIRTY_ITERATION) >= 8 * MiB

    destination = export(pair, "m1")
    assert destination.node == "n2" and destination.uri != source.uri
    checked = fio.run(fio.FioJob(uri=destination.uri, size_bytes=8 * MiB, iodepth=8, verify_only=True),
                      timeout_s=120)
    assert checked.ok, checked.messages
    assert checked.read.ios == 2048
    # the same check where fio never wrote fails, so a pass above means fio's data is there
    elsewhere = fio.run(fio.FioJob(uri=destination.uri, size_bytes=8 * MiB, offset_bytes=8 * MiB, iodepth=8,
                                   verify_only=True), timeout_s=120)
    assert not elsewhere.ok and "verify" in elsewhere.messages, elsewhere.messages
    rest = qemu_io(destination.uri, "read -P 0x5a 8M 24M")
    assert rest.returncode == 0 and "Pattern verification failed" not in rest.stdout, rest.stdout

    channel, n1 = pair.agent_stub("n1")
    with channel, pytest.raises(grpc.RpcError) as caught:
        n1.ExportController(agent_pb2.GetControllerRequest(controller_id="m1"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


REGION_BLOCKS = 1024


def stamp(lba: int, seq: int) -> bytes:
    return struct.pack(">QQ", lba, seq) * 256


class SwitchoverWriter(threading.Thread):
    """Writes blocks one at a time, flat out, until the server hangs up; records what was acked."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.client = RawNbd(uri)
        assert self.client.go("m2")[-1][0] == 1
        self.acked: dict[int, int] = {}
        self.unanswered: tuple[int, int] | None = None
        self.errors: list[int] = []
        self.last_reply_at = 0.0
        self.closed_at = 0.0
        self.stopping = False

    def run(self) -> None:
        seq = 0
        while not self.stopping:
            seq += 1
            lba = seq % REGION_BLOCKS
            try:
                error, _ = self.client.request(1, lba * 4096, 4096, stamp(lba, seq))
            except (ConnectionError, OSError):
                self.unanswered = (lba, seq)
                self.closed_at = time.time()
                return
            self.last_reply_at = time.time()
            if error:
                self.errors.append(error)
                return
            self.acked[lba] = seq

    def stop(self) -> None:
        self.stopping = True
        self.client.sock.close()
        self.join(10)


def test_a_client_writing_through_the_switchover_stalls_is_cut_off_and_loses_no_acked_write(
        pair: LocalCluster) -> None:
    create(pair, "m2", namespace_bytes=8 * MiB)
    source = export(pair, "m2")
    writer = SwitchoverWriter(source.uri)
    writer.start()
    try:
        job = migrate(pair, "m2", to="n2", max_rounds=3, on_no_convergence=migration_pb2.FORCE)
        job = wait_phase(pair, job.id, TERMINAL)
        assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
        writer.join(30)
        assert not writer.is_alive(), "the source kept serving the client after it released the controller"
    finally:
        writer.stop()

    # While suspended the request waited rather than failing; it got no reply before the hang-up.
    assert writer.errors == [], f"the server failed requests during the migration: errno {writer.errors}"
    assert writer.unanswered is not None and len(writer.acked) > 0
    stop_copy = next(p for p in job.phases if p.phase == migration_pb2.STOP_AND_COPY)
    # the connection stayed open through the suspend and ended only at the release after COMMIT
    stop_copy_end = stop_copy.started_at + stop_copy.duration_ms / 1000.0
    assert writer.closed_at >= stop_copy_end, (writer.closed_at, stop_copy_end)

    print(f"{len(writer.acked)} blocks acked, last reply "
          f"{(writer.closed_at - writer.last_reply_at) * 1000:.1f} ms before the hang-up; stop-and-copy took "
          f"{stop_copy.duration_ms:.1f} ms")
    reader = RawNbd(export(pair, "m2").uri)
    assert reader.go("m2")[-1][0] == 1
    error, data = reader.request(0, 0, REGION_BLOCKS * 4096)
    assert error == 0
    lost = []
    for lba, seq in writer.acked.items():
        held = data[lba * 4096:(lba + 1) * 4096]
        # the write in flight at the hang-up may have landed before the suspend; it is newer
        in_flight = writer.unanswered[0] == lba and held == stamp(*writer.unanswered)
        if held != stamp(lba, seq) and not in_flight:
            lost.append((lba, seq, struct.unpack(">QQ", held[:16])))
    assert lost == [], f"{len(lost)} acknowledged writes missing on the destination, first {lost[0]}"


def test_demo_with_the_fio_workload_verifies_fio_data_on_the_destination() -> None:
    demo = subprocess.Popen([sys.executable, "-m", "orchctl.demo", "--workload", "fio", "--namespace", "64M",
                             "--agents", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = demo.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        demo.send_signal(signal.SIGINT)  # the demo's LocalCluster stops its processes on the way out
        out, err = demo.communicate(timeout=60)
        raise AssertionError(f"the demo did not finish in 180 s: {err[-2000:]}") from None
    assert demo.returncode == 0, err[-2000:]
    result = json.loads(out)
    assert result["phase"] == "COMPLETED" and result["verified"] and result["builtin_verified"]
    assert result["blackout_ms"] > 0 and "built-in guest" in result["blackout_source"]
    assert [p["phase"] for p in result["phases"]][-1] == "COMPLETED"
    fio_part = result["fio"]
    assert fio_part["destination_uri"] != fio_part["source_uri"]
    assert fio_part["written_before_migration"] == {**fio_part["written_before_migration"], "writes": 4096,
                                                    "verified": True}
    assert fio_part["written_across_migration"]["writes_completed"] > 0
    assert fio_part["written_across_migration"]["verified"], fio_part["written_across_migration"]

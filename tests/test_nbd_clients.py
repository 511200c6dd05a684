"""The agent's NBD server against real clients (qemu-io, nbdcopy, nbdinfo, fio) and a raw client
written from the protocol document; ExportController through the real orchestrator and orchctl."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from orchctl import fio
from orchctl.localcluster import LocalCluster, wait_for
from proto.v1 import agent_pb2
from tests.nbdprobe import RawNbd, create, export, qemu_io, two_agents

MiB = 1 << 20
pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("qemu-io", "nbdcopy", "nbdinfo", "fio")),
    reason="needs qemu-utils, libnbd-bin and fio (scripts/setup.sh installs them)")


@pytest.fixture(scope="module")
def nbd_cluster() -> Iterator[LocalCluster]:
    """etcd, an orchestrator and agents n1, n2 shared by this module; each test has its own controller."""
    yield from two_agents()


def test_export_uri_names_the_owner_and_qemu_io_reads_back_its_pattern(nbd_cluster: LocalCluster) -> None:
    create(nbd_cluster, "q1", node="n2")
    exported = export(nbd_cluster, "q1")
    node = nbd_cluster.node("n2")
    assert node is not None
    assert exported.node == "n2" and exported.controller_id == "q1"
    assert exported.uri.startswith(f"nbd://{node.address.rpartition(':')[0]}:") and exported.uri.endswith("/q1")
    assert export(nbd_cluster, "q1").uri == exported.uri  # idempotent

    done = qemu_io(exported.uri, "write -P 0xab 0 64k", "read -P 0xab 0 64k")
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done.stdout + done.stderr
    wrong = qemu_io(exported.uri, "read -P 0xcd 0 64k")
    assert "Pattern verification failed" in wrong.stdout, wrong.stdout
    # an unaligned write works: qemu honours the advertised 4096-byte minimum (read-modify-write)
    done = qemu_io(exported.uri, "write -P 0x11 1536 1k", "read -P 0x11 1536 1k", "read -P 0xab 0 1536",
                   "read -P 0xab 2560 1536")
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done.stdout + done.stderr

    info = subprocess.run(["nbdinfo", "--json", exported.uri], capture_output=True, text=True, timeout=30,
                          check=True)
    (described,) = json.loads(info.stdout)["exports"]
    assert described["export-size"] == 16 * MiB
    assert described["block_size_minimum"] == 4096 and described["block_size_preferred"] == 4096
    for feature in ("can_flush", "can_trim", "can_zero", "can_fua", "can_multi_conn"):
        assert described[feature] is True, feature


def test_nbdcopy_into_the_export_and_back_equals_the_namespace(nbd_cluster: LocalCluster, tmp_path: Path) -> None:
    tmp = tmp_path
    create(nbd_cluster, "cp1", namespace_bytes=8 * MiB)
    uri = export(nbd_cluster, "cp1").uri
    source = tmp / "in.img"
    source.write_bytes(os.urandom(8 * MiB))
    subprocess.run(["nbdcopy", str(source), uri], check=True, capture_output=True, timeout=60)
    copied = tmp / "out.img"
    subprocess.run(["nbdcopy", uri, str(copied)], check=True, capture_output=True, timeout=60)
    assert copied.read_bytes() == source.read_bytes()
    # and what the agent keeps is the same bytes: the export is the namespace, not a copy of it
    (namespace,) = (nbd_cluster.workdir / "n1").glob("cp1*.ns")
    assert namespace.read_bytes() == source.read_bytes()


def test_fio_verify_passes_and_verify_only_of_an_unwritten_region_fails(nbd_cluster: LocalCluster) -> None:
    create(nbd_cluster, "f1")
    uri = export(nbd_cluster, "f1").uri
    job = fio.FioJob(uri=uri, size_bytes=4 * MiB, iodepth=8)
    written = fio.run(job, timeout_s=120)
    assert written.ok, written.messages
    assert written.write.ios == 1024 and written.read.ios == 1024  # every block written, then checked

    again = fio.run(fio.FioJob(uri=uri, size_bytes=4 * MiB, iodepth=8, verify_only=True), timeout_s=120)
    assert again.ok, again.messages
    # the same job over the zeroed second 4 MiB must fail: the check can tell good from bad
    zeroed = fio.run(fio.FioJob(uri=uri, size_bytes=4 * MiB, offset_bytes=4 * MiB, iodepth=8, verify_only=True),
                     timeout_s=120)
    assert not zeroed.ok and "verify" in zeroed.messages, zeroed.messages


def test_protocol_refusals_and_commands_with_a_raw_client(nbd_cluster: LocalCluster) -> None:
    create(nbd_cluster, "r1", namespace_bytes=1 * MiB)
    uri = export(nbd_cluster, "r1").uri

    client = RawNbd(uri)
    listed = client.option(3)
    assert (2, struct.pack(">I", 2) + b"r1") in listed and listed[-1][0] == 1
    (kind, message), = client.go("nope")
    assert kind == (1 << 31) + 6 and b"'nope'" in message and b"orchctl export" in message
    replies = client.go("r1")
    assert replies[-1][0] == 1
    infos = {struct.unpack(">H", data[:2])[0]: data[2:] for kind, data in replies if kind == 3}
    size, flags = struct.unpack(">QH", infos[0])
    assert size == MiB and flags & 1 and flags & (1 << 2) and flags & (1 << 5) and flags & (1 << 6)
    assert struct.unpack(">III", infos[3]) == (4096, 4096, 4 * MiB)

    block = os.urandom(4096)
    assert client.request(1, 8192, 4096, block, flags=1) == (0, b"")  # FUA write
    assert client.request(0, 8192, 4096) == (0, block)
    einval, enospc = 22, 28
    assert client.request(0, 512, 4096)[0] == einval  # unaligned offset
    assert client.request(0, 0, 1000)[0] == einval  # unaligned length
    assert client.request(0, MiB, 4096)[0] == einval  # past the end
    assert client.request(1, MiB - 4096, 8192, bytes(8192))[0] == enospc
    assert client.request(1, 4096, 512, bytes(512))[0] == einval  # unaligned write, payload consumed
    assert client.request(99, 0, 4096)[0] == einval  # unknown command
    assert client.request(0, 0, 4096, flags=1 << 4)[0] == einval  # a flag READ does not take
    assert client.request(6, 8192, 4096) == (0, b"")  # WRITE_ZEROES
    assert client.request(0, 8192, 4096) == (0, bytes(4096))
    assert client.request(4, 0, 4096) == (0, b"")  # TRIM (a hint: data may stay)
    assert client.request(3, 0, 0) == (0, b"")  # FLUSH
    client.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 99, 0, 0))  # DISC
    assert client.closed_by_server()

    # unexporting closes open connections; the export is then unknown
    idle = RawNbd(uri)
    assert idle.go("r1")[-1][0] == 1
    channel, n1 = nbd_cluster.agent_stub("n1")
    with channel:
        assert n1.UnexportController(agent_pb2.GetControllerRequest(controller_id="r1"), timeout=10).uri == ""
    assert idle.closed_by_server()
    assert RawNbd(uri).go("r1")[-1][0] == (1 << 31) + 6


@pytest.mark.parametrize(("controller_id", "code", "named"), [
    ("", grpc.StatusCode.INVALID_ARGUMENT, "controller_id"),
    ("Bad_ID!", grpc.StatusCode.INVALID_ARGUMENT, "'Bad_ID!'"),
    ("nope", grpc.StatusCode.NOT_FOUND, "'nope'"),
])
def test_export_of_a_bad_or_unknown_controller_is_refused(nbd_cluster: LocalCluster, controller_id: str,
                                                           code: grpc.StatusCode, named: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        export(nbd_cluster, controller_id)
    assert caught.value.code() == code, caught.value.details()  # type: ignore[attr-defined]
    assert named in caught.value.details()  # type: ignore[attr-defined]


def test_orchctl_export_prints_the_uri_and_refuses_unknown_controllers(nbd_cluster: LocalCluster) -> None:
    create(nbd_cluster, "o1")
    base = [sys.executable, "-m", "orchctl.cli", "--server", nbd_cluster.orchestrator_address]
    plain = subprocess.run([*base, "export", "o1"], capture_output=True, text=True, timeout=30, check=True)
    as_json = json.loads(subprocess.run([*base, "export", "o1", "-o", "json"], capture_output=True, text=True,
                                        timeout=30, check=True).stdout)
    assert plain.stdout.strip() == as_json["uri"] and as_json["node"] == "n1" and as_json["controller_id"] == "o1"
    done = qemu_io(plain.stdout.strip(), "read -P 0 0 4k")  # the printed URI works as it is
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done.stdout
    refused = subprocess.run([*base, "export", "nope"], capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 2 and "'nope'" in refused.stderr and "Traceback" not in refused.stderr


def test_export_of_a_controller_whose_node_is_down_is_refused(nbd_cluster: LocalCluster) -> None:
    nbd_cluster.start_agent("n3")
    create(nbd_cluster, "d1", node="n3")
    nbd_cluster.agents["n3"].stop()
    wait_for("n3 to leave the live nodes", lambda: nbd_cluster.node("n3") is None, 30)
    with pytest.raises(grpc.RpcError) as caught:
        export(nbd_cluster, "d1")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "'n3'" in caught.value.details()  # type: ignore[attr-defined]

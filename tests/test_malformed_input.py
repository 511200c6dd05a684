"""Garbage thrown at every port of a real agent and a real orchestrator: each malformed request is
answered with a clear error where the protocol has one (gRPC INVALID_ARGUMENT), or the connection
is closed, the servers keep answering real calls, and the process logs grow by a bounded number
of lines without a traceback (malformed input is logged at most once per kind per 10 s)."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest

from agent.dataplane.framing import Frame, FrameType, encode_frame
from orchctl.localcluster import LocalCluster, Proc
from proto.v1 import agent_pb2, migration_pb2
from tests.conftest import etcdctl, unique_prefix

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ROUNDS = 40  # of each kind of garbage at each port
# Lines a process may add for all the garbage of one test: a line per kind of malformed input
# (rate-limited), plus slack for the ordinary lines a real call or a scan may log meanwhile.
MAX_NEW_LINES = 12


@pytest.fixture(scope="module")
def garbage_target(request: pytest.FixtureRequest, shared_etcd: str) -> Iterator[LocalCluster]:
    """An orchestrator and agent n1, with controller g1 exported over NBD."""
    prefix = unique_prefix(f"{request.module.__name__}-garbage")
    try:
        with LocalCluster() as c:
            c.use_etcd(shared_etcd, prefix)
            c.start_with_agents(["n1"])
            channel, n1 = c.agent_stub("n1")
            with channel:
                n1.CreateController(agent_pb2.CreateControllerRequest(controller_id="g1", namespace_bytes=1 << 20),
                                    timeout=30)
                c.nbd_uri = n1.ExportController(  # type: ignore[attr-defined]
                    agent_pb2.GetControllerRequest(controller_id="g1"), timeout=30).uri
            yield c
    finally:
        etcdctl(shared_etcd, "del", "--prefix", prefix)


def log_lines(proc: Proc) -> list[str]:
    return proc.log_path.read_text(errors="replace").splitlines()


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def throw(address: str, payload: bytes, timeout_s: float = 20.0) -> bool:
    """Sends `payload` and reads until the server closes the connection; True if it did in time."""
    with socket.create_connection(split(address), timeout=timeout_s) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)  # no more is coming: a server waiting for more gives up at EOF
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if not s.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True  # closed on us while we still wrote
        except TimeoutError:
            return False
    return False


def garbage(rng: random.Random) -> list[bytes]:
    """Random bytes of several lengths, and an HTTP/2 preface followed by junk."""
    return [rng.randbytes(rng.choice((1, 7, 64, 900, 5000))), HTTP2_PREFACE + rng.randbytes(rng.randint(1, 400))]


def throw_all(address: str, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(ROUNDS):
        for payload in garbage(rng):
            assert throw(address, payload), f"{address} kept a garbage connection open"


def garbage_grpc_call(address: str, method: str) -> grpc.RpcError:
    """A call to a real method whose body is not a protobuf message at all."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method)  # no serializers: the body goes out as given
        try:
            call(b"\xff\xff\xff", timeout=10)
        except grpc.RpcError as exc:
            return exc
    raise AssertionError(f"{method} accepted a body of b'\\xff\\xff\\xff'")


def assert_quiet(proc: Proc, before: int) -> None:
    added = log_lines(proc)[before:]
    assert not [line for line in added if "Traceback" in line], "\n".join(added)
    assert len(added) <= MAX_NEW_LINES, f"{proc.name} logged {len(added)} lines:\n" + "\n".join(added)


def test_orchestrator_grpc_port_survives_garbage_quietly(garbage_target: LocalCluster) -> None:
    orch = garbage_target.orchestrators[0]
    before = len(log_lines(orch))
    throw_all(garbage_target.orchestrator_address, seed=1)
    for _ in range(ROUNDS):
        exc = garbage_grpc_call(garbage_target.orchestrator_address, "/nvmigrate.v1.MigrationService/GetMigration")
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc  # type: ignore[attr-defined]
        assert exc.details() == "request body is not a valid nvmigrate.v1.GetMigrationRequest"  # type: ignore[attr-defined]
    channel, api = garbage_target.migration_stub()
    with channel:
        nodes = api.ListNodes(migration_pb2.ListNodesRequest(), timeout=10).nodes
    assert [n.name for n in nodes] == ["n1"]
    assert_quiet(orch, before)


def test_agent_grpc_port_survives_garbage_quietly(garbage_target: LocalCluster) -> None:
    agent = garbage_target.agents["n1"]
    node = garbage_target.node("n1")
    assert node is not None
    before = len(log_lines(agent))
    throw_all(node.address, seed=2)
    for _ in range(ROUNDS):
        exc = garbage_grpc_call(node.address, "/nvmigrate.v1.AgentService/GetController")
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc  # type: ignore[attr-defined]
        assert exc.details() == "request body is not a valid nvmigrate.v1.GetControllerRequest"  # type: ignore[attr-defined]
    channel, stub = garbage_target.agent_stub("n1")
    with channel:
        status = stub.GetController(agent_pb2.GetControllerRequest(controller_id="g1"), timeout=10)
    assert status.controller_id == "g1"
    assert_quiet(agent, before)


def test_agent_data_plane_and_nbd_ports_survive_garbage_quietly(garbage_target: LocalCluster) -> None:
    agent = garbage_target.agents["n1"]
    node = garbage_target.node("n1")
    assert node is not None
    nbd = urlparse(garbage_target.nbd_uri)  # type: ignore[attr-defined]
    before = len(log_lines(agent))
    throw_all(node.data_address, seed=3)
    throw_all(f"{nbd.hostname}:{nbd.port}", seed=4)
    # both still serve: the data plane answers a HELLO for an unknown job with a refusal, and
    # the NBD server greets a new client
    with socket.create_connection(split(node.data_address), timeout=10) as s:
        s.sendall(encode_frame(Frame(FrameType.HELLO, payload=b'{"job_id": "nope", "token": "x"}')))
        assert b"not registered" in s.recv(65536)
    with socket.create_connection((str(nbd.hostname), int(nbd.port or 0)), timeout=10) as s:
        assert s.recv(8) == b"NBDMAGIC"
    assert_quiet(agent, before)


def test_orchestrator_http_port_survives_garbage_quietly(garbage_target: LocalCluster) -> None:
    orch = garbage_target.orchestrators[0]
    before = len(log_lines(orch))
    throw_all(orch.http_address, seed=5)
    with socket.create_connection(split(orch.http_address), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and reply.rstrip().endswith(b"ok"), reply
    assert_quiet(orch, before)


def test_the_log_names_what_was_dropped(garbage_target: LocalCluster) -> None:
    """One line per kind: the first malformed gRPC request of the window, said plainly."""
    text = Path(garbage_target.orchestrators[0].log_path).read_text(errors="replace")
    assert "request body is not a valid nvmigrate.v1.GetMigrationRequest" in text

"""Tests for the orchctl CLI, run as a real subprocess (`python -m orchctl.cli`).

A small grpc.aio MigrationService with canned answers stands in for the orchestrator. It runs on
its own event loop in a background thread so the tests can call the CLI with plain blocking
subprocess.run (a blocked pytest loop would otherwise starve the server).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from orchctl import cli
from proto.v1 import migration_pb2, migration_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0
GIB = 1024**3


def job(job_id: str, phase: int, **fields: object) -> migration_pb2.Migration:
    values: dict[str, object] = {
        "id": job_id,
        "controller_id": "c1",
        "source_node": "node-a",
        "destination_node": "node-b",
        "phase": phase,
        "namespace_bytes": GIB,
        "created_at": T0,
        "updated_at": T0 + 2,
    }
    values.update(fields)
    return migration_pb2.Migration(**values)  # type: ignore[arg-type]


def progression(job_id: str, final: migration_pb2.Phase, reason: str) -> list[migration_pb2.Migration]:
    records: list[migration_pb2.PhaseRecord] = []
    states = []
    for i, phase in enumerate(
        [migration_pb2.PENDING, migration_pb2.PREPARING, migration_pb2.PRECOPY, migration_pb2.DIRTY_ITERATION]
    ):
        records.append(migration_pb2.PhaseRecord(phase=phase, started_at=T0 + i * 0.1, duration_ms=100))
        states.append(job(job_id, phase, phases=list(records), bytes_transferred=i * GIB // 4, rounds=i))
    records.append(migration_pb2.PhaseRecord(phase=final, started_at=T0 + 0.4))
    states.append(job(job_id, final, phases=records, bytes_transferred=GIB, reason=reason, downtime_ms=3.5))
    return states


class FakeOrchestrator(migration_pb2_grpc.MigrationServiceServicer):
    """Canned answers; records the last CreateMigrationRequest for assertions."""

    def __init__(self) -> None:
        self.created: list[migration_pb2.CreateMigrationRequest] = []
        self.flaky_watches = 0

    async def CreateMigration(
        self, request: migration_pb2.CreateMigrationRequest, context: grpc.aio.ServicerContext
    ) -> migration_pb2.Migration:
        if request.controller_id == "busy":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "controller busy is already migrating")
        self.created.append(request)
        return job("m-new", migration_pb2.PENDING, controller_id=request.controller_id, destination_node="")

    async def GetMigration(
        self, request: migration_pb2.GetMigrationRequest, context: grpc.aio.ServicerContext
    ) -> migration_pb2.Migration:
        if request.id != "m-ok":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"migration {request.id} not found")
        return progression("m-ok", migration_pb2.COMPLETED, "switched over in 3.5 ms")[-1]

    async def ListMigrations(
        self, request: migration_pb2.ListMigrationsRequest, context: grpc.aio.ServicerContext
    ) -> migration_pb2.ListMigrationsResponse:
        jobs = [
            progression("m-ok", migration_pb2.COMPLETED, "")[-1],
            job("m-run", migration_pb2.PRECOPY, controller_id="c2", bytes_transferred=GIB // 2),
        ]
        if request.active_only:
            jobs = [j for j in jobs if j.phase == migration_pb2.PRECOPY]
        return migration_pb2.ListMigrationsResponse(migrations=jobs)

    async def WatchMigration(
        self, request: migration_pb2.WatchMigrationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[migration_pb2.MigrationEvent]:
        if request.id == "m-ok" or request.id == "m-new":
            states = progression(request.id, migration_pb2.COMPLETED, "")
        elif request.id == "m-flaky":
            # The first stream breaks mid-job, as when the orchestrator leader changes.
            self.flaky_watches += 1
            states = progression(request.id, migration_pb2.COMPLETED, "")
            if self.flaky_watches == 1:
                for state in states[:2]:
                    yield migration_pb2.MigrationEvent(migration=state)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "leader changed")
        elif request.id == "m-rb":
            states = progression(request.id, migration_pb2.ROLLED_BACK, "no convergence after 30 rounds")
        else:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"migration {request.id} not found")
        for state in states:
            yield migration_pb2.MigrationEvent(migration=state)

    async def CancelMigration(
        self, request: migration_pb2.CancelMigrationRequest, context: grpc.aio.ServicerContext
    ) -> migration_pb2.Migration:
        return job(request.id, migration_pb2.PRECOPY, cancel_requested=True)

    async def ListNodes(
        self, request: migration_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> migration_pb2.ListNodesResponse:
        return migration_pb2.ListNodesResponse(
            nodes=[
                migration_pb2.Node(
                    name="node-a",
                    address="10.0.0.1:7000",
                    live=True,
                    capacity_bytes=8 * GIB,
                    allocated_bytes=2 * GIB,
                    controllers=["c1"],
                )
            ]
        )

    async def ListControllers(
        self, request: migration_pb2.ListControllersRequest, context: grpc.aio.ServicerContext
    ) -> migration_pb2.ListControllersResponse:
        return migration_pb2.ListControllersResponse(
            controllers=[migration_pb2.Controller(id="c1", node="node-a", namespace_bytes=GIB, state="RUNNING")]
        )


class ServerThread:
    def __init__(self) -> None:
        self.servicer = FakeOrchestrator()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = grpc.aio.server()
        migration_pb2_grpc.add_MigrationServiceServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.loop.run_until_complete(self.server.start())
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(10), "fake orchestrator did not start"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    srv = ServerThread()
    srv.start()
    yield srv
    srv.stop()


def run_cli(*args: str, server: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "160"  # rich tables use the full width when stdout is a pipe
    env.pop("ORCHCTL_SERVER", None)
    argv = [sys.executable, "-m", "orchctl.cli"]
    if server is not None:
        argv += ["--server", server]
    return subprocess.run([*argv, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False)


def addr(srv: ServerThread) -> str:
    return f"127.0.0.1:{srv.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# No server / bad input


def test_unreachable_orchestrator_exits_3_and_names_the_address() -> None:
    target = f"127.0.0.1:{free_port()}"
    result = run_cli("list", server=target)
    assert result.returncode == 3, result.stderr
    assert target in result.stderr
    assert "cannot reach the orchestrator" in result.stderr
    assert "ORCHCTL_SERVER" in result.stderr and "(UNAVAILABLE)" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_bandwidth_is_a_usage_error() -> None:
    result = run_cli("migrate", "c1", "--bandwidth", "12Q")
    assert result.returncode == 2
    assert "12Q" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("100M", 100 * 1024**2),
        ("1G", 1024**3),
        ("1.5g", 3 * 1024**3 // 2),
        ("500MB", 500 * 10**6),
        ("64KiB/s", 64 * 1024),
    ],
)
def test_parse_bandwidth(text: str, expected: int) -> None:
    assert cli.parse_bandwidth(text) == expected


@pytest.mark.parametrize("text", ["12Q", "", "M", "-5M", "0", "1e3", "ten"])
def test_parse_bandwidth_rejects_junk(text: str) -> None:
    with pytest.raises(Exception, match="invalid bandwidth"):
        cli.parse_bandwidth(text)


def test_demo_passes_its_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def run_demo(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    module = types.ModuleType("orchctl.demo")
    module.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "orchctl.demo", module)
    assert cli.main(["demo", "--help", "--nodes", "3"]) == 7
    assert seen == [["--help", "--nodes", "3"]]
    # a demo option that begins like orchctl's own --tls-* options is the demo's, not an abbreviation
    assert cli.main(["demo", "--tls", "--no-tls"]) == 7
    assert seen[-1] == ["--tls", "--no-tls"]


def test_unknown_arguments_are_rejected() -> None:
    assert cli.main(["nodes", "--bogus"]) == 2


# ---------------------------------------------------------------------------------------------
# Against the fake orchestrator


def test_get_shows_detail_and_timeline(server: ServerThread) -> None:
    result = run_cli("get", "m-ok", server=addr(server))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "m-ok" in out and "node-a -> node-b" in out
    assert "switched over in 3.5 ms" in out
    for phase in ("PENDING", "PREPARING", "PRECOPY", "DIRTY_ITERATION", "COMPLETED"):
        assert phase in out


def test_list_json_is_parseable(server: ServerThread) -> None:
    result = run_cli("list", "-o", "json", server=addr(server))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    jobs = {m["id"]: m for m in data["migrations"]}
    assert set(jobs) == {"m-ok", "m-run"}
    assert jobs["m-run"]["phase"] == "PRECOPY"
    assert jobs["m-run"]["controller_id"] == "c2"
    assert int(jobs["m-run"]["bytes_transferred"]) == GIB // 2


def test_list_table(server: ServerThread) -> None:
    result = run_cli("list", "--active", server=addr(server))
    assert result.returncode == 0, result.stderr
    assert "m-run" in result.stdout and "m-ok" not in result.stdout


def test_watch_completed_exits_0(server: ServerThread) -> None:
    result = run_cli("watch", "m-ok", server=addr(server))
    assert result.returncode == 0, result.stderr
    assert "COMPLETED" in result.stdout.splitlines()[-1]
    assert "PRECOPY" in result.stdout  # one line per phase change when not on a terminal


def test_watch_rolled_back_exits_1_with_reason(server: ServerThread) -> None:
    result = run_cli("watch", "m-rb", server=addr(server))
    assert result.returncode == 1, result.stderr
    last = result.stdout.splitlines()[-1]
    assert "ROLLED_BACK" in last and "no convergence after 30 rounds" in last


def test_watch_json_prints_one_event_per_line(server: ServerThread) -> None:
    result = run_cli("watch", "m-rb", "-o", "json", server=addr(server))
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["migration"]["phase"] for e in events][-1] == "ROLLED_BACK"
    assert len(events) == 5


def test_watch_reconnects_when_the_stream_breaks(server: ServerThread) -> None:
    result = run_cli("watch", "m-flaky", server=addr(server))
    assert result.returncode == 0, result.stderr
    assert "leader changed" in result.stderr and "reconnecting" in result.stderr
    assert "COMPLETED" in result.stdout.splitlines()[-1]
    assert server.servicer.flaky_watches == 2


def test_not_found_exits_2_with_server_message(server: ServerThread) -> None:
    result = run_cli("get", "m-missing", server=addr(server))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: migration m-missing not found (NOT_FOUND)"


def test_migrate_sends_policy_and_waits(server: ServerThread) -> None:
    result = run_cli(
        "migrate",
        "c1",
        "--to",
        "node-b",
        "--bandwidth",
        "100M",
        "--max-rounds",
        "7",
        "--on-no-convergence",
        "force",
        "--wait",
        server=addr(server),
    )
    assert result.returncode == 0, result.stderr
    assert "m-new" in result.stdout and "COMPLETED" in result.stdout
    request = server.servicer.created[-1]
    assert request.controller_id == "c1" and request.destination_node == "node-b"
    assert request.policy.bandwidth_bytes_per_s == 100 * 1024**2
    assert request.policy.max_rounds == 7
    assert not request.policy.HasField("max_downtime_ms")  # unset: the server default applies
    assert request.policy.on_no_convergence == migration_pb2.FORCE


def test_migrate_refused_exits_2(server: ServerThread) -> None:
    result = run_cli("migrate", "busy", "-o", "json", server=addr(server))
    assert result.returncode == 2
    assert "already migrating (FAILED_PRECONDITION)" in result.stderr


def test_cancel_nodes_controllers(server: ServerThread) -> None:
    result = run_cli("cancel", "m-run", "-o", "json", server=addr(server))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cancel_requested"] is True

    result = run_cli("nodes", server=addr(server))
    assert result.returncode == 0, result.stderr
    assert "node-a" in result.stdout and "2.0 GiB (25%)" in result.stdout

    result = run_cli("controllers", "-o", "json", server=addr(server))
    assert json.loads(result.stdout)["controllers"][0]["state"] == "RUNNING"

"""The agent's HTTP side (`--http`): /metrics, /healthz and /readyz.

The pure parts (the data plane's rate window, readiness, command names, the exposition) are
tested as tables; the rest against real processes: etcd, an orchestrator and two agents serving
HTTP on ports they pick, one migration run to the end, then the agents scraped over HTTP.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.dataplane.traffic import Traffic
from agent.metrics import ACTIVE_STAGES, AgentSnapshot, AgentState
from agent.node_lease import LeaseStatus
from agent.nvme import commands
from agent.readiness import readiness_problem
from cluster.http_server import parse_http_address, reachable_address
from cluster.records import DriveHealth, NodeRecord
from orchctl.localcluster import LocalCluster, Proc, wait_for
from proto.v1 import migration_pb2
from tests.clusterprobe import TERMINAL, create_controller, get_job, migrate, wait_phase, wait_verified
from tests.nbdprobe import RawNbd, export

MiB = 1 << 20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text, keyed by (sample name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


# ---- pure parts -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_traffic_rate_is_the_average_of_the_last_whole_seconds() -> None:
    clock = FakeClock()
    traffic = Traffic(window_s=5, clock=clock)
    assert traffic.rate_bytes_per_s() == 0.0
    traffic.add(1000)
    assert traffic.rate_bytes_per_s() == 0.0  # the running second is not counted yet
    clock.now = 1001.5
    assert traffic.rate_bytes_per_s() == 200.0  # 1000 bytes in the last 5 whole seconds
    traffic.add(500)
    traffic.add(0)
    traffic.add(-3)  # nothing: never negative
    clock.now = 1002.0
    assert traffic.rate_bytes_per_s() == 300.0
    clock.now = 1005.9
    assert traffic.rate_bytes_per_s() == 300.0  # second 1000 is still in 1000..1004
    clock.now = 1006.0
    assert traffic.rate_bytes_per_s() == 100.0  # second 1000 left the window
    clock.now = 1007.0
    assert traffic.rate_bytes_per_s() == 0.0
    assert traffic.total_bytes == 1500  # the total never forgets


def test_traffic_refuses_an_empty_window() -> None:
    with pytest.raises(ValueError, match="window_s=0"):
        Traffic(window_s=0)


@pytest.mark.parametrize(("lease", "serving", "now", "reason"), [
    (LeaseStatus(2, 100.0, ""), True, 101.9, None),
    (LeaseStatus(2, 100.0, ""), False, 100.5, "AgentService (gRPC) is not serving"),
    (LeaseStatus(2, None, ""), True, 100.0, "node not registered in etcd"),
    (LeaseStatus(2, None, "etcd expired the node lease"), True, 100.0,
     "node not registered in etcd: etcd expired the node lease"),
    (LeaseStatus(2, 100.0, "etcd did not answer: connection refused\nmore"), True, 102.5,
     "node lease not confirmed in etcd for 2.5 s (TTL 2 s), it may have expired: etcd did not answer: "
     "connection refused"),
    (LeaseStatus(2, 100.0, ""), True, 102.0, "node lease not confirmed in etcd for 2.0 s (TTL 2 s), it may have "
                                             "expired"),
])
def test_readiness(lease: LeaseStatus, serving: bool, now: float, reason: str | None) -> None:
    assert readiness_problem(lease, serving, now) == reason


@pytest.mark.parametrize(("sqe", "name"), [
    (commands.migration_suspend(3), "migration_send.suspend"),
    (commands.migration_resume(3), "migration_send.resume"),
    (commands.set_controller_state(3, 0, 64, commands.SequenceIndicator.FIRST), "migration_send.set_controller_state"),
    (commands.get_controller_state(3, 0, 64), "migration_receive.get_controller_state"),
    (commands.track_send(1, commands.LoggingAction.START), "track_send"),
    (commands.cdq_create(3, 1024, 0x1000), "controller_data_queue.create"),
    (commands.cdq_delete(1), "controller_data_queue.delete"),
    (commands.get_cdq_pointers(1), "get_features"),
    (commands.get_log_page(2, 512), "get_log_page"),
    (commands.Sqe(0x41, cdw10=0x7), "other"),  # Migration Send with a select spec.py does not name
    (commands.Sqe(0xC5), "other"),  # a vendor opcode
])
def test_admin_command_names_are_a_bounded_set(sqe: commands.Sqe, name: str) -> None:
    assert commands.admin_command_name(sqe) == name


def test_the_exposition_parses_and_lists_every_busy_stage() -> None:
    health = DriveHealth(critical_warning=4, temperature_k=318, available_spare=90, available_spare_threshold=10,
                         percentage_used=7, media_errors=2)
    state = AgentState(lambda: AgentSnapshot(sessions={("source", "round"): 2}, controllers=3, nbd_clients=1,
                                             nbd_requests={"READ": 5, "WRITE": 1, "OTHER": 1}, health=health,
                                             data_dir_free_bytes=123, ready=True, lease_expiries=1))
    scraped = samples(state.exposition().decode())
    assert all(name.startswith(("nvmigrate_agent_", "process_", "python_")) for name, _ in scraped)
    assert value(scraped, "nvmigrate_agent_sessions", role="source", stage="round") == 2
    busy = {(dict(labels)["role"], dict(labels)["stage"]) for name, labels in scraped
            if name == "nvmigrate_agent_sessions"}
    assert busy == set(ACTIVE_STAGES)
    assert ("destination", "running") not in busy and ("source", "released") not in busy
    assert value(scraped, "nvmigrate_agent_nbd_requests_total", command="read") == 5
    assert value(scraped, "nvmigrate_agent_nbd_requests_total", command="other") == 1
    assert value(scraped, "nvmigrate_agent_nbd_requests_total", command="trim") == 0
    assert value(scraped, "nvmigrate_agent_drive_critical_warning") == 4
    assert value(scraped, "nvmigrate_agent_drive_temperature_kelvin") == 318
    assert value(scraped, "nvmigrate_agent_drive_media_errors") == 2
    assert value(scraped, "nvmigrate_agent_controllers") == 3
    assert value(scraped, "nvmigrate_agent_data_dir_free_bytes") == 123
    assert value(scraped, "nvmigrate_agent_ready") == 1
    assert value(scraped, "nvmigrate_agent_lease_expiries_total") == 1
    assert ("nvmigrate_agent_dataplane_sent_bytes_total", ()) in scraped

    unknown = samples(AgentState(lambda: AgentSnapshot()).exposition().decode())
    assert not any(name.startswith("nvmigrate_agent_drive_") for name, _ in unknown)  # no health log: absent


@pytest.mark.parametrize(("text", "parsed"), [
    ("off", None), ("", None), ("127.0.0.1:0", ("127.0.0.1", 0)), ("0.0.0.0:9465", ("0.0.0.0", 9465)),
    ("[::1]:9465", ("::1", 9465)),
])
def test_http_flag(text: str, parsed: tuple[str, int] | None) -> None:
    assert parse_http_address(text) == parsed


@pytest.mark.parametrize("text", ["9465", "host:", "host:port", "h:70000"])
def test_http_flag_refuses_what_is_not_host_port(text: str) -> None:
    with pytest.raises(ValueError, match=f"--http {text!r} is not HOST:PORT"):
        parse_http_address(text)


def test_a_wildcard_listener_is_reached_at_the_advertised_host() -> None:
    assert reachable_address("0.0.0.0", 9465, "10.1.2.3") == "10.1.2.3:9465"
    assert reachable_address("127.0.0.1", 9465, "10.1.2.3") == "127.0.0.1:9465"
    assert reachable_address("::", 9465, "fd00::5") == "[fd00::5]:9465"
    assert NodeRecord.from_bytes(b'{"name": "n1", "address": "a:1", "data_address": "a:2", '
                                 b'"capacity_bytes": 1}').http_address == ""  # an older agent's record


def test_a_bad_http_flag_is_refused_by_name(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "agent.main", "--name", "n1", "--data-dir", str(tmp_path),
                           "--http", "metrics"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--http 'metrics' is not HOST:PORT" in done.stderr and "NVMIGRATE_AGENT_HTTP" in done.stderr
    assert "Traceback" not in done.stderr


# ---- real processes ---------------------------------------------------------------------------


def get(proc: Proc, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{proc.http_address}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(proc: Proc) -> Samples:
    with urllib.request.urlopen(f"http://{proc.http_address}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return samples(reply.read().decode())


def unready(proc: Proc) -> Callable[[], str | None]:
    """/readyz's answer once it is 503."""
    def probe() -> str | None:
        status, text = get(proc, "/readyz")
        return text if status == 503 else None
    return probe


def ready(proc: Proc) -> Callable[[], bool]:
    return lambda: get(proc, "/readyz")[0] == 200


def busy_sessions(scraped: Samples) -> float:
    return sum(v for (name, _), v in scraped.items() if name == "nvmigrate_agent_sessions")


@dataclass
class MigratedCluster:
    cluster: LocalCluster
    job: migration_pb2.Migration
    during: Samples  # the source, scraped while it was sending


@pytest.fixture(scope="module")
def migrated() -> Iterator[MigratedCluster]:
    """etcd of its own (a test stops it), an orchestrator, agents n1 and n2 serving HTTP, and
    controller c1 (16 MiB, a guest writing) moved from n1 to n2 at 8 MiB/s."""
    with LocalCluster() as cluster:
        cluster.start_etcd()
        cluster.start_orchestrator()
        cluster.start_agents(["n1", "n2"], http=True)
        create_controller(cluster, "n1", "c1", 16 * MiB, write_iops=300)
        job = migrate(cluster, "c1", to="n2", bandwidth_bytes_per_s=8 * MiB)
        source = cluster.agents["n1"]

        def sending() -> Samples | None:
            scraped = scrape(source)
            if value(scraped, "nvmigrate_agent_dataplane_send_rate_bytes_per_second") > 0:
                return scraped
            assert get_job(cluster, job.id).phase not in TERMINAL, "the job ended before a scrape saw it send"
            return None

        during = wait_for("n1 to report a send rate", sending, 60, interval_s=0.1)
        job = wait_phase(cluster, job.id, TERMINAL)
        assert migration_pb2.Phase.Name(job.phase) == "COMPLETED", job.reason
        yield MigratedCluster(cluster, job, during)


def test_agents_say_where_they_serve_http(migrated: MigratedCluster) -> None:
    for name in ("n1", "n2"):
        proc = migrated.cluster.agents[name]
        assert proc.http_address.startswith("127.0.0.1:") and not proc.http_address.endswith(":0")
        assert f"agent {name} http on http://{proc.http_address}" in proc.log_path.read_text()
        assert get(proc, "/healthz") == (200, "ok\n")


def test_the_data_plane_counters_match_the_bytes_the_job_moved(migrated: MigratedCluster) -> None:
    job = migrated.job
    source, destination = (scrape(migrated.cluster.agents[name]) for name in ("n1", "n2"))
    # bytes_transferred is the source's count of namespace data and controller and guest state it
    # sent (GetSession / TransferResult total_bytes_sent), as are the counters, framing left out in
    # both; these agents ran this one migration only.
    moved = job.bytes_transferred
    assert moved >= 16 * MiB and moved == sum(p.bytes for p in job.phases)
    assert value(source, "nvmigrate_agent_dataplane_sent_bytes_total") == moved
    assert value(destination, "nvmigrate_agent_dataplane_received_bytes_total") == moved
    assert value(source, "nvmigrate_agent_dataplane_received_bytes_total") == 0
    assert value(destination, "nvmigrate_agent_dataplane_sent_bytes_total") == 0
    # at 8 MiB/s, averaged over whole seconds: under the cap, never above it by more than a burst
    rate = value(migrated.during, "nvmigrate_agent_dataplane_send_rate_bytes_per_second")
    assert 0 < rate <= 9 * MiB


def test_sessions_by_stage_show_the_migration_and_return_to_zero(migrated: MigratedCluster) -> None:
    assert busy_sessions(migrated.during) == 1  # the source's, while it sent
    assert sum(v for (name, labels), v in migrated.during.items()
               if name == "nvmigrate_agent_sessions" and ("role", "source") in labels) == 1
    assert busy_sessions(scrape(migrated.cluster.agents["n2"])) == 0  # its destination runs the controller
    # The source stays STOPPED (its copy kept) until the verifier passes the job and releases it.
    job = wait_verified(migrated.cluster, migrated.job.id)
    assert job.verification == migration_pb2.VERIFICATION_PASSED, job.verification_note
    source = migrated.cluster.agents["n1"]
    wait_for("the source's session to end", lambda: busy_sessions(scrape(source)) == 0, 30)


def test_host_gauges_and_backend_command_latency(migrated: MigratedCluster) -> None:
    source, destination = (scrape(migrated.cluster.agents[name]) for name in ("n1", "n2"))
    assert value(source, "nvmigrate_agent_controllers") == 0
    assert value(destination, "nvmigrate_agent_controllers") == 1
    assert value(destination, "nvmigrate_agent_data_dir_free_bytes") > 0
    assert value(destination, "nvmigrate_agent_drive_available_spare_percent") == 100  # the emulated drive's
    assert value(destination, "nvmigrate_agent_drive_critical_warning") == 0
    assert value(destination, "nvmigrate_agent_drive_temperature_kelvin") > 0
    # the source suspended the controller and read its state; the destination loaded and resumed it
    count = "nvmigrate_agent_backend_command_seconds_count"
    assert value(source, count, command="migration_send.suspend") >= 1
    assert value(source, count, command="migration_receive.get_controller_state") >= 1
    assert value(source, count, command="track_send") >= 1
    assert value(destination, count, command="migration_send.set_controller_state") >= 1
    assert value(destination, count, command="migration_send.resume") >= 1
    assert value(source, "nvmigrate_agent_backend_command_seconds_sum", command="migration_send.suspend") > 0


def test_nbd_clients_and_requests(migrated: MigratedCluster) -> None:
    destination = migrated.cluster.agents["n2"]
    before = value(scrape(destination), "nvmigrate_agent_nbd_requests_total", command="read")
    client = RawNbd(export(migrated.cluster, "c1").uri)
    try:
        client.go("c1")
        assert client.request(0, 0, 4096)[0] == 0
        assert client.request(0, 4096, 4096)[0] == 0
        scraped = scrape(destination)
        assert value(scraped, "nvmigrate_agent_nbd_clients") == 1
        assert value(scraped, "nvmigrate_agent_nbd_requests_total", command="read") == before + 2
    finally:
        client.sock.close()
    wait_for("the NBD client to be gone", lambda: value(scrape(destination), "nvmigrate_agent_nbd_clients") == 0, 10)


def test_readyz_follows_the_node_lease_through_an_etcd_outage(migrated: MigratedCluster) -> None:
    cluster = migrated.cluster
    agents = [cluster.agents["n1"], cluster.agents["n2"]]
    for proc in agents:
        assert get(proc, "/readyz") == (200, "ready\n")
        assert value(scrape(proc), "nvmigrate_agent_ready") == 1
    cluster.stop_etcd()
    try:
        for proc in agents:
            text = wait_for(f"{proc.name} to turn unready", unready(proc), 30)
            assert text.startswith("not ready: node lease not confirmed in etcd for ") and "etcd" in text
            assert text.count("\n") == 1, text  # one line
            assert get(proc, "/healthz") == (200, "ok\n")  # alive all along
            assert value(scrape(proc), "nvmigrate_agent_ready") == 0
    finally:
        cluster.restart_etcd()
    for proc in agents:
        wait_for(f"{proc.name} to be ready again", ready(proc), 60)

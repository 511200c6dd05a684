"""Prometheus metrics of an agent, served on /metrics by `agent.web` (`--http HOST:PORT`).

Two kinds, as in the orchestrator (orchestrator/metrics.py):
- events counted where they happen: the latency of every NVMe admin command the host-side
  migration driver sends its backend (`BACKEND_COMMAND_SECONDS`, observed by
  agent.nvme.migration_driver), and the data plane's bytes (agent.dataplane.traffic);
- the agent's state, read from the host at each scrape (`AgentState`): migration sessions by
  role and stage, NBD clients and requests, controllers, the data dir's free space, the drive's
  health log, readiness.

Labels stay bounded: no job or controller ids (Prometheus adds the instance; the orchestrator's
metrics name jobs), only roles, stages and command names from fixed sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.datadir import free_bytes
from agent.dataplane import traffic
from agent.session_states import ENDED_STAGES, DestinationStage, SourceStage
from cluster.records import DriveHealth

if TYPE_CHECKING:
    from agent.host import Host

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

BACKEND_COMMAND_SECONDS = Histogram(
    "nvmigrate_agent_backend_command_seconds",
    "Time an NVMe admin command of the host-side migration driver took, from submission to completion, "
    "by command (opcode, and select where it has one: migration_send.suspend, "
    "migration_receive.get_controller_state, track_send, controller_data_queue.create, ...; failed ones too)",
    ["command"], buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                          0.5, 1, 2.5, 5, 10),
    registry=REGISTRY)

# The (role, stage) pairs a session can be busy in; every one is reported, at 0 when none is.
ACTIVE_STAGES: tuple[tuple[str, str], ...] = (
    *(("source", stage.value) for stage in SourceStage if stage not in ENDED_STAGES),
    *(("destination", stage.value) for stage in DestinationStage if stage not in ENDED_STAGES),
)
NBD_COMMANDS = ("read", "write", "flush", "trim", "write_zeroes", "disc", "other")


@dataclass(frozen=True)
class AgentSnapshot:
    """What one scrape reports of the host."""

    sessions: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (role, stage) -> busy sessions
    controllers: int = 0
    nbd_clients: int = 0
    nbd_requests: Mapping[str, int] = field(default_factory=dict)  # NBD command name (any case) -> requests
    health: DriveHealth | None = None
    data_dir_free_bytes: int | None = None
    ready: bool = False
    lease_expiries: int = 0


def snapshot_of(host: Host, ready: bool) -> AgentSnapshot:
    """The host as it is now (on the event loop, which owns it)."""
    sessions: dict[tuple[str, str], int] = {}
    for session in host.sessions.values():
        if session.current not in ENDED_STAGES:
            key = (session.role, session.current.value)
            sessions[key] = sessions.get(key, 0) + 1
    try:
        free: int | None = free_bytes(host.data_dir)
    except OSError as exc:
        log.debug("free space of %s unknown: %s", host.data_dir, exc)
        free = None
    return AgentSnapshot(sessions=sessions, controllers=len(host.controllers), nbd_clients=host.nbd.clients(),
                         nbd_requests=dict(host.nbd.requests), health=host.health, data_dir_free_bytes=free,
                         ready=ready, lease_expiries=host.lease.expiries)


def _gauge(name: str, help_text: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text)
    if value is not None:
        family.add_metric([], float(value))
    return family


class AgentState(Collector):
    """The scrape-time metrics: `read()` gives the host's snapshot, the data plane's traffic is
    read as it stands."""

    def __init__(self, read: Callable[[], AgentSnapshot]) -> None:
        self.read = read
        # Its own registry, so several (in tests, one per server) never clash in REGISTRY.
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def exposition(self) -> bytes:
        """The whole /metrics body: this process's events, then the agent's state."""
        return generate_latest(REGISTRY) + generate_latest(self.registry)

    def describe(self) -> Iterable[Metric]:
        return list(self._families(AgentSnapshot()))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self.read()))

    def _families(self, snap: AgentSnapshot) -> Iterator[Metric]:
        sent = CounterMetricFamily(
            "nvmigrate_agent_dataplane_sent_bytes",
            "Migration bytes this agent sent as a source over the data plane: namespace data and controller "
            "and guest state, counted when the connection took them; framing not counted. A block is counted "
            "again only when it was truly sent again (changed again before a later round, or a new attempt "
            "to another destination); the data plane itself never resends", value=traffic.SENT.total_bytes)
        received = CounterMetricFamily(
            "nvmigrate_agent_dataplane_received_bytes",
            "Migration bytes this agent received as a destination over the data plane, each checksummed "
            "frame once: namespace data and controller and guest state; framing not counted",
            value=traffic.RECEIVED.total_bytes)
        yield from (sent, received)
        yield _gauge("nvmigrate_agent_dataplane_send_rate_bytes_per_second",
                     f"Data-plane bytes sent per second, averaged over the last {traffic.SENT.window_s} whole seconds",
                     traffic.SENT.rate_bytes_per_s())
        yield _gauge("nvmigrate_agent_dataplane_receive_rate_bytes_per_second",
                     f"Data-plane bytes received per second, averaged over the last {traffic.RECEIVED.window_s} "
                     "whole seconds", traffic.RECEIVED.rate_bytes_per_s())

        sessions = GaugeMetricFamily(
            "nvmigrate_agent_sessions", "Migration sessions under way here, by role and stage "
            "(agent/session_states.py; ended ones, released, aborted or running, are not counted)",
            labels=["role", "stage"])
        for role, stage in ACTIVE_STAGES:
            sessions.add_metric([role, stage], float(snap.sessions.get((role, stage), 0)))
        yield sessions

        yield _gauge("nvmigrate_agent_nbd_clients", "NBD clients connected to an export of this agent",
                     snap.nbd_clients)
        requests = CounterMetricFamily("nvmigrate_agent_nbd_requests", "NBD requests received, by command",
                                       labels=["command"])
        counts = {command: 0 for command in NBD_COMMANDS}
        for command, count in snap.nbd_requests.items():
            name = command.lower() if command.lower() in counts else "other"
            counts[name] += count
        for command, count in counts.items():
            requests.add_metric([command], float(count))
        yield requests

        yield _gauge("nvmigrate_agent_controllers", "Controllers running on this agent", snap.controllers)
        yield _gauge("nvmigrate_agent_data_dir_free_bytes", "Bytes an unprivileged writer may still put on the "
                     "filesystem of the agent's data dir", snap.data_dir_free_bytes)
        yield _gauge("nvmigrate_agent_ready", "1 when /readyz says ready: AgentService serves and the node "
                     "record is in etcd under a live lease", 1.0 if snap.ready else 0.0)
        yield CounterMetricFamily("nvmigrate_agent_lease_expiries", "Times etcd expired this agent's node lease "
                                  "under it (it registered again)", value=snap.lease_expiries)
        yield from self._health(snap.health)

    @staticmethod
    def _health(health: DriveHealth | None) -> Iterator[Metric]:
        """The drive's SMART / Health log as last read (absent when the backend has none to read)."""
        def value(read: Callable[[DriveHealth], int]) -> float | None:
            return None if health is None else float(read(health))

        yield _gauge("nvmigrate_agent_drive_critical_warning", "The drive's SMART Critical Warning bits (0: none; "
                     "1 spare low, 2 temperature, 4 reliability degraded, 8 read-only, 16 volatile backup failed)",
                     value(lambda h: h.critical_warning))
        yield _gauge("nvmigrate_agent_drive_temperature_kelvin", "The drive's composite temperature",
                     value(lambda h: h.temperature_k))
        yield _gauge("nvmigrate_agent_drive_available_spare_percent", "The drive's available spare capacity",
                     value(lambda h: h.available_spare))
        yield _gauge("nvmigrate_agent_drive_available_spare_threshold_percent", "Available spare below which the "
                     "drive warns", value(lambda h: h.available_spare_threshold))
        yield _gauge("nvmigrate_agent_drive_percentage_used", "The drive's estimate of its rated endurance used, "
                     "in percent (may pass 100)", value(lambda h: h.percentage_used))
        yield _gauge("nvmigrate_agent_drive_media_errors", "Unrecovered data integrity errors over the drive's life",
                     value(lambda h: h.media_errors))

"""Records the agents and the orchestrator keep in etcd: nodes and controller ownership.

Each record is a frozen dataclass that serializes to JSON; the key layout lives in `store`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from cluster.io_limits import IoLimits


@dataclass(frozen=True)
class DriveHealth:
    """A node's drive health, from its backend's SMART / Health log (agent.nvme.smart)."""

    critical_warning: int = 0  # the Critical Warning bits
    temperature_k: int = 0
    available_spare: int = 100  # percent
    available_spare_threshold: int = 0  # percent
    percentage_used: int = 0  # of the rated endurance; may pass 100
    media_errors: int = 0  # unrecovered data integrity errors, lifetime


@dataclass(frozen=True)
class NodeRecord:
    """An agent's registration, kept under its liveness lease: gone when the agent stops."""

    name: str
    address: str  # AgentService host:port
    data_address: str  # data-plane host:port
    capacity_bytes: int
    allocated_bytes: int = 0
    controllers: tuple[str, ...] = ()
    state_format_version: int = 1
    started_at: float = 0.0
    # Free space on the filesystem of the agent's data dir when its namespaces live there (statvfs:
    # what an unprivileged writer may still use); None from a backend whose namespaces live
    # elsewhere, and from agents older than this field.
    data_dir_free_bytes: int | None = None
    # The backend's drive health (its SMART / Health log); None when the backend has none to read.
    health: DriveHealth | None = None
    # The backend kind that hosts its controllers (emulated, nvme-passthru, vfio): a controller
    # moves only between nodes of one kind. Empty from agents older than this field (unknown).
    backend: str = ""
    # Where the agent serves /metrics, /healthz and /readyz (--http), HOST:PORT as peers reach it;
    # empty when it serves no HTTP, and from agents older than this field.
    http_address: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> NodeRecord:
        data: dict[str, Any] = json.loads(raw)
        data["controllers"] = tuple(data.get("controllers", ()))
        if isinstance(data.get("health"), dict):
            health_fields = {f.name for f in fields(DriveHealth)}
            data["health"] = DriveHealth(**{k: v for k, v in data["health"].items() if k in health_fields})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # a newer agent's extra fields

    @property
    def declared_free_bytes(self) -> int:
        """What --capacity leaves free after the controllers and destinations already here."""
        return self.capacity_bytes - self.allocated_bytes

    @property
    def free_bytes(self) -> int:
        """What fits here: the declared free space, bounded by the disk's when the agent says it."""
        if self.data_dir_free_bytes is None:
            return self.declared_free_bytes
        return min(self.declared_free_bytes, self.data_dir_free_bytes)


# Controller states kept in etcd.
RUNNING = "RUNNING"  # its owner runs it (or may run it)
# Ownership moved at COMMIT, the new owner has not started it yet: written by the orchestrator-driven
# commit of earlier versions only (a rolling upgrade may find one); the destination's own commit
# moves ownership and claims RUNNING in one transaction (EtcdStore.commit_switchover).
COMMITTED = "COMMITTED"
LOST = "LOST"  # its node died or hung mid-migration: it is not resumed anywhere without an operator
MISSING = "MISSING"  # its owner is live but does not report it


@dataclass(frozen=True)
class ControllerRecord:
    """Who owns a controller. Only the owner may run it; COMMIT moves ownership in one CAS."""

    controller_id: str
    node: str
    namespace_bytes: int
    job_id: str = ""  # the job that last moved it
    state: str = "RUNNING"
    history: tuple[str, ...] = field(default=())
    # Its guest's I/O limits: kept here, they move with ownership (moved_to) to a destination.
    limits: IoLimits = field(default_factory=IoLimits)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["limits"] = self.limits.to_dict()
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ControllerRecord:
        data: dict[str, Any] = json.loads(raw)
        data["history"] = tuple(data.get("history", ()))
        data["limits"] = IoLimits.from_dict(data.get("limits"))
        return cls(**data)

    def moved_to(self, node: str, job_id: str) -> ControllerRecord:
        """Owned by `node` and RUNNING there: the destination commits this only once it can run
        the controller (loaded and recorded), and runs it right after."""
        return replace(self, node=node, job_id=job_id, state=RUNNING, history=(*self.history, self.node))

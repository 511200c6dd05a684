"""Hosting on the emulated backend: each controller is an emulated NVMe subsystem over a sparse file.

Files in the data dir:

    <cid>.json            a controller this node runs (its metadata, written atomically)
    <cid>.ns              its namespace (sparse), when it was created here
    <cid>.<job>.incoming  a namespace arriving for a migration; once the controller runs here it
                          keeps this file, which its metadata names

The agent keeps the loaded controller state of a destination beside it (``<cid>.<job>.state``);
that file is the agent's, not the hosting's.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from agent.backend import BLOCK_BYTES, GuestDrivenController, MigratableController
from agent.backends.hosting import HostingCapabilities, HostingError
from agent.datadir import write_atomically
from agent.emulated.controller import EmulatedController
from agent.emulated.model import structures

log = logging.getLogger(__name__)

KIND = "emulated"
CAPABILITIES = HostingCapabilities(guest_workload=True, nbd_export=True, sparse_extents=True,
                                   namespaces_in_data_dir=True)
# A data dir of the nvme-passthru backend (agent.backends.passthru_hosting.SLOTS_FILE).
_PASSTHRU_SLOTS_FILE = "nvme-passthru.slots"


# The warning composite temperature the emulated drive reports against (its WCTEMP default).
WARNING_TEMPERATURE_K = 343

class EmulatedHosting:
    """Emulated controllers in ``data_dir``, at most ``capacity_bytes`` of namespaces."""

    kind = KIND
    capabilities = CAPABILITIES

    def __init__(self, data_dir: Path, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise HostingError(f"capacity {capacity_bytes} bytes must be positive")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.health = structures.Health()  # the emulated drive this node's namespaces live on
        self._health_lock = threading.Lock()
        slots = self.data_dir / _PASSTHRU_SLOTS_FILE
        if slots.exists():
            raise HostingError(f"data dir {self.data_dir} belongs to an nvme-passthru agent ({slots} exists); "
                               "give the emulated backend its own --data-dir")
        self._capacity = capacity_bytes
        self._hosted: dict[str, int] = {}  # controller id -> namespace bytes
        self._destinations: dict[tuple[str, str], int] = {}
        for cid, meta in self._metadata().items():
            self._hosted[cid] = int(meta["namespace_bytes"])
        for cid, job in self._incoming():
            self._destinations[cid, job] = (self.data_dir / f"{cid}.{job}.incoming").stat().st_size

    # ----- files --------------------------------------------------------------------------------

    def _meta_path(self, controller_id: str) -> Path:
        return self.data_dir / f"{controller_id}.json"

    def _incoming_path(self, controller_id: str, job_id: str) -> Path:
        return self.data_dir / f"{controller_id}.{job_id}.incoming"

    def _metadata(self) -> dict[str, dict[str, Any]]:
        found = {}
        for meta_path in sorted(self.data_dir.glob("*.json")):
            meta = json.loads(meta_path.read_text())
            found[str(meta["controller_id"])] = meta
        return found

    def _incoming(self) -> list[tuple[str, str]]:
        """(cid, job) of namespace files that arrived for a migration and run nowhere here yet."""
        in_use = {str(meta["namespace_file"]) for meta in self._metadata().values()}
        pending = []
        for path in sorted(self.data_dir.glob("*.incoming")):
            if path.name not in in_use:
                cid, job = path.name.split(".")[:2]
                pending.append((cid, job))
        return pending

    def _write_meta(self, controller_id: str, namespace_bytes: int, namespace_file: str, *,
                    durable: bool = True) -> None:
        meta = {"controller_id": controller_id, "namespace_bytes": namespace_bytes, "namespace_file": namespace_file}
        # atomic: never a half-written record, and no temp file left when the disk is full
        write_atomically(self._meta_path(controller_id), json.dumps(meta).encode(), durable=durable)

    # ----- capacity -----------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def allocated_bytes(self) -> int:
        return sum(self._hosted.values()) + sum(self._destinations.values())

    def capacity_problem(self, controller_id: str, namespace_bytes: int) -> str | None:
        if namespace_bytes <= 0 or namespace_bytes % BLOCK_BYTES:
            return f"namespace_bytes {namespace_bytes} must be a positive multiple of {BLOCK_BYTES}"
        free = self._capacity - self.allocated_bytes()
        if namespace_bytes > free:
            return f"{free} bytes are free; controller {controller_id!r} needs {namespace_bytes}"
        return None

    # ----- controllers --------------------------------------------------------------------------

    def create(self, controller_id: str, namespace_bytes: int) -> EmulatedController:
        path = self.data_dir / f"{controller_id}.ns"
        controller = EmulatedController(controller_id, path, namespace_bytes, create=True)
        self._write_meta(controller_id, namespace_bytes, path.name)
        self._hosted[controller_id] = namespace_bytes
        return controller

    def hosted_ids(self) -> list[str]:
        return sorted(self._metadata())

    def reopen(self, controller_id: str) -> EmulatedController:
        meta = self._metadata()[controller_id]
        return EmulatedController(controller_id, self.data_dir / meta["namespace_file"], int(meta["namespace_bytes"]),
                                  create=False)

    def discard(self, controller_id: str, job_id: str = "") -> None:
        if job_id:
            self._incoming_path(controller_id, job_id).unlink(missing_ok=True)
            self._destinations.pop((controller_id, job_id), None)
            return
        meta = self._metadata().get(controller_id)
        if meta is not None:
            (self.data_dir / str(meta["namespace_file"])).unlink(missing_ok=True)
        self._meta_path(controller_id).unlink(missing_ok=True)
        self._hosted.pop(controller_id, None)

    # ----- destinations -------------------------------------------------------------------------

    def create_destination(self, controller_id: str, job_id: str, namespace_bytes: int) -> EmulatedController:
        controller = EmulatedController.for_resuming(controller_id, self._incoming_path(controller_id, job_id),
                                                     namespace_bytes, create=True)
        self._destinations[controller_id, job_id] = namespace_bytes
        return controller

    def pending_destinations(self) -> list[tuple[str, str]]:
        return self._incoming()

    def reload_destination(self, controller_id: str, job_id: str) -> EmulatedController:
        incoming = self._incoming_path(controller_id, job_id)
        return EmulatedController.for_resuming(controller_id, incoming, incoming.stat().st_size, create=False)

    def adopt_destination(self, controller_id: str, job_id: str) -> None:
        namespace_bytes = self._destinations[controller_id, job_id]
        # Recorded first: a write that fails (disk full) leaves it a pending destination. Not
        # fsynced: this runs while the guest waits, and the namespace it names was written through
        # the page cache (no sync) as it arrived; the record outlives the agent's process as the
        # data does, and an fsync of it alone would not make the pair survive a power loss.
        self._write_meta(controller_id, namespace_bytes, self._incoming_path(controller_id, job_id).name,
                         durable=False)
        del self._destinations[controller_id, job_id]
        self._hosted[controller_id] = namespace_bytes

    def unadopt_destination(self, controller_id: str, job_id: str) -> None:
        meta = self._metadata().get(controller_id)
        if meta is not None and meta["namespace_file"] != self._incoming_path(controller_id, job_id).name:
            raise HostingError(f"controller {controller_id!r} runs here from {meta['namespace_file']}, not as the "
                               f"destination of job {job_id}")
        self._meta_path(controller_id).unlink(missing_ok=True)
        namespace_bytes = self._hosted.pop(controller_id, None)
        if namespace_bytes is not None:
            self._destinations[controller_id, job_id] = namespace_bytes

    def release(self, controller_id: str, job_id: str = "") -> None:
        """The controller's release() deleted its namespace file; forget the rest."""
        if job_id:
            self._destinations.pop((controller_id, job_id), None)
            return
        self._meta_path(controller_id).unlink(missing_ok=True)
        self._hosted.pop(controller_id, None)

    # ----- drive health ---------------------------------------------------------------------------

    def health_log(self) -> bytes | None:
        """The emulated drive's SMART / Health log, encoded as the NVMe model encodes it."""
        with self._health_lock:
            return structures.smart_log(self.health, over_threshold_k=WARNING_TEMPERATURE_K, under_threshold_k=0,
                                        error_log_entries=0)

    def set_health(self, **values: int) -> None:
        """The emulated drive's failure signals (tests, demos): fields of model Health."""
        known = {f.name for f in fields(structures.Health)}
        with self._health_lock:
            for name, value in values.items():
                if name not in known:
                    raise HostingError(f"health field {name!r} is unknown; known fields: {sorted(known)}")
                if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
                    raise HostingError(f"health {name}={value!r} must be an integer from 0 to 65535")
                setattr(self.health, name, value)

    def guest(self, controller: MigratableController) -> GuestDrivenController | None:
        return controller if isinstance(controller, EmulatedController) else None

    def close(self) -> None:
        """Nothing is held open here: each controller closes its own file."""

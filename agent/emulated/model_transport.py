"""The in-process admin-command transport to one controller of the emulated subsystem model.

The host-side migration driver (``agent.nvme.migration_driver``) speaks to the model's primary
controller through it, exactly as it speaks to a real PF through the passthrough ioctl: encoded
64-byte SQEs in, decoded completions out.  Like the kernel, the transport owns the command
identifiers; like a DMA into the host's buffer, data the controller returns beyond the buffer the
host supplied (``read_bytes``) is lost.  Controller Data Queue memory is the model's host memory,
the region the controller reaches by DMA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agent.emulated.model.hostmem import HostMemory
from agent.emulated.model.subsystem import PRIMARY_CNTLID, NvmeSubsystemModel
from agent.nvme import commands
from agent.nvme.commands import Cqe, Sqe
from agent.nvme.migration_driver import AdminResult, NvmeStatusError, QueueMemory, read_explanation


@dataclass
class HostMemoryQueue:
    """A queue in the model's host memory: page aligned and contiguous by construction."""

    memory: HostMemory
    address: int
    size_bytes: int
    contiguous: bool = True
    released: bool = False

    @property
    def view(self) -> memoryview:
        return self.memory.view(self.address, self.size_bytes)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.memory.free(self.address)


class ModelAdminTransport:
    """Admin commands to controller ``cntlid`` (the primary, the migration controller, by default)."""

    def __init__(self, model: NvmeSubsystemModel, cntlid: int = PRIMARY_CNTLID) -> None:
        self._model = model
        self._cntlid = cntlid
        self._cid = 0
        self.name = f"controller {cntlid} of emulated subsystem {model.serial}"

    def _next_cid(self) -> int:
        self._cid = (self._cid + 1) & 0xFFFF
        return self._cid

    def _run(self, sqe: Sqe, data: bytes | None) -> tuple[Cqe, bytes]:
        raw, out = self._model.submit_admin(self._cntlid, replace(sqe, cid=self._next_cid()).encode(), data)
        return Cqe.decode(raw), out

    def submit(self, sqe: Sqe, what: str, *, data: bytes | None = None, read_bytes: int = 0,
               queue: QueueMemory | None = None) -> AdminResult:
        # ``queue`` needs nothing here: its address, in the command's PRP1, is the model's own.
        with self._model.lock:  # the explanation must be about this command, not a later one
            cqe, out = self._run(sqe, data)
            if not cqe.ok:
                raise NvmeStatusError(what, self.name, cqe.status, cqe.dnr,
                                      self.explain(cqe.status) if cqe.more else "")
        return AdminResult(cqe.dw0, cqe.dw1, out[:read_bytes])

    def explain(self, status: int) -> str:
        """The controller's explanation of the error with ``status`` it reported last."""
        def read_log(lid: int, length: int) -> bytes:
            cqe, page = self._run(commands.get_log_page(lid, length), None)
            if not cqe.ok:
                raise NvmeStatusError(f"Get Log Page {lid:#04x}", self.name, cqe.status, cqe.dnr)
            return page

        return read_explanation(read_log, status)

    def allocate_queue(self, preferred_bytes: int) -> HostMemoryQueue:
        size = max(preferred_bytes, 1)
        return HostMemoryQueue(self._model.host_memory, self._model.host_memory.allocate(size), size,
                               contiguous=True)

    def close(self) -> None:
        """Nothing to close: the model lives as long as its owner keeps it."""


"""Host memory as the emulated controller reaches it by DMA: byte regions at bus addresses (pure).

A real Controller Data Queue lives in host memory at the address the host puts in PRP1, and the
controller writes entries there on its own; the host polls them.  The model keeps that shape: the
host allocates a region here, passes its address in the command, and both sides work on the same
bytes.  Command data buffers (Read/Write payloads, Identify data) do not go through here: they
travel as the ``data`` argument and the returned bytes of ``submit_admin`` / ``submit_io``.
"""

from __future__ import annotations

PAGE_BYTES = 4096


class DmaError(ValueError):
    """An address range that no allocated region covers."""


class HostMemory:
    """Allocated regions by base address; addresses are page aligned and never reused."""

    def __init__(self, base: int = 0x1_0000_0000) -> None:
        if base <= 0 or base % PAGE_BYTES:
            raise ValueError(f"base={base:#x} must be a positive multiple of {PAGE_BYTES}")
        self._next = base
        self._regions: dict[int, bytearray] = {}

    def allocate(self, length: int) -> int:
        """A zeroed region of ``length`` bytes; returns its address."""
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length={length!r} must be a positive number of bytes")
        address = self._next
        self._regions[address] = bytearray(length)
        self._next += -(-length // PAGE_BYTES) * PAGE_BYTES + PAGE_BYTES  # a guard page between regions
        return address

    def free(self, address: int) -> None:
        if self._regions.pop(address, None) is None:
            raise DmaError(f"no region is allocated at {address:#x}")

    def view(self, address: int, length: int) -> memoryview:
        """``length`` bytes at ``address``, which must lie inside one region."""
        for base, region in self._regions.items():
            if base <= address and address + length <= base + len(region):
                return memoryview(region)[address - base : address - base + length]
        raise DmaError(f"no allocated region covers {length} bytes at {address:#x}")

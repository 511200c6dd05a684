"""A controller's I/O limits (pure): IOPS and bytes per second for its guest's reads, writes and
trims (deallocate), as the orchestrator accepts them, etcd keeps them and the agent enforces them
(agent/qos.py).

0 means no limit. A request counts as one I/O whatever its size (an NBD request, one write of
the built-in guest), and as its length in bytes; a trim's bytes are the range it deallocates.
Flushes are not limited. The limits live in the controller's etcd record, so they move with it
in a migration (the destination applies the record's limits before it runs the controller).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

OPS = ("read", "write", "trim")
MAX_IOPS = 10_000_000
MIN_BYTES_PER_S = 4096  # one block a second: below it a single request would wait for ever
MAX_BYTES_PER_S = 1 << 40


@dataclass(frozen=True)
class IoLimits:
    read_iops: int = 0
    read_bytes_per_s: int = 0
    write_iops: int = 0
    write_bytes_per_s: int = 0
    trim_iops: int = 0
    trim_bytes_per_s: int = 0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def iops(self, op: str) -> int:
        return int(getattr(self, f"{op}_iops"))

    def bytes_per_s(self, op: str) -> int:
        return int(getattr(self, f"{op}_bytes_per_s"))

    @property
    def any(self) -> bool:
        return any(asdict(self).values())

    def problem(self) -> str | None:
        """Why these limits cannot be applied (naming the field and its value), or None."""
        for name in self.names():
            problem = value_problem(name, getattr(self, name))
            if problem:
                return problem
        return None

    def merged(self, changes: dict[str, int]) -> IoLimits:
        """These limits with `changes` (field -> value; 0 removes that limit) applied."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown I/O limit(s) {', '.join(unknown)}; known: {', '.join(self.names())}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, int]:
        """The limits that are set (etcd keeps no zeros)."""
        return {k: v for k, v in asdict(self).items() if v}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> IoLimits:
        known = set(cls.names())
        return cls(**{k: int(v) for k, v in (data or {}).items() if k in known})

    def shown(self) -> str:
        """'read 200 IOPS 10 MiB/s, trim 50 IOPS', or '-' with no limit."""
        parts = []
        for op in OPS:
            words = []
            if self.iops(op):
                words.append(f"{self.iops(op)} IOPS")
            if self.bytes_per_s(op):
                words.append(f"{_size(self.bytes_per_s(op))}/s")
            if words:
                parts.append(f"{op} {' '.join(words)}")
        return ", ".join(parts) or "-"


def value_problem(name: str, value: object) -> str | None:
    """Why `value` is not a valid setting of limit `name`, or None (0 is: no limit)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{name} {value!r} must be a whole number (0: no limit)"
    if value < 0:
        return f"{name} {value} is negative; give a positive limit, or 0 for no limit"
    if value == 0:
        return None
    if name.endswith("_iops") and value > MAX_IOPS:
        return f"{name} {value} is above {MAX_IOPS} I/Os a second; give a smaller limit, or 0 for no limit"
    if name.endswith("_bytes_per_s"):
        if value < MIN_BYTES_PER_S:
            return (f"{name} {value} is below {MIN_BYTES_PER_S} bytes a second (one 4 KiB block); "
                    "give a larger limit, or 0 for no limit")
        if value > MAX_BYTES_PER_S:
            return f"{name} {value} is above {MAX_BYTES_PER_S} bytes a second (1 TiB/s); give 0 for no limit"
    return None


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def changes_in(message: Any) -> dict[str, int]:
    """The limits a request message (agent IoLimits or ControllerIoLimits: the same fields) sets."""
    return {name: int(getattr(message, name)) for name in IoLimits.names() if message.HasField(name)}


def changes_problem(changes: dict[str, int]) -> str | None:
    """Why one of the requested settings is invalid (naming it and its value), or None."""
    for name, value in changes.items():
        problem = value_problem(name, value)
        if problem:
            return problem
    return None


def fill(message: Any, limits: IoLimits) -> Any:
    """Sets the message's fields to the limits in force (the others stay unset); returns it."""
    for name, value in limits.to_dict().items():
        setattr(message, name, value)
    return message

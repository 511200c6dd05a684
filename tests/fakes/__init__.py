"""Fakes of hardware and kernel interfaces that cannot run here (a real NVMe PF, a VFIO VF)."""

from __future__ import annotations

import os


def same_file(a: int, b: int) -> bool:
    """Whether two descriptors open the same file: a driver knows its device by the node, not the fd number."""
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)

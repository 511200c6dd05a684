"""Filling a real filesystem (a test's tmpfs) the way other data would."""

from __future__ import annotations

import os
from pathlib import Path

from agent.datadir import free_bytes


def fill_disk(directory: Path, *, leave_bytes: int = 0, name: str = "filler") -> Path:
    """Takes the free blocks of the filesystem of `directory`, all but `leave_bytes`, with one
    allocated file (it takes one inode); returns it, so that a test can remove it."""
    filler = directory / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        take = free_bytes(directory) - leave_bytes
        if take > 0:
            os.posix_fallocate(fd, 0, take)
    finally:
        os.close(fd)
    return filler

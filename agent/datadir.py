"""The agent's data dir as a filesystem: records written atomically that leave nothing behind when
the write fails, the sweep of leftovers at start, the space really free there, and what a full
disk looks like as an error.

A full disk is an ordinary fault (DESIGN.md, invariant 3): every write here either lands whole or
leaves the directory as it was, and a refusal for lack of space names the node, the path and
"no space left" so that an operator knows what to free.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
# Both mean "this filesystem takes no more": out of blocks or inodes, or over a quota.
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(path.name + TEMP_SUFFIX)


def write_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    """``path`` holds ``data`` whole, or is unchanged; the temp file never outlives a failure.
    ``durable=False`` leaves out the fsync: the file then survives the agent's process, not the
    machine (for records whose data beside them is not synced either, written while the guest waits)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sweep_temp_files(data_dir: Path) -> list[Path]:
    """Removes the temp files of writes that a crash interrupted; returns what it removed."""
    swept = []
    for tmp in sorted(data_dir.glob(f"*{TEMP_SUFFIX}")):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            swept.append(tmp)
            log.info("removed %s, left by a write that did not finish", tmp)
    return swept


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still put on the filesystem of ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def no_space(exc: BaseException) -> OSError | None:
    """The out-of-space error behind ``exc`` (itself or a cause), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def no_space_message(node: str, path: Path, exc: OSError) -> str:
    """One line for an operator: which node, which file, and what to do."""
    try:
        stats = os.statvfs(path.parent)
        free = (f"{stats.f_bavail * stats.f_frsize} bytes free there" if stats.f_favail
                else "no inode left there")
    except OSError:
        free = "free space unknown"
    quota = " (over quota)" if exc.errno == errno.EDQUOT else ""
    return (f"node {node!r}: no space left on device writing {path}{quota} ({free}); free space in its "
            "data dir or choose another node")

"""Validation of the names people type: controller ids, node names, job ids.

Each check returns an error message naming the bad value and what is expected, or None.
"""

from __future__ import annotations

import re

SHOWN_CHARS = 64  # a bad value is echoed this far: a 20,000-character name must not fill the error


def shown(value: str) -> str:
    """`value` as an error message quotes it: repr'd, and cut to a prefix when long."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    return f"{value[:SHOWN_CHARS]!r}... ({len(value)} characters)"


MESSAGE_CHARS = 1024  # gRPC carries the status message in a header; its limit is 16 KiB in all


def bounded(message: str) -> str:
    """An error message as a server sends it: cut, should a value it echoes be huge."""
    return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + "... (cut)"


# Matched with fullmatch: a pattern ending in `$` also takes the value followed by a newline.
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_JOB_ID = re.compile(r"mig-[0-9a-f]{12}")


def controller_id_problem(value: str) -> str | None:
    if not _NAME.fullmatch(value):
        return (f"controller id {shown(value)} is malformed: use 1-63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit")
    return None


def node_name_problem(value: str) -> str | None:
    if not _NAME.fullmatch(value):
        return (f"node name {shown(value)} is malformed: use 1-63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit")
    return None


def job_id_problem(value: str) -> str | None:
    if not _JOB_ID.fullmatch(value):
        return f"job id {shown(value)} is malformed: job ids look like 'mig-' and 12 hex digits, e.g. mig-0123456789ab"
    return None

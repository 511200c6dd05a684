"""Validation of the names people type: controller ids, node names, job ids.

Each check returns an error message naming the bad value and what is expected, or None.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_JOB_ID = re.compile(r"^mig-[0-9a-f]{12}$")


def controller_id_problem(value: str) -> str | None:
    if not _NAME.match(value):
        return (f"controller id {value!r} is malformed: use 1-63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit")
    return None


def node_name_problem(value: str) -> str | None:
    if not _NAME.match(value):
        return (f"node name {value!r} is malformed: use 1-63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit")
    return None


def job_id_problem(value: str) -> str | None:
    if not _JOB_ID.match(value):
        return f"job id {value!r} is malformed: job ids look like 'mig-' and 12 hex digits, e.g. mig-0123456789ab"
    return None

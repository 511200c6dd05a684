"""Process log setup: every record carries the job id and trace id of the work it belongs to.

The ids live in a context variable, bound by the code that works for a job (the orchestrator's
job runner, the agent's RPC handlers). asyncio copies context variables into the tasks a
coroutine starts, so logs from the helpers and tasks of a job carry its ids without being
passed them. A filter on the handlers copies the ids onto each record; the text format shows
them as `[job=... trace=...]`, the JSON format (`--log-format json`, one object per line for log
shippers) as fields.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

FORMATS = ("text", "json")


class LogContext(Protocol):
    """Anything with a job id and a trace id ('' when none); read when a record is made, so a
    trace id known only later still shows up."""

    @property
    def job_id(self) -> str: ...

    @property
    def trace_id(self) -> str: ...


@dataclass(frozen=True)
class Fields:
    job_id: str = ""
    trace_id: str = ""


_CURRENT: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar("nvmigrate_log_context", default=None)


@contextlib.contextmanager
def context(fields: LogContext) -> Iterator[None]:
    """Records logged in this block (and in tasks started from it) carry these ids."""
    token = _CURRENT.set(fields)
    try:
        yield
    finally:
        _CURRENT.reset(token)


class ContextFilter(logging.Filter):
    """Puts `job_id`, `trace_id` and the text form `context` on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _CURRENT.get()
        job_id = getattr(record, "job_id", "") or (current.job_id if current else "")
        trace_id = getattr(record, "trace_id", "") or (current.trace_id if current else "")
        record.job_id, record.trace_id = job_id, trace_id
        parts = [f"job={job_id}" if job_id else "", f"trace={trace_id}" if trace_id else ""]
        shown = " ".join(p for p in parts if p)
        record.context = f" [{shown}]" if shown else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, process, logger, message, ids."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job_id", "trace_id"):
            value = getattr(record, key, "")
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str, process: str) -> None:
    """Root logging for a process: `fmt` is 'text' or 'json'; `process` names it in each line."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {process} %(name)s%(context)s "
                                               "%(message)s"))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())

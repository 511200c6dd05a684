"""Counts the etcd writes a migration job causes, read back from etcd's own history.

`WriteRecorder(endpoint, prefix)` notes etcd's revision when made; `collect()` then replays every
put and delete under the cluster's prefix since that revision (an etcd watch from a past
revision), ending at a marker key it writes itself, so nothing written before the call is
missed. `JobWrites.of(log, job_id, controller_id)` keeps what concerns one job:

- its record (jobs/<id>): the API's create, every runner write, the verifier's verdict;
- its controller's active marker (active/<controller>): created with the job, deleted at its end;
- its controller's ownership record (controllers/<controller>): the commit, the destination's
  claim, a move back, a LOST mark.

Each write is a transaction: one etcd revision, one or more keys (the commit changes the job
and the controller at one revision). `revisions` counts transactions, the figure an etcd budget
is about (one raft entry, one revision each); `by_key` counts key events. Writes under other
keys (agents' node records: free space, health, the controllers they host; the leader key;
evacuations) are kept apart in `other`, because an agent rewrites its record for reasons of its
own too (its data dir's free space moved by 1 MiB, a health poll). Lease grants and keepalives
create no revision and are not seen here.

It uses aetcd directly (a client that is not the project's store) and needs etcd's history since
the start revision (not compacted meanwhile: true of the etcds the tests and benchmarks start).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

import aetcd

MARKER = "~etcd-writes-marker"  # under the cluster's prefix; no component reads it
COLLECT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Write:
    revision: int
    key: str  # relative to the cluster's prefix, e.g. "jobs/mig-1a2b"
    kind: str  # "put" or "delete"


@dataclass(frozen=True)
class WriteLog:
    start_revision: int  # first revision that could be in it
    end_revision: int  # the marker's: everything before it is in
    writes: tuple[Write, ...]


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    first = endpoint.split(",")[0].removeprefix("http://").removeprefix("https://")
    host, _, port = first.rpartition(":")
    return host, int(port)


async def _current_revision(client: aetcd.Client, prefix: bytes) -> int:
    got = await client.get_prefix(prefix + MARKER.encode() + b"/none/")
    return int(got.header.revision)


async def _replay(client: aetcd.Client, prefix: bytes, start_revision: int) -> WriteLog:
    marker = prefix + MARKER.encode()
    end = int((await client.put(marker, b"1")).header.revision)
    writes: list[Write] = []
    watch = await client.watch_prefix(prefix, start_revision=start_revision)
    try:
        async with asyncio.timeout(COLLECT_TIMEOUT_S):
            async for event in watch:
                revision = int(event.kv.mod_revision)
                key = event.kv.key[len(prefix):].decode(errors="replace")
                if key == MARKER:
                    if revision >= end:
                        return WriteLog(start_revision, end, tuple(writes))
                    continue
                writes.append(Write(revision, key, "delete" if event.kind == "DELETE" else "put"))
    finally:
        await watch.cancel()
        await client.delete(marker)
    raise AssertionError(f"etcd's watch from revision {start_revision} ended before the marker at {end}")


class WriteRecorder:
    """Notes etcd's revision now; `collect()` returns every write under `prefix` since."""

    def __init__(self, endpoint: str, prefix: str) -> None:
        self.endpoint, self.prefix = endpoint, prefix
        self.start_revision = asyncio.run(self._with_client(lambda c: _current_revision(c, prefix.encode()))) + 1

    async def _with_client(self, work):  # type: ignore[no-untyped-def]
        host, port = _split_endpoint(self.endpoint)
        async with aetcd.Client(host=host, port=port, timeout=10) as client:
            return await work(client)

    def collect(self) -> WriteLog:
        log: WriteLog = asyncio.run(self._with_client(
            lambda c: _replay(c, self.prefix.encode(), self.start_revision)))
        return log


@dataclass(frozen=True)
class JobWrites:
    """The writes of one job (see the module docstring), and the rest of the log apart."""

    job_id: str
    controller_id: str
    writes: tuple[Write, ...]
    other: tuple[Write, ...] = field(default=())

    @classmethod
    def of(cls, log: WriteLog, job_id: str, controller_id: str) -> JobWrites:
        mine = {f"jobs/{job_id}", f"active/{controller_id}", f"controllers/{controller_id}"}
        return cls(job_id, controller_id, tuple(w for w in log.writes if w.key in mine),
                   tuple(w for w in log.writes if w.key not in mine))

    @property
    def revisions(self) -> int:
        """Transactions (etcd revisions) that wrote a key of the job."""
        return len({w.revision for w in self.writes})

    def by_key(self) -> dict[str, int]:
        """Key events per kind of key ("jobs/", "active/", "controllers/") and operation."""
        counted = collections.Counter(f"{w.key.split('/', 1)[0]}/ {w.kind}" for w in self.writes)
        return dict(sorted(counted.items()))

    def other_by_key(self) -> dict[str, int]:
        counted = collections.Counter(f"{w.key.split('/', 1)[0]}/ {w.kind}" for w in self.other)
        return dict(sorted(counted.items()))

    def describe(self) -> str:
        """One line per transaction: its revision and the keys it wrote; then the totals."""
        lines: list[str] = []
        by_revision: dict[int, list[Write]] = collections.defaultdict(list)
        for w in self.writes:
            by_revision[w.revision].append(w)
        for revision in sorted(by_revision):
            lines.append(f"  rev {revision}: " + ", ".join(f"{w.kind} {w.key}" for w in by_revision[revision]))
        lines.append(f"  {self.revisions} transactions, {len(self.writes)} key events {self.by_key()}; "
                     f"outside the job's keys: {self.other_by_key()}")
        return "\n".join(lines)

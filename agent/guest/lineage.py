"""A guest's run lineage and acknowledgement receipts (pure): which run wrote which seq, and whether
a write someone saw acknowledged is still in the guest's history.

Every start of a guest draws a fresh random run id and opens a segment at the seq it starts from;
the segments, oldest first, travel with the guest state. So any seq maps to the run that wrote it,
and a guest restored from an older image (which replays the same seqs at the same LBAs) writes them
under a new run id: its lineage no longer holds the run, or the run's segment ends earlier.

A receipt is what an observer keeps of the guest's status: the highest acknowledged seq and the
run that wrote it (and where that run began, to say which writes were lost).
"""

from __future__ import annotations

import bisect
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from agent.guest.blocks import LEGACY_RUN_ID, run_label


@dataclass(frozen=True)
class Segment:
    run_id: int
    first_seq: int


@dataclass(frozen=True)
class Receipt:
    """Write ``seq`` of run ``run_id`` was acknowledged; that run began at ``run_first_seq``
    (0 when the receipt's holder did not say)."""

    run_id: int
    seq: int
    run_first_seq: int = 0


def draw_run_id(taken: Iterable[int] = ()) -> int:
    """A fresh random 64-bit run id, never the legacy one nor one already in ``taken``."""
    used = set(taken) | {LEGACY_RUN_ID}
    while True:
        run_id = secrets.randbits(64)
        if run_id not in used:
            return run_id


@dataclass(frozen=True)
class Lineage:
    """The segments of a guest's history, in seq order; the last one is open-ended (the guest's
    ``next_seq`` bounds it)."""

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a lineage has at least one segment")
        firsts = [s.first_seq for s in self.segments]
        if firsts != sorted(firsts):
            raise ValueError(f"lineage segments start at seqs {firsts}, not in order")
        ids = [s.run_id for s in self.segments]
        if len(set(ids)) != len(ids):
            raise ValueError("lineage names a run id twice")

    def with_run(self, run_id: int, first_seq: int) -> Lineage:
        return Lineage((*self.segments, Segment(run_id, first_seq)))

    @property
    def current_run(self) -> int:
        return self.segments[-1].run_id

    def _index_of_seq(self, seq: int) -> int:
        # The last segment starting at or before seq; a later segment that starts at the same seq
        # supersedes one whose run wrote nothing.
        index = bisect.bisect_right([s.first_seq for s in self.segments], seq) - 1
        return max(index, 0)

    def run_of(self, seq: int) -> int:
        """The run that wrote ``seq`` in this history."""
        return self.segments[self._index_of_seq(seq)].run_id

    def receipt_for(self, seq: int) -> Receipt:
        segment = self.segments[self._index_of_seq(seq)]
        return Receipt(segment.run_id, seq, segment.first_seq)

    def receipt_problem(self, receipt: Receipt, next_seq: int) -> str | None:
        """None if the acknowledged write of ``receipt`` is in this history (whose next write is
        ``next_seq``); otherwise a line saying which writes were lost."""
        where = f"acknowledged write seq {receipt.seq} of run {run_label(receipt.run_id)}"
        index = next((i for i, s in enumerate(self.segments) if s.run_id == receipt.run_id), None)
        if index is None:
            if receipt.run_first_seq:
                lost = f"writes {receipt.run_first_seq}..{receipt.seq} were lost"
            else:
                lost = f"that run's writes up to seq {receipt.seq} were lost"
            return f"{where}: not in the guest's history (the guest resumed from an older image); {lost}"
        segment = self.segments[index]
        end = self.segments[index + 1].first_seq if index + 1 < len(self.segments) else next_seq
        if receipt.seq >= end:
            return (f"{where}: not in the guest's history (the guest resumed from an older image, where "
                    f"that run ends before seq {end}); writes {end}..{receipt.seq} were lost")
        if receipt.seq < segment.first_seq:
            return (f"{where}: that run began at seq {segment.first_seq} in the guest's history; the receipt "
                    "is not of this guest")
        return None

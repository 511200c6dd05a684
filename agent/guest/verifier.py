"""Checks that every write the guest had acknowledged reads back from a controller (invariant 2).

Reads go through ``read_raw`` (allowed in every controller state) in 1 MiB chunks.  The guest
may keep writing during the check: a block may then hold a newer write than the one acknowledged
when its chunk was read, which is accepted only if that newer write was acknowledged by the time
the chunk had been read, or is the single write in flight.  A block holding anything older, or
anything corrupt, is a mismatch.  Each block must also carry the run that wrote its seq in the
guest's lineage: a block of another run is a write this history never acknowledged.

Block checks alone cannot see writes lost by a guest restored from an older image: the restored
guest replays the same seqs with the same contents at the same LBAs, and its acknowledged map came
from the same image.  Receipts can: each is a write someone saw acknowledged (seq and run), and it
must lie within its run's segment of the lineage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.backend import BLOCK_BYTES, GuestDrivenController
from agent.guest.blocks import block_seq, check_block
from agent.guest.lineage import Receipt
from agent.guest.workload import GuestWorkload

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    blocks_checked: int
    mismatches: int
    first_mismatch: str  # "" when ok
    receipts_checked: int = 0


def verify(controller: GuestDrivenController, workload: GuestWorkload,
           receipts: Sequence[Receipt] = ()) -> VerifyResult:
    """Check every receipt against the guest's history, then every acknowledged block of
    ``workload`` on ``controller``."""
    blocks = controller.block_count
    per_chunk = CHUNK_BYTES // BLOCK_BYTES
    checked = mismatches = 0
    first_mismatch = ""
    now = workload.acked_map(0, 0)
    for receipt in receipts:
        problem = now.lineage.receipt_problem(receipt, now.next_seq)
        if problem is not None:
            mismatches += 1
            first_mismatch = first_mismatch or problem
    for first in range(0, blocks, per_chunk):
        count = min(per_chunk, blocks - first)
        before = workload.acked_map(first, count)
        if before.acked_count() == 0:
            continue
        data = controller.read_raw(first * BLOCK_BYTES, count * BLOCK_BYTES)
        after = workload.acked_map(first, count)
        for i in range(count):
            lba = first + i
            expected = before.seq(lba)
            if expected is None:
                continue
            checked += 1
            block = data[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES]
            held = block_seq(block)
            if held is not None and held > expected:
                acked_later = after.seq(lba)
                if (acked_later is not None and held <= acked_later) or held == after.next_seq:
                    expected = held
            reason = check_block(block, lba, expected, after.lineage.run_of(expected))
            if reason is not None:
                mismatches += 1
                if not first_mismatch:
                    first_mismatch = reason
    return VerifyResult(mismatches == 0, checked, mismatches, first_mismatch, len(receipts))

"""Checks that every write the guest had acknowledged reads back from a controller (invariant 2).

Reads go through ``read_raw`` (allowed in every controller state) in 1 MiB chunks.  The guest
may keep writing during the check: a block may then hold a newer write than the one acknowledged
when its chunk was read, which is accepted only if that newer write was acknowledged by the time
the chunk had been read, or is the single write in flight.  A block holding anything older, or
anything corrupt, is a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.backend import BLOCK_BYTES, GuestDrivenController
from agent.guest.blocks import block_seq, check_block
from agent.guest.workload import GuestWorkload

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    blocks_checked: int
    mismatches: int
    first_mismatch: str  # "" when ok


def verify(controller: GuestDrivenController, workload: GuestWorkload) -> VerifyResult:
    """Check every acknowledged block of ``workload`` on ``controller``."""
    blocks = controller.block_count
    per_chunk = CHUNK_BYTES // BLOCK_BYTES
    checked = mismatches = 0
    first_mismatch = ""
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
            reason = check_block(block, lba, expected)
            if reason is not None:
                mismatches += 1
                if not first_mismatch:
                    first_mismatch = reason
    return VerifyResult(mismatches == 0, checked, mismatches, first_mismatch)

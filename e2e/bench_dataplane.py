"""Benchmark: data-plane throughput over loopback versus a raw asyncio socket baseline.

Sends N MiB (default 256) in 1 MiB extents from a DataSender to a DataReceiver whose sink only
counts bytes (one by one with ``send_extent``, through ``stream_extents``, and through
``send_ranges``, which reads in the sender's thread as a migration's precopy does), with no
bandwidth limit, and times it up to the ACK of the final round (so every byte was received,
checksummed and applied). The baseline in the same run pushes the same bytes through a bare asyncio
stream (no framing, no checksum, no sink) and times it until the server has read them all. Prints
MB/s for both and the ratio ours/raw.

Usage: python e2e/bench_dataplane.py [--mib 256] [--repeat 3] [--chunk-kib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.dataplane.receiver import STREAM_LIMIT, DataReceiver
from agent.dataplane.sender import DataSender, stream_extents

MiB = 1024 * 1024


class CountingSink:
    """Destination that keeps nothing: isolates the data plane from disk speed."""

    def __init__(self) -> None:
        self.bytes = 0

    async def apply_extent(self, offset: int, data: bytes) -> None:
        self.bytes += len(data)

    async def apply_round_end(self, round: int) -> None:
        pass

    async def apply_guest_map(self, piece: bytes) -> None:
        raise ValueError("the data-plane benchmark has no guest")

    async def apply_plan(self, plan: bytes) -> None:
        raise ValueError("the data-plane benchmark has no switchover")

    async def apply_final(self, state_blob: bytes, guest_blob: bytes) -> dict[str, Any]:
        return {}


async def bench_raw(chunk: bytes, count: int) -> float:
    """Seconds to push count*len(chunk) bytes through a plain asyncio stream."""
    total = count * len(chunk)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while got < total:
            data = await reader.read(STREAM_LIMIT)
            if not data:
                break
            got += len(data)
        if not done.done():
            done.set_result(None)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=STREAM_LIMIT)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=STREAM_LIMIT)
    writer.transport.set_write_buffer_limits(high=4 * MiB)  # same as DataSender
    start = time.perf_counter()
    for _ in range(count):
        writer.write(chunk)
        await writer.drain()
    await asyncio.wait_for(done, 120)
    elapsed = time.perf_counter() - start
    writer.close()
    server.close()
    await server.wait_closed()
    return elapsed


async def bench_ours(chunk: bytes, count: int, *, how: str, job: str) -> float:
    """Seconds from the first EXTENT to the ACK of the round that follows the last one."""
    receiver = DataReceiver("127.0.0.1")
    await receiver.start()
    sink = CountingSink()
    receiver.register(job, "bench-token", sink)
    try:
        sender = await DataSender.connect(receiver.address, job, "bench-token")
        async with sender:
            start = time.perf_counter()
            if how == "send_ranges":

                def read_into(offset: int, buffer: memoryview) -> None:
                    buffer[:] = chunk  # a copy, as a read from the page cache would be

                await sender.send_ranges(read_into, [(0, count * len(chunk))], chunk_bytes=len(chunk))
            elif how == "stream_extents":

                async def read(offset: int, length: int) -> bytes:
                    return chunk

                await stream_extents(sender, read, [(0, count * len(chunk))], chunk_bytes=len(chunk))
            else:
                for i in range(count):
                    await sender.send_extent(i * len(chunk), chunk)
            ack = await sender.end_round(0, timeout_s=120)
            elapsed = time.perf_counter() - start
        assert ack["bytes_received"] == count * len(chunk) == sink.bytes, (ack, sink.bytes)
    finally:
        await receiver.close()
    return elapsed


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="MiB to send per run (default 256)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is reported")
    ap.add_argument("--chunk-kib", type=int, default=1024, help="extent size in KiB (default 1024)")
    args = ap.parse_args()

    chunk = os.urandom(args.chunk_kib * 1024)
    count = args.mib * MiB // len(chunk)
    nbytes = count * len(chunk)
    results: dict[str, list[float]] = {"raw": [], "ours send_extent": [], "ours stream_extents": [],
                                       "ours send_ranges": []}
    for i in range(args.repeat):
        # Interleaved so a noisy neighbour hurts all variants alike.
        results["raw"].append(await bench_raw(chunk, count))
        for how, tag in (("send_extent", "a"), ("stream_extents", "b"), ("send_ranges", "c")):
            results[f"ours {how}"].append(await bench_ours(chunk, count, how=how, job=f"{tag}{i}"))

    print(f"{nbytes / MiB:.0f} MiB over loopback in {len(chunk) // 1024} KiB chunks, {args.repeat} runs, median:")
    raw = statistics.median(results["raw"])
    for name, times in results.items():
        med = statistics.median(times)
        line = f"  {name:22s} {mbps(nbytes, med):8.0f} MB/s  (best {mbps(nbytes, min(times)):.0f})"
        if name != "raw":
            line += f"  ratio ours/raw = {raw / med:.2f}"
        print(line)


if __name__ == "__main__":
    asyncio.run(main())

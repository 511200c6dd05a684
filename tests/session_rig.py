"""A guest writing on an emulated controller, and a source and destination session for job mig-1
over a real data-plane receiver in the test's event loop: what the session tests start from."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from agent.dataplane.receiver import DataReceiver
from agent.emulated.controller import EmulatedController
from agent.guest.workload import GuestWorkload, WorkloadSpec
from agent.sessions import DestinationSession, SourceSession


@dataclass
class SessionRig:
    source: EmulatedController
    destination: EmulatedController
    workload: GuestWorkload
    inbound: DestinationSession
    outbound: SourceSession


@contextlib.asynccontextmanager
async def session_rig(tmp_path: Path, receiver: DataReceiver, namespace_bytes: int, spec: WorkloadSpec, *,
                      state_path: Path | None = None, keep_destination: bool = False) -> AsyncIterator[SessionRig]:
    """Yields the rig with the guest prefilled and writing; stops and closes what it made (the
    destination controller too, unless `keep_destination`: then the test closes it)."""
    source = EmulatedController("c1", tmp_path / "c1.ns", namespace_bytes, create=True)
    destination = EmulatedController.for_resuming("c1", tmp_path / "c1.incoming", namespace_bytes)
    workload = GuestWorkload(source, spec)
    await asyncio.to_thread(workload.prefill)
    workload.start()
    inbound = DestinationSession(job_id="mig-1", epoch=1, controller_id="c1", controller=destination, token="t1",
                                 guest=destination, backend="emulated", state_path=state_path)
    receiver.register("mig-1", "t1", inbound)
    outbound = SourceSession(job_id="mig-1", epoch=1, controller_id="c1", controller=source, workload=workload,
                             token="t1")
    try:
        yield SessionRig(source, destination, workload, inbound, outbound)
    finally:
        await outbound.close()
        await asyncio.to_thread(workload.stop)
        source.close()
        if not keep_destination:
            destination.close()

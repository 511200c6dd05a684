"""Agent migration sessions: the stage tables (every pair), the refusals' kinds and codes, and,
with real sessions over the real data plane in process, that an abort while stop-and-copy waits
for a round stops it before the guest is paused."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from agent.dataplane.receiver import DataReceiver
from agent.guest.workload import WorkloadSpec
from agent.session_states import (
    CODES,
    DESTINATION_MOVES,
    SOURCE_MOVES,
    DestinationStage,
    ErrorKind,
    SessionError,
    SourceStage,
    move_problem,
)
from agent.sessions import SourceSession
from agent.vfio_states import VfioState
from cluster.agent_errors import StaleEpochDetail
from tests.session_rig import session_rig

MiB = 1 << 20
S, D = SourceStage, DestinationStage

# Written out here, apart from the module's tables: what a session may do next.
SOURCE_EXPECTED = {
    (S.NEW, S.PRECOPY), (S.PRECOPY, S.ROUND), (S.PRECOPY, S.STOP_AND_COPY), (S.ROUND, S.ROUND),
    (S.ROUND, S.STOP_AND_COPY), (S.STOP_AND_COPY, S.STOPPED), (S.STOPPED, S.RELEASED),
} | {(s, S.ABORTED) for s in (S.NEW, S.PRECOPY, S.ROUND, S.STOP_AND_COPY, S.STOPPED)}
DESTINATION_EXPECTED = {
    (D.RESUMING, D.RECEIVING), (D.RESUMING, D.LOADED), (D.RECEIVING, D.RECEIVING), (D.RECEIVING, D.LOADED),
    (D.LOADED, D.RUNNING),
} | {(s, D.ABORTED) for s in (D.RESUMING, D.RECEIVING, D.LOADED)}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(SourceStage, SourceStage)))
def test_source_moves_follow_the_table(current: SourceStage, target: SourceStage) -> None:
    problem = move_problem("mig-1", "source", current, target)
    assert (problem is None) == ((current, target) in SOURCE_EXPECTED)
    if problem:
        assert problem == f"job mig-1: the source is {current.value}, so it cannot go to {target.value}"
    assert set(SOURCE_MOVES) == set(SourceStage)


@pytest.mark.parametrize(("current", "target"), list(itertools.product(DestinationStage, DestinationStage)))
def test_destination_moves_follow_the_table(current: DestinationStage, target: DestinationStage) -> None:
    assert (move_problem("mig-1", "destination", current, target) is None) == ((current, target) in
                                                                               DESTINATION_EXPECTED)
    assert set(DESTINATION_MOVES) == set(DestinationStage)


def test_every_kind_has_one_code_and_only_a_stale_epoch_carries_its_detail() -> None:
    assert set(CODES) == set(ErrorKind)
    assert CODES[ErrorKind.STALE_EPOCH] is grpc.StatusCode.FAILED_PRECONDITION
    detail = StaleEpochDetail("mig-1", 3, 5)
    assert SessionError(ErrorKind.STALE_EPOCH, "old", stale=detail).stale == detail
    with pytest.raises(ValueError, match="STALE_EPOCH"):
        SessionError(ErrorKind.PRECONDITION, "x", stale=detail)
    with pytest.raises(ValueError, match="STALE_EPOCH"):
        SessionError(ErrorKind.STALE_EPOCH, "x")


def test_a_stale_epoch_is_refused_with_its_detail() -> None:
    session = SourceSession(job_id="mig-1", epoch=5, controller_id="c1")
    with pytest.raises(SessionError) as refused:
        session.check_epoch(3)
    assert refused.value.kind is ErrorKind.STALE_EPOCH and refused.value.stale == StaleEpochDetail("mig-1", 3, 5)
    session.check_epoch(7)
    assert session.epoch == 7


async def test_an_abort_while_stop_and_copy_waits_for_a_round_never_pauses_the_guest(
        tmp_path: Path, receiver: DataReceiver) -> None:
    async with session_rig(tmp_path, receiver, 8 * MiB, WorkloadSpec(write_iops=2000, seed=3)) as rig:
        source, workload, outbound = rig.source, rig.workload, rig.outbound
        await outbound.start_precopy(receiver.address, "t1", 0)
        # A round at 256 KiB/s against a guest writing 8 MB/s: it is still sending when
        # stop-and-copy asks for it, so stop-and-copy waits on it.
        round_call = asyncio.create_task(outbound.dirty_round(1, 256 * 1024, 0))
        await eventually("the round to start", lambda: outbound.stage is SourceStage.ROUND)
        stop_call = asyncio.create_task(outbound.stop_and_copy())
        await eventually("stop-and-copy to start", lambda: outbound.stop_copy_task is not None)
        assert not outbound.round_tasks[1].done()

        await outbound.abort("cancelled by operator")

        for call in (round_call, stop_call):
            with pytest.raises(SessionError) as aborted:
                await call
            assert aborted.value.kind is ErrorKind.ABORTED
        assert outbound.stop_copy_task is not None and outbound.stop_copy_task.cancelled()
        assert workload.status().pauses == 0, "the guest was paused for a stop-and-copy that was cancelled"
        assert source.vfio_state is VfioState.RUNNING and outbound.stage is SourceStage.ABORTED
        assert outbound.label == "aborted"
        with pytest.raises(SessionError, match="job mig-1 is aborted on the source"):
            await outbound.stop_and_copy()


async def eventually(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Waits, on this test's own event loop, until `check` holds; fails after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for _ in itertools.count():
        if check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("bandwidth", [0, 64 * 1024], ids=["unlimited", "too-slow-to-go-before"])
async def test_stop_and_copy_sends_what_changed_since_the_last_round_before_it_pauses_the_guest(
        tmp_path: Path, receiver: DataReceiver, bandwidth: int) -> None:
    async with session_rig(tmp_path, receiver, 8 * MiB, WorkloadSpec(write_iops=2000, seed=5)) as rig:
        source, destination, workload, outbound = rig.source, rig.destination, rig.workload, rig.outbound
        await outbound.start_precopy(receiver.address, "t1", 0)
        await outbound.dirty_round(1, bandwidth, 0)
        written = workload.status().acked_writes
        await asyncio.to_thread(workload.wait_acked, written + 20, 30)  # blocks changed since the round
        facts = await outbound.stop_and_copy()
        if bandwidth:
            # 20 ms at 64 KiB/s is not one block: they all wait for the pause.
            assert facts.pre_pause_bytes == 0 and facts.bytes_sent >= 4096
        else:
            assert facts.pre_pause_bytes >= 4096 and facts.pre_pause_ms > 0
            assert facts.bytes_sent >= facts.pre_pause_bytes
        assert workload.status().pauses == 1
        # What went before the pause and after it is the namespace as the guest paused.
        assert destination.digest() == source.digest()

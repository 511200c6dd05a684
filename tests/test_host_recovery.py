"""An agent restarted between recording a destination as hosted and claiming it in etcd: the
record without the claim is undone, and the destination is loaded and resumable again. With the
claim, the controller is its own and runs. Real etcd, real files; the agent's Host without its
servers."""

from __future__ import annotations

from pathlib import Path

from agent.backends.emulated_hosting import EmulatedHosting
from agent.dataplane.receiver import encode_final_payload
from agent.host import Host
from agent.session_states import DestinationStage
from agent.sessions import DestinationSession
from agent.vfio_states import VfioState
from cluster.records import COMMITTED, RUNNING, ControllerRecord
from cluster.store import EtcdStore

MIB = 1 << 20


def recorded_but_unclaimed(tmp_path: Path) -> Path:
    """A destination of job mig-1 whose data and state arrived and whose record was written."""
    source = EmulatedHosting(tmp_path / "source", 4 * MIB).create("c1", MIB)
    source.set_state(VfioState.STOP)
    state_blob = source.save_state()
    source.close()
    data_dir = tmp_path / "n2"
    hosting = EmulatedHosting(data_dir, 4 * MIB)
    hosting.create_destination("c1", "mig-1", MIB).close()
    (data_dir / "c1.mig-1.state").write_bytes(encode_final_payload(state_blob, b""))
    hosting.adopt_destination("c1", "mig-1")
    return data_dir


def host(store: EtcdStore, data_dir: Path) -> Host:
    return Host("n2", store, data_dir, EmulatedHosting(data_dir, 4 * MIB), "127.0.0.1:1", "127.0.0.1", 0, 2)


async def test_a_record_without_a_claim_is_undone_and_the_destination_is_loaded_again(
        store: EtcdStore, tmp_path: Path) -> None:
    data_dir = recorded_but_unclaimed(tmp_path)
    await store.claim_controller(ControllerRecord("c1", node="n2", namespace_bytes=MIB, state=COMMITTED))
    restarted = host(store, data_dir)
    await restarted.recover()
    try:
        assert restarted.controllers == {}
        session = restarted.sessions["mig-1"]
        assert isinstance(session, DestinationSession) and session.stage is DestinationStage.LOADED
        assert not (data_dir / "c1.json").exists() and (data_dir / "c1.mig-1.state").exists()
        assert restarted.hosting.pending_destinations() == [("c1", "mig-1")]
    finally:
        loaded = restarted.sessions["mig-1"]
        assert isinstance(loaded, DestinationSession)
        await loaded.close()
        loaded.ctrl.close()
        restarted.hosting.close()


async def test_a_record_with_its_claim_runs(store: EtcdStore, tmp_path: Path) -> None:
    data_dir = recorded_but_unclaimed(tmp_path)
    await store.claim_controller(ControllerRecord("c1", node="n2", namespace_bytes=MIB, state=RUNNING))
    restarted = host(store, data_dir)
    await restarted.recover()
    try:
        assert list(restarted.controllers) == ["c1"] and restarted.sessions == {}
        assert restarted.controllers["c1"].controller.vfio_state is VfioState.RUNNING
        assert (data_dir / "c1.json").exists() and not (data_dir / "c1.mig-1.state").exists()
    finally:
        restarted.controllers["c1"].controller.close()
        restarted.hosting.close()

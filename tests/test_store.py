"""The safety core against a real etcd: the fencing and compare-and-swap writes of EtcdStore.

Each test has its own key prefix in the session's etcd (conftest). The orchestrator and an agent
are played by separate clients (separate connections); what etcd holds afterwards is read back
with etcdctl, a client that is not ours.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from cluster.records import COMMITTED, LOST, RUNNING, ControllerRecord, NodeRecord
from cluster.store import ConflictError, EtcdStore, KeyLayout, keep_lease_alive, prefix_problem
from orchestrator.jobs import Job, Phase, Policy
from tests.conftest import etcdctl, unique_prefix

MiB = 1 << 20
RACE_ROUNDS = 200


# ---- reading back with etcdctl --------------------------------------------------------------

def read_back(endpoint: str, key: bytes) -> tuple[bytes, int] | None:
    """(value, mod revision) of a key, or None when it does not exist."""
    got = json.loads(etcdctl(endpoint, "get", key.decode(), "-w", "json"))
    kvs = got.get("kvs") or []
    if not kvs:
        return None
    (kv,) = kvs
    return base64.b64decode(kv["value"]), int(kv["mod_revision"])


def read_controller(endpoint: str, keys: KeyLayout, controller_id: str) -> ControllerRecord | None:
    got = read_back(endpoint, keys.controller(controller_id))
    return ControllerRecord.from_bytes(got[0]) if got else None


def keys_created_since(endpoint: str, revision: int) -> list[str]:
    got = json.loads(etcdctl(endpoint, "get", "", "--prefix", "--keys-only", "-w", "json"))
    return sorted(base64.b64decode(kv["key"]).decode() for kv in got.get("kvs") or []
                  if int(kv["create_revision"]) > revision)


def current_revision(endpoint: str) -> int:
    return int(json.loads(etcdctl(endpoint, "get", "/", "-w", "json"))["header"]["revision"])


# ---- building the records a real run writes -------------------------------------------------

def new_job(job_id: str, controller_id: str, source: str = "n1") -> Job:
    return Job(id=job_id, controller_id=controller_id, source_node=source, namespace_bytes=MiB, policy=Policy(),
               created_at=1.0)


async def lead(store: EtcdStore, name: str, ttl_s: int = 10) -> tuple[int, int]:
    """Takes the leader key for `name`; returns (lease id, term)."""
    lease = await store.grant_lease(ttl_s)
    term = await store.try_become_leader(name, lease)
    assert term is not None, f"{name} could not take the leader key: {await store.leader()} leads"
    return lease, term


async def committed_to(store: EtcdStore, job_id: str, controller_id: str, dest: str, term: int) -> int:
    """A controller owned by n1, a job moving it, and COMMIT done as the orchestrator-driven
    protocol of earlier versions left it (what a rolling upgrade may find): the record says
    COMMITTED on `dest`, unclaimed. Returns the job's revision."""
    assert await store.claim_controller(ControllerRecord(controller_id, "n1", MiB))
    job = new_job(job_id, controller_id)
    revision = await store.create_job(job_id, controller_id, job.to_bytes())
    got = await store.get_controller(controller_id)
    assert got is not None
    record, _ = got
    revision = await store.update_job(job_id, replace(job, phase=Phase.COMMIT).to_bytes(), revision,
                                      leader_term=term)
    # written as that version's COMMIT wrote it: no call of this version writes COMMITTED
    old_style = replace(record, node=dest, job_id=job_id, state=COMMITTED, history=(record.node,))
    await store._client.put(store.keys.controller(controller_id), old_style.to_bytes())
    return revision


@pytest.fixture
async def other(shared_etcd: str, etcd_prefix: str) -> AsyncIterator[EtcdStore]:
    """A second client under the same prefix: another orchestrator, or an agent."""
    second = EtcdStore(shared_etcd, prefix=etcd_prefix)
    await second.connect()
    try:
        yield second
    finally:
        await second.close()


# ---- fencing: a stale leader writes nothing -------------------------------------------------

async def test_a_stale_leader_cannot_write_the_job_commit_or_move_back(
        store: EtcdStore, other: EtcdStore, shared_etcd: str) -> None:
    keys = store.keys
    old_lease, old_term = await lead(store, "orch-a")
    job = new_job("mig-00000000000a", "c1")
    assert await store.claim_controller(ControllerRecord("c1", "n1", MiB))
    revision = await store.create_job(job.id, "c1", job.to_bytes())
    got = await store.get_controller("c1")
    assert got is not None
    record, controller_revision = got

    # orch-a loses its lease (expired, as for a frozen process): nobody leads for a moment ...
    await store.revoke_lease(old_lease)
    assert await other.leader_term() is None
    with pytest.raises(ConflictError):
        await store.update_job(job.id, replace(job, phase=Phase.PREPARING).to_bytes(), revision, leader_term=old_term)
    # ... then orch-b takes over with a new term
    _, new_term = await lead(other, "orch-b")
    assert new_term > old_term

    job_before = read_back(shared_etcd, keys.job(job.id))
    controller_before = read_back(shared_etcd, keys.controller("c1"))
    marker_before = read_back(shared_etcd, keys.active_job("c1"))
    assert job_before is not None and controller_before is not None and marker_before is not None

    committed = replace(job, phase=Phase.RESUMING).to_bytes()
    with pytest.raises(ConflictError):
        await store.update_job(job.id, replace(job, phase=Phase.FAILED).to_bytes(), revision,
                               release_controller="c1", leader_term=old_term)
    # the destination's commit, planned by orch-a before it lost the lead, is refused
    with pytest.raises(ConflictError):
        await other.commit_switchover(job.id, committed, revision, record, controller_revision, "n2",
                                      leader_term=old_term)
    assert read_back(shared_etcd, keys.job(job.id)) == job_before
    assert read_back(shared_etcd, keys.controller("c1")) == controller_before
    assert read_back(shared_etcd, keys.active_job("c1")) == marker_before

    # the same commit under the current term goes through: the term alone refused it above; it
    # moves ownership and claims RUNNING at once
    await other.commit_switchover(job.id, committed, revision, record, controller_revision, "n2",
                                  leader_term=new_term)
    moved = read_back(shared_etcd, keys.controller("c1"))
    assert moved is not None
    assert ControllerRecord.from_bytes(moved[0]).node == "n2"
    assert ControllerRecord.from_bytes(moved[0]).state == RUNNING
    job_after = read_back(shared_etcd, keys.job(job.id))
    assert job_after is not None and job_after[0] == committed

    # claimed: no leader, current or stale, can move it back
    assert not await store.move_back("c1", "n2", "n1", leader_term=old_term)
    assert not await other.move_back("c1", "n2", "n1", leader_term=new_term)
    assert read_back(shared_etcd, keys.controller("c1")) == moved


async def test_commit_moves_ownership_and_the_job_together_or_not_at_all(
        store: EtcdStore, shared_etcd: str) -> None:
    _, term = await lead(store, "orch-a")
    job = new_job("mig-00000000000b", "c1")
    assert await store.claim_controller(ControllerRecord("c1", "n1", MiB))
    revision = await store.create_job(job.id, "c1", job.to_bytes())
    got = await store.get_controller("c1")
    assert got is not None
    record, controller_revision = got
    # the controller changes after the runner read it (its source was marked lost)
    assert await store.set_controller_state("c1", LOST, only_if_node="n1")
    job_before = read_back(shared_etcd, store.keys.job(job.id))
    with pytest.raises(ConflictError):
        await store.commit_switchover(job.id, replace(job, phase=Phase.RESUMING).to_bytes(), revision, record,
                                      controller_revision, "n2", leader_term=term)
    assert read_back(shared_etcd, store.keys.job(job.id)) == job_before
    after = read_controller(shared_etcd, store.keys, "c1")
    assert after is not None and (after.node, after.state) == ("n1", LOST)


# ---- the switchover race: the destination's claim against the orchestrator's move_back -----

async def test_claim_running_racing_move_back_has_exactly_one_winner(
        store: EtcdStore, other: EtcdStore, shared_etcd: str) -> None:
    orchestrator, destination = store, other
    _, term = await lead(orchestrator, "orch-a")
    wins: Counter[str] = Counter()
    for i in range(RACE_ROUNDS):
        cid = f"r{i}"
        await committed_to(orchestrator, f"mig-{i:012x}", cid, "n2", term)
        claim = destination.claim_running(cid, "n2")
        back = orchestrator.move_back(cid, "n2", "n1", leader_term=term)
        # alternate which call leaves first, so each side gets to be the early one
        if i % 2:
            moved, refusal = await asyncio.gather(back, claim)
        else:
            refusal, moved = await asyncio.gather(claim, back)
        claimed = refusal is None
        assert claimed != moved, f"round {i}: claim granted={claimed}, moved back={moved}: exactly one must win"

        record = read_controller(shared_etcd, orchestrator.keys, cid)
        assert record is not None
        if claimed:
            wins["destination"] += 1
            assert (record.node, record.state) == ("n2", RUNNING), f"round {i}: {record}"
            assert not await orchestrator.move_back(cid, "n2", "n1", leader_term=term)  # too late, for good
        else:
            wins["source"] += 1
            assert (record.node, record.state, record.history) == ("n1", RUNNING, ("n1", "n2")), f"round {i}"
            assert refusal is not None and "'n1'" in refusal, refusal
            assert await destination.claim_running(cid, "n2") is not None  # the destination lost, for good
    print(f"winners over {RACE_ROUNDS} rounds: {dict(wins)}")
    # each side won some rounds: the two calls really overlapped rather than running one after the other
    assert wins["destination"] > 0 and wins["source"] > 0, dict(wins)


async def test_claim_running_on_a_read_made_before_a_move_back_is_refused(
        store: EtcdStore, other: EtcdStore, shared_etcd: str) -> None:
    """The destination reads the record while it writes its hosting record, then claims on that
    read: a move back landing in between must still win, and the claim say why it lost."""
    orchestrator, destination = store, other
    _, term = await lead(orchestrator, "orch-a")
    await committed_to(orchestrator, "mig-00000000aaaa", "pre", "n2", term)
    read = await destination.get_controller("pre")
    assert read is not None and read[0].state == COMMITTED
    assert await orchestrator.move_back("pre", "n2", "n1", leader_term=term)
    refusal = await destination.claim_running("pre", "n2", read)
    assert refusal is not None and "'n1'" in refusal, refusal
    record = read_controller(shared_etcd, orchestrator.keys, "pre")
    assert record is not None and (record.node, record.state) == ("n1", RUNNING), record


async def test_claim_running_on_a_fresh_read_is_granted(store: EtcdStore, other: EtcdStore,
                                                        shared_etcd: str) -> None:
    _, term = await lead(store, "orch-a")
    await committed_to(store, "mig-00000000bbbb", "fresh", "n2", term)
    assert await other.claim_running("fresh", "n2", await other.get_controller("fresh")) is None
    record = read_controller(shared_etcd, store.keys, "fresh")
    assert record is not None and (record.node, record.state) == ("n2", RUNNING), record


# ---- a job and its controller's in-migration marker -----------------------------------------

async def test_create_job_writes_the_job_and_the_marker_together_or_not_at_all(
        store: EtcdStore, shared_etcd: str) -> None:
    keys = store.keys
    first = new_job("mig-000000000001", "c1")
    await store.create_job(first.id, "c1", first.to_bytes())
    assert read_back(shared_etcd, keys.active_job("c1")) is not None
    assert await store.active_job_for("c1") == first.id

    # a second job for the same controller: refused, and no job key is left behind
    second = new_job("mig-000000000002", "c1")
    with pytest.raises(ConflictError, match=r"'c1' already has a migration in progress \(job mig-000000000001\)"):
        await store.create_job(second.id, "c1", second.to_bytes())
    assert read_back(shared_etcd, keys.job(second.id)) is None
    assert await store.active_job_for("c1") == first.id

    # a job id that exists, for another controller: refused, and no marker is left behind
    job_before = read_back(shared_etcd, keys.job(first.id))
    reused = new_job(first.id, "c2")
    with pytest.raises(ConflictError, match="job id 'mig-000000000001' exists already"):
        await store.create_job(reused.id, "c2", reused.to_bytes())
    assert read_back(shared_etcd, keys.active_job("c2")) is None
    assert read_back(shared_etcd, keys.job(first.id)) == job_before

    # the job's end takes the marker away in the same write; then the controller can move again
    assert job_before is not None
    await store.update_job(first.id, replace(first, phase=Phase.CANCELLED).to_bytes(), job_before[1],
                           release_controller="c1")
    assert read_back(shared_etcd, keys.active_job("c1")) is None
    await store.create_job(second.id, "c1", second.to_bytes())
    assert await store.active_job_for("c1") == second.id


async def test_update_job_is_a_compare_and_swap_on_the_job_revision(store: EtcdStore, shared_etcd: str) -> None:
    job = new_job("mig-000000000003", "c1")
    created = await store.create_job(job.id, "c1", job.to_bytes())
    updated = await store.update_job(job.id, replace(job, phase=Phase.PREPARING).to_bytes(), created)
    assert updated > created
    before = read_back(shared_etcd, store.keys.job(job.id))
    with pytest.raises(ConflictError, match="changed since revision"):
        await store.update_job(job.id, replace(job, phase=Phase.FAILED).to_bytes(), created, release_controller="c1")
    assert read_back(shared_etcd, store.keys.job(job.id)) == before
    assert await store.active_job_for("c1") == job.id  # the refused write released nothing


# ---- controller records ---------------------------------------------------------------------

async def test_a_job_is_deleted_only_unchanged_and_by_the_leader_of_its_term(
        store: EtcdStore, other: EtcdStore, shared_etcd: str) -> None:
    old_lease, old_term = await lead(store, "orch-a")
    job = new_job("mig-0000000000de", "c1")
    revision = await store.create_job(job.id, "c1", job.to_bytes())
    assert not await store.delete_job(job.id, revision - 1, leader_term=old_term)  # changed since: kept
    await store.revoke_lease(old_lease)
    _, new_term = await lead(other, "orch-b")
    assert not await store.delete_job(job.id, revision, leader_term=old_term)  # no longer leads: kept
    assert read_back(shared_etcd, store.keys.job(job.id)) is not None
    assert await other.delete_job(job.id, revision, leader_term=new_term)
    assert read_back(shared_etcd, store.keys.job(job.id)) is None


async def test_claim_controller_is_idempotent_for_its_node_and_refused_for_another(
        store: EtcdStore, other: EtcdStore, shared_etcd: str) -> None:
    first = ControllerRecord("c1", "n1", MiB)
    assert await store.claim_controller(first)
    stored = read_back(shared_etcd, store.keys.controller("c1"))
    assert stored is not None and ControllerRecord.from_bytes(stored[0]) == first
    # n1 again (an agent restarting and recovering it): granted, and the record is not rewritten
    assert await other.claim_controller(replace(first, namespace_bytes=2 * MiB))
    assert read_back(shared_etcd, store.keys.controller("c1")) == stored
    # another node: refused, the owner stays
    assert not await other.claim_controller(ControllerRecord("c1", "n2", MiB))
    assert read_back(shared_etcd, store.keys.controller("c1")) == stored


async def test_set_controller_state_only_if_node(store: EtcdStore, shared_etcd: str) -> None:
    assert await store.claim_controller(ControllerRecord("c1", "n1", MiB))
    before = read_back(shared_etcd, store.keys.controller("c1"))
    assert not await store.set_controller_state("c1", LOST, only_if_node="n2")
    assert read_back(shared_etcd, store.keys.controller("c1")) == before
    assert await store.set_controller_state("c1", LOST, only_if_node="n1")
    lost = read_back(shared_etcd, store.keys.controller("c1"))
    assert lost is not None and ControllerRecord.from_bytes(lost[0]).state == LOST
    assert await store.set_controller_state("c1", LOST, only_if_node="n1")  # already so: no new write
    assert read_back(shared_etcd, store.keys.controller("c1")) == lost
    assert await store.set_controller_state("c1", RUNNING)  # without a node condition
    assert (await store.get_controller("c1") or (None, 0))[0] == ControllerRecord("c1", "n1", MiB, state=RUNNING)
    assert not await store.set_controller_state("nope", LOST)
    assert read_back(shared_etcd, store.keys.controller("nope")) is None


async def test_claim_running_only_by_the_owner(store: EtcdStore, other: EtcdStore, shared_etcd: str) -> None:
    _, term = await lead(store, "orch-a")
    assert "'c9' is not known" in (await other.claim_running("c9", "n2") or "")
    await committed_to(store, "mig-000000000004", "c1", "n2", term)
    before = read_back(shared_etcd, store.keys.controller("c1"))
    refusal = await other.claim_running("c1", "n3")
    assert refusal is not None and "belongs to 'n2', not 'n3'" in refusal
    assert read_back(shared_etcd, store.keys.controller("c1")) == before
    assert await other.claim_running("c1", "n2") is None
    claimed = read_back(shared_etcd, store.keys.controller("c1"))
    assert claimed is not None and ControllerRecord.from_bytes(claimed[0]).state == RUNNING
    assert await other.claim_running("c1", "n2") is None  # a retried claim: granted, nothing rewritten
    assert read_back(shared_etcd, store.keys.controller("c1")) == claimed


# ---- leader election ------------------------------------------------------------------------

async def test_each_new_leader_has_a_greater_term(store: EtcdStore, other: EtcdStore) -> None:
    terms = []
    lease_a, term = await lead(store, "orch-a")
    terms.append(term)
    assert await other.try_become_leader("orch-b", await other.grant_lease(10)) is None  # held: refused
    assert (await other.leader(), await other.leader_term()) == ("orch-a", term)
    await store.resign("orch-a")
    assert await other.leader() is None and await other.leader_term() is None
    lease_b, term = await lead(other, "orch-b")
    terms.append(term)
    await other.revoke_lease(lease_b)  # lost its lease rather than resigned
    _, term = await lead(store, "orch-a")  # the first leader again: a new term all the same
    terms.append(term)
    assert terms == sorted(set(terms)), terms
    assert await other.leader_term() == terms[-1]
    await store.revoke_lease(lease_a)


async def test_only_the_holder_can_resign(store: EtcdStore, other: EtcdStore) -> None:
    _, term = await lead(store, "orch-a")
    await other.resign("orch-b")
    assert (await other.leader(), await other.leader_term()) == ("orch-a", term)
    await store.resign("orch-a")
    assert await other.leader() is None


# ---- liveness -------------------------------------------------------------------------------

async def wait_until(what: str, probe: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_node_record_vanishes_with_its_lease(store: EtcdStore, other: EtcdStore, shared_etcd: str) -> None:
    lease = await store.grant_lease(1)
    record = NodeRecord(name="n1", address="127.0.0.1:1", data_address="127.0.0.1:2", capacity_bytes=4 * MiB)
    await store.put_node(record, lease)
    assert await other.get_node("n1") == record
    assert [n.name for n in await other.list_nodes()] == ["n1"]

    async def gone() -> bool:
        return await other.get_node("n1") is None

    await wait_until("n1's record to vanish once its lease expired (TTL 1 s)", gone, 10)
    assert await other.list_nodes() == []
    assert read_back(shared_etcd, store.keys.node("n1")) is None
    assert not await store.refresh_lease(lease)  # the holder learns it lost what it held


async def test_keep_lease_alive_reports_a_lost_lease(store: EtcdStore, other: EtcdStore) -> None:
    lease = await store.grant_lease(1)
    await store.put_node(NodeRecord(name="n1", address="a:1", data_address="a:2", capacity_bytes=1), lease)
    lost = asyncio.Event()

    async def on_lost() -> None:
        lost.set()

    keeper = asyncio.create_task(keep_lease_alive(store, lease, 1, on_lost))
    try:
        await other.revoke_lease(lease)  # etcd drops it (an operator, or a lease expired while partitioned)
        await asyncio.wait_for(lost.wait(), timeout=10)
        await asyncio.wait_for(keeper, timeout=5)  # it stops by itself
        assert await other.get_node("n1") is None
    finally:
        keeper.cancel()


# ---- the prefix -----------------------------------------------------------------------------

async def test_clusters_under_different_prefixes_do_not_see_each_other(
        store: EtcdStore, shared_etcd: str) -> None:
    start = current_revision(shared_etcd)
    neighbour_prefix = unique_prefix("neighbour")
    neighbour = EtcdStore(shared_etcd, prefix=neighbour_prefix)
    await neighbour.connect()
    try:
        lease = await store.grant_lease(10)
        _, term = await lead(store, "orch-a")
        assert await store.claim_controller(ControllerRecord("c1", "n1", MiB))
        job = new_job("mig-000000000005", "c1")
        await store.create_job(job.id, "c1", job.to_bytes())
        await store.put_node(NodeRecord(name="n1", address="a:1", data_address="a:2", capacity_bytes=MiB), lease)
        await store.set_cordon("n2", True)

        assert await neighbour.list_jobs() == [] and await neighbour.list_controllers() == []
        assert await neighbour.list_nodes() == [] and await neighbour.cordoned_nodes() == set()
        assert await neighbour.leader() is None and await neighbour.active_job_for("c1") is None
        # its own leader, at the same time; and the same ids mean other things there
        _, neighbour_term = await lead(neighbour, "orch-z")
        assert await neighbour.claim_controller(ControllerRecord("c1", "n7", MiB))
        assert await store.leader() == "orch-a" and await store.leader_term() == term
        assert (await store.get_controller("c1") or (None, 0))[0] == ControllerRecord("c1", "n1", MiB)
        assert neighbour_term != term

        p = store.prefix
        assert keys_created_since(shared_etcd, start) == sorted([
            f"{p}active/c1", f"{p}controllers/c1", f"{p}cordon/n2", f"{p}jobs/{job.id}", f"{p}leader",
            f"{p}nodes/n1", f"{neighbour_prefix}controllers/c1", f"{neighbour_prefix}leader"])
        assert await store.cordoned_nodes() == {"n2"}
    finally:
        await neighbour.close()
        etcdctl(shared_etcd, "del", "--prefix", neighbour_prefix)


@pytest.mark.parametrize("prefix", ["/", "/nvmigrate/", "/nvmigrate/cluster-a/", "/a.b_c-d/e/"])
def test_good_prefixes(prefix: str) -> None:
    assert prefix_problem(prefix) is None
    assert KeyLayout(prefix).job("mig-1") == f"{prefix}jobs/mig-1".encode()


@pytest.mark.parametrize(("prefix", "named"), [
    ("", "must start and end with '/'"),
    ("nvmigrate/", "must start and end with '/'"),
    ("/nvmigrate", "must start and end with '/'"),
    ("/nv migrate/", "space"),
    ("/nv\tmigrate/", "space"),
    ("/nv\x00migrate/", "non-printable"),
])
def test_bad_prefixes_are_refused_with_the_value(prefix: str, named: str) -> None:
    problem = prefix_problem(prefix)
    assert problem is not None and named in problem and repr(prefix) in problem
    with pytest.raises(ValueError, match="etcd prefix"):
        EtcdStore("127.0.0.1:2379", prefix=prefix)

"""Kubernetes Nodes request evacuations: against a FAKE API server (tests/fakes/fake_kube_api.py),
since no Kubernetes cluster runs here, with the real kubernetes client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from orchctl.localcluster import LocalCluster, wait_for
from orchestrator.kube import (
    PROGRESS_ANNOTATION,
    EvacuationRequest,
    KubeNodes,
    KubeNodeWatcher,
    evacuation_request,
)
from tests.clusterprobe import create_controller, etcd_json, owners, verify
from tests.fakes.fake_kube_api import FakeKubeApi

MiB = 1 << 20


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi().start()
    yield api
    api.stop()


def test_conditions_taints_and_annotations_ask_and_other_nodes_do_not() -> None:
    def node(**parts: object) -> dict[str, object]:
        return {"metadata": {"name": "k1", "labels": {"nvmigrate.io/node": "n1"}, **parts.get("meta", {})},  # type: ignore[dict-item]
                "spec": parts.get("spec", {}), "status": parts.get("status", {})}
    assert evacuation_request(node()) is None
    predicted = evacuation_request(node(status={"conditions": [
        {"type": "NVMeDriveFailurePredicted", "status": "True", "message": "spare 3%"}]}))
    assert predicted == EvacuationRequest("n1", "k1", "Kubernetes node k1: condition NVMeDriveFailurePredicted "
                                                      "(spare 3%)", predicted_failure=True)
    assert evacuation_request(node(status={"conditions": [
        {"type": "NVMeDriveFailurePredicted", "status": "False"}]})) is None
    tainted = evacuation_request(node(spec={"taints": [{"key": "nvmigrate.io/evacuate", "effect": "NoSchedule"}]}))
    assert tainted is not None and not tainted.predicted_failure and "taint" in tainted.reason
    annotated = evacuation_request(node(meta={"annotations": {"nvmigrate.io/evacuate": "true"}}))
    assert annotated is not None and annotated.node == "n1"


async def wait_until(what: str, probe: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_condition_set_on_a_node_cordons_it_and_hands_over_one_request(kube: FakeKubeApi) -> None:
    kube.add_node("k1", labels={"nvmigrate.io/node": "n1"})
    kube.add_node("k2")
    requests: list[EvacuationRequest] = []

    async def on_request(request: EvacuationRequest) -> None:
        requests.append(request)

    watcher = KubeNodeWatcher(KubeNodes(host=kube.url), on_request)
    watcher.start()
    try:
        # node-problem-detector's way: a condition on the Node's status
        kube.patch_node("k1", {"status": {"conditions": [
            {"type": "NVMeDriveFailurePredicted", "status": "True", "reason": "SpareLow"}]}})
        await wait_until("the request", lambda: requests)
        assert requests[0].node == "n1" and requests[0].predicted_failure
        await wait_until("k1 cordoned", lambda: kube.node("k1")["spec"].get("unschedulable") is True)
        # later changes of the same Node do not ask again
        kube.patch_node("k1", {"metadata": {"annotations": {"unrelated": "x"}}})
        kube.patch_node("k2", {"metadata": {"annotations": {"unrelated": "x"}}})
        await wait_until("the watch to see both changes",
                         lambda: kube.node("k2")["metadata"]["annotations"].get("unrelated") == "x")
        await asyncio.sleep(0)  # let any hand-over scheduled from the watch thread run
        assert len(requests) == 1
        assert "unschedulable" not in kube.node("k2")["spec"]
        await watcher.report(requests[0], "done: 8 of 8 controllers moved", done=True)
        assert kube.node("k1")["metadata"]["annotations"][PROGRESS_ANNOTATION] == "done: 8 of 8 controllers moved"
        assert [(e["involvedObject"]["name"], e["reason"]) for e in kube.events] == [("k1", "EvacuationDone")]
    finally:
        await watcher.stop()


async def test_a_node_already_asking_when_the_watch_starts_is_handed_over(kube: FakeKubeApi) -> None:
    kube.add_node("k3")
    kube.patch_node("k3", {"metadata": {"annotations": {"nvmigrate.io/evacuate": "true"}}})
    requests: list[EvacuationRequest] = []

    async def on_request(request: EvacuationRequest) -> None:
        requests.append(request)

    watcher = KubeNodeWatcher(KubeNodes(host=kube.url), on_request)
    watcher.start()
    try:
        await wait_until("the request from the list", lambda: requests)
        assert requests[0].node == "k3" and not requests[0].predicted_failure
    finally:
        await watcher.stop()


def test_a_node_condition_evacuates_through_a_real_orchestrator(shared_etcd: str, etcd_prefix: str,
                                                                 kube: FakeKubeApi) -> None:
    for name in ("n1", "n2", "n3"):
        kube.add_node(name)
    with LocalCluster() as c:
        c.use_etcd(shared_etcd, etcd_prefix)
        c.start_orchestrator("orch-1", extra_args=["--kube-api", kube.url])
        c.start_agents(["n1", "n2", "n3"])
        for cid in ("k1", "k2"):
            create_controller(c, "n1", cid, 4 * MiB, write_iops=100)
        # as node-problem-detector reports a predicted drive failure
        kube.patch_node("n1", {"status": {"conditions": [
            {"type": "NVMeDriveFailurePredicted", "status": "True", "reason": "SmartSpareLow"}]}})

        def annotated_done() -> str | None:
            text = kube.node("n1")["metadata"]["annotations"].get(PROGRESS_ANNOTATION, "")
            return str(text) if text.startswith("DONE") else None
        text = wait_for("n1's Node to say the evacuation is done", annotated_done, 240, interval_s=0.2)
        assert text == "DONE: 2 of 2 controllers moved"
        assert kube.node("n1")["spec"].get("unschedulable") is True  # the Kubernetes node, cordoned
        assert [(e["involvedObject"]["name"], e["reason"]) for e in kube.events] == [("n1", "EvacuationDone")]
        ev = etcd_json(c, f"{c.etcd_prefix}evacuations/n1")
        assert ev is not None and ev["reason"] == "PREDICTED_FAILURE"
        assert "condition NVMeDriveFailurePredicted (SmartSpareLow)" in str(ev["note"])
        where = owners(c)
        for cid in ("k1", "k2"):
            assert where[cid] in ("n2", "n3")
            assert verify(c, where[cid], cid).ok
        # other Nodes were left alone
        assert "unschedulable" not in kube.node("n2")["spec"]

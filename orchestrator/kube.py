"""Kubernetes Nodes as a source of evacuation requests, and where an evacuation's progress shows.

A Node asks for its host to be emptied by any of (configurable):
- a condition, as node-problem-detector sets one (default type `NVMeDriveFailurePredicted`, status
  True): a predicted failure;
- the taint `nvmigrate.io/evacuate` (any effect), or the annotation `nvmigrate.io/evacuate: "true"`:
  an operator's request.
The orchestrator's node is the Node's label `nvmigrate.io/node` when set, else the Node's name.

The leader watches Nodes (list, then watch from the list's resourceVersion, re-listed when the
watch ends), hands each request to its evacuation callback once, cordons the Kubernetes Node
(spec.unschedulable) and reports progress as Events and the annotation
`nvmigrate.io/evacuation`. The kubernetes client blocks, so every call runs in a worker thread,
never on the event loop. `evacuation_request` and `orchestrator_node` are pure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cluster.kube_client import api_client

log = logging.getLogger(__name__)

EVACUATE_KEY = "nvmigrate.io/evacuate"
NODE_LABEL = "nvmigrate.io/node"
PROGRESS_ANNOTATION = "nvmigrate.io/evacuation"
WATCH_TIMEOUT_S = 5  # a watch call returns this often, so a stop is noticed
RETRY_S = 2.0


@dataclass(frozen=True)
class KubeSignals:
    condition_types: tuple[str, ...] = ("NVMeDriveFailurePredicted",)
    taint_key: str = EVACUATE_KEY
    annotation: str = EVACUATE_KEY


@dataclass(frozen=True)
class EvacuationRequest:
    node: str  # the orchestrator's node name
    kube_node: str  # the Kubernetes Node's name
    reason: str
    predicted_failure: bool  # a condition (hardware) rather than an operator's taint or annotation


def orchestrator_node(node: dict[str, Any]) -> str:
    meta = node.get("metadata") or {}
    return str((meta.get("labels") or {}).get(NODE_LABEL) or meta.get("name", ""))


def evacuation_request(node: dict[str, Any], signals: KubeSignals = KubeSignals()) -> EvacuationRequest | None:
    """What this Node asks for, or None."""
    meta = node.get("metadata") or {}
    name = str(meta.get("name", ""))
    node_name = orchestrator_node(node)
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") in signals.condition_types and condition.get("status") == "True":
            why = condition.get("message") or condition.get("reason") or ""
            text = f"Kubernetes node {name}: condition {condition['type']}" + (f" ({why})" if why else "")
            return EvacuationRequest(node_name, name, text, predicted_failure=True)
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("key") == signals.taint_key:
            text = f"Kubernetes node {name}: taint {signals.taint_key}"
            return EvacuationRequest(node_name, name, text, predicted_failure=False)
    if str((meta.get("annotations") or {}).get(signals.annotation, "")).lower() == "true":
        text = f"Kubernetes node {name}: annotation {signals.annotation}=true"
        return EvacuationRequest(node_name, name, text, predicted_failure=False)
    return None


class KubeNodes:
    """The blocking kubernetes client calls (run them in a thread)."""

    def __init__(self, host: str = "", kubeconfig: str = "") -> None:
        from kubernetes import client  # imported here: the orchestrator runs without it too

        self._client = api_client(host, kubeconfig)
        self.api = client.CoreV1Api(self._client)

    def list(self) -> tuple[list[dict[str, Any]], str]:
        got = self.api.list_node()
        nodes = [self._client.sanitize_for_serialization(n) for n in got.items]
        return nodes, str(got.metadata.resource_version or "") if got.metadata is not None else ""

    def watch(self, resource_version: str, stop: threading.Event,
              on_node: Callable[[dict[str, Any]], None]) -> str:
        """Streams Node changes from `resource_version` until the watch times out or `stop` is set;
        returns the last resourceVersion seen."""
        from kubernetes import watch

        stream = watch.Watch()
        try:
            for event in stream.stream(self.api.list_node, resource_version=resource_version,
                                       timeout_seconds=WATCH_TIMEOUT_S):
                node = self._client.sanitize_for_serialization(event["object"])
                resource_version = str(node.get("metadata", {}).get("resourceVersion", resource_version))
                on_node(node)
                if stop.is_set():
                    break
        finally:
            stream.stop()
        return resource_version

    def cordon(self, name: str) -> None:
        self.api.patch_node(name, {"spec": {"unschedulable": True}})

    def annotate(self, name: str, key: str, value: str) -> None:
        self.api.patch_node(name, {"metadata": {"annotations": {key: value}}})

    def event(self, kube_node: str, reason: str, message: str, *, warning: bool = False) -> None:
        now = datetime.now(UTC).isoformat()
        self.api.create_namespaced_event("default", {  # type: ignore[arg-type]  # a dict body is sent as is
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{kube_node}.nvmigrate."},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": kube_node},
            "reason": reason, "message": message, "type": "Warning" if warning else "Normal",
            "source": {"component": "nvmigrate-orchestrator"}, "firstTimestamp": now, "lastTimestamp": now,
            "count": 1})


class KubeNodeWatcher:
    """Owned by the leader: watches Nodes from a thread and hands each new evacuation request to
    `on_request` on the event loop. `stop()` ends the thread (within a watch timeout)."""

    def __init__(self, nodes: KubeNodes, on_request: Callable[[EvacuationRequest], Awaitable[None]],
                 signals: KubeSignals = KubeSignals()) -> None:
        self.nodes = nodes
        self.on_request = on_request
        self.signals = signals
        self._stop = threading.Event()
        self._requested: set[str] = set()  # Kubernetes nodes already handed over
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[concurrent.futures.Future[None]] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kube-node-watch", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, WATCH_TIMEOUT_S * 2)
        for future in list(self._pending):
            future.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(future)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                nodes, version = self.nodes.list()
                for node in nodes:
                    self._seen(node)
                while not self._stop.is_set():
                    version = self.nodes.watch(version, self._stop, self._seen)
            except Exception as exc:  # the API server away, a watch that expired: list again
                log.warning("Kubernetes node watch: %s; listing again in %.0f s", exc, RETRY_S)
                self._stop.wait(RETRY_S)

    def _seen(self, node: dict[str, Any]) -> None:
        request = evacuation_request(node, self.signals)
        if request is None:
            self._requested.discard(str(node.get("metadata", {}).get("name", "")))
            return
        if request.kube_node in self._requested or self._loop is None:
            return
        self._requested.add(request.kube_node)
        future = asyncio.run_coroutine_threadsafe(self._hand_over(request), self._loop)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def _hand_over(self, request: EvacuationRequest) -> None:
        log.info("evacuation requested: %s", request.reason)
        try:
            await asyncio.to_thread(self.nodes.cordon, request.kube_node)
            await self.on_request(request)
        except Exception as exc:
            log.error("evacuation of %s requested by Kubernetes not started: %s", request.node, exc)
            self._requested.discard(request.kube_node)  # asked again at the next change of the Node

    async def report(self, request: EvacuationRequest, progress: str, *, done: bool = False,
                     failed: bool = False) -> None:
        """Progress on the Node: its annotation, and an Event when the evacuation starts or ends."""
        await asyncio.to_thread(self.nodes.annotate, request.kube_node, PROGRESS_ANNOTATION, progress)
        if done or failed:
            await asyncio.to_thread(self.nodes.event, request.kube_node,
                                    "EvacuationFailed" if failed else "EvacuationDone", progress, warning=failed)


class KubeEvacuations:
    """While this orchestrator leads: evacuations that Kubernetes Nodes ask for are started through
    `start` (the EvacuateNode path), and each one's progress is written back onto its Node (the
    annotation as it changes, an Event when it ends), read from the evacuation records."""

    def __init__(self, nodes: KubeNodes, start: Callable[[EvacuationRequest], Awaitable[None]],
                 progress: Callable[[str], Awaitable[tuple[str, bool, bool] | None]],
                 signals: KubeSignals = KubeSignals(), poll_s: float = 1.0) -> None:
        self.watcher = KubeNodeWatcher(nodes, self._requested, signals)
        self._start = start
        self._progress = progress  # node -> (text, ended, failed), or None when it has no evacuation
        self._poll_s = poll_s
        self._following: dict[str, tuple[EvacuationRequest, str]] = {}  # node -> (request, text shown)

    async def _requested(self, request: EvacuationRequest) -> None:
        await self._start(request)
        self._following[request.node] = (request, "")

    async def run_forever(self) -> None:
        self.watcher.start()
        try:
            while True:
                for node, (request, shown) in list(self._following.items()):
                    try:
                        got = await self._progress(node)
                        if got is None:
                            continue
                        text, ended, failed = got
                        if text != shown or ended:
                            await self.watcher.report(request, text, done=ended and not failed, failed=failed)
                            self._following[node] = (request, text)
                        if ended:
                            del self._following[node]
                    except Exception as exc:  # the API server away: the next pass writes it
                        log.warning("progress of %s not written to Kubernetes node %s: %s", node, request.kube_node,
                                    exc)
                await asyncio.sleep(self._poll_s)
        finally:
            await self.watcher.stop()

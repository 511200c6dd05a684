"""A FAKE Kubernetes API server, for what cannot run here (no cluster, no real API server): just
enough of core/v1 for the orchestrator's node watch, over real HTTP on loopback.

- GET  /api/v1/nodes                      list (with a resourceVersion)
- GET  /api/v1/nodes?watch=true&...       watch: one JSON event per line, as the API server streams
- GET  /api/v1/nodes/NAME                 one node
- PATCH /api/v1/nodes/NAME[/status]       JSON merge patch or strategic merge patch (conditions
                                          merged by type, as the real server merges them)
- POST /api/v1/namespaces/NS/events       create an Event (kept in `events`)

Nothing else: no auth, no field selectors, no other kinds. A test adds nodes with `add_node`
and reads what the orchestrator did through `node`, `events`.
"""

from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.fakes.kube_http import JsonHandler

WATCH_POLL_S = 0.1


class FakeKubeApi:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self._version = 1
        self._watchers: list[queue.Queue[dict[str, Any] | None]] = []
        self.events: list[dict[str, Any]] = []
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-kube-api", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeKubeApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            for watcher in self._watchers:
                watcher.put(None)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # ---- what a test does -----------------------------------------------------------------------

    def add_node(self, name: str, labels: dict[str, str] | None = None) -> None:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels or {}, "annotations": {}},
                "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        self._store(name, node, "ADDED")

    def node(self, name: str) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._nodes[name]))

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """What a client's PATCH does (node-problem-detector setting a condition, say)."""
        with self._lock:
            node = self._nodes[name]
        merged = _merge(node, patch)
        self._store(name, merged, "MODIFIED")
        return merged

    # ---- the store ------------------------------------------------------------------------------

    def _store(self, name: str, node: dict[str, Any], kind: str) -> None:
        with self._lock:
            self._version += 1
            node["metadata"]["resourceVersion"] = str(self._version)
            self._nodes[name] = node
            event = {"type": kind, "object": json.loads(json.dumps(node))}
            for watcher in self._watchers:
                watcher.put(event)

    def _list(self) -> dict[str, Any]:
        with self._lock:
            return {"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": str(self._version)},
                    "items": [json.loads(json.dumps(n)) for n in self._nodes.values()]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if parts[:3] != ["api", "v1", "nodes"]:
                    return self._not_found()
                if len(parts) == 4:
                    with api._lock:
                        node = api._nodes.get(parts[3])
                    return self._send(200, node) if node else self._not_found()
                if parse_qs(url.query).get("watch", ["false"])[0] in ("true", "1"):
                    return self._watch(int(parse_qs(url.query).get("timeoutSeconds", ["30"])[0]))
                return self._send(200, api._list())

            def _watch(self, timeout_s: int) -> None:
                events: queue.Queue[dict[str, Any] | None] = queue.Queue()
                with api._lock:
                    api._watchers.append(events)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                waited = 0.0
                try:
                    while waited < timeout_s:
                        try:
                            event = events.get(timeout=WATCH_POLL_S)
                        except queue.Empty:
                            waited += WATCH_POLL_S
                            continue
                        if event is None:
                            break
                        line = json.dumps(event).encode() + b"\n"
                        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with api._lock:
                        api._watchers.remove(events)

            def do_PATCH(self) -> None:
                parts = urlparse(self.path).path.strip("/").split("/")
                if parts[:3] != ["api", "v1", "nodes"] or len(parts) not in (4, 5) or parts[3] not in api._nodes:
                    return self._not_found()
                patch = self._body()
                api.patches.append((parts[3], patch))
                self._send(200, api.patch_node(parts[3], patch))

            def do_POST(self) -> None:
                parts = urlparse(self.path).path.strip("/").split("/")
                if parts[:3] != ["api", "v1", "namespaces"] or len(parts) != 5 or parts[4] != "events":
                    return self._not_found()
                event = self._body()
                with api._lock:
                    api.events.append(event)
                self._send(201, event)

        return Handler


def _merge(target: Any, patch: Any) -> Any:
    """JSON merge patch, except that status.conditions lists merge by `type` (strategic merge)."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return patch
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif key == "conditions" and isinstance(value, list) and isinstance(target.get(key), list):
            by_type = {c["type"]: c for c in target[key]}
            for condition in value:
                by_type[condition["type"]] = {**by_type.get(condition["type"], {}), **condition}
            out[key] = list(by_type.values())
        else:
            out[key] = _merge(target.get(key), value)
    return out

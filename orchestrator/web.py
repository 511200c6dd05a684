"""The orchestrator's HTTP side (`--http HOST:PORT`): Prometheus /metrics, a read-only web page
(nodes, jobs, a job's phase timeline) and the JSON it draws from.

    /                  nodes and jobs          /api/nodes       nodes (JSON)
    /jobs/JOB          one job's timeline      /api/jobs        jobs, newest first (JSON)
    /metrics           Prometheus              /api/jobs/JOB    one job (JSON)
    /healthz           "ok"                    /static/...      the page's script and style
    /readyz            200 "ready" once the gRPC API serves (as grpc.health.v1 says SERVING), else 503:
                       the probe for clusters whose gRPC port takes only client certificates (mutual TLS)

Every replica serves it (reads come from etcd, like the gRPC API). The page is plain HTML with a
small script of our own: no CDN, since operators' machines may have no internet. Served by
aiohttp on the orchestrator's event loop; nothing here blocks it (etcd reads are async).
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from cluster import names
from cluster.http_server import HttpServer, healthz, parse_http_address, prometheus_response
from cluster.node_cache import NodeSource
from cluster.records import NodeRecord
from cluster.store import EtcdError, EtcdStore
from orchestrator.jobs import Job, LiveJob, shown
from orchestrator.metrics import ClusterState

__all__ = ["DEFAULT_HTTP", "WebServer", "job_json", "node_json", "parse_http_address", "start"]  # --http: main

log = logging.getLogger(__name__)

UI_DIR = Path(__file__).with_name("webui")
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# Job fields a read-only page must not show: the destination's one-time data-plane token.
_HIDDEN = ("destination_token", "trace_context")


def job_json(job: Job) -> dict[str, Any]:
    data = asdict(job)
    for key in _HIDDEN:
        data.pop(key, None)
    data["trace_id"] = job.trace_context.get("trace_id", "")
    data["terminal"] = job.terminal
    return data


def node_json(node: NodeRecord, cordoned: set[str]) -> dict[str, Any]:
    return {**asdict(node), "live": True, "cordoned": node.name in cordoned}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class WebServer:
    def __init__(self, store: EtcdStore, name: str, live_job: LiveJob | None = None,
                 nodes: NodeSource | None = None) -> None:
        self.store = store
        self.node_source: NodeSource = nodes or store  # shown as of a moment ago
        self.name = name
        self.live_job = live_job  # the leader's jobs with progress not yet written to etcd
        self.cluster_state = ClusterState(name, live_job)
        self.grpc_serving = False  # set by the orchestrator's main once its gRPC server serves, cleared at stop
        self._server = HttpServer(self.app(), log)
        self._page = (UI_DIR / "index.html").read_text().replace("{{ORCHESTRATOR}}", html.escape(name))

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.get("/", self.page), web.get("/jobs/{job_id}", self.page),
            web.get("/static/{name}", self.static), web.get("/healthz", healthz),
            web.get("/readyz", self.readyz), web.get("/metrics", self.metrics),
            web.get("/api/nodes", self.nodes), web.get("/api/jobs", self.jobs), web.get("/api/jobs/{job_id}", self.job),
        ])
        return app

    async def start(self, host: str, port: int) -> str:
        """Listens; returns the bound HOST:PORT (port 0 picks a free one)."""
        return f"{host}:{await self._server.start(host, port)}"

    async def stop(self) -> None:
        await self._server.stop()

    # ---- handlers -------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=self._page, content_type="text/html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:  # a fixed list: no path from the URL reaches the filesystem
            return _error(404, f"no static file {name!r}")
        return web.Response(body=(UI_DIR / name).read_bytes(), content_type=STATIC_FILES[name])

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.grpc_serving:
            return web.Response(status=503, text="not ready: the gRPC API is not serving\n")
        return web.Response(text="ready\n")

    async def metrics(self, request: web.Request) -> web.Response:
        await self.cluster_state.refresh(self.store, self.node_source)
        return prometheus_response(self.cluster_state.exposition())

    async def nodes(self, request: web.Request) -> web.Response:
        try:
            nodes = sorted(await self.node_source.list_nodes(), key=lambda n: n.name)
            cordoned = await self.store.cordoned_nodes()
        except EtcdError as exc:
            return _error(503, f"etcd is unavailable: {exc}")
        return _json({"orchestrator": self.name, "nodes": [node_json(n, cordoned) for n in nodes]})

    async def jobs(self, request: web.Request) -> web.Response:
        try:
            jobs = [shown(Job.from_bytes(v.value), v.mod_revision, self.live_job) for v in await self.store.list_jobs()]
        except EtcdError as exc:
            return _error(503, f"etcd is unavailable: {exc}")
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return _json({"orchestrator": self.name, "jobs": [job_json(j) for j in jobs]})

    async def job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        problem = names.job_id_problem(job_id)
        if problem:
            return _error(400, problem)
        try:
            got = await self.store.get_job(job_id)
        except EtcdError as exc:
            return _error(503, f"etcd is unavailable: {exc}")
        if got is None:
            return _error(404, f"job {job_id!r} does not exist")
        return _json(job_json(shown(Job.from_bytes(got.value), got.mod_revision, self.live_job)))


DEFAULT_HTTP = "127.0.0.1:9464"


async def start(store: EtcdStore, name: str, address: tuple[str, int] | None,
                live_job: LiveJob | None = None, nodes: NodeSource | None = None) -> WebServer | None:
    """Serves /metrics and the page on `address` (None: not at all); says where on stdout."""
    if address is None:
        return None
    server = WebServer(store, name, live_job, nodes)
    bound = await server.start(*address)
    print(f"orchestrator {name} http on http://{bound}", flush=True)
    return server

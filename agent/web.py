"""The agent's HTTP side (`--http HOST:PORT`, off by default): Prometheus metrics and probes.

    /metrics   Prometheus (agent.metrics)
    /healthz   liveness: 200 "ok" whenever the event loop answers
    /readyz    readiness: 200 "ready" when AgentService serves and the node record is in etcd under
               a live lease (agent.readiness); else 503 and the reason, one line

Served by aiohttp on the agent's event loop; a handler reads the host in memory and never waits
on etcd (the lease thread's last word is enough), so probes answer during an etcd outage.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from agent.host import Host
from agent.metrics import AgentState, snapshot_of
from agent.readiness import readiness_problem
from cluster.http_server import HttpServer, healthz, prometheus_response, reachable_address

log = logging.getLogger(__name__)

DEFAULT_HTTP = "off"
HTTP_ENV = "NVMIGRATE_AGENT_HTTP"


class AgentWeb:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.grpc_serving = False  # set by the agent's main once AgentService serves, cleared when it stops
        self.agent_state = AgentState(lambda: snapshot_of(self.host, ready=self.problem() is None))
        self._server = HttpServer(self.app(), log)

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/metrics", self.metrics), web.get("/healthz", healthz),
                        web.get("/readyz", self.readyz)])
        return app

    def problem(self) -> str | None:
        return readiness_problem(self.host.lease.status(), self.grpc_serving, time.monotonic())

    async def start(self, host: str, port: int) -> int:
        """Listens; returns the bound port (port 0 picks a free one)."""
        return await self._server.start(host, port)

    async def stop(self) -> None:
        await self._server.stop()

    async def metrics(self, request: web.Request) -> web.Response:
        return prometheus_response(self.agent_state.exposition())

    async def readyz(self, request: web.Request) -> web.Response:
        problem = self.problem()
        if problem is not None:
            return web.Response(status=503, text=f"not ready: {problem}\n")
        return web.Response(text="ready\n")


async def start(host: Host, address: tuple[str, int] | None, advertise_host: str) -> AgentWeb | None:
    """Serves /metrics and the probes on `address` (None: not at all). The address peers reach it
    at goes into the node record (as the gRPC address does) and, on stdout, into the log."""
    if address is None:
        return None
    server = AgentWeb(host)
    port = await server.start(*address)
    host.http_address = reachable_address(address[0], port, advertise_host)
    print(f"agent {host.name} http on http://{host.http_address}", flush=True)
    return server


def serving(server: AgentWeb | None, grpc_serving: bool) -> None:
    """AgentService started (or stopped) serving: /readyz follows."""
    if server is not None:
        server.grpc_serving = grpc_serving


async def stop(server: AgentWeb | None) -> None:
    if server is not None:
        await server.stop()

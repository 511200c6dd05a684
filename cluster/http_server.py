"""What the orchestrator's and the agent's HTTP sides share: the `--http HOST:PORT` flag, an
aiohttp server on the process's event loop that reports the port it bound, its error log, and
the Prometheus response.

Each process adds its own routes (orchestrator.web, agent.web); nothing here blocks the loop.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from cluster.ratelimited_log import malformed_input

log = logging.getLogger(__name__)
HTTP_KIND = "http"  # malformed input of this kind is logged at most once per window
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OFF = ("", "off", "none")
# Hosts that listen on every interface: peers reach such a server at the process's advertised host.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def parse_http_address(text: str, flag: str = "--http") -> tuple[str, int] | None:
    """HOST:PORT to serve on (port 0 picks a free one), or '' / 'off' for no HTTP."""
    if text.strip().lower() in OFF:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{flag} {text!r} is not HOST:PORT (port 0 picks a free one; 'off' serves no HTTP)")
    return host.strip("[]"), int(port)


def reachable_address(listen_host: str, port: int, advertise_host: str) -> str:
    """HOST:PORT at which peers reach a server bound to `listen_host`: a wildcard is no address."""
    host = advertise_host if listen_host in WILDCARD_HOSTS else listen_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def prometheus_response(body: bytes) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.Response(text="ok\n")


class ServerErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server log: a request that is not HTTP (garbage, a TLS or HTTP/2 hello on this
    port) goes to the rate-limited log of malformed input as one line; anything else (a handler
    that raised) is logged as aiohttp would, with its traceback."""

    def exception(self, msg: object, *args: object, exc_info: object = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            said = (exc_info.message or type(exc_info).__name__).splitlines()[0][:120]
            remote = args[0] if args else "?"
            malformed_input.malformed(HTTP_KIND, "malformed HTTP request from %s: %d %s", remote, exc_info.code, said)
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)


class HttpServer:
    """An aiohttp application served on HOST:PORT; `start` returns the port it bound."""

    def __init__(self, app: web.Application, logger: logging.Logger) -> None:
        self._app = app
        self._logger = logger
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listens (port 0 picks a free one); OSError when it cannot."""
        self._runner = web.AppRunner(self._app, access_log=None, logger=ServerErrorLog(self._logger))
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except BaseException:
            await self.stop()
            raise
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

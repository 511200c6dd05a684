"""Connection to the orchestrator's MigrationService for orchctl.

One place decides how orchctl reaches the orchestrator: the address (flag, then the
ORCHCTL_SERVER environment variable, then the local default), the deadline for unary calls,
and the channel credentials. Today the channel is plaintext; TLS is a `TLSConfig` away:
`open_channel` already branches on it so the CLI only has to grow the flags that fill it in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from proto.v1 import migration_pb2_grpc

ENV_SERVER = "ORCHCTL_SERVER"
DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0


def default_server() -> str:
    """The address used when --server is not given: $ORCHCTL_SERVER, else the local default."""
    return os.environ.get(ENV_SERVER, "").strip() or DEFAULT_SERVER


@dataclass(frozen=True)
class TLSConfig:
    """Files for a TLS channel: the CA that signed the orchestrator's certificate and, for
    mutual TLS, our own certificate and key. Not wired to CLI flags yet."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Overrides the name checked against the server certificate (useful behind port-forwards).
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to reach the orchestrator."""

    server: str = DEFAULT_SERVER
    timeout_s: float = DEFAULT_TIMEOUT_S
    tls: TLSConfig | None = None


def open_channel(config: ClientConfig) -> grpc.Channel:
    """A channel to `config.server`; plaintext unless `config.tls` is set."""
    # No keepalive pings: the orchestrator's default server policy treats frequent pings as abuse
    # (GOAWAY "too_many_pings") and a watch stream already notices a dead server on its own.
    if config.tls is None:
        return grpc.insecure_channel(config.server)
    options: list[tuple[str, str]] = []
    if config.tls.server_name:
        options.append(("grpc.ssl_target_name_override", config.tls.server_name))
    return grpc.secure_channel(config.server, config.tls.credentials(), options=options)


class OrchestratorClient:
    """The MigrationService stub plus the deadline to use for unary calls.

    Use as a context manager so the channel (and its threads) close when the command ends.
    Streams (WatchMigration) take no deadline: they last as long as the migration does.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._channel = open_channel(config)
        self.stub = migration_pb2_grpc.MigrationServiceStub(self._channel)

    @property
    def server(self) -> str:
        return self.config.server

    @property
    def timeout(self) -> float:
        return self.config.timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> OrchestratorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""Mutual TLS for the gRPC servers and clients of a cluster, and the authorization of each call.

Flags, the same on the orchestrator and the agent (and `orchctl --tls-*`):
  --tls-ca FILE    ($NVMIGRATE_TLS_CA)    the cluster's CA: peers' certificates must chain to it
  --tls-cert FILE  ($NVMIGRATE_TLS_CERT)  this process's certificate (`orchctl certs` makes them)
  --tls-key FILE   ($NVMIGRATE_TLS_KEY)   its private key
All three or none: without them every port is plaintext and nothing is authorized (one machine,
tests). With them a server takes only clients whose certificate chains to the CA, and
`Authorizer` lets each call through only for the roles cluster/identity.py lists for its method.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from cluster.identity import Identity, IdentityError, identity_from_pem, refusal


@dataclass(frozen=True)
class TlsFiles:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    # where they came from: Python's ssl module loads a certificate chain from files only
    cert_file: Path | None = None
    key_file: Path | None = None

    @functools.cached_property
    def identity(self) -> Identity:
        return identity_from_pem(self.cert_pem)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    def ssl_context(self, *, server: bool) -> ssl.SSLContext:
        """A context for plain TCP protocols (the data plane, NBD): TLS 1.3 only, this process's
        certificate, peers verified against the cluster's CA, both ways. A client checks the
        server's name itself (`server_hostname`: the peer's node name)."""
        if self.cert_file is None or self.key_file is None:
            raise ValueError("TLS for TCP needs the certificate and key as files (--tls-cert, --tls-key)")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH,
                                             cadata=self.ca_pem.decode())
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(self.cert_file, self.key_file)
        if server:
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def add_tls_arguments(parser: argparse.ArgumentParser, env_prefix: str = "NVMIGRATE_TLS") -> None:
    for flag, what in (("ca", "the cluster's CA certificate"), ("cert", "this process's certificate"),
                       ("key", "the private key of --tls-cert")):
        variable = f"{env_prefix}_{flag.upper()}"
        parser.add_argument(f"--tls-{flag}", default=os.environ.get(variable, ""), metavar="FILE",
                            help=f"mutual TLS: {what} (${variable}); --tls-ca, --tls-cert and --tls-key go "
                                 "together")


def tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS files the flags name, None when none is given; ValueError naming the flag when only
    some are, or one cannot be read, or the certificate names no identity."""
    given = {flag: getattr(args, f"tls_{flag}") for flag in ("ca", "cert", "key")}
    if not any(given.values()):
        return None
    missing = [f"--tls-{flag}" for flag, value in given.items() if not value]
    if missing:
        raise ValueError(f"--tls-ca, --tls-cert and --tls-key go together; {' and '.join(missing)} missing")
    pems = {}
    for flag, path in given.items():
        try:
            pems[flag] = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"--tls-{flag} {path}: cannot read it ({exc.strerror}); give a readable file") from None
    files = TlsFiles(pems["ca"], pems["cert"], pems["key"], cert_file=Path(given["cert"]),
                     key_file=Path(given["key"]))
    try:
        files.identity  # noqa: B018  (parsed now, so a wrong certificate stops the start)
    except IdentityError as exc:
        raise ValueError(f"--tls-cert {given['cert']}: {exc}") from None
    return files


def identity_of_der(der: bytes | None) -> Identity | None:
    """The identity a peer's certificate (DER, as ssl's getpeercert(binary_form=True) gives it)
    names; None when there is none or it names none."""
    if not der:
        return None
    return _identity_of(ssl.DER_cert_to_PEM_cert(der).encode())


@functools.lru_cache(maxsize=256)
def _identity_of(pem: bytes) -> Identity | None:
    try:
        return identity_from_pem(pem)
    except IdentityError:
        return None


def peer_identity(context: grpc.aio.ServicerContext) -> Identity | None:
    """The identity the client's certificate names (None: no certificate, or one naming none)."""
    pems = context.auth_context().get("x509_pem_cert") or []
    return _identity_of(bytes(pems[0])) if pems else None


class Authorizer(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a call whose client identity may not call its method, before the servicer runs:
    UNAUTHENTICATED without an identity, PERMISSION_DENIED with the wrong one."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method)

        async def check(context: grpc.aio.ServicerContext) -> None:
            identity = peer_identity(context)
            problem = refusal(identity, method)
            if problem:
                code = grpc.StatusCode.UNAUTHENTICATED if identity is None else grpc.StatusCode.PERMISSION_DENIED
                await context.abort(code, problem)

        def guarded(inner: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(inner):
                async def generate(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    await check(context)
                    async for response in inner(request, context):
                        yield response
                return generate

            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result
            return behavior

        args = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(guarded(handler.unary_unary), *args)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(guarded(handler.unary_stream), *args)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(guarded(handler.stream_unary), *args)
        return grpc.stream_stream_rpc_method_handler(guarded(handler.stream_stream), *args)


def agent_channel(address: str, node: str, tls: TlsFiles | None,
                  interceptors: list[grpc.aio.ClientInterceptor] | None = None) -> grpc.aio.Channel:
    """A channel to the agent of `node` at `address`: with TLS that agent must prove it is `node`
    (its certificate carries the DNS name `node`), so an agent registered under a name not its
    own is not believed."""
    if tls is None:
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), interceptors=interceptors,
                                   options=[("grpc.ssl_target_name_override", node)])


def server_interceptors(tls: TlsFiles | None) -> list[grpc.aio.ServerInterceptor]:
    return [Authorizer()] if tls is not None else []


def add_port(server: grpc.aio.Server, address: str, tls: TlsFiles | None) -> int:
    return int(server.add_secure_port(address, tls.server_credentials()) if tls is not None
               else server.add_insecure_port(address))

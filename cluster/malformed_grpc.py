"""A gRPC server interceptor that answers an undecodable request INVALID_ARGUMENT, quietly.

grpc.aio decodes a request body with the handler's deserializer before any interceptor or
servicer sees it; when that raises (a body that is not the method's protobuf message), grpc's
own `_handle_exceptions` logs an ERROR with a traceback and answers UNKNOWN. A peer sending
garbage then writes a dozen log lines per request. This interceptor wraps every handler's
deserializer so that a body that does not decode becomes a `MalformedRequest` value instead of
an exception; the wrapped handler answers it INVALID_ARGUMENT "request body is not a valid
<Message>" and logs one line through the process's rate-limited log of malformed input.

Installed first in the interceptor list of both servers (agent and orchestrator), so the tracing
interceptor never sees a malformed request either.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from cluster.ratelimited_log import RateLimitedLog, malformed_input

GRPC_KIND = "grpc"


@dataclass(frozen=True)
class MalformedRequest:
    """Stands for a request body that did not decode as `message` (a protobuf full name)."""

    message: str
    error: str

    @property
    def details(self) -> str:
        return f"request body is not a valid {self.message}"


def _message_name(deserializer: Callable[[bytes], Any], method: str) -> str:
    cls = getattr(deserializer, "__self__", None)  # `SomeRequest.FromString`, bound to its class
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "")) or f"request of {method}"


def _guarded(deserializer: Callable[[bytes], Any], message: str) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, or whatever a custom deserializer raises
            return MalformedRequest(message, f"{type(exc).__name__}: {exc}")
    return deserialize


class MalformedRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, log: RateLimitedLog = malformed_input) -> None:
        self.log = log

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = str(handler_call_details.method)
        message = _message_name(handler.request_deserializer, method)
        deserializer = _guarded(handler.request_deserializer, message)
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary_in(handler.unary_unary, method),
                                                       deserializer, serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._unary_in_stream_out(handler.unary_stream, method),
                                                        deserializer, serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._stream_in(handler.stream_unary, method),
                                                        deserializer, serializer)
        return grpc.stream_stream_rpc_method_handler(self._stream_in_stream_out(handler.stream_stream, method),
                                                     deserializer, serializer)

    async def _refuse(self, request: MalformedRequest, context: grpc.aio.ServicerContext, method: str) -> None:
        self.log.malformed(GRPC_KIND, "malformed gRPC request to %s from %s: %s (%s)", method, context.peer(),
                           request.details, request.error)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)

    async def _checked(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                       method: str) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, MalformedRequest):
                await self._refuse(request, context, method)
            yield request

    def _unary_in(self, inner: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, MalformedRequest):
                await self._refuse(request, context, method)
            return await _result(inner(request, context))
        return behavior

    def _unary_in_stream_out(self, inner: Callable[..., Any], method: str) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(inner):
            async def generate(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, MalformedRequest):
                    await self._refuse(request, context, method)
                async for response in inner(request, context):
                    yield response
            return generate
        return self._unary_in(inner, method)  # a coroutine that writes with context.write()

    def _stream_in(self, inner: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def behavior(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await _result(inner(self._checked(requests, context, method), context))
        return behavior

    def _stream_in_stream_out(self, inner: Callable[..., Any], method: str) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(inner):
            async def generate(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in inner(self._checked(requests, context, method), context):
                    yield response
            return generate
        return self._stream_in(inner, method)


async def _result(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value

"""Tracing setup both processes share: the tracer provider from the standard OTEL_* environment
variables, and W3C trace context carried over gRPC metadata (a client interceptor for the
orchestrator's agent channels, a server interceptor in the agent).

Tracing is on when an exporter is configured: OTEL_TRACES_EXPORTER=otlp|console, or an
OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT with no OTEL_TRACES_EXPORTER. With none (the default) no
provider is installed, the interceptors are not installed either, and every hook the job code
calls returns at its first `if`: tracing then costs next to nothing.

The OTLP exporter speaks gRPC and reads its own settings (endpoint, headers, timeout) from the
environment; the batch processor reads OTEL_BSP_*; the resource takes OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES.

Surviving a process that dies (SIGKILL, a lost node) takes two things from here:
- `flush_soon()`: the batch processor holds ended spans for up to OTEL_BSP_SCHEDULE_DELAY
  (5 s by default), and a killed process takes them along. The orchestrator asks for a flush
  after each job write that ended spans; a thread of its own exports them (`SpanFlusher`), so
  the event loop never waits and a collector that is down never holds up a job.
- An agent call made for a job carries the job's phase or round span as its `traceparent` (the
  agent's span is a child of that span, which whoever closes it emits) and the caller's own
  CLIENT span id in `nvmigrate-caller-span` (the agent's span links to it). A caller killed
  mid-call never exports its CLIENT span; the agent's span then lacks only a link target, not
  its parent.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from cluster import logs

log = logging.getLogger(__name__)

TRACER_NAME = "nvmigrate"
EXPORTERS = ("otlp", "console", "none")

# Polls repeated every half second while a transfer runs: a span each would bury the trace.
QUIET_METHODS = frozenset({"GetSession", "GetInfo", "GetController"})

# gRPC metadata key: the span id (16 hex) of the caller's CLIENT span, which the server's span
# links to while its parent is the job's phase or round span (`traceparent`).
CALLER_SPAN_KEY = "nvmigrate-caller-span"

# The bound handed to each flush. The SDK's BatchSpanProcessor (1.45) ignores it and exports
# until the exporter gives up (OTEL_EXPORTER_OTLP_TIMEOUT); only the flusher thread waits then.
FLUSH_TIMEOUT_MS = 2000

# TransferResult and SessionStatus fields worth seeing on the agent's span.
_RESULT_FIELDS = ("bytes_sent", "blocks_sent", "bytes_received", "dirty_bytes_remaining", "dirty_rate_bytes_per_s",
                  "state_bytes", "round", "duration_s", "guest_blackout_ms", "stage")


class TelemetryConfigError(ValueError):
    """The OTEL_* settings ask for something this build cannot do."""


# ---- ids chosen ahead of time ------------------------------------------------------------------

_PRESET: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("nvmigrate_preset_ids",
                                                                                 default=None)


class PresetIdGenerator(IdGenerator):
    """Random ids, except inside `preset_ids()`: then the ids given there.

    A job's root span and its phase spans outlive any one orchestrator (a leader can die
    mid-phase), so their ids are chosen when the job or phase begins and kept in the job record;
    whoever ends them emits the span under the recorded ids with the recorded start time.
    """

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_trace_id(self) -> int:
        preset = _PRESET.get()
        return preset[0] if preset and preset[0] else self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        preset = _PRESET.get()
        return preset[1] if preset and preset[1] else self._random.generate_span_id()


@contextlib.contextmanager
def preset_ids(trace_id: int, span_id: int) -> Iterator[None]:
    """Spans started in this block get these ids (trace_id only matters for a root span)."""
    token = _PRESET.set((trace_id, span_id))
    try:
        yield
    finally:
        _PRESET.reset(token)


# ---- the provider --------------------------------------------------------------------------

_provider: TracerProvider | None = None


def exporter_name(environ: Mapping[str, str] | None = None) -> str:
    """Which exporter the environment asks for: 'otlp', 'console' or 'none'."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    chosen = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not chosen:
        # The SDK's default would be otlp; we only export when someone said where to.
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return "otlp" if endpoint else "none"
    unknown = [n for n in chosen if n not in EXPORTERS]
    if unknown or len(chosen) > 1:
        raise TelemetryConfigError(
            f"OTEL_TRACES_EXPORTER={env.get('OTEL_TRACES_EXPORTER')!r}: use one of {', '.join(EXPORTERS)}")
    if chosen[0] == "otlp":
        protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                    or "grpc").strip().lower()
        if protocol != "grpc":
            raise TelemetryConfigError(f"OTLP protocol {protocol!r} is not supported; this build exports OTLP "
                                       "over gRPC (OTEL_EXPORTER_OTLP_PROTOCOL=grpc, port 4317)")
    return chosen[0]


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def setup_tracing(service_name: str, instance: str, environ: Mapping[str, str] | None = None) -> bool:
    """Installs the process's tracer provider when an exporter is configured; True if it did.

    `service_name` is the default for OTEL_SERVICE_NAME; `instance` names this process among
    its peers (the orchestrator's or the node's name)."""
    env = os.environ if environ is None else environ
    name = exporter_name(env)
    if name == "none":
        return False
    attributes: dict[str, str] = {"service.instance.id": instance}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name  # given attributes win over the env, so only as default
    provider = TracerProvider(resource=Resource.create(attributes), id_generator=PresetIdGenerator())
    provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)  # for libraries that trace through the global API
    use_provider(provider)
    log.info("tracing on: exporting spans with %s as %s/%s", name, attributes.get("service.name",
             env.get("OTEL_SERVICE_NAME", "")), instance)
    return True


def config_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """What is wrong with the OTEL_* settings, for a usage error at startup; None if nothing."""
    try:
        exporter_name(environ)
    except TelemetryConfigError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def running(service_name: str, instance: str, log_label: str, log_level: str, log_format: str) -> Iterator[None]:
    """A process's logs and traces for as long as it runs: logging configured, the tracer
    provider installed (if an exporter is configured), buffered spans flushed at the end."""
    logs.configure(log_level, log_format, log_label)
    setup_tracing(service_name, instance)
    try:
        yield
    finally:
        shutdown_tracing()


def use_provider(provider: TracerProvider | None) -> None:
    """Makes `provider` the one our spans go to (None: tracing off). setup_tracing calls it; tests
    call it with a provider of their own, since the global one can be set only once."""
    global _provider
    _stop_flusher()
    _provider = provider


def shutdown_tracing() -> None:
    """Flushes buffered spans (bounded by the exporter's timeout) and stops exporting."""
    global _provider
    _stop_flusher()
    if _provider is not None:
        _provider.shutdown()
        _provider = None


# ---- flushing soon -----------------------------------------------------------------------------


class SpanFlusher:
    """Exports the ended spans of a provider soon after `request()`, from a thread of its own.

    `request()` only sets a flag: the caller (the orchestrator's event loop) never waits. The
    thread runs one `force_flush` at a time; requests made meanwhile merge into the next one, so
    a collector that is down (each flush then lasts the exporter's timeout) costs one stuck
    thread, never a queue of them, and never an error in the job. Spans still go out on the
    batch schedule as well; the flush only shortens the time they sit in this process.
    """

    THREAD_NAME = "nvmigrate-span-flush"

    def __init__(self, provider: TracerProvider, timeout_ms: int = FLUSH_TIMEOUT_MS) -> None:
        self._provider = provider
        self._timeout_ms = timeout_ms
        self._changed = threading.Condition()
        self.requested = 0  # flushes asked for so far
        self.flushed = 0  # the requests the last finished flush covered
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def request(self) -> None:
        with self._changed:
            self.requested += 1
            self._changed.notify_all()

    def wait(self, timeout_s: float) -> bool:
        """Until every request so far is flushed; False if `timeout_s` passed first (tests)."""
        with self._changed:
            target = self.requested
            return self._changed.wait_for(lambda: self.flushed >= target, timeout_s)

    def stop(self, timeout_s: float = 1.0) -> None:
        """Ends the thread once its flush in progress, if any, returns (waiting at most
        `timeout_s`: a flush stuck on a dead collector is left to the exporter's timeout)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._stopping or self.requested > self.flushed)
                if self._stopping:
                    return
                target = self.requested
            try:
                self._provider.force_flush(self._timeout_ms)
            except Exception:  # an exporter bug must not end the thread; spans still leave on schedule
                log.warning("flushing spans failed", exc_info=True)
            with self._changed:
                self.flushed = target
                self._changed.notify_all()


_flusher: SpanFlusher | None = None


def flush_soon() -> None:
    """Asks for the spans ended so far to be exported now rather than on the batch schedule.
    Returns at once; does nothing while tracing is off (and starts no thread then)."""
    global _flusher
    if _provider is None:
        return
    if _flusher is None:
        _flusher = SpanFlusher(_provider)
    _flusher.request()


def span_flusher() -> SpanFlusher | None:
    """The flusher of this process, once a flush was asked for (tests look at it)."""
    return _flusher


def _stop_flusher() -> None:
    global _flusher
    if _flusher is not None:
        _flusher.stop()
        _flusher = None


def tracing_enabled() -> bool:
    return _provider is not None


def tracer() -> trace.Tracer:
    if _provider is None:
        return trace.get_tracer(TRACER_NAME)  # the API's no-op
    return _provider.get_tracer(TRACER_NAME)


_IDS = RandomIdGenerator()


def new_ids() -> tuple[int, int, bool]:
    """A fresh (trace id, span id, sampled) for a root span that is emitted later; the
    configured sampler decides now, so every span of the trace follows one decision."""
    assert _provider is not None
    trace_id = _IDS.generate_trace_id()
    decision = _provider.sampler.should_sample(None, trace_id, "migration")
    return trace_id, _IDS.generate_span_id(), decision.decision.is_sampled()


def new_span_id() -> int:
    return _IDS.generate_span_id()


# ---- gRPC propagation ------------------------------------------------------------------------


def _method(full: str | bytes) -> tuple[str, str]:
    """'/nvmigrate.v1.AgentService/StartPrecopy' -> ('nvmigrate.v1.AgentService', 'StartPrecopy')."""
    text = full.decode() if isinstance(full, bytes) else full
    service, _, method = text.lstrip("/").rpartition("/")
    return service, method


def _job_id(request: Any) -> str:
    ref = getattr(request, "ref", request)
    return str(getattr(ref, "job_id", "") or "")


ParentFor = Callable[[str], otel_context.Context | None]


class ClientTracing(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """A CLIENT span per call.

    For a call that belongs to a job (`parent_for(job id of the request)` names the phase or
    round running it), the span is a child of that phase or round, and so is the agent's: the
    `traceparent` sent is the phase's or round's, and the CLIENT span's id travels beside it
    (CALLER_SPAN_KEY) for the agent's span to link to. Any other call is traced the usual way:
    a child of the caller's current span, sent as the `traceparent`."""

    def __init__(self, peer: str, parent_for: ParentFor | None = None) -> None:
        self.peer = peer
        self.parent_for = parent_for

    async def intercept_unary_unary(self, continuation: Callable[[Any, Any], Awaitable[Any]],
                                    client_call_details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        service, method = _method(client_call_details.method)
        if method in QUIET_METHODS:
            return await continuation(client_call_details, request)
        job_id = _job_id(request)
        parent = self.parent_for(job_id) if self.parent_for is not None and job_id else None
        span = tracer().start_span(f"{service}/{method}", context=parent, kind=SpanKind.CLIENT, attributes={
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": method, "server.address": self.peer,
            "nvmigrate.job_id": job_id})
        carrier: dict[str, str] = {}
        if parent is not None:
            propagate.inject(carrier, context=parent)
            caller = span.get_span_context()
            if caller.is_valid:
                carrier[CALLER_SPAN_KEY] = f"{caller.span_id:016x}"
        else:
            propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *carrier.items())
        details = grpc.aio.ClientCallDetails(client_call_details.method, client_call_details.timeout, metadata,
                                             client_call_details.credentials, client_call_details.wait_for_ready)
        try:
            call = await continuation(details, request)
            await call  # the span lasts until the answer (or the error) is in
            span.set_attribute("rpc.grpc.status_code", 0)
        except grpc.aio.AioRpcError as exc:
            span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
            span.set_status(Status(StatusCode.ERROR, f"{exc.code().name}: {exc.details()}"))
            raise
        except BaseException as exc:  # cancelled by the runner (a long call re-issued, a cancel)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()
        return call


class ServerTracing(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A SERVER span per call, child of the caller's `traceparent` and linked to the caller's
    CLIENT span when CALLER_SPAN_KEY names it; the job id and trace id go into the log context
    of the handler (and of the tasks it starts)."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        service, method = _method(handler_call_details.method)
        if handler is None or handler.unary_unary is None or method in QUIET_METHODS:
            return handler
        inner = handler.unary_unary
        metadata = {m.key: m.value for m in (handler_call_details.invocation_metadata or ())
                    if isinstance(m.value, str)}

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            parent = propagate.extract(metadata)
            job_id = _job_id(request)
            with tracer().start_as_current_span(
                    f"{service}/{method}", context=parent, kind=SpanKind.SERVER, record_exception=False,
                    set_status_on_exception=False, links=caller_links(parent, metadata.get(CALLER_SPAN_KEY)),
                    attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                                "nvmigrate.job_id": job_id}) as span:
                trace_id = f"{span.get_span_context().trace_id:032x}" if span.get_span_context().is_valid else ""
                with logs.context(logs.Fields(job_id=job_id, trace_id=trace_id)):
                    try:
                        response = await inner(request, context)
                    except BaseException as exc:
                        code = _code(context)
                        span.set_status(Status(StatusCode.ERROR, f"{code}: {_details(context) or exc}"))
                        raise
                    _describe(span, response)
                    return response

        return grpc.unary_unary_rpc_method_handler(traced, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


def caller_links(parent: otel_context.Context, caller_span: str | None) -> list[Link]:
    """The link from a server span to the caller's CLIENT span (in the parent's trace); none when
    the caller sent no valid span id."""
    remote = trace.get_current_span(parent).get_span_context()
    try:
        span_id = int(caller_span or "", 16)
    except ValueError:
        return []
    if not remote.is_valid or not 0 < span_id < 1 << 64 or span_id == remote.span_id:
        return []
    return [Link(SpanContext(remote.trace_id, span_id, is_remote=True, trace_flags=remote.trace_flags))]


def _code(context: grpc.aio.ServicerContext) -> str:
    with contextlib.suppress(Exception):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code.name
    return "UNKNOWN"


def _details(context: grpc.aio.ServicerContext) -> str:
    with contextlib.suppress(Exception):
        return str(context.details() or "")
    return ""


def _describe(span: trace.Span, response: Any) -> None:
    fields = getattr(getattr(response, "DESCRIPTOR", None), "fields_by_name", {})
    for name in _RESULT_FIELDS:
        if name in fields:
            span.set_attribute(f"nvmigrate.{name}", getattr(response, name))


def client_interceptors(peer: str, parent_for: ParentFor | None = None) -> list[grpc.aio.ClientInterceptor]:
    """What an agent channel gets: nothing while tracing is off."""
    return [ClientTracing(peer, parent_for)] if tracing_enabled() else []


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    return [ServerTracing()] if tracing_enabled() else []

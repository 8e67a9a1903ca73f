"""OpenTelemetry tracing and the gRPC and database instrumentation every service uses.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (RuntimeConfig reads it): spans go over
OTLP/gRPC to that collector (Jaeger reads OTLP). The SDK reads the other standard variables itself:
``OTEL_SERVICE_NAME`` (default: the service's own name), ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``: a request that arrives with a
``traceparent`` is sampled as its caller decided, a new trace always), ``OTEL_BSP_*`` (batching).

What is traced:
- every gRPC call a server answers and every call a client makes (grpc.aio interceptors), except
  health checks, reflection and the long-lived ``Subscribe*`` feeds: a subscription lives for hours
  and is not one unit of work (messages of a stream get their own spans, see ``message_span``);
- SQL statements, as children of the span that runs them (never as new traces of their own);
- what the services add themselves: a span per streamed tick batch and per group commit.

The gRPC metrics interceptor (services.common.metrics) is installed whether tracing is on or not.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from sqlalchemy import Engine, event

from services.common import metrics

logger = logging.getLogger(__name__)

TRACER_NAME = "mt5mesh"
# Calls that are not traced: probes every few seconds, tooling, and subscriptions that last hours.
_UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_UNTRACED_METHOD_PREFIX = "Subscribe"
_STATEMENT_CHARS = 2048  # db.query.text is cut here: IN (...) lists can be long
_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE|TABLE)\s+(?:IF\s+NOT\s+EXISTS\s+)?\"?([\w.]+)", re.IGNORECASE)


def tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """The tracer of the mesh's own spans: the global provider's unless one is given (tests).

    While tracing is off the global provider is a no-op one.
    """
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)


def otlp_grpc_endpoint(endpoint: str) -> str:
    """The endpoint with a scheme: ``host:port`` means plain ``http://host:port`` (no TLS).

    The exporter would take a bare ``host:port`` as a TLS endpoint; every local collector (Jaeger
    all-in-one, an OpenTelemetry Collector) listens without TLS, and ``https://`` still asks for TLS.
    """
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def configure_tracing(service_name: str, otlp_endpoint: str) -> TracerProvider | None:
    """Install a tracer provider exporting OTLP over gRPC; a no-op when no endpoint is set.

    ``service_name`` is used unless ``OTEL_SERVICE_NAME`` (or ``OTEL_RESOURCE_ATTRIBUTES``) names
    the service; the sampler comes from ``OTEL_TRACES_SAMPLER``/``_ARG`` (read by the SDK).
    """
    if not otlp_endpoint:
        return None
    # Imported here so that a service without tracing does not load the exporter's gRPC stack.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_grpc_endpoint(otlp_endpoint)))
    )
    trace.set_tracer_provider(provider)
    logger.info(
        "tracing to %s as %s (sampler %s)",
        otlp_endpoint,
        resource.attributes.get(SERVICE_NAME),
        provider.sampler.get_description(),
    )
    return provider


def _traced(details: Any) -> bool:
    method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
    return not method.startswith(_UNTRACED_PREFIXES) and not method.rpartition("/")[2].startswith(
        _UNTRACED_METHOD_PREFIX
    )


def server_interceptors(tracing: bool) -> list[Any]:
    """The grpc.aio server interceptors: metrics always, a span per call when tracing is on."""
    interceptors: list[Any] = [metrics.GrpcServerMetrics()]
    if tracing:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptors.append(aio_server_interceptor(filter_=_traced))  # type: ignore[no-untyped-call]
    return interceptors


def client_interceptors(tracing: bool) -> list[Any]:
    """The grpc.aio client interceptors that open a span per call and send its context along."""
    if not tracing:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(filter_=_traced))  # type: ignore[no-untyped-call]


# --- spans of the services' own units of work ------------------------------------------------------


def current_span_context() -> SpanContext | None:
    """The context of the span running now, if it is being recorded (cheap; call it per batch)."""
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid and context.trace_flags.sampled else None


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the span running now, None when nothing is being traced.

    Stages store it with the rows they commit; the next stage parents its span on it.
    """
    return trace_carrier().get("traceparent")


def trace_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``...), to put in a message."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextlib.contextmanager
def message_span(
    name: str,
    *,
    carrier: Mapping[str, str] | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    kind: SpanKind = SpanKind.CONSUMER,
    provider: trace.TracerProvider | None = None,
) -> Iterator[trace.Span]:
    """A span for one message of a long-lived stream (a tick batch, a feed item).

    Its parent is the trace context the message carries (``carrier``, W3C ``traceparent``) when there
    is one; otherwise it starts a trace of its own, which the sampler decides on like any new trace.
    Either way it links to the span of the stream it arrived on, so Jaeger shows both relations.
    """
    stream = trace.get_current_span().get_span_context()
    links = [Link(stream)] if stream.is_valid else []
    parent = propagate.extract(carrier) if carrier else Context()
    with tracer(provider).start_as_current_span(
        name, context=parent, kind=kind, links=links, attributes=dict(attributes or {})
    ) as span:
        yield span


@contextlib.contextmanager
def continued_span(
    name: str,
    traceparents: str | Sequence[str] | None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Iterator[SpanContext | None]:
    """A span continuing the trace(s) stored feed rows carry, yielding its context for the commit.

    With several contexts (a page of rows from several commits) the span is a child of the first
    and links the others. Rows written by an untraced commit carry none: then nothing is recorded
    (a background stage never starts traces of its own) and None is yielded.
    """
    given = [traceparents] if isinstance(traceparents, str) else list(traceparents or ())
    members = [c for c in (_span_context(t) for t in given if t) if c is not None]
    if not members:
        yield None
        return
    with group_span(name, members, dict(attributes or {})):
        yield current_span_context()


def _span_context(traceparent: str) -> SpanContext | None:
    context = trace.get_current_span(propagate.extract({"traceparent": traceparent})).get_span_context()
    return context if context.is_valid else None


@contextlib.contextmanager
def group_span(
    name: str,
    members: Sequence[SpanContext | None],
    attributes: Mapping[str, str | int | float | bool],
    provider: trace.TracerProvider | None = None,
) -> Iterator[trace.Span]:
    """A span for work done once on behalf of several traced requests (a group commit).

    It joins the trace of the first sampled member and links to the others, so each request's trace
    shows the shared work (directly, or by a link). No member sampled: no span is recorded.
    """
    sampled = [m for m in members if m is not None]
    if not sampled:
        yield trace.INVALID_SPAN
        return
    parent = trace.set_span_in_context(trace.NonRecordingSpan(sampled[0]))
    links = [Link(m) for m in sampled[1:]]
    with tracer(provider).start_as_current_span(
        name, context=parent, kind=SpanKind.INTERNAL, links=links, attributes=dict(attributes)
    ) as span:
        yield span


# --- database -----------------------------------------------------------------------------------------


def instrument_database(engine: Engine, provider: trace.TracerProvider | None = None) -> None:
    """Time every SQL statement (``mt5_db_query_seconds``) and trace it inside the current span.

    A statement only gets a span when a recorded span is current: background polling (feeds,
    readiness probes) then costs one histogram observation and starts no trace of its own.
    Statements are parameterized; their text carries no values.
    """
    system = "postgresql" if engine.dialect.name == "postgresql" else engine.dialect.name
    statement_tracer = tracer(provider)

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        operation = metrics.statement_operation(statement)
        span = None
        if context is not None and trace.get_current_span().is_recording():
            table = _TABLE.search(statement)
            span = statement_tracer.start_span(
                f"{operation.upper()} {table.group(1)}" if table else operation.upper(),
                kind=SpanKind.CLIENT,
                attributes={
                    "db.system.name": system,
                    "db.operation.name": operation.upper(),
                    "db.query.text": statement[:_STATEMENT_CHARS],
                },
            )
        if context is not None:
            context._mt5_db = (operation, time.perf_counter(), span)

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        started = getattr(context, "_mt5_db", None)
        if started is None:
            return
        operation, began, span = started
        metrics.DB_SECONDS.labels(operation).observe(time.perf_counter() - began)
        if span is not None:
            span.end()
        context._mt5_db = None

    @event.listens_for(engine, "handle_error")
    def _error(exception_context: Any) -> None:
        context = exception_context.execution_context
        started = getattr(context, "_mt5_db", None)
        if started is None:
            return
        operation, began, span = started
        metrics.DB_SECONDS.labels(operation).observe(time.perf_counter() - began)
        metrics.DB_ERRORS.labels(operation).inc()
        if span is not None:
            error = exception_context.original_exception
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.end()
        context._mt5_db = None

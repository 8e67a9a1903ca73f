"""OpenTelemetry tracing: OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set, gRPC instrumentation.

The standard ``OTEL_*`` variables (service name, sampler, headers) are read by the SDK itself.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

logger = logging.getLogger(__name__)


def configure_tracing(service_name: str, otlp_endpoint: str) -> TracerProvider | None:
    """Install a tracer provider exporting OTLP over gRPC; a no-op when no endpoint is set."""
    if not otlp_endpoint:
        return None
    # Imported here so that a service without tracing does not load the exporter's gRPC stack.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    logger.info("tracing to %s", otlp_endpoint)
    return provider


def server_interceptors(enabled: bool) -> list[Any]:
    """The grpc.aio server interceptors that open a span per call, when tracing is on."""
    if not enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]  # type: ignore[no-untyped-call]


def client_interceptors(enabled: bool) -> list[Any]:
    """The grpc.aio client interceptors that propagate trace context, when tracing is on."""
    if not enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())  # type: ignore[no-untyped-call]

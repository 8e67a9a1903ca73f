"""An in-process OTLP/gRPC trace receiver: what Jaeger would get, collected for tests and benchmarks.

Services export with ``OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint`` (their batch processor sends
every ``OTEL_BSP_SCHEDULE_DELAY`` ms: set it low in tests) and Envoy renders its tracer with
``GatewaySettings(otlp_endpoint=receiver.endpoint)``. The receiver is a plain (threaded) grpc server,
so it works from synchronous tests, asyncio tests and benchmarks alike::

    with OtlpReceiver() as receiver:
        ...  # start services / Envoy pointing at receiver.endpoint, send requests
        spans = receiver.wait_for(lambda spans: find(spans, service="ingest", kind="SERVER"))

Spans are flattened into ``CollectedSpan`` records (ids as lowercase hex, the parent's id empty for a
root) with helpers to find spans and follow parent links, so a test can assert a whole chain — gateway
to ingest today, and through every stage once feed messages carry their trace context.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class CollectedSpan:
    """One exported span, flattened."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: str  # SERVER, CLIENT, INTERNAL, PRODUCER, CONSUMER
    attributes: Mapping[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace_id, span_id) of each linked span
    start_ns: int
    end_ns: int
    status: str  # UNSET, OK, ERROR

    @property
    def is_root(self) -> bool:
        """Whether the span has no parent."""
        return not self.parent_span_id

    @property
    def seconds(self) -> float:
        """The span's duration."""
        return (self.end_ns - self.start_ns) / 1e9


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[CollectedSpan]:
    """Every span of an export request, with its resource's service.name."""
    spans = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    CollectedSpan(
                        service=service,
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        attributes=_attributes(span.attributes),
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status=trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix(
                            "STATUS_CODE_"
                        ),
                    )
                )
    return spans


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(  # noqa: N802 - the generated base class names it
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Collects spans exported over OTLP/gRPC to ``endpoint`` (127.0.0.1, a free port).

    ``keep_spans=False`` only counts spans (a benchmark exporting millions of them).
    """

    def __init__(self, *, keep_spans: bool = True, workers: int = 4) -> None:
        self._keep = keep_spans
        self._spans: list[CollectedSpan] = []
        self._span_count = 0
        self._requests = 0
        self._changed = threading.Condition()
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-receiver"),
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT (and GatewaySettings.otlp_endpoint) should say."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        """Start serving."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving (exports still in flight are dropped)."""
        self._server.stop(grace=None).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        """Take one export request (called by the gRPC server's threads)."""
        if self._keep:
            spans = flatten(request)
            count = len(spans)
        else:
            spans = []
            count = sum(len(s.spans) for rs in request.resource_spans for s in rs.scope_spans)
        with self._changed:
            self._spans.extend(spans)
            self._span_count += count
            self._requests += 1
            self._changed.notify_all()

    @property
    def span_count(self) -> int:
        """Spans received so far (also when they are not kept)."""
        with self._changed:
            return self._span_count

    @property
    def export_requests(self) -> int:
        """Export calls received so far."""
        with self._changed:
            return self._requests

    def spans(self) -> list[CollectedSpan]:
        """A copy of every span kept so far."""
        with self._changed:
            return list(self._spans)

    def clear(self) -> None:
        """Forget every span and count."""
        with self._changed:
            self._spans.clear()
            self._span_count = 0
            self._requests = 0

    def wait_for(self, found: Callable[[list[CollectedSpan]], T | None], timeout: float = 15.0) -> T:
        """Wait until ``found(spans)`` is truthy and return it; AssertionError (with the spans) if not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = found(list(self._spans))
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    summary = "\n".join(describe(s) for s in self._spans) or "(none)"
                    raise AssertionError(f"spans not found within {timeout}s; received:\n{summary}")
                self._changed.wait(remaining)

    async def wait_for_async(
        self, found: Callable[[list[CollectedSpan]], T | None], within: float = 15.0
    ) -> T:
        """``wait_for`` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for, found, within)


def describe(span: CollectedSpan) -> str:
    """One line per span, for failure messages."""
    parent = span.parent_span_id or "root"
    return (
        f"{span.service} {span.kind} {span.name!r} trace={span.trace_id} span={span.span_id} parent={parent}"
    )


def find(
    spans: Sequence[CollectedSpan],
    *,
    service: str | None = None,
    name: str | None = None,
    kind: str | None = None,
    trace_id: str | None = None,
    parent: CollectedSpan | None = None,
) -> list[CollectedSpan]:
    """The spans matching every given criterion (``parent``: direct children of that span)."""
    return [
        s
        for s in spans
        if (service is None or s.service == service)
        and (name is None or s.name == name)
        and (kind is None or s.kind == kind)
        and (trace_id is None or s.trace_id == trace_id)
        and (parent is None or (s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id))
    ]


def ancestors(span: CollectedSpan, spans: Sequence[CollectedSpan]) -> list[CollectedSpan]:
    """The span's parent, grandparent... as far as they were received (nearest first)."""
    by_id = {(s.trace_id, s.span_id): s for s in spans}
    chain = []
    current = by_id.get((span.trace_id, span.parent_span_id))
    while current is not None:
        chain.append(current)
        current = by_id.get((current.trace_id, current.parent_span_id))
    return chain

"""Log lines are single JSON objects carrying the service and, inside a span, the trace ids."""

from __future__ import annotations

import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from services.common.logs import JsonFormatter


def record(message: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("services.test", logging.WARNING, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_formatter_outside_span_has_fields_and_no_trace_id() -> None:
    line = JsonFormatter("ingest").format(record("stored %s", symbol="EURUSD"))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["service"] == "ingest"
    assert entry["level"] == "WARNING"
    assert entry["symbol"] == "EURUSD"
    assert "trace_id" not in entry


def test_json_formatter_inside_span_carries_trace_and_span_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        entry = json.loads(JsonFormatter("ingest").format(record("inside")))
        context = span.get_span_context()
    assert entry["trace_id"] == format(context.trace_id, "032x")
    assert entry["span_id"] == format(context.span_id, "016x")

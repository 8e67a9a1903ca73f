"""The shared metrics and telemetry helpers: gRPC call metrics, data age, feed lag, SQL statements."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import create_engine, text

from services.common import metrics, telemetry
from services.common.feed import CommitSignal, follow
from services.ingest.metrics import rejection_reason


def sample(registry_or_collector: object, name: str, **labels: str) -> float | None:
    """The value of one sample, or None when it is absent."""
    collect = getattr(registry_or_collector, "collect")  # noqa: B009 - a collector or a registry
    for family in collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def value(name: str, **labels: str) -> float:
    """A sample of the default registry (0 when absent)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- small helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "operation"),
    [
        ("SELECT id FROM t", "select"),
        ("\n  insert into t values (1)", "insert"),
        ("(SELECT 1) UNION (SELECT 2)", "select"),
        ("BEGIN IMMEDIATE", "begin"),
        ("PRAGMA journal_mode=WAL", "other"),
        ("", "other"),
    ],
)
def test_statement_operation_bounded_keyword(statement: str, operation: str) -> None:
    assert metrics.statement_operation(statement) == operation


@pytest.mark.parametrize(
    ("field", "reason"),
    [("items[3].high", "high"), ("ticks[0].ask", "ask"), ("source_id", "source_id"), ("ticks", "ticks")],
)
def test_rejection_reason_field_without_indices(field: str, reason: str) -> None:
    assert rejection_reason(field) == reason


def test_split_method_service_and_method() -> None:
    assert metrics.split_method("/mt5.ingest.v1.IngestService/IngestTicks") == (
        "mt5.ingest.v1.IngestService",
        "IngestTicks",
    )
    assert metrics.split_method(b"/grpc.health.v1.Health/Check") == ("grpc.health.v1.Health", "Check")


@pytest.mark.parametrize(
    ("peer", "address"),
    [("ipv4:10.0.3.7:51234", "10.0.3.7:51234"), ("ipv6:[::1]:5000", "[::1]:5000"), ("", "unknown")],
)
def test_peer_address_without_scheme(peer: str, address: str) -> None:
    assert metrics.peer_address(peer) == address


# --- data age --------------------------------------------------------------------------------------


def test_data_age_newest_time_kept_and_age_grows() -> None:
    ages = metrics.DataAge()
    now = time.time()
    ages.observe("ingest", {"EURUSD": now - 30})
    ages.observe("ingest", {"EURUSD": dt.datetime.fromtimestamp(now - 90, dt.UTC)})  # older: ignored
    first = sample(ages, "mt5_data_age_seconds", stage="ingest", symbol="EURUSD")
    assert first is not None
    assert 29 < first < 35
    time.sleep(0.05)
    later = sample(ages, "mt5_data_age_seconds", stage="ingest", symbol="EURUSD")
    assert later is not None
    assert later > first
    ages.observe("ingest", {"EURUSD": now})
    newest = sample(ages, "mt5_data_age_seconds", stage="ingest", symbol="EURUSD")
    assert newest is not None
    assert newest < 5


def test_data_age_registered_collector_describes_without_collecting() -> None:
    registry = CollectorRegistry()
    ages = metrics.DataAge()
    registry.register(ages)
    assert sample(registry, "mt5_data_age_seconds") is None
    ages.observe("aggregator", {"GBPUSD": time.time()})
    assert sample(registry, "mt5_data_age_seconds", stage="aggregator", symbol="GBPUSD") is not None


# --- feed lag --------------------------------------------------------------------------------------


def test_feed_lag_waiting_subscriber_has_zero_lag_and_cursor_distance_from_head() -> None:
    lag = metrics.FeedLag(head_max_age=0.0)
    heads = iter([100, 150])
    lag.set_head("f", lambda: next(heads))
    with lag.track("f", cursor=40) as position:
        position.waiting = True
        # The head is read in a background thread: the first scrape starts it.
        sample(lag, "mt5_feed_lag_cursors")
        deadline = time.monotonic() + 5
        while sample(lag, "mt5_feed_lag_cursors", feed="f") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sample(lag, "mt5_feed_lag_cursors", feed="f", subscriber="unknown") in (60, 110)
        assert sample(lag, "mt5_feed_lag_seconds", feed="f") == 0
        assert sample(lag, "mt5_feed_subscribers", feed="f") == 1
        position.waiting = False
        position.caught_up_at = time.monotonic() - 30
        seconds = sample(lag, "mt5_feed_lag_seconds", feed="f")
        assert seconds is not None
        assert seconds >= 30
    assert sample(lag, "mt5_feed_subscribers", feed="f") is None


def test_feed_lag_head_failure_keeps_reporting_seconds() -> None:
    lag = metrics.FeedLag(head_max_age=0.0)

    def broken() -> int:
        raise OSError("database away")

    lag.set_head("f", broken)
    with lag.track("f", cursor=1):
        for _ in range(3):
            assert sample(lag, "mt5_feed_lag_cursors", feed="f") is None
            assert sample(lag, "mt5_feed_lag_seconds", feed="f") is not None
            time.sleep(0.02)


@dataclass(frozen=True)
class Item:
    cursor: int


async def test_follow_reports_position_caught_up_waiting_then_behind() -> None:
    log = [Item(i) for i in range(1, 26)]
    signal = CommitSignal()
    reads: list[int] = []

    async def read(cursor: int, limit: int) -> Sequence[Item]:
        reads.append(cursor)
        return [i for i in log if i.cursor > cursor][:limit]

    def position() -> metrics.FeedPosition:
        (found,) = [p for p in metrics.FEED_LAG._positions if p.feed == "unit.feed"]
        return found

    pages: AsyncIterator[Sequence[Item]] = follow(
        read, signal, 0, page_size=10, poll_seconds=5, feed="unit.feed"
    )
    first = await anext(pages)
    assert [i.cursor for i in first] == list(range(1, 11))
    assert not position().waiting  # a full page: it is behind
    await anext(pages)
    last = await anext(pages)  # the partial page: everything delivered once it is taken
    assert last[-1].cursor == 25
    waiting = asyncio.ensure_future(anext(pages))
    await asyncio.sleep(0.05)
    assert position().waiting
    assert position().cursor == 25
    assert position().lag_seconds(time.monotonic()) == 0
    log.append(Item(26))
    signal.notify()
    assert [i.cursor for i in await waiting] == [26]
    await pages.aclose()  # type: ignore[attr-defined]
    assert not [p for p in metrics.FEED_LAG._positions if p.feed == "unit.feed"]


# --- gRPC call metrics -------------------------------------------------------------------------------


async def test_grpc_server_metrics_count_unary_by_code_and_stream_once() -> None:
    server = grpc.aio.server(interceptors=[metrics.GrpcServerMetrics()])
    servicer = health.aio.HealthServicer()
    await servicer.set("known", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    labels = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
    before_ok = value("mt5_grpc_server_handled_total", **labels, grpc_code="OK")
    before_missing = value("mt5_grpc_server_handled_total", **labels, grpc_code="NOT_FOUND")
    before_count = value("mt5_grpc_server_handling_seconds_count", **labels)
    watch = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch"}
    before_watch = value("mt5_grpc_server_started_total", **watch, grpc_type="server_stream")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(service="known"))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Check(health_pb2.HealthCheckRequest(service="unknown"))
            call = stub.Watch(health_pb2.HealthCheckRequest(service="known"))
            assert (await anext(aiter(call))).status == health_pb2.HealthCheckResponse.SERVING
            call.cancel()
    finally:
        await server.stop(None)
    assert value("mt5_grpc_server_handled_total", **labels, grpc_code="OK") == before_ok + 1
    assert value("mt5_grpc_server_handled_total", **labels, grpc_code="NOT_FOUND") == before_missing + 1
    assert value("mt5_grpc_server_handling_seconds_count", **labels) == before_count + 2
    assert value("mt5_grpc_server_started_total", **watch, grpc_type="server_stream") == before_watch + 1


# --- spans -------------------------------------------------------------------------------------------


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_instrument_database_statement_span_only_inside_recorded_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    engine = create_engine("sqlite://")
    telemetry.instrument_database(engine, provider)
    before = value("mt5_db_query_seconds_count", operation="select")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))  # no span running: timed, not traced
        with provider.get_tracer("test").start_as_current_span("work"):
            conn.execute(text("SELECT 2 FROM (SELECT 1) AS sub"))
    finished = exporter.get_finished_spans()
    (statement,) = [s for s in finished if s.name != "work"]
    (work,) = [s for s in finished if s.name == "work"]
    assert statement.name == "SELECT"
    assert statement.parent is not None
    assert statement.parent.span_id == work.context.span_id
    assert statement.kind == trace.SpanKind.CLIENT
    assert statement.attributes is not None
    assert statement.attributes["db.system.name"] == "sqlite"
    assert value("mt5_db_query_seconds_count", operation="select") == before + 2


def test_instrument_database_failed_statement_counted_and_span_marked_error(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    engine = create_engine("sqlite://")
    telemetry.instrument_database(engine, provider)
    before = value("mt5_db_errors_total", operation="select")
    with (
        engine.connect() as conn,
        provider.get_tracer("test").start_as_current_span("work"),
        pytest.raises(Exception, match="no such table"),
    ):
        conn.execute(text("SELECT * FROM missing_table"))
    (statement,) = [s for s in exporter.get_finished_spans() if s.name != "work"]
    assert statement.name == "SELECT missing_table"
    assert statement.status.status_code == trace.StatusCode.ERROR
    assert value("mt5_db_errors_total", operation="select") == before + 1


def test_message_span_new_trace_linked_to_stream_or_child_of_carried_context(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("stream") as stream:
        with telemetry.message_span("batch", provider=provider):
            pass
        with tracer.start_as_current_span("sender"):
            carrier = telemetry.trace_carrier()
        with telemetry.message_span("carried", carrier=carrier, provider=provider):
            pass
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    batch, carried = by_name["batch"], by_name["carried"]
    assert batch.parent is None
    assert batch.context.trace_id != stream.get_span_context().trace_id
    assert [link.context.span_id for link in batch.links] == [stream.get_span_context().span_id]
    assert carried.parent is not None
    assert carried.parent.span_id == by_name["sender"].context.span_id


def test_group_span_joins_first_sampled_member_and_links_the_rest(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    members = []
    for name in ("a", "b"):
        with tracer.start_as_current_span(name):
            members.append(telemetry.current_span_context())
    with telemetry.group_span("commit", [None, *members], {"mt5.rows": 3}, provider=provider):
        pass
    with telemetry.group_span("nobody", [None], {}, provider=provider) as span:
        assert not span.is_recording()
    (commit,) = [s for s in exporter.get_finished_spans() if s.name == "commit"]
    assert members[0] is not None
    assert members[1] is not None
    assert commit.parent is not None
    assert commit.parent.span_id == members[0].span_id
    assert [link.context.span_id for link in commit.links] == [members[1].span_id]
    assert not [s for s in exporter.get_finished_spans() if s.name == "nobody"]


@pytest.mark.parametrize(
    ("endpoint", "normalized"),
    [("127.0.0.1:4317", "http://127.0.0.1:4317"), ("http://jaeger:4317", "http://jaeger:4317")],
)
def test_otlp_grpc_endpoint_bare_address_means_plain_http(endpoint: str, normalized: str) -> None:
    assert telemetry.otlp_grpc_endpoint(endpoint) == normalized

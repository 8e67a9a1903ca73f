"""The input rules the hostile-input proving ground found missing, as pure functions.

Timestamps outside google.protobuf.Timestamp's range, cursors and sequences beyond BIGINT, symbol
filters with NUL, bounded error details, requests that do not parse, and the fuzz harness's own
per-source accounting of streamed ticks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from mt5.aggregator.v1 import aggregator_service_pb2
from mt5.ingest.v1 import ingest_service_pb2
from mt5.market.v1 import market_pb2

from services.common import errors, protoconv
from services.common.validation import FieldViolation, ValidationFailed
from services.inference.servicer import _ending_on_failure
from services.ingest import convert, domain
from tests.fuzz_client import IngestRows, stray_stream_ticks

# --- timestamps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "nanos", "words"),
    [
        (0, -1, "nanos"),
        (0, 1_000_000_000, "nanos"),
        (0, 2**31 - 1, "nanos"),
        (2**62, 0, "9999-12-31"),
        (-(2**62), 0, "0001-01-01"),
        (protoconv.TIMESTAMP_MAX_SECONDS + 1, 0, "9999-12-31"),
        (protoconv.TIMESTAMP_MIN_SECONDS - 1, 0, "0001-01-01"),
    ],
)
def test_micros_invalid_timestamp_raises_naming_the_field(seconds: int, nanos: int, words: str) -> None:
    with pytest.raises(ValidationFailed) as failed:
        protoconv.micros(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), "items[3].ts")
    (violation,) = failed.value.violations
    assert violation.field == "items[3].ts"
    assert words in violation.description


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(protoconv.TIMESTAMP_MIN_SECONDS, 0), (protoconv.TIMESTAMP_MAX_SECONDS, 999_999_999), (0, 0)],
)
def test_to_datetime_edges_of_the_timestamp_range_convert(seconds: int, nanos: int) -> None:
    value = protoconv.to_datetime(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    assert protoconv.timestamp(value).seconds == seconds


def test_timestamp_violations_only_set_fields_checked_each_named() -> None:
    request = aggregator_service_pb2.GetCandlesRequest(
        symbol="EURUSD", to=timestamp_pb2.Timestamp(seconds=2**62)
    )
    assert [v.field for v in protoconv.timestamp_violations(request, "from", "to")] == ["to"]
    request.ClearField("to")
    assert protoconv.timestamp_violations(request, "from", "to") == []


def test_ingest_candles_of_bad_nanos_in_an_item_names_that_item() -> None:
    good = market_pb2.Candle(symbol="A", ts=timestamp_pb2.Timestamp(seconds=1_760_929_200))
    bad = market_pb2.Candle(symbol="B", ts=timestamp_pb2.Timestamp(seconds=1_760_929_200, nanos=-1))
    with pytest.raises(ValidationFailed) as failed:
        convert.candles_of(ingest_service_pb2.IngestCandlesRequest(items=[good, bad]))
    assert [v.field for v in failed.value.violations] == ["items[1].ts"]
    with pytest.raises(ValidationFailed) as failed:
        convert.raw_ticks([market_pb2.Tick(symbol="A", ts=timestamp_pb2.Timestamp(nanos=10**9))])
    assert [v.field for v in failed.value.violations] == ["ticks[0].ts"]


# --- cursors, sequences and symbol filters ---------------------------------------------------------


@pytest.mark.parametrize(
    ("cursor", "symbols", "fields"),
    [
        (2**63 - 1, ["EURUSD", "XAUUSD.m"], []),
        (2**63, [], ["from_cursor"]),
        (2**64 - 1, ["EURUSD", "EUR\x00USD", ""], ["from_cursor", "symbols[1]", "symbols[2]"]),
        (0, ["'; DROP TABLE x; --"], ["symbols[0]"]),
    ],
)
def test_subscription_violations_cursor_beyond_bigint_and_bad_symbols_named(
    cursor: int, symbols: list[str], fields: list[str]
) -> None:
    assert [v.field for v in protoconv.subscription_violations(cursor, symbols)] == fields


@pytest.mark.parametrize(
    ("sequence", "refused"), [(1, False), (2**63 - 1, False), (2**63, True), (2**64 - 1, True)]
)
def test_validate_source_sequence_beyond_bigint_refused(sequence: int, refused: bool) -> None:
    if not refused:
        domain.validate_source("feed-1", sequence)
        return
    with pytest.raises(ValidationFailed) as failed:
        domain.validate_source("feed-1", sequence)
    assert [v.field for v in failed.value.violations] == ["sequence"]


# --- requests that do not parse --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "data", "field", "words"),
    [
        (ingest_service_pb2.IngestTicksRequest, b"\x0a\x03\x0a\x01\xff", "ticks.symbol", "UTF-8"),
        (ingest_service_pb2.IngestCandlesRequest, b"\xff\xff\xff\xff", "request", "ends"),
        (aggregator_service_pb2.GetCandlesRequest, b"\x0a\x05abc", "symbol", "ends"),
        (ingest_service_pb2.IngestTicksRequest, b"\x0a\xff\xff\xff\xff\x0f", "ticks", "ends"),
        (ingest_service_pb2.IngestTicksRequest, b"\x0f", "request", "tag"),
    ],
)
def test_damaged_field_names_where_the_bytes_go_wrong(
    message: Any, data: bytes, field: str, words: str
) -> None:
    with pytest.raises(Exception):  # noqa: B017, PT011 - protobuf's DecodeError: the bytes really are bad
        message.FromString(data)
    violation = protoconv.damaged_field(message.DESCRIPTOR, data)
    assert violation.field == field
    assert words in violation.description


class _Aborted(Exception):
    pass


class _Context:
    """Records the status a handler aborts with (grpc.aio's abort raises after sending it)."""

    def __init__(self) -> None:
        self.status: Any = None

    async def abort_with_status(self, status: Any) -> NoReturn:
        self.status = status
        raise _Aborted

    def bad_request(self) -> list[tuple[str, str]]:
        details = dict(self.status.trailing_metadata)["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(details)
        bad = error_details_pb2.BadRequest()
        status.details[0].Unpack(bad)
        return [(v.field, v.description) for v in bad.field_violations]


def test_decode_guard_unary_request_that_does_not_parse_invalid_argument_servicer_not_called() -> None:
    called: list[Any] = []

    async def servicer(request: Any, context: Any) -> Any:
        called.append(request)
        return ingest_service_pb2.IngestTicksResponse()

    handler = errors.guarded_handler(
        grpc.unary_unary_rpc_method_handler(
            servicer, request_deserializer=ingest_service_pb2.IngestTicksRequest.FromString
        )
    )
    context = _Context()
    request = handler.request_deserializer(b"\x0a\x03\x0a\x01\xff")
    with pytest.raises(_Aborted):
        asyncio.run(handler.unary_unary(request, context))
    assert called == []
    assert context.status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert context.bad_request() == [("ticks.symbol", "is not valid UTF-8")]
    good = handler.request_deserializer(ingest_service_pb2.IngestTicksRequest().SerializeToString())
    asyncio.run(handler.unary_unary(good, _Context()))
    assert called == [ingest_service_pb2.IngestTicksRequest()]


def test_decode_guard_client_stream_aborts_at_the_message_that_does_not_parse() -> None:
    seen: list[Any] = []

    async def servicer(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            seen.append(request)
            yield ingest_service_pb2.StreamTicksResponse(sequence=request.sequence)

    deserialize = ingest_service_pb2.StreamTicksRequest.FromString
    handler = errors.guarded_handler(
        grpc.stream_stream_rpc_method_handler(servicer, request_deserializer=deserialize)
    )
    raw = [ingest_service_pb2.StreamTicksRequest(sequence=1).SerializeToString(), b"\x0a\x01\xff"]

    async def requests() -> AsyncIterator[Any]:
        for data in raw:
            yield handler.request_deserializer(data)

    async def run(context: _Context) -> list[Any]:
        return [answer async for answer in handler.stream_stream(requests(), context)]

    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(run(context))
    assert [r.sequence for r in seen] == [1]
    assert context.bad_request() == [("source_id", "is not valid UTF-8")]


def test_ending_on_failure_reader_error_queued_for_the_answering_loop() -> None:
    async def failing() -> None:
        raise _Aborted

    async def run() -> Any:
        pending: asyncio.Queue[Any] = asyncio.Queue(1)
        await _ending_on_failure(failing(), pending)
        return pending.get_nowait()

    assert isinstance(asyncio.run(run()), _Aborted)


# --- bounded error details -------------------------------------------------------------------------


def _trailer_bytes(violations: list[FieldViolation]) -> int:
    status = errors.bad_request_status(errors.summarize(violations), violations)
    # base64 of the details plus the percent-encoded message (bytes outside 0x20-0x7E, and "%",
    # take three characters), as they travel in trailers.
    message = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in status.message.encode())
    return -(-len(status.SerializeToString()) // 3) * 4 + message


def test_reported_violations_100000_capped_with_a_closing_count_trailer_under_8_kib() -> None:
    violations = [FieldViolation(f"items[{i}].open", "must be greater than 0") for i in range(100_000)]
    shown = errors.reported_violations(violations)
    assert len(shown) <= errors.MAX_VIOLATIONS + 1
    assert shown[0] == violations[0]
    assert shown[-1].description == f"and {100_000 - (len(shown) - 1)} more violations"
    assert _trailer_bytes(violations) < 6 * 1024


@pytest.mark.parametrize("text", ["X" * 20_000, "é" * 20_000, "\U0001f600" * 20_000])
def test_bad_request_status_huge_echoed_values_clipped_trailer_under_8_kib(text: str) -> None:
    violations = [FieldViolation(text, f"no function is called {text!r}")] * 50
    shown = errors.reported_violations(violations)
    assert all(len(v.field) <= errors.MAX_FIELD_CHARS for v in shown)
    assert all(len(v.description) <= errors.MAX_DESCRIPTION_CHARS for v in shown)
    assert _trailer_bytes(violations) < 6 * 1024


def test_reported_violations_few_short_ones_reported_whole() -> None:
    violations = [FieldViolation("symbol", "is required"), FieldViolation("ts", "is required")]
    assert errors.reported_violations(violations) == violations


# --- the harness's accounting of streamed ticks ----------------------------------------------------


def _rows(by_source: dict[str, tuple[int, int]]) -> IngestRows:
    return IngestRows(0, 0, 0, 0, 0, 0, by_source)


def test_stray_stream_ticks_rows_beyond_a_sources_committed_batches_counted_per_source() -> None:
    before = _rows({"a": (5, 5), "b": (1, 2)})
    after = _rows({"a": (8, 10), "b": (4, 3), "c": (2, 0), "d": (0, 7)})
    # a: 3 rows for 5 batch ticks (duplicates); b: 3 rows for 1 tick; c: rows with no batch at all.
    assert stray_stream_ticks(before, after) == {"b": 2, "c": 2}
    assert stray_stream_ticks(after, after) == {}


class _AbortingContext:
    def __init__(self) -> None:
        self.aborted: tuple[Any, str] | None = None
        self.details = ""

    async def abort(self, code: Any, details: str = "") -> NoReturn:
        self.aborted = (code, details)
        raise _Aborted

    def set_details(self, details: str) -> None:
        self.details = details

    def time_remaining(self) -> float:
        return 1.5


def test_bounded_context_abort_echoing_20_kb_clipped_other_calls_passed_through() -> None:
    inner = _AbortingContext()
    context = errors.BoundedContext(inner)
    with pytest.raises(_Aborted):
        asyncio.run(context.abort(grpc.StatusCode.NOT_FOUND, "unknown model " + "\U0001f600" * 20_000))
    assert inner.aborted is not None
    assert inner.aborted[0] == grpc.StatusCode.NOT_FOUND
    assert inner.aborted[1].startswith("unknown model ")
    assert len(inner.aborted[1].encode()) <= errors.MESSAGE_BUDGET
    context.set_details("x" * 10_000)
    assert len(inner.details) <= errors.MESSAGE_BUDGET
    assert context.time_remaining() == 1.5

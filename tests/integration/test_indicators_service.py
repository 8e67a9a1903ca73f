"""The indicators service as a real process behind real ingest and aggregator processes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import pathlib
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_pb_grpc
from mt5.indicators.v1 import indicators_service_pb2 as pb
from mt5.indicators.v1 import indicators_service_pb2_grpc as pb_grpc
from sqlalchemy import text

from services.common import db
from services.common.channels import open_channel
from services.common.errors import abort_invalid
from services.common.validation import FieldViolation
from services.indicators.config import IndicatorsConfig
from services.indicators.servicer import IndicatorsServicer
from services.indicators.stage import IndicatorStage
from services.indicators.store import IndicatorStore
from services.ingest.client import TickStreamer
from tests.helpers import API_KEY, ServiceProcess, pipeline, sqlite_url
from tests.market_data import make_ticks, reference, tick_batches
from tests.pipeline_checks import IndicatorRows, indicator_log_duplicates, indicators_expected_and_stored

Trio = tuple[ServiceProcess, ServiceProcess, ServiceProcess]


@pytest.fixture
def trio(database_url: str, tmp_path: pathlib.Path) -> Iterator[Trio]:
    with pipeline(database_url, tmp_path, "indicators") as (ingest, aggregator, indicators):
        yield ingest, aggregator, indicators


async def settle(url: str, symbol: str, bars: int) -> tuple[IndicatorRows, IndicatorRows]:
    for _ in range(300):
        expected, stored = indicators_expected_and_stored(url, symbol)
        if len(expected) == bars and stored == expected:
            break
        await asyncio.sleep(0.1)
    return expected, stored


async def test_indicators_equal_talib_batch_over_every_timeframe(trio: Trio, database_url: str) -> None:
    ingest, _, _ = trio
    ticks = make_ticks(8_000, seed=51, span_hours=24)
    await TickStreamer(ingest.address, API_KEY, "ind-1").send(tick_batches(ticks, "EURUSD", 1_000))
    expected, stored = await settle(database_url, "EURUSD", len(reference(ticks)))
    assert len(expected) == len(reference(ticks))
    assert stored == expected  # bit for bit; None exactly where TA-Lib gives NaN
    assert indicator_log_duplicates(database_url) == 0
    # The seed's wide table: every final candle with its indicators.
    engine = db.create_db_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT timeframe, ts, close, rsi, bb_lower FROM market_data WHERE symbol = 'EURUSD'")
        )
        # Through a view the ts column has no SQLAlchemy type: SQLite gives its text, PostgreSQL a datetime.
        wide: dict[tuple[str, object], tuple[float | None, float | None]] = {
            (r.timeframe, _utc(r.ts)): (r.rsi, r.bb_lower) for r in rows
        }
    engine.dispose()
    assert len(wide) == len(expected)
    assert all(wide[key] == (v[0], v[7]) for key, v in expected.items())


async def test_indicators_killed_at_random_moments_warm_restart_loses_and_duplicates_nothing(
    trio: Trio, database_url: str
) -> None:
    ingest, _, indicators = trio
    ticks = make_ticks(15_000, seed=52, span_hours=40)
    rng = random.Random(9)

    async def chaos() -> None:
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            indicators.kill()
            await asyncio.to_thread(indicators.start)

    chaos_task = asyncio.create_task(chaos())
    await TickStreamer(ingest.address, API_KEY, "ind-2").send(tick_batches(ticks, "GBPUSD", 300))
    await chaos_task
    expected, stored = await settle(database_url, "GBPUSD", len(reference(ticks)))
    assert len(expected) == len(reference(ticks))
    assert stored == expected
    assert indicator_log_duplicates(database_url) == 0


async def test_subscribe_indicators_resumes_from_cursor(trio: Trio) -> None:
    ingest, _, indicators = trio
    ticks = make_ticks(3_000, seed=53, span_hours=4)
    await TickStreamer(ingest.address, API_KEY, "ind-3").send(tick_batches(ticks, "USDJPY", 1_000))
    async with grpc.aio.insecure_channel(indicators.address) as channel:
        stub = pb_grpc.IndicatorsServiceStub(channel)
        metadata = (("x-api-key", API_KEY),)
        first: list[pb.SubscribeIndicatorsResponse] = []
        call = stub.SubscribeIndicators(
            pb.SubscribeIndicatorsRequest(symbols=["USDJPY"], timeframes=["M1"]), metadata=metadata
        )
        async for item in call:
            first.append(item)
            if len(first) == 40:
                break
        call.cancel()
        resumed = stub.SubscribeIndicators(
            pb.SubscribeIndicatorsRequest(
                symbols=["USDJPY"], timeframes=["M1"], from_cursor=first[19].cursor
            ),
            metadata=metadata,
        )
        tail = []
        async for item in resumed:
            tail.append(item)
            if len(tail) == 20:
                break
        resumed.cancel()
    assert [t.cursor for t in tail] == [f.cursor for f in first[20:]]
    assert [t.values.ts for t in tail] == [f.values.ts for f in first[20:]]
    assert not first[0].values.HasField("rsi")  # warming up: absent, not NaN, not 0
    assert first[39].values.HasField("rsi")


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"symbol": "EUR USD", "timeframe": "M1"}, "symbol"),
        ({"symbol": "EURUSD"}, "timeframe"),
        ({"symbol": "EURUSD", "timeframe": "M1", "limit": 10_001}, "limit"),
    ],
)
async def test_get_indicators_bad_request_names_field(trio: Trio, bad: dict[str, Any], field: str) -> None:
    _, _, indicators = trio
    async with grpc.aio.insecure_channel(indicators.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.IndicatorsServiceStub(channel).GetIndicators(
                pb.GetIndicatorsRequest(**bad), metadata=(("x-api-key", API_KEY),)
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")


# --- ComputeIndicator's range, and the aggregator failing the read of its bars -------------------------


def _compute_request(start: str, end: str) -> pb.ComputeIndicatorRequest:
    request = pb.ComputeIndicatorRequest(function="RSI", symbol="EURUSD", timeframe="M1")
    getattr(request, "from").FromJsonString(start)
    request.to.FromJsonString(end)
    return request


@pytest.mark.parametrize("end", ["2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z"])
async def test_compute_indicator_to_not_after_from_is_invalid_argument_naming_to(
    trio: Trio, end: str
) -> None:
    _, _, indicators = trio
    async with grpc.aio.insecure_channel(indicators.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.IndicatorsServiceStub(channel).ComputeIndicator(
                _compute_request("2025-02-01T00:00:00Z", end), metadata=(("x-api-key", API_KEY),)
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "to: must be after from" in (info.value.details() or "")


class FailingAggregator(agg_pb_grpc.AggregatorServiceServicer):
    """GetCandles fails with one status; a BadRequest rides along with INVALID_ARGUMENT."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message

    async def GetCandles(  # noqa: N802 - the RPC's name in the proto contract
        self, request: agg_pb.GetCandlesRequest, context: grpc.aio.ServicerContext
    ) -> agg_pb.GetCandlesResponse:
        if self.code == grpc.StatusCode.INVALID_ARGUMENT:
            await abort_invalid(context, [FieldViolation("limit", self.message)])
        await context.abort(self.code, self.message)
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises


@contextlib.asynccontextmanager
async def indicators_over(aggregator: FailingAggregator, tmp_path: pathlib.Path) -> AsyncIterator[str]:
    """An in-process IndicatorsService whose stage reads bars from ``aggregator``; its address."""
    upstream = grpc.aio.server()
    agg_pb_grpc.add_AggregatorServiceServicer_to_server(aggregator, upstream)
    upstream_port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    config = IndicatorsConfig.from_env({"MT5MESH_API_KEY": API_KEY})
    engine = db.create_db_engine(sqlite_url(tmp_path))
    channel = open_channel(f"127.0.0.1:{upstream_port}", API_KEY)
    server = grpc.aio.server()
    stage = IndicatorStage(config, IndicatorStore(engine), channel)
    pb_grpc.add_IndicatorsServiceServicer_to_server(IndicatorsServicer(stage, 4), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        await channel.close()
        await upstream.stop(None)
        engine.dispose()


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT),
        (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_compute_indicator_aggregator_failure_is_mapped_not_unhandled(
    tmp_path: pathlib.Path, upstream: grpc.StatusCode, expected: grpc.StatusCode
) -> None:
    aggregator = FailingAggregator(upstream, "must be at most 10000")
    async with (
        indicators_over(aggregator, tmp_path) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.IndicatorsServiceStub(channel).ComputeIndicator(
                _compute_request("2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z")
            )
    error = info.value
    assert error.code() == expected
    details = error.details() or ""
    assert "AioRpcError" not in details
    assert "Exception" not in details
    if expected == grpc.StatusCode.INVALID_ARGUMENT:
        # Passed through: the message and the BadRequest naming the field.
        assert details == "limit: must be at most 10000"
        status = rpc_status.from_call(error)
        assert status is not None
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad)
        assert [v.field for v in bad.field_violations] == ["limit"]
    else:
        assert upstream.name in details
        assert "must be at most" not in details


def _utc(value: dt.datetime | str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)

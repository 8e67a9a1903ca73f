"""The indicators service as a real process behind real ingest and aggregator processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
import random
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from mt5.indicators.v1 import indicators_service_pb2 as pb
from mt5.indicators.v1 import indicators_service_pb2_grpc as pb_grpc
from sqlalchemy import text

from services.common import db
from services.ingest.client import TickStreamer
from tests.helpers import API_KEY, ServiceProcess, pipeline
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


def _utc(value: dt.datetime | str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)

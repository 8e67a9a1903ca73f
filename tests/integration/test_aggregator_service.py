"""The aggregator as a real process behind a real ingest, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from mt5.aggregator.v1 import aggregator_service_pb2 as pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc
from sqlalchemy import func, select

from services.common import db
from services.common.market import Timeframe
from services.common.schema import agg_candle_log, agg_candles
from services.ingest.client import TickStreamer
from tests.helpers import API_KEY, ServiceProcess, pipeline
from tests.market_data import Ticks, make_ticks, reference, tick_batches

Stored = dict[tuple[Timeframe, dt.datetime], tuple[float, ...]]


@pytest.fixture
def pair(database_url: str, tmp_path: pathlib.Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    extra = {"aggregator": {"AGGREGATOR_FORMING_QUEUE": "5"}}
    with pipeline(database_url, tmp_path, "aggregator", extra) as (ingest, aggregator):
        yield ingest, aggregator


def final_candles(database_url: str, symbol: str) -> Stored:
    engine = db.create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(agg_candles).where(agg_candles.c.symbol == symbol, agg_candles.c.final)
            )
            return {
                (Timeframe[r.timeframe], r.ts): (r.open, r.high, r.low, r.close, r.volume, r.spread)
                for r in rows
            }
    finally:
        engine.dispose()


def log_duplicates(database_url: str) -> int:
    engine = db.create_db_engine(database_url)
    c = agg_candle_log.c
    try:
        with engine.connect() as conn:
            groups = select(c.symbol, c.timeframe, c.ts, c.revision).group_by(
                c.symbol, c.timeframe, c.ts, c.revision
            )
            total = conn.execute(select(func.count()).select_from(agg_candle_log)).scalar_one()
            distinct = conn.execute(select(func.count()).select_from(groups.subquery())).scalar_one()
            return int(total - distinct)
    finally:
        engine.dispose()


def assert_equal_to_reference(got: Stored, ref: Stored) -> None:
    assert set(got) == set(ref)
    for key, values in got.items():
        assert values[:4] == ref[key][:4], key
        assert values[4:] == pytest.approx(ref[key][4:], rel=1e-12), key


async def wait_for(predicate: Callable[[], bool], within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_aggregator_streamed_ticks_give_reference_candles(
    pair: tuple[ServiceProcess, ServiceProcess], database_url: str
) -> None:
    ingest, _ = pair
    ticks = make_ticks(6_000, seed=11, span_hours=30)
    await TickStreamer(ingest.address, API_KEY, "agg-1").send(tick_batches(ticks, "EURUSD", 500))
    ref = reference(ticks)
    await wait_for(lambda: len(final_candles(database_url, "EURUSD")) == len(ref))
    assert_equal_to_reference(final_candles(database_url, "EURUSD"), ref)


async def test_aggregator_killed_at_random_moments_loses_and_duplicates_nothing(
    pair: tuple[ServiceProcess, ServiceProcess], database_url: str
) -> None:
    ingest, aggregator = pair
    ticks = make_ticks(20_000, seed=12, span_hours=60)
    rng = random.Random(5)

    async def chaos() -> None:
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            aggregator.kill()
            await asyncio.to_thread(aggregator.start)

    chaos_task = asyncio.create_task(chaos())
    await TickStreamer(ingest.address, API_KEY, "agg-2").send(tick_batches(ticks, "GBPUSD", 200))
    await chaos_task
    ref = reference(ticks)
    await wait_for(lambda: len(final_candles(database_url, "GBPUSD")) == len(ref), 60)
    assert_equal_to_reference(final_candles(database_url, "GBPUSD"), ref)
    assert log_duplicates(database_url) == 0


async def test_subscribe_candles_resumes_from_cursor_without_gap(
    pair: tuple[ServiceProcess, ServiceProcess],
) -> None:
    ingest, aggregator = pair
    ticks = make_ticks(2_000, seed=13, span_hours=5)
    await TickStreamer(ingest.address, API_KEY, "agg-3").send(tick_batches(ticks, "USDJPY", 500))
    expected = len(reference(ticks))
    async with grpc.aio.insecure_channel(aggregator.address) as channel:
        stub = pb_grpc.AggregatorServiceStub(channel)
        metadata = (("x-api-key", API_KEY),)
        seen: list[pb.SubscribeCandlesResponse] = []
        call = stub.SubscribeCandles(pb.SubscribeCandlesRequest(symbols=["USDJPY"]), metadata=metadata)
        async for item in call:
            seen.append(item)
            if len(seen) == expected:
                break
        call.cancel()
        assert all(item.bar.final for item in seen)
        cursors = [item.cursor for item in seen]
        assert cursors == sorted(set(cursors))
        resumed = stub.SubscribeCandles(
            pb.SubscribeCandlesRequest(symbols=["USDJPY"], from_cursor=cursors[9]), metadata=metadata
        )
        tail = []
        async for item in resumed:
            tail.append(item)
            if len(tail) == expected - 10:
                break
        resumed.cancel()
    assert [t.cursor for t in tail] == cursors[10:]
    assert {(t.bar.candle.timeframe, t.bar.candle.ts.seconds) for t in tail} == {
        (s.bar.candle.timeframe, s.bar.candle.ts.seconds) for s in seen[10:]
    }


async def test_subscribe_candles_slow_forming_subscriber_is_cut_off(
    pair: tuple[ServiceProcess, ServiceProcess],
) -> None:
    ingest, aggregator = pair
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    async with grpc.aio.insecure_channel(aggregator.address) as channel:
        stub = pb_grpc.AggregatorServiceStub(channel)
        call = stub.SubscribeCandles(
            pb.SubscribeCandlesRequest(symbols=["LIVE1"], include_forming=True),
            metadata=(("x-api-key", API_KEY),),
        )
        await asyncio.sleep(0.3)  # subscribed; now never read while forming updates pile up
        for i in range(20):
            base = int(now.timestamp() * 1_000_000) + i * 1_000
            live = Ticks(
                np.array([base], dtype=np.int64),
                np.array([1.0 + i / 1000]),
                np.array([1.0002 + i / 1000]),
                np.zeros(1),
            )
            await TickStreamer(ingest.address, API_KEY, f"live-{i}").send(tick_batches(live, "LIVE1", 1))
        await asyncio.sleep(1.0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"symbol": "EUR USD", "timeframe": 1}, "symbol"),
        ({"symbol": "EURUSD"}, "timeframe"),
        ({"symbol": "EURUSD", "timeframe": 1, "limit": 10_001}, "limit"),
    ],
)
async def test_get_candles_bad_request_names_field(
    pair: tuple[ServiceProcess, ServiceProcess], bad: dict[str, Any], field: str
) -> None:
    _, aggregator = pair
    async with grpc.aio.insecure_channel(aggregator.address) as channel:
        stub = pb_grpc.AggregatorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetCandles(pb.GetCandlesRequest(**bad), metadata=(("x-api-key", API_KEY),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")


async def test_subscribe_candles_include_forming_streams_bar_while_it_forms(
    pair: tuple[ServiceProcess, ServiceProcess],
) -> None:
    ingest, aggregator = pair
    now_us = int(dt.datetime.now(dt.UTC).timestamp() * 1_000_000)
    live = Ticks(np.array([now_us], dtype=np.int64), np.array([1.25]), np.array([1.2502]), np.zeros(1))
    async with grpc.aio.insecure_channel(aggregator.address) as channel:
        stub = pb_grpc.AggregatorServiceStub(channel)
        call = stub.SubscribeCandles(
            pb.SubscribeCandlesRequest(symbols=["FORM1"], timeframes=["M1"], include_forming=True),
            metadata=(("x-api-key", API_KEY),),
        )
        await asyncio.sleep(0.3)
        await TickStreamer(ingest.address, API_KEY, "forming").send(tick_batches(live, "FORM1", 1))
        first = await asyncio.wait_for(anext(aiter(call)), 10)
        call.cancel()
    assert first.bar.candle.symbol == "FORM1"
    assert not first.bar.final
    assert first.bar.candle.close == pytest.approx(1.2501)

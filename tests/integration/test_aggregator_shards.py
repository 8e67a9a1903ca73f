"""Two shards of each stateful stage: every symbol is handled by exactly one shard of each; the bars
equal the single-run reference, and each indicators shard publishes one value per final bar of exactly
its own symbols (their exactness against TA-Lib is tested in test_indicators_service.py)."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from services.common import db
from services.common.market import shard_of
from services.common.schema import agg_candle_log, agg_candles, ind_values
from services.ingest.client import TickStreamer
from tests.helpers import API_KEY, ServiceProcess, free_port, make_service, postgres_database
from tests.market_data import make_ticks, reference, tick_batches

SYMBOLS = ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "US30#", "BTCUSD.m")


@pytest.fixture
def sharded(tmp_path: pathlib.Path) -> Iterator[tuple[str, ServiceProcess, list[tuple[ServiceProcess, int]]]]:
    with postgres_database() as url:
        ingest = make_service("ingest", url, tmp_path).start()
        shards = []
        indicators = []
        for index in range(2):
            metrics = free_port()
            shard = make_service(
                "aggregator",
                url,
                tmp_path,
                {
                    "AGGREGATOR_INGEST_ADDRESS": ingest.address,
                    "AGGREGATOR_SHARD_COUNT": "2",
                    "AGGREGATOR_SHARD_INDEX": f"aggregator-{index}",
                    "AGGREGATOR_METRICS_PORT": str(metrics),
                    "AGGREGATOR_CLOCK_SECONDS": "0.05",
                },
            )
            shard.log_path = tmp_path / f"aggregator-{index}.log"
            shards.append((shard.start(), metrics))
        for index in range(2):
            metrics = free_port()
            ind = make_service(
                "indicators",
                url,
                tmp_path,
                {
                    "INDICATORS_AGGREGATOR_ADDRESS": shards[1 - index][
                        0
                    ].address,  # any aggregator shard serves all
                    "INDICATORS_SHARD_COUNT": "2",
                    "INDICATORS_SHARD_INDEX": f"indicators-{index}",
                    "INDICATORS_METRICS_PORT": str(metrics),
                    "INDICATORS_FEED_POLL_SECONDS": "0.1",
                },
            )
            ind.log_path = tmp_path / f"indicators-{index}.log"
            indicators.append((ind.start(), metrics))
        try:
            yield url, ingest, shards + indicators
        finally:
            for shard, _ in shards + indicators:
                shard.kill()
            ingest.kill()


def final_count(url: str, symbol: str) -> int:
    engine = db.create_db_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(agg_candles)
                    .where(agg_candles.c.symbol == symbol, agg_candles.c.final)
                ).scalar_one()
            )
    finally:
        engine.dispose()


async def counted(metrics_port: int, metric: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == metric)


def indicator_rows(url: str, symbol: str) -> int:
    engine = db.create_db_engine(url)
    try:
        with engine.connect() as conn:
            query = select(func.count()).select_from(ind_values).where(ind_values.c.symbol == symbol)
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


async def test_two_shards_each_symbol_handled_once_and_bars_equal_reference(
    sharded: tuple[str, ServiceProcess, list[tuple[ServiceProcess, int]]],
) -> None:
    url, ingest, shards = sharded
    data = {symbol: make_ticks(1_500, seed=40 + i, span_hours=6) for i, symbol in enumerate(SYMBOLS)}
    assert {shard_of(s, 2) for s in SYMBOLS} == {0, 1}  # both shards have work
    for symbol, ticks in data.items():
        await TickStreamer(ingest.address, API_KEY, f"shard-{symbol.replace('#', '')}").send(
            tick_batches(ticks, symbol, 500)
        )
    refs = {symbol: reference(ticks) for symbol, ticks in data.items()}
    for _ in range(300):
        if all(final_count(url, s) == len(refs[s]) for s in SYMBOLS):
            break
        await asyncio.sleep(0.1)
    engine = db.create_db_engine(url)
    with engine.connect() as conn:
        for symbol, ref in refs.items():
            rows = conn.execute(
                select(agg_candles).where(agg_candles.c.symbol == symbol, agg_candles.c.final)
            )
            got = {(r.timeframe, r.ts): (r.open, r.high, r.low, r.close) for r in rows}
            assert got == {(tf.name, ts): v[:4] for (tf, ts), v in ref.items()}, symbol
        c = agg_candle_log.c
        versions = select(c.symbol, c.timeframe, c.ts, c.revision).distinct().subquery()
        assert (
            conn.execute(select(func.count()).select_from(versions)).scalar_one()
            == conn.execute(select(func.count()).select_from(agg_candle_log)).scalar_one()
        )
    engine.dispose()
    # Each aggregator shard read exactly its own symbols' ticks.
    for index, (_, metrics_port) in enumerate(shards[:2]):
        expected = sum(len(t) for s, t in data.items() if shard_of(s, 2) == index)
        assert await counted(metrics_port, "mt5_aggregator_ticks_total") == expected
    # Each indicators shard computed exactly its own symbols' values, one per final bar.
    for _ in range(300):
        if all(indicator_rows(url, s) == len(refs[s]) for s in SYMBOLS):
            break
        await asyncio.sleep(0.1)
    for index, (_, metrics_port) in enumerate(shards[2:]):
        expected = sum(len(refs[s]) for s in SYMBOLS if shard_of(s, 2) == index)
        assert await counted(metrics_port, "mt5_indicators_values_total") == expected

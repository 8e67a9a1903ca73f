"""Failures the proving ground's crash-and-resume runs found (``bench/proving/chaos.py``), one by one.

Each test reproduces one of them deterministically and guards its fix. A bug still open is marked
``xfail(strict=True)`` with the bug in the reason: fixing it makes the test pass, and then the marker
goes. None is open now.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
from collections.abc import AsyncIterator, Iterator

import grpc
import psycopg
import pytest
from mt5.ingest.v1 import ingest_service_pb2 as pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from mt5.market.v1 import market_pb2
from sqlalchemy import select

from services.common import db
from services.common.market import Timeframe, from_us
from services.common.schema import ind_log
from services.indicators.engine import IndicatorValues
from services.indicators.store import IndicatorStore, IndicatorWork
from services.ingest.client import TickStreamer
from tests.helpers import API_KEY, ServiceProcess, make_service, postgres_database, sqlite_url, wait_until
from tests.market_data import make_ticks, reference, tick_batches
from tests.pipeline_checks import indicators_expected_and_stored

# --- the StreamTicks client ------------------------------------------------------------------------


class FlakyIngest(pb_grpc.IngestServiceServicer):
    """StreamTicks that ends calls with UNAVAILABLE, as ingest does when a commit fails.

    Envoy answers the same while it has no healthy ingest. Calls numbered in ``dead_calls`` read
    ``read_before_failing`` batches and fail without acknowledging any; every other call acknowledges
    batches as they come, and fails after ``acks_per_call`` of them when that is set.
    """

    def __init__(
        self, dead_calls: set[int], read_before_failing: int = 8, acks_per_call: int | None = None
    ) -> None:
        self.dead_calls = dead_calls
        self.read_before_failing = read_before_failing
        self.acks_per_call = acks_per_call
        self.calls: list[list[int]] = []

    async def StreamTicks(  # noqa: N802 - the RPC's name in the proto contract
        self, request_iterator: AsyncIterator[pb.StreamTicksRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamTicksResponse]:
        received: list[int] = []
        self.calls.append(received)
        dead = len(self.calls) in self.dead_calls
        async for request in request_iterator:
            received.append(request.sequence)
            if dead:
                if len(received) == self.read_before_failing:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "storage unavailable")
                continue
            yield pb.StreamTicksResponse(sequence=request.sequence, stored=len(request.ticks))
            if self.acks_per_call is not None and len(received) == self.acks_per_call:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "storage unavailable")


async def _serve(servicer: FlakyIngest) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_IngestServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _batches(count: int) -> list[list[market_pb2.Tick]]:
    return [[market_pb2.Tick(symbol="EURUSD", bid=1.0, ask=1.0001)] for _ in range(count)]


async def test_tick_streamer_call_ends_unavailable_sends_every_batch_in_sequence_order() -> None:
    servicer = FlakyIngest(dead_calls={1})
    server, address = await _serve(servicer)
    try:
        report = await TickStreamer(address, API_KEY, "order", backoff_seconds=0.01).send(_batches(30))
    finally:
        await server.stop(None)
    assert report.batches_acked == 30
    first_seen: list[int] = []
    for call in servicer.calls:
        first_seen.extend(s for s in call if s not in first_seen)
    assert first_seen == list(range(1, 31)), servicer.calls


async def test_tick_streamer_many_separate_outages_each_recovered_keeps_streaming() -> None:
    # Every call stores three batches and then fails: an outage after progress, each time.
    servicer = FlakyIngest(dead_calls=set(), acks_per_call=3)
    server, address = await _serve(servicer)
    streamer = TickStreamer(address, API_KEY, "outages", max_reconnects=3, backoff_seconds=0.001)
    try:
        report = await streamer.send(_batches(20))
    finally:
        await server.stop(None)
    assert report.batches_acked == 20
    assert report.reconnects == 6


# --- the indicators' log ------------------------------------------------------------------------------


def test_indicator_store_same_version_twice_in_one_commit_logs_it_once(tmp_path: pathlib.Path) -> None:
    engine = db.create_db_engine(sqlite_url(tmp_path))
    db.migrate(engine)
    store = IndicatorStore(engine)
    ts = dt.datetime(2025, 10, 30, 22, 49, tzinfo=dt.UTC)

    def values(rsi: float) -> IndicatorValues:
        others = dict.fromkeys(("macd", "macd_signal", "macd_hist", "atr"), 1e-4)
        bands = {"bb_upper": 1.09, "bb_middle": 1.08, "bb_lower": 1.07}
        return IndicatorValues(
            "EURUSD",
            Timeframe.M1,
            ts,
            0,
            True,
            rsi=rsi,
            **others,
            **bands,
            close=1.08,
            volume=1.0,
            spread=1e-4,
        )

    store.commit(IndicatorWork(values=[values(50.0)], cursor=1))
    # Revised twice: the first recomputation changed the bar's values, the second gave the same.
    store.commit(IndicatorWork(values=[values(51.0), values(51.0)], cursor=3))
    with engine.connect() as conn:
        logged = [row.rsi for row in conn.execute(select(ind_log).order_by(ind_log.c.id))]
    engine.dispose()
    assert logged == [50.0, 51.0]


# --- stages restarted around a revision ------------------------------------------------------------


def _pg(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _scalar(url: str, query: str, *params: object) -> int:
    with psycopg.connect(_pg(url)) as conn:
        row = conn.execute(query, params).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def _start(name: str, url: str, workdir: pathlib.Path, env: dict[str, str]) -> ServiceProcess:
    # A wall-clock grace of a minute: no bar is finalized because the market looks quiet.
    base = {
        "AGGREGATOR_CLOCK_SECONDS": "0.05",
        "AGGREGATOR_GRACE_SECONDS": "60",
        "AGGREGATOR_FEED_POLL_SECONDS": "0.05",
        "INDICATORS_FEED_POLL_SECONDS": "0.05",
    }
    return make_service(name, url, workdir, base | env).start()


async def test_aggregator_restarted_while_its_feed_is_idle_applies_the_ticks_that_follow(
    pg_url: str, tmp_path: pathlib.Path
) -> None:
    ingest = _start("ingest", pg_url, tmp_path, {})
    aggregator = _start("aggregator", pg_url, tmp_path, {"AGGREGATOR_INGEST_ADDRESS": ingest.address})
    try:
        ticks = make_ticks(4_000, seed=81, span_hours=3)
        half = len(ticks) // 2
        streamer = TickStreamer(ingest.address, API_KEY, "restart-idle")
        await streamer.send(tick_batches(ticks.take(slice(0, half)), "EURUSD", 500))
        cursor = "SELECT cursor FROM agg_cursors WHERE feed = 'ticks'"
        wait_until(lambda: _scalar(pg_url, cursor) == half, 30, what="aggregator caught up")
        # Killed and restarted within seconds: the market has not been quiet for the grace minute.
        aggregator.kill()
        await asyncio.to_thread(aggregator.start)
        await asyncio.sleep(0.5)
        await streamer.send(tick_batches(ticks.take(slice(half, None)), "EURUSD", 500), first_sequence=5)
        wait_until(lambda: _scalar(pg_url, cursor) == len(ticks), 30, what="aggregator caught up again")
        with psycopg.connect(_pg(pg_url)) as conn:
            rows = conn.execute(
                "SELECT timeframe, ts, open, high, low, close FROM agg_candles WHERE symbol = 'EURUSD'"
            ).fetchall()
    finally:
        aggregator.kill()
        ingest.kill()
    stored = {(Timeframe[r[0]], r[1]): tuple(r[2:]) for r in rows}
    expected = {key: values[:4] for key, values in reference(ticks).items()}
    # Final or still forming, every bar holds the ticks of its interval.
    assert stored == expected


async def test_aggregator_feed_paused_longer_than_grace_applies_the_ticks_after_the_pause(
    pg_url: str, tmp_path: pathlib.Path
) -> None:
    ingest = _start("ingest", pg_url, tmp_path, {})
    aggregator = _start(
        "aggregator",
        pg_url,
        tmp_path,
        {"AGGREGATOR_INGEST_ADDRESS": ingest.address, "AGGREGATOR_GRACE_SECONDS": "1"},
    )
    try:
        ticks = make_ticks(4_000, seed=83, span_hours=3)
        half = len(ticks) // 2
        streamer = TickStreamer(ingest.address, API_KEY, "paused")
        await streamer.send(tick_batches(ticks.take(slice(0, half)), "EURUSD", 500))
        # The feed pauses for longer than the grace (1 s here, 5 s by default), then goes on.
        await asyncio.sleep(2.0)
        await streamer.send(tick_batches(ticks.take(slice(half, None)), "EURUSD", 500), first_sequence=5)
        cursor = "SELECT cursor FROM agg_cursors WHERE feed = 'ticks'"
        wait_until(lambda: _scalar(pg_url, cursor) == len(ticks), 30, what="aggregator caught up")
        await asyncio.sleep(2.0)  # the grace again: the last bars become final too
        with psycopg.connect(_pg(pg_url)) as conn:
            rows = conn.execute(
                "SELECT timeframe, ts, open, high, low, close FROM agg_candles WHERE symbol = 'EURUSD'"
            ).fetchall()
    finally:
        aggregator.kill()
        ingest.kill()
    stored = {(Timeframe[r[0]], r[1]): tuple(r[2:]) for r in rows}
    expected = {key: values[:4] for key, values in reference(ticks).items()}
    assert stored == expected


async def test_indicators_restarted_after_a_revision_they_missed_store_talib_batch_values(
    pg_url: str, tmp_path: pathlib.Path
) -> None:
    ingest = _start("ingest", pg_url, tmp_path, {})
    aggregator = _start("aggregator", pg_url, tmp_path, {"AGGREGATOR_INGEST_ADDRESS": ingest.address})
    indicators = _start("indicators", pg_url, tmp_path, {"INDICATORS_AGGREGATOR_ADDRESS": aggregator.address})
    caught_up = (
        "SELECT (SELECT coalesce(max(id), 0) FROM agg_candle_log) - (SELECT coalesce(max(cursor), 0) "
        "FROM ind_cursors)"
    )
    try:
        ticks = make_ticks(3_000, seed=82, span_hours=2)
        await TickStreamer(ingest.address, API_KEY, "revised").send(tick_batches(ticks, "EURUSD", 500))
        cursor = "SELECT cursor FROM agg_cursors WHERE feed = 'ticks'"
        wait_until(lambda: _scalar(pg_url, cursor) == len(ticks), 30, what="aggregator caught up")
        wait_until(lambda: _scalar(pg_url, caught_up) == 0, 30, what="indicators caught up")
        indicators.kill()
        # A late tick, the last of its minute 20 minutes before the newest tick, changes that bar's
        # close: the aggregator revises it (within its hour of retention).
        newest = int(ticks.ts.max())
        minute = (newest - 20 * 60_000_000) // 60_000_000 * 60_000_000
        late = market_pb2.Tick(symbol="EURUSD", bid=1.2, ask=1.2002)
        late.ts.FromDatetime(from_us(minute + 59_999_999).replace(tzinfo=None))
        await TickStreamer(ingest.address, API_KEY, "late").send([[late]])
        revised = (
            "SELECT count(*) FROM agg_candle_log WHERE symbol = 'EURUSD' AND timeframe = 'M1' "
            "AND revision > 0 AND ts = %s"
        )
        wait_until(lambda: _scalar(pg_url, revised, from_us(minute)) == 1, 30, what="the revision")
        await asyncio.to_thread(indicators.start)
        wait_until(lambda: _scalar(pg_url, caught_up) == 0, 30, what="indicators caught up again")
        expected, stored = indicators_expected_and_stored(pg_url, "EURUSD")
    finally:
        for service in (indicators, aggregator, ingest):
            service.kill()
    assert from_us(minute).astimezone(dt.UTC) in {ts for tf, ts in expected if tf == "M1"}
    stale = sorted(key for key in expected if stored.get(key) != expected[key])
    assert stale == []


async def test_indicators_started_while_the_aggregator_is_down_wait_and_then_serve(
    pg_url: str, tmp_path: pathlib.Path
) -> None:
    ingest = _start("ingest", pg_url, tmp_path, {})
    aggregator = _start("aggregator", pg_url, tmp_path, {"AGGREGATOR_INGEST_ADDRESS": ingest.address})
    indicators = _start("indicators", pg_url, tmp_path, {"INDICATORS_AGGREGATOR_ADDRESS": aggregator.address})
    try:
        ticks = make_ticks(2_000, seed=84, span_hours=1)
        await TickStreamer(ingest.address, API_KEY, "warm").send(tick_batches(ticks, "EURUSD", 500))
        # Stored values: the next start warms its series from the aggregator's bars.
        wait_until(lambda: _scalar(pg_url, "SELECT count(*) FROM ind_values") > 0, 60, what="values")
        aggregator.kill()
        indicators.kill()
        indicators.start(wait_serving=False)
        # Long enough to start and reach the warm-up, however busy the machine is.
        await asyncio.sleep(8.0)
        await asyncio.to_thread(aggregator.start)
        try:
            await asyncio.to_thread(indicators.wait_serving, 60)
            alive = True
        except AssertionError:  # it exited
            alive = False
    finally:
        for service in (indicators, aggregator, ingest):
            service.kill()
    assert alive, "indicators exited while the aggregator was down"

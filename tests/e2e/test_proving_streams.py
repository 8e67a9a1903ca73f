"""Proving ground, short form: slow and vanishing subscribers, deadlines into a stalled stage.

One mesh on PostgreSQL (four probed services behind the real Envoy); ticks are pumped at 10,000/s
over a fast-forwarded market clock so that bars close within seconds. The full form, with figures,
is ``bench/proving/streams.py``.

What the code promises and what these tests hold it to:
- live-only updates (forming bars) are snapshots: each subscriber keeps the newest unread one per
  series, so one that keeps reading is never cut off however fast bars form; one whose oldest unread
  update has waited 5 s is cut off with RESOURCE_EXHAUSTED — sent in order after what it
  has not read yet, its handler and slot freed within seconds even if it stopped reading — and
  resumes from its last cursor with no gap and no duplicate;
- durable feeds are read from the database page by page, so a subscriber that stops reading is held
  back by gRPC flow control (its cursor lags), never cut off, and costs the server one page;
- a subscription that disconnects frees its task and its slot;
- a call with a 200 ms deadline into a stage stalled on a table lock ends DEADLINE_EXCEEDED within
  250 ms, and nothing it asked for is written once it was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import psycopg
import pytest
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_grpc
from mt5.ingest.v1 import ingest_service_pb2 as ingest_pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc

from bench.proving.traffic import (
    METADATA,
    ProvingMesh,
    TickMaker,
    TickPump,
    candle_request,
    metric_sum,
    proving_mesh,
)
from tests import helpers

pytestmark = [pytest.mark.postgres, pytest.mark.envoy]

FORMING_MAX_DELAY = 5.0  # AGGREGATOR_FORMING_MAX_DELAY_SECONDS, its default
NO_BDP = [("grpc.http2.bdp_probe", 0)]
MARKET_START_US = int(dt.datetime(2025, 10, 20, tzinfo=dt.UTC).timestamp() * 1_000_000)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvingMesh]:
    workdir = tmp_path_factory.mktemp("proving-streams")
    with helpers.postgres_database() as url, proving_mesh(url, workdir) as running:
        yield running


def _pg(mesh: ProvingMesh) -> str:
    return mesh.database_url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.asynccontextmanager
async def _pumping(
    mesh: ProvingMesh, prefix: str, symbols: int = 8, rate: float = 10_000, wall_clock: bool = False
) -> AsyncIterator[None]:
    """Ticks at ``rate``/s over ``symbols`` symbols, on a fast-forwarded market clock (or the wall's)."""
    names = [f"{prefix}{i:03d}" for i in range(symbols)]
    # At 10,000 ticks/s the market moves 200 s per second: M1 bars close several times a second.
    start = None if wall_clock else MARKET_START_US
    maker = TickMaker(names, market_start_us=start, market_step_us=20_000)
    pump = TickPump(mesh.gateway, names, rate, batch_size=500, source_id=prefix, maker=maker)
    stop = asyncio.Event()
    task = asyncio.create_task(pump.run(stop))
    try:
        yield
    finally:
        stop.set()
        report = await task
        assert report.reconnects == 0, report.errors


def _log_ids(mesh: ProvingMesh, table: str, prefix: str, upto: int) -> list[int]:
    with psycopg.connect(_pg(mesh)) as conn:
        rows = conn.execute(
            f"SELECT id FROM {table} WHERE symbol LIKE %s AND id <= %s ORDER BY id",  # noqa: S608
            (prefix + "%", upto),
        ).fetchall()
    return [int(r[0]) for r in rows]


def _tick_lags(mesh: ProvingMesh) -> dict[str, float]:
    """``mt5_feed_lag_cursors`` of every subscription to ingest's tick feed."""
    mesh.metrics("ingest")  # the feed's head is read in the background after a scrape asks for it
    time.sleep(0.5)
    samples = mesh.metrics("ingest", ("mt5_feed_lag_cursors",))
    return {k: v for k, v in samples.items() if 'feed="ingest.ticks"' in k}


# --- slow subscribers ----------------------------------------------------------------------------


async def _read_all(call: grpc.aio.UnaryStreamCall, until: asyncio.Event) -> int:
    """Read as fast as possible until ``until``; the number of messages read."""
    count = 0
    async for _ in call:
        count += 1
        if until.is_set():
            break
    return count


async def test_slow_forming_subscriber_cut_off_resource_exhausted_resumes_without_gap(
    mesh: ProvingMesh,
) -> None:
    request = agg_pb.SubscribeCandlesRequest(include_forming=True)
    finals: list[int] = []
    last_cursor = 0
    address = mesh.services["aggregator"].address
    # gRPC's BDP probing sizes a connection's receive windows from the bandwidth it measures, whether
    # or not the application reads: with it on, a slow client's library keeps accepting megabytes
    # (about 25,000 bars in 40 s here) before the server is held back; the full form measures that.
    # Here the slow subscriber keeps a 64 KiB window, so the server-side bound is what is tested.
    async with (
        grpc.aio.insecure_channel(address, options=NO_BDP) as channel,
        _pumping(mesh, "SLOW", symbols=8),
    ):
        call = agg_grpc.AggregatorServiceStub(channel).SubscribeCandles(request, metadata=METADATA)
        slow_until = time.monotonic() + 3 * FORMING_MAX_DELAY
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            async with asyncio.timeout(40):
                while True:
                    item = await call.read()
                    assert item is not grpc.aio.EOF
                    if item.bar.candle.symbol.startswith("SLOW") and item.bar.final:
                        finals.append(item.cursor)
                    last_cursor = max(last_cursor, item.cursor)
                    # 10 messages a second for 15 s: the 72 forming series alone take longer than
                    # 5 s to go round. Then as fast as it can: what was sent before the cut-off
                    # arrives, then the status.
                    if time.monotonic() < slow_until:
                        await asyncio.sleep(0.1)
    assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "resume from your last cursor" in (cut.value.details() or "")
    # Resume from the last cursor received: everything final after it comes, once, in order.
    helpers.wait_until(lambda: bool(_log_ids(mesh, "agg_candle_log", "SLOW", 2**62)), 10, what="final bars")
    head = max(_log_ids(mesh, "agg_candle_log", "SLOW", 2**62))
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        call = agg_grpc.AggregatorServiceStub(channel).SubscribeCandles(
            agg_pb.SubscribeCandlesRequest(include_forming=True, from_cursor=last_cursor), metadata=METADATA
        )
        async with asyncio.timeout(30):
            async for item in call:
                if item.bar.final:
                    assert item.cursor > last_cursor
                    if item.bar.candle.symbol.startswith("SLOW"):
                        finals.append(item.cursor)
                    if item.cursor >= head:
                        break
        call.cancel()
    assert finals == sorted(set(finals)), "a final bar version came twice or out of order"
    assert finals == _log_ids(mesh, "agg_candle_log", "SLOW", head), "a final bar version is missing"


async def test_forming_subscriber_reading_one_message_a_second_freed_within_20s_then_told(
    mesh: ProvingMesh,
) -> None:
    def candle_feed() -> tuple[float, float]:
        samples = mesh.metrics("aggregator")
        return (
            metric_sum(samples, "mt5_feed_subscribers", feed="aggregator.candles"),
            metric_sum(samples, "mt5_feed_slow_subscribers_total", feed="aggregator.candles"),
        )

    open_before, cut_before = candle_feed()
    address = mesh.services["aggregator"].address
    request = agg_pb.SubscribeCandlesRequest(include_forming=True)
    async with (
        grpc.aio.insecure_channel(address, options=NO_BDP) as channel,
        _pumping(mesh, "HUNG", symbols=8),
    ):
        call = agg_grpc.AggregatorServiceStub(channel).SubscribeCandles(request, metadata=METADATA)
        assert await call.read() is not grpc.aio.EOF
        # Its window fills at once and its handler blocks writing; its oldest unread forming bar is
        # 5 s old soon after; the handler is gone 5 s later (CutOff), while the client still reads.
        seen: list[tuple[float, float]] = []

        def freed() -> bool:
            return seen[-1][0] == open_before and seen[-1][1] > cut_before

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert await call.read() is not grpc.aio.EOF
            seen.append(candle_feed())
            if freed():
                break
            await asyncio.sleep(1)
        assert freed(), (open_before, cut_before, seen)
        # What it has not read yet is still delivered, then RESOURCE_EXHAUSTED, not a bare reset.
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            async with asyncio.timeout(30):
                while (await call.read()) is not grpc.aio.EOF:
                    pass
    assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_forming_subscriber_that_keeps_reading_100_symbols_not_cut_off(mesh: ProvingMesh) -> None:
    # 10,000 ticks/s over 100 symbols make thousands of forming versions a second, more than one
    # stream carries; a subscriber that keeps reading gets the newest version of each bar instead.
    done = asyncio.Event()
    request = agg_pb.SubscribeCandlesRequest(include_forming=True)
    async with (
        grpc.aio.insecure_channel(mesh.services["aggregator"].address) as channel,
        _pumping(mesh, "WIDE", symbols=100, wall_clock=True),
    ):
        reader = asyncio.create_task(
            _read_all(
                agg_grpc.AggregatorServiceStub(channel).SubscribeCandles(request, metadata=METADATA), done
            )
        )
        await asyncio.sleep(5)
        done.set()
        assert await reader > 0


async def test_durable_subscriber_that_stops_reading_held_back_not_cut_off_no_gap(mesh: ProvingMesh) -> None:
    before = mesh.rss_mb("ingest")
    received: list[int] = []
    # Without BDP probing the client keeps a 64 KiB window; with it, its library would first accept a
    # few megabytes on its own (the full form measures that).
    async with grpc.aio.insecure_channel(mesh.services["ingest"].address, options=NO_BDP) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        start = max(_log_ids(mesh, "ingest_ticks", "", 2**62) or [0])
        call = stub.SubscribeTicks(ingest_pb.SubscribeTicksRequest(from_cursor=start), metadata=METADATA)
        async with _pumping(mesh, "HOLD"):
            first = await call.read()
            assert first is not grpc.aio.EOF
            received.extend(t.cursor for t in first.ticks)
            await asyncio.sleep(4)  # 40,000 ticks committed meanwhile; this subscriber reads none
            lags = _tick_lags(mesh)
        grown = mesh.rss_mb("ingest") - before
        head = max(_log_ids(mesh, "ingest_ticks", "", 2**62))
        async with asyncio.timeout(30):
            while not received or received[-1] < head:
                page = await call.read()
                assert page is not grpc.aio.EOF, "the held-back subscription ended"
                received.extend(t.cursor for t in page.ticks)
        call.cancel()
    # Held back, not buffered: the server's cursor for it lags tens of thousands of ticks.
    assert max(lags.values()) > 10_000
    assert grown < 30, f"ingest grew {grown} MB while a subscriber was held back"
    assert received == [i for i in _log_ids(mesh, "ingest_ticks", "", head) if i > start]


async def test_durable_subscriber_through_gateway_that_stops_reading_held_back_not_cut_off(
    mesh: ProvingMesh,
) -> None:
    # Flow control reaches the service through Envoy: its 1 MiB downstream windows and buffer limits
    # hold the upstream stream back. (With gRPC's BDP probing on, the client's library accepts a few
    # megabytes first; the full form measures Envoy's memory over two minutes.)
    def subscribers() -> set[str]:
        return {k for k in mesh.metrics("ingest", ("mt5_feed_lag_cursors",)) if 'feed="ingest.ticks"' in k}

    known = subscribers()
    async with grpc.aio.insecure_channel(mesh.gateway, options=NO_BDP) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        call = stub.SubscribeTicks(ingest_pb.SubscribeTicksRequest(), metadata=METADATA)
        assert await call.read() is not grpc.aio.EOF
        async with _pumping(mesh, "GWHOLD"):
            await asyncio.sleep(4)
            lags = _tick_lags(mesh)
            lag = max(v for k, v in lags.items() if k not in known)
        call.cancel()
    assert lag > 10_000


async def test_1000_disconnects_mid_stream_leave_no_task_or_subscription(mesh: ProvingMesh) -> None:
    cycles = 100  # the full form runs 1,000 through the gateway (bench/proving/streams.py)

    def probe() -> tuple[int, int, float, float]:
        agg, ing = mesh.metrics("aggregator"), mesh.metrics("ingest")
        return (
            int(agg["mt5_probe_asyncio_tasks"]),
            int(ing["mt5_probe_asyncio_tasks"]),
            metric_sum(agg, "mt5_feed_subscribers"),
            metric_sum(ing, "mt5_feed_subscribers"),
        )

    before = probe()
    # Straight to the services: what is measured is theirs (the full form also goes through Envoy).
    async with (
        grpc.aio.insecure_channel(mesh.services["aggregator"].address) as to_agg,
        grpc.aio.insecure_channel(mesh.services["ingest"].address) as to_ingest,
        _pumping(mesh, "CYCLE", rate=2_000),
    ):
        agg = agg_grpc.AggregatorServiceStub(to_agg)
        ing = ingest_grpc.IngestServiceStub(to_ingest)
        for i in range(cycles):
            if i % 2:
                call = agg.SubscribeCandles(
                    agg_pb.SubscribeCandlesRequest(include_forming=True), metadata=METADATA
                )
            else:
                call = ing.SubscribeTicks(ingest_pb.SubscribeTicksRequest(), metadata=METADATA)
            first = await call.read()  # mid-stream: it has started delivering
            assert first is not grpc.aio.EOF
            call.cancel()

    seen: list[tuple[int, int, float, float]] = []

    def settled() -> bool:
        # At most as many subscriptions as before (one an earlier test cancelled through Envoy may
        # still have been closing then), and no more than a couple of tasks over the baseline.
        seen.append(probe())
        now = seen[-1]
        return (
            now[2] <= before[2]
            and now[3] <= before[3]
            and now[0] <= before[0] + 2
            and now[1] <= before[1] + 2
        )

    try:
        helpers.wait_until(settled, 15, interval=0.5, what="tasks and subscriptions back")
    except AssertionError as exc:
        raise AssertionError(f"before {before}, after {seen[-5:]}") from exc


# --- deadlines into a stalled stage --------------------------------------------------------------


def _candles_of(mesh: ProvingMesh, symbol: str) -> int:
    with psycopg.connect(_pg(mesh)) as conn:
        row = conn.execute("SELECT count(*) FROM ingest_candles WHERE symbol = %s", (symbol,)).fetchone()
    return int(row[0]) if row else 0


def _unary_with_deadline(
    mesh: ProvingMesh, symbol: str, timeout: float = 0.2
) -> tuple[grpc.StatusCode, float]:
    with grpc.insecure_channel(mesh.gateway) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        stub.CheckHealth(ingest_pb.CheckHealthRequest(), timeout=5)  # connected before the clock starts
        started = time.perf_counter()
        try:
            stub.IngestCandles(candle_request(symbol), metadata=METADATA, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code(), time.perf_counter() - started
    return grpc.StatusCode.OK, time.perf_counter() - started


def test_200ms_deadline_into_stalled_ingest_deadline_exceeded_within_250ms(mesh: ProvingMesh) -> None:
    with helpers.table_locked(mesh.database_url, "ingest_candles"):
        code, elapsed = _unary_with_deadline(mesh, "DLFAST")
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 0.25, f"{elapsed * 1000:.0f} ms"


def test_deadline_exceeded_while_queued_behind_stalled_commit_nothing_written(mesh: ProvingMesh) -> None:
    blocker: list[grpc.StatusCode] = []

    def block() -> None:
        code, _ = _unary_with_deadline(mesh, "DLBLOCK", timeout=20)
        blocker.append(code)

    with helpers.table_locked(mesh.database_url, "ingest_candles"):
        thread = threading.Thread(target=block)
        thread.start()
        helpers.wait_until(
            lambda: helpers.lock_waiters(mesh.database_url) >= 1, 5, what="the blocker's commit to wait"
        )
        code, _ = _unary_with_deadline(mesh, "DLQUEUED")
    thread.join(20)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert blocker == [grpc.StatusCode.OK]
    time.sleep(0.5)
    assert _candles_of(mesh, "DLBLOCK") == 1
    assert _candles_of(mesh, "DLQUEUED") == 0


@pytest.mark.parametrize("via", ["grpc", "rest"])
def test_deadline_exceeded_during_stalled_commit_nothing_written(mesh: ProvingMesh, via: str) -> None:
    symbol = f"DLSTALL{via.upper()}"
    with helpers.table_locked(mesh.database_url, "ingest_candles"):
        if via == "grpc":
            code, _ = _unary_with_deadline(mesh, symbol)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            body = _rest_candle(symbol)
            with pytest.raises(httpx.TimeoutException):
                httpx.post(
                    mesh.url + "/ingest", json=body, headers={"X-API-Key": helpers.API_KEY}, timeout=0.2
                )
        time.sleep(0.3)
        # The cancelled work should be gone from the database too, not waiting for the lock.
        still_waiting = helpers.lock_waiters(mesh.database_url)
    time.sleep(1.0)
    assert (_candles_of(mesh, symbol), still_waiting) == (0, 0)


def _rest_candle(symbol: str) -> dict[str, object]:
    return helpers.SEED_CANDLE | {"symbol": symbol}

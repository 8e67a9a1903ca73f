"""The ingest service as a real process on a loopback port, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
import random
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2
from mt5.ingest.v1 import ingest_service_pb2 as pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from mt5.market.v1 import market_pb2
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from services.common import db
from services.common.channels import api_key_metadata, open_channel
from services.common.protoconv import timestamp
from services.common.schema import ingest_ticks
from services.ingest.client import TickStreamer
from tests.helpers import API_KEY, ServiceProcess, free_port, grpc_status, make_service, wait_until

START = dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC)


@pytest.fixture
def ingest(database_url: str, tmp_path: pathlib.Path) -> Iterator[ServiceProcess]:
    service = make_service("ingest", database_url, tmp_path).start()
    yield service
    service.kill()


def make_batches(count: int, size: int, symbol: str = "EURUSD", seed: int = 3) -> list[list[market_pb2.Tick]]:
    rng = random.Random(seed)
    batches = []
    for b in range(count):
        batch = []
        for i in range(size):
            n = b * size + i
            mid = 1.08 + rng.random() / 1000
            batch.append(
                market_pb2.Tick(
                    symbol=symbol,
                    ts=timestamp(START + dt.timedelta(milliseconds=n * 7)),
                    bid=round(mid, 6),
                    ask=round(mid + 0.0001, 6),
                )
            )
        batches.append(batch)
    return batches


def stored_ticks(database_url: str) -> tuple[int, set[tuple[str, dt.datetime, float, float]]]:
    engine = db.create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(ingest_ticks)).scalar_one()
            rows = conn.execute(
                select(ingest_ticks.c.symbol, ingest_ticks.c.ts, ingest_ticks.c.bid, ingest_ticks.c.ask)
            )
            return int(total), {(r.symbol, r.ts, r.bid, r.ask) for r in rows}
    finally:
        engine.dispose()


def sent_keys(batches: list[list[market_pb2.Tick]]) -> set[tuple[str, dt.datetime, float, float]]:
    return {(t.symbol, t.ts.ToDatetime(dt.UTC), t.bid, t.ask) for b in batches for t in b}


async def test_stream_ticks_client_killed_midstream_resends_and_stores_each_tick_once(
    ingest: ServiceProcess, database_url: str
) -> None:
    batches = make_batches(40, 50)
    acked = 0
    async with grpc.aio.insecure_channel(ingest.address) as channel:

        async def first_session() -> AsyncIterator[pb.StreamTicksRequest]:
            for seq, ticks in enumerate(batches, start=1):
                yield pb.StreamTicksRequest(source_id="feed-1", sequence=seq, ticks=ticks)
                await asyncio.sleep(0)

        call = pb_grpc.IngestServiceStub(channel).StreamTicks(
            first_session(), metadata=api_key_metadata(API_KEY)
        )
        async for _ack in call:
            acked += 1
            if acked == 10:
                call.cancel()  # the client dies with batches in flight and unacknowledged
                break
    report = await TickStreamer(ingest.address, API_KEY, "feed-1").send(batches)
    total, keys = stored_ticks(database_url)
    assert report.batches_acked == 40
    assert report.batches_replayed >= 10
    assert total == 40 * 50
    assert keys == sent_keys(batches)


async def test_stream_ticks_server_killed_midstream_resumes_and_stores_each_tick_once(
    ingest: ServiceProcess, database_url: str
) -> None:
    batches = make_batches(300, 100)
    streamer = TickStreamer(ingest.address, API_KEY, "feed-2", backoff_seconds=0.05, max_reconnects=50)
    engine = db.create_db_engine(database_url)

    def count() -> int:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(ingest_ticks)).scalar_one())

    sent = asyncio.Event()

    async def chaos() -> None:
        seen = 0
        for _ in range(2):
            # Each kill lands mid-stream: once more ticks are stored than before it.
            while (stored := await asyncio.to_thread(count)) <= seen:
                if sent.is_set():
                    return
                await asyncio.sleep(0.01)
            ingest.kill()  # SIGKILL: whatever was in flight is lost unless committed
            seen = stored
            await asyncio.to_thread(ingest.start)

    try:
        chaos_task = asyncio.create_task(chaos())
        report = await streamer.send(batches)
        sent.set()
        await chaos_task
    finally:
        engine.dispose()
    total, keys = stored_ticks(database_url)
    assert report.reconnects >= 1
    assert total == 300 * 100
    assert keys == sent_keys(batches)


async def test_stream_ticks_bad_batch_acks_prefix_then_names_field(
    ingest: ServiceProcess, database_url: str
) -> None:
    good = make_batches(2, 3)
    bad = [market_pb2.Tick(symbol="EURUSD", ts=timestamp(START), bid=1.1, ask=1.0)]

    async def requests() -> AsyncIterator[pb.StreamTicksRequest]:
        for seq, ticks in enumerate([*good, bad, *make_batches(1, 3, seed=9)], start=1):
            yield pb.StreamTicksRequest(source_id="feed-3", sequence=seq, ticks=ticks)

    acks = []
    async with grpc.aio.insecure_channel(ingest.address) as channel:
        call = pb_grpc.IngestServiceStub(channel).StreamTicks(requests(), metadata=api_key_metadata(API_KEY))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for ack in call:
                acks.append(ack.sequence)
    assert acks == [1, 2]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ticks[0].ask" in (info.value.details() or "")
    assert stored_ticks(database_url)[0] == 6


async def test_subscribe_ticks_from_cursor_replays_stored_then_live_without_gap(
    ingest: ServiceProcess,
) -> None:
    batches = make_batches(3, 10)
    await TickStreamer(ingest.address, API_KEY, "feed-4").send(batches[:2])
    channel = open_channel(ingest.address, API_KEY)
    stub = pb_grpc.IngestServiceStub(channel)
    received: list[pb.CursorTick] = []
    call = stub.SubscribeTicks(pb.SubscribeTicksRequest(from_cursor=0))

    async def read(n: int) -> None:
        async for page in call:
            assert page.cursor == page.ticks[-1].cursor
            received.extend(page.ticks)
            if len(received) >= n:
                return

    await asyncio.wait_for(read(20), 10)
    live = asyncio.create_task(read(30))
    await TickStreamer(ingest.address, API_KEY, "feed-4").send(batches[2:], first_sequence=3)
    await asyncio.wait_for(live, 10)
    call.cancel()
    assert [r.tick for r in received] == [t for b in batches for t in b]
    cursors = [r.cursor for r in received]
    assert cursors == sorted(set(cursors))
    resumed = stub.SubscribeTicks(pb.SubscribeTicksRequest(from_cursor=cursors[14]))
    tail: list[pb.CursorTick] = []
    async for page in resumed:
        tail.extend(page.ticks)
        if len(tail) >= 15:
            break
    resumed.cancel()
    assert [r.cursor for r in tail] == cursors[15:]
    await channel.close()


async def test_ingest_calls_without_or_with_wrong_key_are_unauthenticated(ingest: ServiceProcess) -> None:
    request = pb.IngestTicksRequest(ticks=make_batches(1, 1)[0])
    async with grpc.aio.insecure_channel(ingest.address) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        for metadata in [(), (("x-api-key", "wrong-key-0123456789"),)]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.IngestTicks(request, metadata=metadata, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_status(ingest.address) == health_pb2.HealthCheckResponse.SERVING


def test_ingest_database_unreachable_reports_not_serving_and_stays_up(tmp_path: pathlib.Path) -> None:
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    service = make_service("ingest", dead, tmp_path).start(wait_serving=False)
    try:
        wait_until(
            lambda: grpc_status(service.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
            30,
            what="NOT_SERVING",
        )
        assert service.proc is not None
        assert service.proc.poll() is None
    finally:
        service.kill()


def test_ingest_sigterm_stops_cleanly_with_exit_zero(ingest: ServiceProcess) -> None:
    assert ingest.terminate() == 0


async def test_ingest_metrics_endpoint_counts_stored_and_duplicate_ticks(tmp_path: pathlib.Path) -> None:
    port = free_port()
    service = make_service(
        "ingest", f"sqlite:///{tmp_path / 'm.db'}", tmp_path, {"INGEST_METRICS_PORT": str(port)}
    ).start()
    try:
        batch = make_batches(1, 5)[0]
        async with open_channel(service.address, API_KEY) as channel:
            stub = pb_grpc.IngestServiceStub(channel)
            await stub.IngestTicks(pb.IngestTicksRequest(ticks=batch))
            await stub.IngestTicks(pb.IngestTicksRequest(ticks=batch[:2]))
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("mt5_ingest_items_total", (("kind", "ticks"), ("status", "received")))] == 5
        assert samples[("mt5_ingest_items_total", (("kind", "ticks"), ("status", "duplicate")))] == 2
        assert samples[("mt5_ingest_commit_seconds_count", ())] >= 2
    finally:
        service.kill()

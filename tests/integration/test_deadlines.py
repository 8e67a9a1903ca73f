"""Deadlines into a stalled database: the caller's deadline ends the work, not only the wait for it.

A test transaction holds ``LOCK TABLE ... IN ACCESS EXCLUSIVE MODE`` (PostgreSQL) or the write
lock (SQLite) while calls with short deadlines come in. Each test checks what happens after the
caller has gone: nothing of its work is written once the lock is released, no statement of it is
left waiting in the database, and the threads it used are free for the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import pathlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import grpc
import pytest
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_grpc
from mt5.ingest.v1 import ingest_service_pb2 as ingest_pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from mt5.market.v1 import market_pb2
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from services.aggregator.store import AggregatorStore
from services.common import db, protoconv
from services.common.market import Candle, Timeframe
from services.ingest.commits import CommitQueue
from services.ingest.domain import CandleStatus
from services.ingest.store import IngestStore, TickBatch, TickBatchResult
from tests import helpers

TS = dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC)
METADATA = (("x-api-key", helpers.API_KEY),)


def candle(symbol: str) -> Candle:
    return Candle(symbol, Timeframe.M1, TS, 1.0855, 1.0857, 1.0854, 1.0856, 150.0, 2.0)


class RecordingStore(IngestStore):
    """The real store, remembering the symbols of each commit it was asked for."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.commits: list[list[str]] = []

    def commit(
        self,
        tick_batches: Sequence[TickBatch],
        candle_batches: Sequence[Sequence[Candle]],
        traceparent: str | None = None,
        *,
        timeout: float | None = None,
        interrupt: db.Interrupt | None = None,
    ) -> tuple[list[TickBatchResult], list[list[CandleStatus]]]:
        self.commits.append([c.symbol for batch in candle_batches for c in batch])
        return super().commit(tick_batches, candle_batches, traceparent, timeout=timeout, interrupt=interrupt)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with helpers.postgres_database() as url:
        yield url


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    engine = db.create_db_engine(pg_url)
    db.migrate(engine)
    yield engine
    engine.dispose()


def candles_of(engine: Engine, symbol: str) -> int:
    return len(IngestStore(engine).candles_between(symbol, TS, TS + dt.timedelta(minutes=1)))


async def eventually(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(queue: CommitQueue) -> AsyncIterator[None]:
    task = asyncio.create_task(queue.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the group-commit writer, PostgreSQL ---------------------------------------------------------


@pytest.mark.postgres
async def test_commit_caller_deadline_during_stalled_commit_rolled_back_nothing_left_waiting(
    engine: Engine, pg_url: str
) -> None:
    store = RecordingStore(engine)
    queue = CommitQueue(store)
    async with running(queue):
        with helpers.table_locked(pg_url, "ingest_candles"):
            call = asyncio.create_task(queue.submit_candles([candle("GONE")], 0.2))
            await eventually(lambda: helpers.lock_waiters(pg_url) == 1, 5, "the commit to wait on the lock")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(call, 0.2)
            await eventually(lambda: helpers.lock_waiters(pg_url) == 0, 1, "the commit to be cancelled")
        # The commit path is free: the next call is committed at once.
        assert await asyncio.wait_for(queue.submit_candles([candle("NEXT")], 5), 5) == [CandleStatus.INSERTED]
    assert (candles_of(engine, "GONE"), candles_of(engine, "NEXT")) == (0, 1)
    assert store.commits == [["GONE"], ["NEXT"]]


@pytest.mark.postgres
async def test_commit_caller_without_deadline_disconnects_during_stalled_commit_nothing_written(
    engine: Engine, pg_url: str
) -> None:
    # A REST caller through the gateway has no deadline of its own: its disconnect cancels the call.
    queue = CommitQueue(IngestStore(engine))
    async with running(queue):
        with helpers.table_locked(pg_url, "ingest_candles"):
            call = asyncio.create_task(queue.submit_candles([candle("HUNGUP")]))
            await eventually(lambda: helpers.lock_waiters(pg_url) == 1, 5, "the commit to wait on the lock")
            call.cancel()
            await eventually(lambda: helpers.lock_waiters(pg_url) == 0, 1, "the commit to be cancelled")
        await asyncio.wait_for(queue.submit_candles([candle("NEXT")]), 5)
    assert (candles_of(engine, "HUNGUP"), candles_of(engine, "NEXT")) == (0, 1)


@pytest.mark.postgres
async def test_commit_one_caller_of_group_leaves_midcommit_others_recommitted_without_its_rows(
    engine: Engine, pg_url: str
) -> None:
    store = RecordingStore(engine)
    queue = CommitQueue(store)
    async with contextlib.AsyncExitStack() as writer:
        with helpers.table_locked(pg_url, "ingest_candles"):
            leaving = asyncio.create_task(queue.submit_candles([candle("LEFT")], 10))
            staying = asyncio.create_task(queue.submit_candles([candle("STAYED")], 10))
            await asyncio.sleep(0.05)  # both queued before the writer starts: one group
            await writer.enter_async_context(running(queue))
            await eventually(lambda: helpers.lock_waiters(pg_url) == 1, 5, "the group to wait on the lock")
            leaving.cancel()
            await eventually(lambda: len(store.commits) == 2, 2, "the group to be committed again")
            await eventually(lambda: helpers.lock_waiters(pg_url) == 1, 2, "the retry to wait on the lock")
            assert not staying.done()
        assert await asyncio.wait_for(staying, 5) == [CandleStatus.INSERTED]
    assert store.commits == [["LEFT", "STAYED"], ["STAYED"]]
    assert (candles_of(engine, "LEFT"), candles_of(engine, "STAYED")) == (0, 1)


@pytest.mark.postgres
async def test_commit_bounded_by_latest_deadline_of_group_even_if_nobody_cancels(
    engine: Engine, pg_url: str
) -> None:
    # The statement timeout is the database's own bound, in case the event loop cannot cancel.
    store = IngestStore(engine)
    with helpers.table_locked(pg_url, "ingest_candles"):
        with pytest.raises(OperationalError, match="statement timeout"):
            await asyncio.to_thread(store.commit, [], [[candle("BOUNDED")]], None, timeout=0.2)
        assert helpers.lock_waiters(pg_url) == 0
    assert candles_of(engine, "BOUNDED") == 0


# --- the group-commit writer, SQLite -------------------------------------------------------------


@pytest.fixture
def sqlite_engine(tmp_path: pathlib.Path) -> Iterator[tuple[Engine, str]]:
    url = helpers.sqlite_url(tmp_path)
    engine = db.create_db_engine(url)
    db.migrate(engine)
    yield engine, url.removeprefix("sqlite:///")
    engine.dispose()


@contextlib.contextmanager
def sqlite_write_locked(path: str) -> Iterator[None]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


async def test_sqlite_commit_caller_deadline_while_write_locked_nothing_written_writer_free(
    sqlite_engine: tuple[Engine, str],
) -> None:
    engine, path = sqlite_engine
    store = RecordingStore(engine)
    queue = CommitQueue(store)
    async with running(queue):
        with sqlite_write_locked(path):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(queue.submit_candles([candle("GONE")], 0.2), 0.2)
            # The wait for the lock is bounded by the deadline: the writer comes back while the lock
            # is still held, and takes the next call.
            nxt = asyncio.create_task(queue.submit_candles([candle("NEXT")], 10))
            await eventually(lambda: len(store.commits) == 2, 5, "the writer to take the next call")
        assert await asyncio.wait_for(nxt, 10) == [CandleStatus.INSERTED]
    assert (candles_of(engine, "GONE"), candles_of(engine, "NEXT")) == (0, 1)


async def test_sqlite_commit_caller_without_deadline_leaves_while_write_locked_nothing_written(
    sqlite_engine: tuple[Engine, str],
) -> None:
    # SQLite cannot interrupt a wait for its lock: the transaction is rolled back once it gets it.
    engine, path = sqlite_engine
    queue = CommitQueue(IngestStore(engine))
    async with running(queue):
        with sqlite_write_locked(path), pytest.raises(TimeoutError):
            await asyncio.wait_for(queue.submit_candles([candle("GONE")]), 0.2)
        assert await asyncio.wait_for(queue.submit_candles([candle("NEXT")]), 10) == [CandleStatus.INSERTED]
    assert (candles_of(engine, "GONE"), candles_of(engine, "NEXT")) == (0, 1)


# --- bounded reads -------------------------------------------------------------------------------


def _stored_bars(store: AggregatorStore) -> object:
    return store.candles("EURUSD", Timeframe.M1, None, None, 10)


@pytest.mark.postgres
async def test_reads_past_deadline_into_locked_table_leave_no_statement_and_free_executor(
    engine: Engine, pg_url: str
) -> None:
    store = AggregatorStore(engine)
    calls = db.READ_THREADS + 2  # more than the read executor has threads
    with helpers.table_locked(pg_url, "agg_candles"):
        reads = [asyncio.wait_for(db.read(0.2, _stored_bars, store), 0.2) for _ in range(calls)]
        results = await asyncio.gather(*reads, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        await eventually(lambda: helpers.lock_waiters(pg_url) == 0, 1, "the reads to give up")
        # While the lock is still held, the read threads are free for other reads.
        assert await asyncio.wait_for(db.read(2.0, store.cursors), 2) == {}
    assert await asyncio.wait_for(db.read(2.0, _stored_bars, store), 2) == []


@pytest.mark.postgres
async def test_read_without_deadline_whose_caller_leaves_is_interrupted(engine: Engine, pg_url: str) -> None:
    store = AggregatorStore(engine)
    with helpers.table_locked(pg_url, "agg_candles"):
        read = asyncio.create_task(db.read(None, _stored_bars, store))
        await eventually(lambda: helpers.lock_waiters(pg_url) == 1, 5, "the read to wait on the lock")
        read.cancel()
        await eventually(lambda: helpers.lock_waiters(pg_url) == 0, 1, "the read to be interrupted")


def _statement_timeout(engine: Engine) -> str:
    with db.reading(engine) as conn:
        return str(conn.exec_driver_sql("SHOW statement_timeout").scalar())


@pytest.mark.postgres
async def test_reading_bounded_only_inside_db_read_with_deadline(engine: Engine) -> None:
    assert _statement_timeout(engine) == "0"
    assert await db.read(None, _statement_timeout, engine) == "0"
    assert await db.read(3.0, _statement_timeout, engine) != "0"


# --- through the services' gRPC servers ----------------------------------------------------------


@pytest.fixture
def pipeline(pg_url: str, tmp_path: pathlib.Path) -> Iterator[list[helpers.ServiceProcess]]:
    with helpers.pipeline(pg_url, tmp_path, "aggregator") as started:
        yield started


def _candles_request(symbol: str) -> ingest_pb.IngestCandlesRequest:
    item = market_pb2.Candle(
        symbol=symbol,
        timeframe=market_pb2.M1,
        ts=protoconv.timestamp(TS),
        open=1.0855,
        high=1.0857,
        low=1.0854,
        close=1.0856,
        volume=150,
        spread=2,
    )
    return ingest_pb.IngestCandlesRequest(items=[item])


@pytest.mark.postgres
def test_ingest_200ms_deadline_into_stalled_commit_deadline_exceeded_in_time_nothing_written(
    pipeline: list[helpers.ServiceProcess], pg_url: str
) -> None:
    ingest = pipeline[0]
    with grpc.insecure_channel(ingest.address) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        stub.CheckHealth(ingest_pb.CheckHealthRequest(), timeout=5)  # connected before the clock starts
        with helpers.table_locked(pg_url, "ingest_candles"):
            started = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                stub.IngestCandles(_candles_request("STALLED"), metadata=METADATA, timeout=0.2)
            elapsed = time.perf_counter() - started
            time.sleep(0.3)
            still_waiting = helpers.lock_waiters(pg_url)
        reply = stub.IngestCandles(_candles_request("AFTER"), metadata=METADATA, timeout=5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 0.25, f"{elapsed * 1000:.0f} ms"
    assert still_waiting == 0
    assert (reply.ok, reply.inserted) == (True, 1)
    engine = db.create_db_engine(pg_url)
    try:
        assert (candles_of(engine, "STALLED"), candles_of(engine, "AFTER")) == (0, 1)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_get_candles_deadlines_into_locked_table_leave_no_statement_service_stays_serving(
    pipeline: list[helpers.ServiceProcess], pg_url: str
) -> None:
    aggregator = pipeline[1]
    request = agg_pb.GetCandlesRequest(symbol="EURUSD", timeframe=market_pb2.M1)
    with grpc.insecure_channel(aggregator.address) as channel:
        stub = agg_grpc.AggregatorServiceStub(channel)
        stub.GetCandles(request, metadata=METADATA, timeout=5)  # connected before the clock starts
        with helpers.table_locked(pg_url, "agg_candles"):
            futures = [
                stub.GetCandles.future(request, metadata=METADATA, timeout=0.2)
                for _ in range(db.READ_THREADS + 2)
            ]
            codes = []
            for future in futures:
                with pytest.raises(grpc.RpcError) as info:
                    future.result()
                codes.append(info.value.code())
            time.sleep(0.3)
            still_waiting = helpers.lock_waiters(pg_url)
            serving = helpers.grpc_status(aggregator.address)
        reply = stub.GetCandles(request, metadata=METADATA, timeout=5)
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * len(futures)
    assert still_waiting == 0
    assert serving == 1  # SERVING: the readiness probe was not queued behind stalled reads
    assert list(reply.bars) == []

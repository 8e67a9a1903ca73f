"""Ingest's storage on real SQLite and real PostgreSQL: exactly once, cursors in commit order."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, func, select

from services.common import db
from services.common.market import Candle, Tick, Timeframe
from services.common.schema import ingest_candle_log, ingest_candles, ingest_ticks, metadata
from services.ingest.domain import CandleStatus, TickStatus
from services.ingest.store import IngestStore, TickBatch

T0 = dt.datetime(2025, 10, 20, 3, 1, 10, 123000, tzinfo=dt.UTC)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = db.create_db_engine(database_url)
    db.migrate(engine)
    yield engine
    engine.dispose()


def ticks(n: int, symbol: str = "EURUSD", start: int = 0) -> list[Tick]:
    return [
        Tick(symbol, T0 + dt.timedelta(milliseconds=i), 1.0 + i * 1e-5, 1.0001 + i * 1e-5)
        for i in range(start, start + n)
    ]


def count(engine: Engine, table: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_migrations_match_schema_module(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_migrate_twice_is_a_no_op(engine: Engine) -> None:
    db.migrate(engine)
    assert count(engine, ingest_ticks) == 0


def test_commit_ticks_same_batch_twice_stores_once(engine: Engine) -> None:
    store = IngestStore(engine)
    batch = TickBatch(ticks(100))
    first, _ = store.commit([batch], [])
    again, _ = store.commit([batch], [])
    assert first[0].statuses == [TickStatus.RECEIVED] * 100
    assert again[0].statuses == [TickStatus.DUPLICATE] * 100
    assert count(engine, ingest_ticks) == 100


def test_commit_ticks_duplicate_inside_one_request_is_reported_duplicate(engine: Engine) -> None:
    tick = ticks(1)[0]
    (result,), _ = IngestStore(engine).commit([TickBatch([tick, tick])], [])
    assert result.statuses == [TickStatus.RECEIVED, TickStatus.DUPLICATE]
    assert count(engine, ingest_ticks) == 1


def test_commit_ticks_resent_source_sequence_is_replayed_not_applied(engine: Engine) -> None:
    store = IngestStore(engine)
    store.commit([TickBatch(ticks(10), "feed-a", 1)], [])
    # Same source and sequence with different ticks: recognised by (source, sequence), not by content.
    (result,), _ = store.commit([TickBatch(ticks(10, start=50), "feed-a", 1)], [])
    assert result.replayed
    assert count(engine, ingest_ticks) == 10


def test_commit_ticks_earlier_sequence_after_later_one_is_still_applied(engine: Engine) -> None:
    store = IngestStore(engine)
    store.commit([TickBatch(ticks(5, start=5), "feed-a", 2)], [])
    (result,), _ = store.commit([TickBatch(ticks(5), "feed-a", 1)], [])
    assert not result.replayed
    assert count(engine, ingest_ticks) == 10


def test_commit_ticks_group_of_batches_preserves_cursor_order(engine: Engine) -> None:
    store = IngestStore(engine)
    store.commit([TickBatch(ticks(3, "B")), TickBatch(ticks(3, "A")), TickBatch(ticks(2, "C"))], [])
    stored = store.ticks_after(0, [], 100)
    assert [s.tick.symbol for s in stored] == ["B"] * 3 + ["A"] * 3 + ["C"] * 2
    assert [s.cursor for s in stored] == sorted(s.cursor for s in stored)
    assert stored[0].tick == ticks(3, "B")[0]


def test_ticks_after_cursor_and_symbol_filter_returns_only_later_ticks(engine: Engine) -> None:
    store = IngestStore(engine)
    store.commit([TickBatch(ticks(5, "A") + ticks(5, "B"))], [])
    everything = store.ticks_after(0, [], 100)
    later = store.ticks_after(everything[3].cursor, ["A"], 100)
    assert [s.tick for s in later] == ticks(5, "A")[4:]


def candle(close: float, symbol: str = "EURUSD") -> Candle:
    return Candle(
        symbol,
        Timeframe.M1,
        dt.datetime(2025, 10, 20, 3, tzinfo=dt.UTC),
        1.0855,
        1.0857,
        1.0854,
        close,
        150,
        2,
    )


def test_commit_candles_insert_duplicate_update_are_reported_and_logged(engine: Engine) -> None:
    store = IngestStore(engine)
    _, (first,) = store.commit([], [[candle(1.0856), candle(1.0856, "GBPUSD")]])
    _, (second,) = store.commit([], [[candle(1.0856), candle(1.0855, "GBPUSD")]])
    assert first == [CandleStatus.INSERTED, CandleStatus.INSERTED]
    assert second == [CandleStatus.DUPLICATE, CandleStatus.UPDATED]
    assert count(engine, ingest_candles) == 2
    changes = store.candles_after(0, [], [], 100)
    assert [(c.candle.symbol, c.revision) for c in changes] == [("EURUSD", 0), ("GBPUSD", 0), ("GBPUSD", 1)]
    assert changes[-1].candle.close == 1.0855
    assert count(engine, ingest_candle_log) == 3


def test_candles_after_timeframe_filter_excludes_other_timeframes(engine: Engine) -> None:
    store = IngestStore(engine)
    h1 = Candle("EURUSD", Timeframe.H1, dt.datetime(2025, 10, 20, 3, tzinfo=dt.UTC), 1, 2, 0.5, 1.5, 1, 1)
    store.commit([], [[candle(1.0856), h1]])
    assert [c.candle for c in store.candles_after(0, [], [Timeframe.H1], 10)] == [h1]


def test_commit_failure_after_ticks_written_rolls_back_whole_group(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = IngestStore(engine)

    def fail(*_args: object) -> None:
        raise RuntimeError("injected failure after the tick insert")

    monkeypatch.setattr(store, "_commit_candles", fail)
    with pytest.raises(RuntimeError, match="injected"):
        store.commit([TickBatch(ticks(3), "feed-a", 1)], [[candle(1.0856)]])
    assert count(engine, ingest_ticks) == 0
    monkeypatch.undo()
    # The batch was never committed, so re-sending it applies it (it is not mistaken for a replay).
    (result,), _ = store.commit([TickBatch(ticks(3), "feed-a", 1)], [])
    assert not result.replayed
    assert count(engine, ingest_ticks) == 3

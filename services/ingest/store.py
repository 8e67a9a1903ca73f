"""Ingest's storage adapter: one transaction per group of requests, exactly-once by natural keys.

Commits are serialized (one writer per process, and a PostgreSQL advisory lock across replicas),
so the ids that tables assign grow in commit order and serve as the feeds' durable cursors.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import ARRAY, Connection, Engine, String, and_, func, select, tuple_, type_coerce

from services.common import db
from services.common.market import Candle, Tick, Timeframe
from services.common.schema import (
    UtcDateTime,
    ingest_candle_log,
    ingest_candles,
    ingest_source_batches,
    ingest_ticks,
)
from services.ingest.domain import CandleStatus, TickStatus, classify_candles, tick_statuses

# Same idea as the migration lock: any constant shared by every ingest replica.
WRITE_LOCK_KEY = 0x6D7435_77726974
_KEY_CHUNK = 500  # keys per IN (...) lookup; keeps SQLite under its bound-parameter limit

_T = TypeVar("_T")
TickKey = tuple[str, dt.datetime, float, float]


@dataclasses.dataclass(frozen=True, slots=True)
class TickBatch:
    """Ticks to store together; streamed batches name their source and sequence."""

    ticks: Sequence[Tick]
    source_id: str | None = None
    sequence: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TickBatchResult:
    """Per-tick outcome of a batch, and whether the whole batch was a re-send."""

    statuses: list[TickStatus]
    replayed: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class StoredTick:
    """A committed tick and its cursor."""

    cursor: int
    tick: Tick
    traceparent: str | None = None  # of the commit that stored it, when traced


@dataclasses.dataclass(frozen=True, slots=True)
class StoredCandleChange:
    """A committed candle version and its cursor."""

    cursor: int
    candle: Candle
    revision: int
    traceparent: str | None = None  # of the commit that stored it, when traced


class IngestStore:
    """Reads and writes ingest's tables through one SQLAlchemy engine (sync; run it in a thread).

    Reads are bounded by the deadline of the ``db.read()`` that runs them (``db.reading``).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._insert = db.dialect_insert(engine)

    def commit(
        self,
        tick_batches: Sequence[TickBatch],
        candle_batches: Sequence[Sequence[Candle]],
        traceparent: str | None = None,
        *,
        timeout: float | None = None,
        interrupt: db.Interrupt | None = None,
    ) -> tuple[list[TickBatchResult], list[list[CandleStatus]]]:
        """Store every batch in one transaction and say what happened to each item.

        ``traceparent`` (the commit's trace context) is stored with the ticks and candle changes.
        ``timeout`` (what the callers have left, in seconds) bounds the transaction's statements;
        ``interrupt`` stops it, rolled back, once its callers have gone (see ``db.write_transaction``).
        """
        with db.write_transaction(self._engine, WRITE_LOCK_KEY, timeout=timeout, interrupt=interrupt) as conn:
            tick_results = self._commit_ticks(conn, tick_batches, traceparent) if tick_batches else []
            candle_results = self._commit_candles(conn, candle_batches, traceparent) if candle_batches else []
        return tick_results, candle_results

    # --- ticks -------------------------------------------------------------------------------

    def _commit_ticks(
        self, conn: Connection, batches: Sequence[TickBatch], traceparent: str | None
    ) -> list[TickBatchResult]:
        sourced = [
            (b.source_id, b.sequence) for b in batches if b.source_id is not None and b.sequence is not None
        ]
        committed = self._committed_batches(conn, sourced)
        fresh: list[TickBatch] = []
        seen: set[tuple[str, int]] = set()
        replayed: list[bool] = []
        for batch in batches:
            ident = (batch.source_id, batch.sequence) if batch.source_id is not None else None
            is_replay = ident is not None and (ident in committed or ident in seen)
            replayed.append(is_replay)
            if ident is not None and batch.sequence is not None and batch.source_id is not None:
                seen.add((batch.source_id, batch.sequence))
            if not is_replay:
                fresh.append(batch)
        rows = [(t, b.source_id) for b in fresh for t in b.ticks]
        inserted = (
            self._insert_ticks_copy(conn, rows, traceparent)
            if self._postgres
            else self._insert_ticks(conn, rows, traceparent)
        )
        new_batches = [b for b in fresh if b.source_id is not None]
        if new_batches:
            now = dt.datetime.now(dt.UTC)
            conn.execute(
                ingest_source_batches.insert(),
                [
                    {
                        "source_id": b.source_id,
                        "sequence": b.sequence,
                        "ticks": len(b.ticks),
                        "committed_at": now,
                    }
                    for b in new_batches
                ],
            )
        fresh_ticks = [t for b in fresh for t in b.ticks]
        statuses = iter(
            [TickStatus.RECEIVED] * len(fresh_ticks)
            if inserted is None
            else tick_statuses(fresh_ticks, inserted)
        )
        results: list[TickBatchResult] = []
        for batch, was_replay in zip(batches, replayed, strict=True):
            if was_replay:
                results.append(TickBatchResult([TickStatus.DUPLICATE] * len(batch.ticks), replayed=True))
            else:
                results.append(TickBatchResult([next(statuses) for _ in batch.ticks]))
        return results

    def _committed_batches(self, conn: Connection, idents: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        found: set[tuple[str, int]] = set()
        t = ingest_source_batches
        for chunk in _chunks(idents, _KEY_CHUNK):
            query = select(t.c.source_id, t.c.sequence).where(tuple_(t.c.source_id, t.c.sequence).in_(chunk))
            found.update((row.source_id, row.sequence) for row in conn.execute(query))
        return found

    def _insert_ticks(
        self, conn: Connection, rows: Sequence[tuple[Tick, str | None]], traceparent: str | None
    ) -> set[TickKey]:
        if not rows:
            return set()
        t = ingest_ticks
        stmt = (
            self._insert(t)
            .on_conflict_do_nothing(index_elements=[t.c.symbol, t.c.ts, t.c.bid, t.c.ask])
            .returning(t.c.symbol, t.c.ts, t.c.bid, t.c.ask)
        )
        params = [
            {
                "symbol": tick.symbol,
                "ts": tick.ts,
                "bid": tick.bid,
                "ask": tick.ask,
                "volume": tick.volume,
                "source_id": source,
                "traceparent": traceparent,
            }
            for tick, source in rows
        ]
        result = conn.execute(stmt, params)
        return {(r.symbol, r.ts, r.bid, r.ask) for r in result}

    def _insert_ticks_copy(
        self, conn: Connection, rows: Sequence[tuple[Tick, str | None]], traceparent: str | None
    ) -> set[TickKey] | None:
        """PostgreSQL: binary COPY into a session staging table, then one deduplicating INSERT.

        Returns the keys of the rows stored, or None when all of them were.
        """
        if not rows:
            return set()
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur:
            # Every time, not once per connection: a rolled-back transaction also rolls back the
            # creation, so a remembered "created" flag could be wrong.
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS ingest_ticks_stage (ord int4, symbol text, "
                "ts timestamptz, bid float8, ask float8, volume float8, source_id text) "
                "ON COMMIT DELETE ROWS"
            )
            # The commit's trace context is one value for all its rows: a constant in the INSERT,
            # not a column of the COPY.
            with cur.copy(
                "COPY ingest_ticks_stage (ord, symbol, ts, bid, ask, volume, source_id) "
                "FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int4", "text", "timestamptz", "float8", "float8", "float8", "text"])
                for ordinal, (tick, source) in enumerate(rows):
                    copy.write_row((ordinal, tick.symbol, tick.ts, tick.bid, tick.ask, tick.volume, source))
            # ORDER BY keeps ids (cursors) in request order. Only ids come back: when every row was
            # new (the common case) nothing else needs decoding inside the transaction.
            cur.execute(
                "INSERT INTO ingest_ticks (symbol, ts, bid, ask, volume, source_id, traceparent) "
                "SELECT symbol, ts, bid, ask, volume, source_id, %s::text "
                "FROM ingest_ticks_stage ORDER BY ord "
                "ON CONFLICT (symbol, ts, bid, ask) DO NOTHING RETURNING id",
                (traceparent,),
            )
            ids = [row[0] for row in cur.fetchall()]
            if len(ids) == len(rows):
                return None
            cur.execute("SELECT symbol, ts, bid, ask FROM ingest_ticks WHERE id = ANY(%s)", (ids,))
            return {(s, ts.astimezone(dt.UTC), bid, ask) for s, ts, bid, ask in cur.fetchall()}

    # --- candles -----------------------------------------------------------------------------

    def _commit_candles(
        self, conn: Connection, batches: Sequence[Sequence[Candle]], traceparent: str | None
    ) -> list[list[CandleStatus]]:
        candles = [c for batch in batches for c in batch]
        stored = self._stored_candles(conn, {c.key for c in candles})
        statuses = classify_candles(candles, {k: v[0] for k, v in stored.items()})
        revisions = {k: v[1] for k, v in stored.items()}
        latest: dict[tuple[str, Timeframe, dt.datetime], dict[str, Any]] = {}
        log: list[dict[str, Any]] = []
        now = dt.datetime.now(dt.UTC)
        for candle, status in zip(candles, statuses, strict=True):
            if status is CandleStatus.DUPLICATE:
                continue
            revision = revisions[candle.key] + 1 if candle.key in revisions else 0
            revisions[candle.key] = revision
            row = _candle_row(candle) | {"revision": revision}
            log.append(row | {"traceparent": traceparent})
            latest[candle.key] = row | {"updated_at": now}
        if latest:
            db.upsert(conn, ingest_candles, list(latest.values()))
            conn.execute(ingest_candle_log.insert(), log)
        result: list[list[CandleStatus]] = []
        position = 0
        for batch in batches:
            result.append(statuses[position : position + len(batch)])
            position += len(batch)
        return result

    def _stored_candles(
        self, conn: Connection, keys: Iterable[tuple[str, Timeframe, dt.datetime]]
    ) -> dict[tuple[str, Timeframe, dt.datetime], tuple[tuple[float, ...], int]]:
        t = ingest_candles
        found: dict[tuple[str, Timeframe, dt.datetime], tuple[tuple[float, ...], int]] = {}
        wanted = sorted((s, tf.name, ts) for s, tf, ts in keys)
        if self._postgres and wanted:
            # A join on unnest()ed arrays: PostgreSQL plans a long (a, b, c) IN (...) list slowly.
            symbols, timeframes, times = (list(column) for column in zip(*wanted, strict=True))
            keyset = select(
                func.unnest(type_coerce(symbols, ARRAY(String()))).label("symbol"),
                func.unnest(type_coerce(timeframes, ARRAY(String()))).label("timeframe"),
                func.unnest(type_coerce(times, ARRAY(UtcDateTime()))).label("ts"),
            ).subquery()
            query = select(t).join(
                keyset,
                and_(
                    t.c.symbol == keyset.c.symbol, t.c.timeframe == keyset.c.timeframe, t.c.ts == keyset.c.ts
                ),
            )
            chunks: Iterable[Any] = [query]
        else:
            chunks = (
                select(t).where(tuple_(t.c.symbol, t.c.timeframe, t.c.ts).in_(chunk))
                for chunk in _chunks(wanted, _KEY_CHUNK)
            )
        for query in chunks:
            for row in conn.execute(query):
                key = (row.symbol, Timeframe[row.timeframe], row.ts)
                found[key] = ((row.open, row.high, row.low, row.close, row.volume, row.spread), row.revision)
        return found

    # --- feeds -------------------------------------------------------------------------------

    def ticks_after(self, cursor: int, symbols: Sequence[str], limit: int) -> list[StoredTick]:
        """Committed ticks with a cursor above ``cursor``, in cursor order."""
        t = ingest_ticks
        query = select(t.c.id, t.c.symbol, t.c.ts, t.c.bid, t.c.ask, t.c.volume, t.c.traceparent).where(
            t.c.id > cursor
        )
        if symbols:
            query = query.where(t.c.symbol.in_(symbols))
        with db.reading(self._engine) as conn:
            rows = conn.execute(query.order_by(t.c.id).limit(limit))
            return [
                StoredTick(r.id, Tick(r.symbol, r.ts, r.bid, r.ask, r.volume), r.traceparent) for r in rows
            ]

    def ticks_between(self, symbol: str, start: dt.datetime, end: dt.datetime) -> list[StoredTick]:
        """Committed ticks of a symbol with ``start <= ts < end``, in cursor (arrival) order."""
        t = ingest_ticks
        query = (
            select(t.c.id, t.c.symbol, t.c.ts, t.c.bid, t.c.ask, t.c.volume)
            .where(t.c.symbol == symbol, t.c.ts >= start, t.c.ts < end)
            .order_by(t.c.id)
        )
        with db.reading(self._engine) as conn:
            return [
                StoredTick(r.id, Tick(r.symbol, r.ts, r.bid, r.ask, r.volume)) for r in conn.execute(query)
            ]

    def candles_between(self, symbol: str, start: dt.datetime, end: dt.datetime) -> list[Candle]:
        """Stored EA candles (latest versions) of a symbol with ``start <= ts < end``."""
        t = ingest_candles
        query = select(t).where(t.c.symbol == symbol, t.c.ts >= start, t.c.ts < end).order_by(t.c.ts)
        with db.reading(self._engine) as conn:
            return [
                Candle(
                    r.symbol, Timeframe[r.timeframe], r.ts, r.open, r.high, r.low, r.close, r.volume, r.spread
                )
                for r in conn.execute(query)
            ]

    def candles_after(
        self, cursor: int, symbols: Sequence[str], timeframes: Sequence[Timeframe], limit: int
    ) -> list[StoredCandleChange]:
        """Committed candle changes with a cursor above ``cursor``, in cursor order."""
        query = db.page_after(ingest_candle_log, cursor, limit, symbols, [tf.name for tf in timeframes])
        with db.reading(self._engine) as conn:
            rows = conn.execute(query)
            return [
                StoredCandleChange(
                    r.id,
                    Candle(
                        r.symbol,
                        Timeframe[r.timeframe],
                        r.ts,
                        r.open,
                        r.high,
                        r.low,
                        r.close,
                        r.volume,
                        r.spread,
                    ),
                    r.revision,
                    r.traceparent,
                )
                for r in rows
            ]


def _candle_row(candle: Candle) -> dict[str, Any]:
    return {
        "symbol": candle.symbol,
        "timeframe": candle.timeframe.name,
        "ts": candle.ts,
        "open": candle.open,
        "high": candle.high,
        "low": candle.low,
        "close": candle.close,
        "volume": candle.volume,
        "spread": candle.spread,
    }


def _chunks(items: Sequence[_T], size: int) -> Iterable[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]

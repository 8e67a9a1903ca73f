"""The indicators service's storage adapter: values, their log and the input cursor, committed together."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from opentelemetry.trace import SpanContext
from sqlalchemy import Engine, and_, func, select, tuple_

from services.common import db
from services.common.market import Timeframe
from services.common.schema import CANDLE_INPUT_NAMES, INDICATOR_NAMES, ind_cursors, ind_log, ind_values
from services.indicators.engine import IndicatorValues

WRITE_LOCK_KEY = 0x6D7435_696E6469  # serializes indicator commits across processes (PostgreSQL)
CANDLES_FEED = "candles"


@dataclasses.dataclass(slots=True)
class IndicatorWork:
    """One commit: final indicator versions and the input cursor they bring us to."""

    values: list[IndicatorValues] = dataclasses.field(default_factory=list)
    cursor: int | None = None
    # Spans of the traced bars that went into this work; the commit span joins their traces.
    traces: list[SpanContext] = dataclasses.field(default_factory=list)
    feed: str = CANDLES_FEED  # the cursor's key: one per shard layout ("candles@k/N")

    def __bool__(self) -> bool:
        return bool(self.values) or self.cursor is not None


@dataclasses.dataclass(frozen=True, slots=True)
class LoggedValues:
    """A published version and its cursor."""

    cursor: int
    values: IndicatorValues
    traceparent: str | None = None  # of the commit that published it, when traced


class IndicatorStore:
    """Reads and writes the indicators service's tables (sync; call from a worker thread)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def commit(self, work: IndicatorWork, traceparent: str | None = None) -> None:
        """Write one unit of work in one transaction; a version already stored is not logged again.

        Logged versions carry the commit's trace context (``traceparent``).
        """
        with db.write_transaction(self._engine, WRITE_LOCK_KEY) as conn:
            latest = {(v.symbol, v.timeframe, v.ts): v for v in work.values}
            if latest:
                t = ind_values
                keys = [(s, tf.name, ts) for s, tf, ts in latest]
                stored = {
                    (r.symbol, Timeframe[r.timeframe], r.ts): _values(r)
                    for r in conn.execute(
                        select(t).where(tuple_(t.c.symbol, t.c.timeframe, t.c.ts).in_(keys))
                    )
                }
                # A restart re-delivers what was already published: same bar revision, same values.
                fresh = db.changed(work.values, stored, lambda v: (v.symbol, v.timeframe, v.ts))
                if fresh:
                    conn.execute(ind_log.insert(), [_row(v) | {"traceparent": traceparent} for v in fresh])
                    db.upsert(
                        conn, t, [_row(v) for v in {(v.symbol, v.timeframe, v.ts): v for v in fresh}.values()]
                    )
            if work.cursor is not None:
                db.upsert(conn, ind_cursors, [{"feed": work.feed, "cursor": work.cursor}])

    def cursors(self) -> dict[str, int]:
        """Every committed input cursor, by key."""
        with self._engine.connect() as conn:
            return {r.feed: r.cursor for r in conn.execute(select(ind_cursors))}

    def series(self) -> list[tuple[str, Timeframe, dt.datetime]]:
        """Every (symbol, timeframe) with stored values, and the time of its last value."""
        t = ind_values
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(t.c.symbol, t.c.timeframe, func.max(t.c.ts)).group_by(t.c.symbol, t.c.timeframe)
            )
            return [(r[0], Timeframe[r[1]], r[2]) for r in rows]

    def values_after(
        self, cursor: int, symbols: Sequence[str], timeframes: Sequence[Timeframe], limit: int
    ) -> list[LoggedValues]:
        """Published versions with a cursor above ``cursor``, in cursor order."""
        query = db.page_after(ind_log, cursor, limit, symbols, [tf.name for tf in timeframes])
        with self._engine.connect() as conn:
            return [LoggedValues(r.id, _values(r), r.traceparent) for r in conn.execute(query)]

    def values(
        self,
        symbol: str,
        timeframe: Timeframe,
        start: dt.datetime | None,
        end: dt.datetime | None,
        limit: int,
        newest: bool = False,
    ) -> list[IndicatorValues]:
        """Stored values of a symbol and timeframe, oldest first: the first ``limit`` or the newest."""
        t = ind_values
        conditions = [t.c.symbol == symbol, t.c.timeframe == timeframe.name]
        if start is not None:
            conditions.append(t.c.ts >= start)
        if end is not None:
            conditions.append(t.c.ts < end)
        with db.reading(self._engine) as conn:  # bounded by the caller's deadline (db.read)
            order = t.c.ts.desc() if newest else t.c.ts
            rows = [
                _values(r)
                for r in conn.execute(select(t).where(and_(*conditions)).order_by(order).limit(limit))
            ]
            return rows[::-1] if newest else rows


def _row(v: IndicatorValues) -> dict[str, Any]:
    return {
        "symbol": v.symbol,
        "timeframe": v.timeframe.name,
        "ts": v.ts,
        "revision": v.revision,
        **{name: getattr(v, name) for name in (*INDICATOR_NAMES, *CANDLE_INPUT_NAMES)},
    }


def _values(r: Any) -> IndicatorValues:
    return IndicatorValues(
        r.symbol,
        Timeframe[r.timeframe],
        r.ts,
        r.revision,
        True,
        *(getattr(r, name) for name in (*INDICATOR_NAMES, *CANDLE_INPUT_NAMES)),
    )

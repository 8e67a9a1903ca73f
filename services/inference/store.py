"""The inference service's storage adapter: signals, their log and the input cursor, committed together."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from opentelemetry.trace import SpanContext
from sqlalchemy import Engine, and_, func, select, tuple_

from services.common import db
from services.common.market import Timeframe
from services.common.schema import inf_cursors, inf_saved_signals, inf_signal_log, inf_signals
from services.inference.domain import Signal

WRITE_LOCK_KEY = 0x6D7435_696E6665  # serializes signal commits across processes (PostgreSQL)
INDICATORS_FEED = "indicators"
_FIELDS = ("symbol", "timeframe", "ts", "prob_up", "label", "model_version", "candle_revision")


@dataclasses.dataclass(slots=True)
class SignalWork:
    """One commit: signals and the input cursor they bring us to."""

    signals: list[Signal] = dataclasses.field(default_factory=list)
    cursor: int | None = None
    # Spans of the traced indicator values that went into this work; the commit span joins them.
    traces: list[SpanContext] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.signals) or self.cursor is not None


@dataclasses.dataclass(frozen=True, slots=True)
class LoggedSignal:
    """A published signal version and its cursor."""

    cursor: int
    signal: Signal
    traceparent: str | None = None  # of the commit that published it, when traced


class SignalStore:
    """Reads and writes the inference service's tables (sync; call from a worker thread)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def commit(self, work: SignalWork, traceparent: str | None = None) -> int:
        """Write one unit of work in one transaction; return how many signal versions were new.

        Logged signals carry the commit's trace context (``traceparent``).

        A restart re-delivers indicator values after the committed cursor; the signals they give
        are the ones already stored and are not logged again.
        """
        fresh: list[Signal] = []
        with db.write_transaction(self._engine, WRITE_LOCK_KEY) as conn:
            latest = {(s.symbol, s.timeframe, s.ts): s for s in work.signals}
            if latest:
                t = inf_signals
                keys = [(symbol, tf.name, ts) for symbol, tf, ts in latest]
                stored = {
                    (r.symbol, Timeframe[r.timeframe], r.ts): _signal(r)
                    for r in conn.execute(
                        select(t).where(tuple_(t.c.symbol, t.c.timeframe, t.c.ts).in_(keys))
                    )
                }
                fresh = db.changed(work.signals, stored, lambda s: (s.symbol, s.timeframe, s.ts))
                if fresh:
                    conn.execute(
                        inf_signal_log.insert(), [_row(s) | {"traceparent": traceparent} for s in fresh]
                    )
                    db.upsert(
                        conn, t, [_row(s) for s in {(s.symbol, s.timeframe, s.ts): s for s in fresh}.values()]
                    )
            if work.cursor is not None:
                db.upsert(conn, inf_cursors, [{"feed": INDICATORS_FEED, "cursor": work.cursor}])
        return len(fresh)

    def cursor(self) -> int:
        """The committed cursor on the indicators feed (0: nothing consumed yet)."""
        with self._engine.connect() as conn:
            value = conn.execute(select(inf_cursors.c.cursor).where(inf_cursors.c.feed == INDICATORS_FEED))
            return int(value.scalar() or 0)

    def signals_after(
        self, cursor: int, symbols: Sequence[str], timeframes: Sequence[Timeframe], limit: int
    ) -> list[LoggedSignal]:
        """Published versions with a cursor above ``cursor``, in cursor order."""
        query = db.page_after(inf_signal_log, cursor, limit, symbols, [tf.name for tf in timeframes])
        with self._engine.connect() as conn:
            return [LoggedSignal(r.id, _signal(r), r.traceparent) for r in conn.execute(query)]

    def current(self, timeframe: Timeframe) -> list[Signal]:
        """The signal of each symbol's latest final candle in a timeframe, by symbol."""
        return self._latest_per_symbol(inf_signals, timeframe)

    def save(self, timeframe: Timeframe, now: dt.datetime) -> int:
        """Copy the current signals of a timeframe into the saved history; return how many there are."""
        with db.writer(self._engine).begin() as conn:
            signals = self._latest_per_symbol(inf_signals, timeframe, conn)
            if signals:
                stmt = db.dialect_insert(self._engine)(inf_saved_signals).on_conflict_do_nothing()
                conn.execute(stmt, [{**_row(s), "saved_at": now} for s in signals])
        return len(signals)

    def history(self, symbol: str, timeframe: Timeframe, limit: int) -> list[Signal]:
        """Saved signals of a symbol and timeframe, newest first."""
        t = inf_saved_signals
        query = (
            select(t)
            .where(t.c.symbol == symbol, t.c.timeframe == timeframe.name)
            .order_by(t.c.ts.desc(), t.c.saved_at.desc())
            .limit(limit)
        )
        with db.reading(self._engine) as conn:  # bounded by the caller's deadline (db.read)
            return [_signal(r) for r in conn.execute(query)]

    def latest_saved(self, timeframe: Timeframe) -> list[Signal]:
        """The last saved signal of each symbol in a timeframe, by symbol."""
        return self._latest_per_symbol(inf_saved_signals, timeframe)

    def _latest_per_symbol(self, table: Any, timeframe: Timeframe, conn: Any = None) -> list[Signal]:
        newest = (
            select(table.c.symbol, func.max(table.c.ts).label("ts"))
            .where(table.c.timeframe == timeframe.name)
            .group_by(table.c.symbol)
            .subquery()
        )
        query = (
            select(table)
            .join(newest, and_(table.c.symbol == newest.c.symbol, table.c.ts == newest.c.ts))
            .where(table.c.timeframe == timeframe.name)
            .order_by(table.c.symbol)
        )
        if table is inf_saved_signals:
            query = query.order_by(table.c.saved_at.desc())
        if conn is not None:
            return _first_per_symbol(conn.execute(query))
        with db.reading(self._engine) as own:  # bounded by the caller's deadline (db.read)
            return _first_per_symbol(own.execute(query))


def _first_per_symbol(rows: Any) -> list[Signal]:
    # Saved history may hold several versions of the newest candle; the latest saved comes first.
    out: dict[str, Signal] = {}
    for r in rows:
        out.setdefault(r.symbol, _signal(r))
    return list(out.values())


def _row(s: Signal) -> dict[str, Any]:
    return {
        "symbol": s.symbol,
        "timeframe": s.timeframe.name,
        "ts": s.ts,
        "prob_up": s.prob_up,
        "label": s.label,
        "model_version": s.model_version,
        "candle_revision": s.candle_revision,
    }


def _signal(r: Any) -> Signal:
    return Signal(
        r.symbol, Timeframe[r.timeframe], r.ts, r.prob_up, r.label, r.model_version, r.candle_revision
    )

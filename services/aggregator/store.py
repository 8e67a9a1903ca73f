"""The aggregator's storage adapter.

Bar versions, per-symbol state and input cursors are committed together, so that a restart resumes
exactly where the last commit left off.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry.trace import SpanContext
from sqlalchemy import Engine, and_, or_, select

from services.aggregator.bars import (
    PARENTS_OF,
    SOURCE_OF,
    Bar,
    BarSource,
    Values,
    bucket_bounds,
    from_us,
    to_us,
)
from services.common import db
from services.common.market import Timeframe
from services.common.schema import agg_candle_log, agg_candles, agg_cursors, agg_symbols

WRITE_LOCK_KEY = 0x6D7435_61676772  # serializes aggregator commits across processes (PostgreSQL)
# The longest a bar of each timeframe can be.
_LONGEST = {
    Timeframe.M1: dt.timedelta(minutes=1),
    Timeframe.M5: dt.timedelta(minutes=5),
    Timeframe.M15: dt.timedelta(minutes=15),
    Timeframe.M30: dt.timedelta(minutes=30),
    Timeframe.H1: dt.timedelta(hours=1),
    Timeframe.H4: dt.timedelta(hours=4),
    Timeframe.D1: dt.timedelta(days=1),
    Timeframe.W1: dt.timedelta(days=7),
    Timeframe.MN1: dt.timedelta(days=31),
}
TICKS_FEED = "ticks"
CANDLES_FEED = "candles"


@dataclasses.dataclass(slots=True)
class UnitOfWork:
    """Everything one commit writes: latest bar versions, final versions to log, state, cursors."""

    latest: dict[tuple[str, Timeframe, dt.datetime], Bar] = dataclasses.field(default_factory=dict)
    finals: list[Bar] = dataclasses.field(default_factory=list)
    symbols: dict[str, tuple[int | None, int]] = dataclasses.field(default_factory=dict)
    cursors: dict[str, int] = dataclasses.field(default_factory=dict)
    # Spans of the traced inputs that went into this work; the commit span joins their traces.
    traces: list[SpanContext] = dataclasses.field(default_factory=list)

    def add(self, bars: Iterable[Bar], *, final: bool) -> None:
        """Record published bars (final ones are also logged)."""
        for bar in bars:
            self.latest[bar.key] = bar
            if final:
                self.finals.append(bar)

    def __bool__(self) -> bool:
        return bool(self.latest or self.finals or self.symbols or self.cursors)


@dataclasses.dataclass(frozen=True, slots=True)
class SymbolState:
    """What a restart needs for one symbol."""

    symbol: str
    latest_tick_us: int | None
    last_cursor: int
    bars: list[Bar]


@dataclasses.dataclass(frozen=True, slots=True)
class LoggedBar:
    """A final bar version and its cursor."""

    cursor: int
    bar: Bar
    traceparent: str | None = None  # of the commit that published it, when traced


class AggregatorStore:
    """Reads and writes the aggregator's tables (sync; call from a worker thread)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def commit(self, work: UnitOfWork, traceparent: str | None = None) -> None:
        """Write one unit of work in one transaction; logged versions carry the commit's trace context."""
        with db.write_transaction(self._engine, WRITE_LOCK_KEY) as conn:
            db.upsert(conn, agg_candles, [_row(bar) for bar in work.latest.values()])
            if work.finals:
                conn.execute(
                    agg_candle_log.insert(), [_row(bar) | {"traceparent": traceparent} for bar in work.finals]
                )
            db.upsert(
                conn,
                agg_symbols,
                [
                    {"symbol": s, "latest_tick_us": latest, "last_tick_cursor": cursor}
                    for s, (latest, cursor) in work.symbols.items()
                ],
            )
            db.upsert(conn, agg_cursors, [{"feed": f, "cursor": c} for f, c in work.cursors.items()])

    def cursors(self) -> dict[str, int]:
        """The committed input cursors."""
        with self._engine.connect() as conn:
            return {r.feed: r.cursor for r in conn.execute(select(agg_cursors))}

    def load_state(
        self,
        retention: dt.timedelta,
        lateness: dt.timedelta,
        owns: Callable[[str], bool] = lambda _symbol: True,
    ) -> list[SymbolState]:
        """For every symbol: its watermark, cursor and the bars a restart must rebuild.

        That is every forming bar, every final bar still revisable (ending within the retention
        window before the watermark), and all children of the bars of higher timeframes.
        """
        c = agg_candles.c
        states = []
        with self._engine.connect() as conn:
            symbols = [row for row in conn.execute(select(agg_symbols)) if owns(row.symbol)]
            for sym in symbols:
                horizon = (sym.latest_tick_us or 0) - lateness // dt.timedelta(microseconds=1)
                oldest = from_us(max(0, horizon)) - retention
                # A final bar is still revisable when it ends after `oldest`.
                revisable = or_(
                    *(and_(c.timeframe == tf.name, c.ts > oldest - length) for tf, length in _LONGEST.items())
                )
                rows = conn.execute(
                    select(agg_candles).where(c.symbol == sym.symbol, or_(c.final.is_(False), revisable))
                )
                bars = {(b.timeframe, b.ts): b for b in map(_bar, rows)}
                # Children of restored higher bars may be older than the window: fetch what is missing.
                wanted: dict[Timeframe, list[tuple[int, int]]] = defaultdict(list)
                for bar in bars.values():
                    if bar.timeframe in SOURCE_OF:
                        wanted[SOURCE_OF[bar.timeframe]].append(bucket_bounds(to_us(bar.ts), bar.timeframe))
                for child_tf, ranges in wanted.items():
                    start = min(r[0] for r in ranges)
                    rows = conn.execute(
                        select(agg_candles).where(
                            c.symbol == sym.symbol,
                            c.timeframe == child_tf.name,
                            c.ts >= dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=start),
                        )
                    )
                    for bar in map(_bar, rows):
                        bars.setdefault((bar.timeframe, bar.ts), bar)
                states.append(
                    SymbolState(sym.symbol, sym.latest_tick_us, sym.last_tick_cursor, list(bars.values()))
                )
        return states

    def bars_around(self, symbol: str, timeframe: Timeframe, ts: dt.datetime) -> list[Bar]:
        """The stored bar of ``ts``, every bar above it, and the children of each of those.

        What the core needs to revise an old bar and cascade the change upwards exactly.
        """
        c = agg_candles.c
        wanted: list[tuple[Timeframe, int, int]] = []  # (timeframe, start, end) of bars to fetch
        levels = [timeframe]
        start_us = to_us(ts)
        while levels:
            tf = levels.pop()
            start, end = bucket_bounds(start_us, tf)
            wanted.append((tf, start, start + 1))
            if tf in SOURCE_OF:
                wanted.append((SOURCE_OF[tf], start, end))
            levels.extend(PARENTS_OF[tf])
        bars: dict[tuple[Timeframe, dt.datetime], Bar] = {}
        with self._engine.connect() as conn:
            for tf, start, end in wanted:
                rows = conn.execute(
                    select(agg_candles).where(
                        c.symbol == symbol,
                        c.timeframe == tf.name,
                        c.ts >= from_us(start),
                        c.ts < from_us(end),
                    )
                )
                for bar in map(_bar, rows):
                    bars[(bar.timeframe, bar.ts)] = bar
        return list(bars.values())

    def candles_after(
        self, cursor: int, symbols: Sequence[str], timeframes: Sequence[Timeframe], limit: int
    ) -> list[LoggedBar]:
        """Final bar versions with a cursor above ``cursor``, in cursor order."""
        query = db.page_after(agg_candle_log, cursor, limit, symbols, [tf.name for tf in timeframes])
        with self._engine.connect() as conn:
            return [LoggedBar(r.id, _bar(r), r.traceparent) for r in conn.execute(query)]

    def candles(
        self,
        symbol: str,
        timeframe: Timeframe,
        start: dt.datetime | None,
        end: dt.datetime | None,
        limit: int,
    ) -> list[Bar]:
        """Stored bars (latest versions) of a symbol and timeframe, oldest first."""
        c = agg_candles.c
        conditions = [c.symbol == symbol, c.timeframe == timeframe.name]
        if start is not None:
            conditions.append(c.ts >= start)
        if end is not None:
            conditions.append(c.ts < end)
        with db.reading(self._engine) as conn:  # bounded by the caller's deadline (db.read)
            rows = conn.execute(select(agg_candles).where(and_(*conditions)).order_by(c.ts).limit(limit))
            return [_bar(r) for r in rows]


def _row(bar: Bar) -> dict[str, Any]:
    state = bar.state
    assert state is not None
    return {
        "symbol": bar.symbol,
        "timeframe": bar.timeframe.name,
        "ts": bar.ts,
        "open": bar.open,
        "high": bar.high,
        "low": bar.low,
        "close": bar.close,
        "volume": bar.volume,
        "spread": bar.spread,
        "revision": bar.revision,
        "tick_count": bar.tick_count,
        "source": bar.source.value,
        "final": bar.final,
        "ea_disagrees": bar.ea_disagrees,
        "spread_sum": state.spread_sum,
        "weight": state.weight,
        "first_us": state.first_us,
        "last_us": state.last_us,
    }


def _bar(r: Any) -> Bar:
    state = Values(
        r.open, r.high, r.low, r.close, r.volume, r.spread_sum, r.weight, r.tick_count, r.first_us, r.last_us
    )
    return Bar(
        r.symbol,
        Timeframe[r.timeframe],
        r.ts,
        r.open,
        r.high,
        r.low,
        r.close,
        r.volume,
        r.spread,
        r.tick_count,
        BarSource(r.source),
        r.revision,
        r.final,
        r.ea_disagrees,
        state,
    )

"""The one schema module: every table of every service. Each table is written by exactly one service.

Migrations under ``services/common/migrations`` create these tables; a test checks that the
migrated database and this module agree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

# W3C trace context of the commit that wrote a log row (NULL when not traced): the next stage makes
# its span for the row a child of it, so one trace crosses every stage (streams cannot carry it).
TRACEPARENT_LENGTH = 55


def traceparent_column() -> Column[Any]:
    """The trace context column of an append-only log."""
    return Column("traceparent", String(TRACEPARENT_LENGTH), nullable=True)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time type, so values are stored as UTC text
    in SQLAlchemy's fixed format (which sorts and compares correctly) and read back as aware UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        """Store UTC; naive datetimes are refused rather than guessed."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        """Return aware UTC datetimes."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)  # type: ignore[no-any-return]
        return value.astimezone(dt.UTC)  # type: ignore[no-any-return]


# BIGINT identity on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
Cursor = BigInteger().with_variant(Integer(), "sqlite")
Price = Float(precision=53)

# --- ingest ----------------------------------------------------------------------------------

# Every committed tick; the id is the tick feed's cursor (commits are serialized, so ids grow in
# commit order). Natural-key uniqueness deduplicates replays from any client.
ingest_ticks = Table(
    "ingest_ticks",
    metadata,
    Column("id", Cursor, primary_key=True, autoincrement=True),
    Column("symbol", String(32), nullable=False),
    Column("ts", UtcDateTime(), nullable=False),
    Column("bid", Price, nullable=False),
    Column("ask", Price, nullable=False),
    Column("volume", Price, nullable=False),
    Column("source_id", String(64), nullable=True),
    traceparent_column(),
    UniqueConstraint("symbol", "ts", "bid", "ask"),
)

# Every committed streamed batch, by source and sequence: a re-sent batch is recognised exactly,
# whatever order batches arrive or fail in (a high-water mark would drop a retried earlier batch).
ingest_source_batches = Table(
    "ingest_source_batches",
    metadata,
    Column("source_id", String(64), nullable=False),
    Column("sequence", BigInteger(), nullable=False),
    Column("ticks", Integer(), nullable=False),
    Column("committed_at", UtcDateTime(), nullable=False),
    PrimaryKeyConstraint("source_id", "sequence"),
)


def candle_columns() -> list[Column[Any]]:
    """The columns of a candle version, fresh for each table that holds one."""
    return [
        Column("symbol", String(32), nullable=False),
        Column("timeframe", String(3), nullable=False),
        Column("ts", UtcDateTime(), nullable=False),
        *(
            Column(name, Price, nullable=False)
            for name in ("open", "high", "low", "close", "volume", "spread")
        ),
        Column("revision", Integer(), nullable=False),
    ]


# Candles as the Expert Advisor posted them, keyed by (symbol, timeframe, bucket start).
ingest_candles = Table(
    "ingest_candles",
    metadata,
    *candle_columns(),
    Column("updated_at", UtcDateTime(), nullable=False),
    PrimaryKeyConstraint("symbol", "timeframe", "ts"),
)

# Append-only log of candle changes (new or updated); its id is the candle feed's cursor.
ingest_candle_log = Table(
    "ingest_candle_log",
    metadata,
    Column("id", Cursor, primary_key=True, autoincrement=True),
    *candle_columns(),
    traceparent_column(),
)

# --- aggregator ------------------------------------------------------------------------------


def bar_columns() -> list[Column[Any]]:
    """A published bar: candle values, lifecycle, and the accumulator that restores it exactly."""
    return [
        *candle_columns(),
        Column("tick_count", Integer(), nullable=False),
        Column("source", Integer(), nullable=False),  # mt5.market.v1.CandleSource number
        Column("final", Boolean(), nullable=False),
        Column("ea_disagrees", Boolean(), nullable=False),
        Column("spread_sum", Price, nullable=False),
        Column("weight", Integer(), nullable=False),
        Column("first_us", BigInteger(), nullable=False),
        Column("last_us", BigInteger(), nullable=False),
    ]


# The latest version of every bar, forming or final; what GetCandles reads and restarts restore.
agg_candles = Table(
    "agg_candles",
    metadata,
    *bar_columns(),
    PrimaryKeyConstraint("symbol", "timeframe", "ts"),
)

# Every final version of every bar (first final, then each revision); its id is the candle feed's
# cursor. Forming versions are not logged: they are live-only.
agg_candle_log = Table(
    "agg_candle_log",
    metadata,
    Column("id", Cursor, primary_key=True, autoincrement=True),
    *bar_columns(),
    traceparent_column(),
)

# Per symbol: the latest tick time seen (the watermark's base) and the last input cursor applied.
agg_symbols = Table(
    "agg_symbols",
    metadata,
    Column("symbol", String(32), primary_key=True),
    Column("latest_tick_us", BigInteger(), nullable=True),
    Column("last_tick_cursor", BigInteger(), nullable=False),
)

# The aggregator's input cursors on ingest's feeds ("ticks", "candles"), committed with its output.
agg_cursors = Table(
    "agg_cursors",
    metadata,
    Column("feed", String(16), primary_key=True),
    Column("cursor", BigInteger(), nullable=False),
)

# --- indicators ------------------------------------------------------------------------------

INDICATOR_NAMES = ("rsi", "macd", "macd_signal", "macd_hist", "atr", "bb_upper", "bb_middle", "bb_lower")
# The bar's own values stored with its indicators (the inference model's other inputs).
CANDLE_INPUT_NAMES = ("close", "volume", "spread")


def indicator_columns() -> list[Column[Any]]:
    """The indicator values of one final bar; NULL while a lookback is warming up."""
    return [
        Column("symbol", String(32), nullable=False),
        Column("timeframe", String(3), nullable=False),
        Column("ts", UtcDateTime(), nullable=False),
        Column("revision", Integer(), nullable=False),
        *(Column(name, Price, nullable=True) for name in INDICATOR_NAMES),
        # NULL only in rows stored before migration 0004.
        *(Column(name, Price, nullable=True) for name in CANDLE_INPUT_NAMES),
    ]


# The latest indicator values of every final bar.
ind_values = Table(
    "ind_values",
    metadata,
    *indicator_columns(),
    PrimaryKeyConstraint("symbol", "timeframe", "ts"),
)

# Every published version (first final, then after each revision); its id is the feed's cursor.
ind_log = Table(
    "ind_log",
    metadata,
    Column("id", Cursor, primary_key=True, autoincrement=True),
    *indicator_columns(),
    traceparent_column(),
)

# The indicators service's cursor on the aggregator's candle feed, committed with its output.
ind_cursors = Table(
    "ind_cursors",
    metadata,
    Column("feed", String(16), primary_key=True),
    Column("cursor", BigInteger(), nullable=False),
)

# --- inference -------------------------------------------------------------------------------


def signal_columns() -> list[Column[Any]]:
    """A signal: the model's call on one final candle, and what produced it."""
    return [
        Column("symbol", String(32), nullable=False),
        Column("timeframe", String(3), nullable=False),
        Column("ts", UtcDateTime(), nullable=False),
        Column("prob_up", Float(precision=53), nullable=False),
        Column("label", Integer(), nullable=False),
        Column("model_version", String(32), nullable=False),
        Column("candle_revision", Integer(), nullable=False),
    ]


# The latest signal of every final candle.
inf_signals = Table(
    "inf_signals",
    metadata,
    *signal_columns(),
    PrimaryKeyConstraint("symbol", "timeframe", "ts"),
)

# Every published signal version (first, then after a revision or a new model); its id is the
# signal feed's cursor.
inf_signal_log = Table(
    "inf_signal_log",
    metadata,
    Column("id", Cursor, primary_key=True, autoincrement=True),
    *signal_columns(),
    traceparent_column(),
)

# Signals saved on request (the seed's POST /signals/save), read by /signals/history and /latest.
inf_saved_signals = Table(
    "inf_saved_signals",
    metadata,
    *signal_columns(),
    Column("saved_at", UtcDateTime(), nullable=False),
    # Saving the same signal twice keeps one row.
    PrimaryKeyConstraint("symbol", "timeframe", "ts", "model_version", "candle_revision"),
)

# The inference service's cursor on the indicators feed, committed with its signals.
inf_cursors = Table(
    "inf_cursors",
    metadata,
    Column("feed", String(16), primary_key=True),
    Column("cursor", BigInteger(), nullable=False),
)

"""Market value objects and timeframe buckets, shared by every stage. Pure: no I/O, no protobuf."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
import zlib

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def to_us(ts: dt.datetime) -> int:
    """An aware datetime as integer microseconds since the epoch."""
    return (ts - EPOCH) // dt.timedelta(microseconds=1)


def from_us(us: int) -> dt.datetime:
    """Integer microseconds since the epoch as an aware UTC datetime."""
    return EPOCH + dt.timedelta(microseconds=us)


# What a symbol may look like everywhere in the mesh: "EURUSD", "XAUUSD.m", "US30#".
SYMBOL_PATTERN = re.compile(r"[A-Za-z0-9._#-]{1,32}")


def shard_of(symbol: str, shard_count: int) -> int:
    """The shard that owns a symbol: CRC-32 of its UTF-8 bytes modulo the shard count.

    Stable across processes, machines and Python versions (unlike ``hash``), so every shard and
    every feed agree on who owns what.
    """
    return zlib.crc32(symbol.encode()) % shard_count if shard_count > 1 else 0


class Timeframe(enum.Enum):
    """MT5 timeframes; values equal the proto enum numbers of ``mt5.market.v1.Timeframe``."""

    M1 = 1
    M5 = 2
    M15 = 3
    M30 = 4
    H1 = 5
    H4 = 6
    D1 = 7
    W1 = 8
    MN1 = 9


_MINUTES = {
    Timeframe.M1: 1,
    Timeframe.M5: 5,
    Timeframe.M15: 15,
    Timeframe.M30: 30,
    Timeframe.H1: 60,
    Timeframe.H4: 240,
    Timeframe.D1: 1440,
}


def bucket_start(ts: dt.datetime, timeframe: Timeframe) -> dt.datetime:
    """Start of the timeframe bucket containing ``ts``, in UTC (DESIGN.md section 3 table).

    Sub-daily buckets are aligned on the UTC day (H4 at 00, 04, ... 20); W1 starts on Monday
    00:00 UTC; MN1 on the first day of the month.
    """
    ts = ts.astimezone(dt.UTC)
    day = ts.replace(hour=0, minute=0, second=0, microsecond=0)
    if timeframe is Timeframe.W1:
        return day - dt.timedelta(days=day.weekday())
    if timeframe is Timeframe.MN1:
        return day.replace(day=1)
    size = _MINUTES[timeframe]
    minute_of_day = ts.hour * 60 + ts.minute
    return day + dt.timedelta(minutes=minute_of_day - minute_of_day % size)


@dataclasses.dataclass(frozen=True, slots=True)
class Tick:
    """One quote; ``ts`` is aware UTC with microsecond precision."""

    symbol: str
    ts: dt.datetime
    bid: float
    ask: float
    volume: float = 0.0

    @property
    def key(self) -> tuple[str, dt.datetime, float, float]:
        """Natural key used to recognise a tick sent twice."""
        return (self.symbol, self.ts, self.bid, self.ask)


@dataclasses.dataclass(frozen=True, slots=True)
class Candle:
    """One OHLC bar; ``ts`` is the bucket start of its timeframe, aware UTC."""

    symbol: str
    timeframe: Timeframe
    ts: dt.datetime
    open: float
    high: float
    low: float
    close: float
    volume: float
    spread: float

    @property
    def key(self) -> tuple[str, Timeframe, dt.datetime]:
        """Natural key: one bar per symbol, timeframe and bucket start."""
        return (self.symbol, self.timeframe, self.ts)

    @property
    def values(self) -> tuple[float, float, float, float, float, float]:
        """The bar's numbers, for comparing two versions of the same bar."""
        return (self.open, self.high, self.low, self.close, self.volume, self.spread)

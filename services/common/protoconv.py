"""Conversions between protobuf messages and the shared market value objects."""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2
from mt5.market.v1 import market_pb2

from services.common.market import EPOCH, Candle, Tick, Timeframe, from_us


def micros(ts: timestamp_pb2.Timestamp) -> int:
    """A Timestamp as integer microseconds since the epoch (sub-microsecond digits dropped)."""
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def to_datetime(ts: timestamp_pb2.Timestamp) -> dt.datetime:
    """A Timestamp as an aware UTC datetime (to the microsecond)."""
    return from_us(micros(ts))


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp."""
    delta = value - EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def tick_to_pb(tick: Tick) -> market_pb2.Tick:
    """A Tick value as its message."""
    return market_pb2.Tick(
        symbol=tick.symbol, ts=timestamp(tick.ts), bid=tick.bid, ask=tick.ask, volume=tick.volume
    )


def candle_to_pb(candle: Candle) -> market_pb2.Candle:
    """A Candle value as its message."""
    return market_pb2.Candle(
        symbol=candle.symbol,
        timeframe=candle.timeframe.name,
        ts=timestamp(candle.ts),
        open=candle.open,
        high=candle.high,
        low=candle.low,
        close=candle.close,
        volume=candle.volume,
        spread=candle.spread,
    )


def timeframes_from_pb(values: list[int] | tuple[int, ...]) -> list[Timeframe]:
    """Timeframe numbers as values; raises ValueError on an unknown one."""
    return [Timeframe(v) for v in values]

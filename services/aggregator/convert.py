"""Aggregator's domain bars to messages, and request fields to domain values."""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2
from mt5.market.v1 import market_pb2

from services.aggregator.bars import Bar
from services.common.protoconv import timestamp, to_datetime


def bar_to_pb(bar: Bar) -> market_pb2.Bar:
    """A bar as its message; the candle has the same JSON names as ingest's."""
    return market_pb2.Bar(
        candle=market_pb2.Candle(
            symbol=bar.symbol,
            timeframe=bar.timeframe.name,
            ts=timestamp(bar.ts),
            open=bar.open,
            high=bar.high,
            low=bar.low,
            close=bar.close,
            volume=bar.volume,
            spread=bar.spread,
        ),
        source=bar.source.value,  # type: ignore[arg-type]
        revision=bar.revision,
        final=bar.final,
        tick_count=bar.tick_count,
        ea_disagrees=bar.ea_disagrees,
    )


def optional_time(message: object, field: str) -> dt.datetime | None:
    """A Timestamp field as a datetime, None when unset."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    value: timestamp_pb2.Timestamp = getattr(message, field)
    return to_datetime(value)

"""Ingest's messages to domain records and back."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import timestamp_pb2
from mt5.ingest.v1 import ingest_service_pb2 as pb
from mt5.market.v1 import market_pb2

from services.common.market import Candle, Tick, Timeframe, bucket_start
from services.common.protoconv import micros, timestamp
from services.common.validation import FieldViolation, ValidationFailed
from services.ingest.domain import CandleStatus, RawCandle, RawTick, TickStatus

_SINGLE_FIELDS = ("symbol", "timeframe", "ts", "open", "high", "low", "close", "volume", "spread")


def _ts(message: market_pb2.Candle | market_pb2.Tick | pb.IngestCandlesRequest, field: str) -> int | None:
    # micros refuses a Timestamp that is invalid (nanos, years 1-9999), naming ``field``.
    return micros(message.ts, field) if message.HasField("ts") else None


def raw_candle(m: market_pb2.Candle | pb.IngestCandlesRequest, field: str = "ts") -> RawCandle:
    """A candle message (or the single-candle fields of a request) as a raw record.

    ``field`` names its timestamp in the request; ValidationFailed when that Timestamp is invalid.
    """
    return RawCandle(m.symbol, m.timeframe, _ts(m, field), m.open, m.high, m.low, m.close, m.volume, m.spread)


def candles_of(request: pb.IngestCandlesRequest) -> tuple[list[RawCandle], str | None]:
    """The request's candles and the field they are reported under (None: the top-level single form)."""
    single = any(request.HasField(f) if f == "ts" else getattr(request, f) for f in _SINGLE_FIELDS)
    if request.items and single:
        raise ValidationFailed(
            [FieldViolation("items", "send either items or one candle's fields, not both")]
        )
    if single:
        return [raw_candle(request)], None
    return [raw_candle(item, f"items[{i}].ts") for i, item in enumerate(request.items)], "items"


def original_timestamps(request: pb.IngestCandlesRequest) -> Sequence[timestamp_pb2.Timestamp]:
    """The timestamps as received, in item order."""
    return [item.ts for item in request.items] if request.items else [request.ts]


def raw_tick(m: market_pb2.Tick, field: str = "ts") -> RawTick:
    """A tick message as a raw record (ValidationFailed naming ``field`` when its Timestamp is invalid)."""
    return RawTick(m.symbol, _ts(m, field), m.bid, m.ask, m.volume)


def raw_ticks(ticks: Sequence[market_pb2.Tick], field: str = "ticks") -> list[RawTick]:
    """The ticks of a request (its ``field``) as raw records."""
    return [raw_tick(m, f"{field}[{i}].ts") for i, m in enumerate(ticks)]


def candles_response(
    originals: Sequence[timestamp_pb2.Timestamp], candles: Sequence[Candle], statuses: Sequence[CandleStatus]
) -> pb.IngestCandlesResponse:
    """The seed's answer: counts plus one detail per candle."""
    return pb.IngestCandlesResponse(
        ok=True,
        received=len(candles),
        inserted=statuses.count(CandleStatus.INSERTED),
        duplicates=statuses.count(CandleStatus.DUPLICATE),
        updated=statuses.count(CandleStatus.UPDATED),
        details=[
            pb.CandleDetail(
                symbol=c.symbol,
                timeframe=c.timeframe.name,
                ts_original=original,
                ts_bucket=timestamp(c.ts),
                status=str(status),
            )
            for c, original, status in zip(candles, originals, statuses, strict=True)
        ],
    )


def ticks_response(
    request_ticks: Sequence[market_pb2.Tick], ticks: Sequence[Tick], statuses: Sequence[TickStatus]
) -> pb.IngestTicksResponse:
    """The seed's answer: counts plus one detail per tick, with its M1 bucket."""
    return pb.IngestTicksResponse(
        ok=True,
        received=len(ticks),
        stored=statuses.count(TickStatus.RECEIVED),
        duplicates=statuses.count(TickStatus.DUPLICATE),
        details=[
            pb.TickDetail(
                symbol=t.symbol,
                ts_original=m.ts,
                ts_bucket=timestamp(bucket_start(t.ts, Timeframe.M1)),
                status=str(status),
            )
            for m, t, status in zip(request_ticks, ticks, statuses, strict=True)
        ],
    )

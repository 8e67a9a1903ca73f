"""Conversions between protobuf messages and the shared market value objects.

Every Timestamp read from a request goes through ``micros`` (or ``to_datetime``), which refuses one
that google.protobuf.Timestamp itself calls invalid, naming the field: a valid wire message can
still carry seconds outside years 1-9999 (beyond ``datetime``) or nanos outside 0..999,999,999.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from google.protobuf import descriptor as pb_descriptor
from google.protobuf import timestamp_pb2
from mt5.market.v1 import market_pb2

from services.common.market import EPOCH, SYMBOL_PATTERN, Candle, Tick, Timeframe, from_us
from services.common.validation import FieldViolation, ValidationFailed

# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
MAX_NANOS = 999_999_999
# Cursors are uint64 in the protos but BIGINT (signed 64-bit) ids in the tables.
MAX_CURSOR = 2**63 - 1


def timestamp_violation(ts: timestamp_pb2.Timestamp, field: str) -> FieldViolation | None:
    """What makes a Timestamp invalid (None when it is valid); ``field`` is its path in the request."""
    if not 0 <= ts.nanos <= MAX_NANOS:
        return FieldViolation(field, f"nanos must be 0 to {MAX_NANOS:,}, got {ts.nanos}")
    if not TIMESTAMP_MIN_SECONDS <= ts.seconds <= TIMESTAMP_MAX_SECONDS:
        return FieldViolation(field, "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z")
    return None


def timestamp_violations(message: object, *fields: str) -> list[FieldViolation]:
    """Violations of the named Timestamp fields of ``message`` that are set (unset ones are fine)."""
    found = []
    for field in fields:
        if message.HasField(field):  # type: ignore[attr-defined]
            violation = timestamp_violation(getattr(message, field), field)
            if violation is not None:
                found.append(violation)
    return found


def micros(ts: timestamp_pb2.Timestamp, field: str = "ts") -> int:
    """A Timestamp as integer microseconds since the epoch (sub-microsecond digits dropped).

    Raises ValidationFailed naming ``field`` when the Timestamp is invalid.
    """
    violation = timestamp_violation(ts, field)
    if violation is not None:
        raise ValidationFailed([violation])
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def to_datetime(ts: timestamp_pb2.Timestamp, field: str = "ts") -> dt.datetime:
    """A Timestamp as an aware UTC datetime (to the microsecond); ValidationFailed when invalid."""
    return from_us(micros(ts, field))


def subscription_violations(from_cursor: int, symbols: Sequence[str]) -> list[FieldViolation]:
    """What every Subscribe* request must respect before its cursor and filter reach the SQL.

    The cursor is a uint64 in the protos but a BIGINT id in the tables; a symbol in the filter
    follows the symbol rule (which also keeps NUL characters away from PostgreSQL).
    """
    found = []
    if from_cursor > MAX_CURSOR:
        found.append(FieldViolation("from_cursor", f"must be at most {MAX_CURSOR} (2**63 - 1)"))
    found.extend(
        FieldViolation(f"symbols[{i}]", "must be 1 to 32 letters, digits or ._-#")
        for i, symbol in enumerate(symbols)
        if not SYMBOL_PATTERN.fullmatch(symbol)
    )
    return found


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


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A base-128 varint at ``pos`` and the position after it; IndexError when it runs off the end."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise IndexError("varint longer than 10 bytes")


_FIXED_SIZES = {1: 8, 5: 4}


def damaged_field(descriptor: pb_descriptor.Descriptor | None, data: bytes) -> FieldViolation:
    """Where serialized bytes that failed to parse as ``descriptor`` go wrong, as a field violation.

    Walks the wire format to the first field that is truncated, of an impossible wire type, or a
    string that is not UTF-8, and names it by its path (``ticks.symbol``); damage that no field
    explains is reported on ``request``. For error messages only: it does not validate.
    """
    found = _damage(descriptor, data, "") if descriptor is not None else None
    return found or FieldViolation("request", "does not parse")


def _damage(descriptor: pb_descriptor.Descriptor, data: bytes, prefix: str) -> FieldViolation | None:
    pos, name = 0, prefix.rstrip(".") or "request"
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            number, wire = tag >> 3, tag & 7
            if number == 0 or wire in (3, 4, 6, 7):
                return FieldViolation(prefix.rstrip(".") or "request", "does not parse: invalid field tag")
            field = descriptor.fields_by_number.get(number)
            name = prefix + (field.name if field is not None else f"#{number}")
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire in _FIXED_SIZES:
                pos += _FIXED_SIZES[wire]
            else:
                length, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + length], pos + length
                if pos > len(data):
                    break
                if field is not None and field.type == field.TYPE_STRING:
                    chunk.decode("utf-8")
                elif field is not None and field.message_type is not None and wire == 2:
                    inner = _damage(field.message_type, chunk, name + ".")
                    if inner is not None:
                        return inner
        if pos > len(data):
            return FieldViolation(name, "does not parse: the message ends inside this field")
    except UnicodeDecodeError:
        return FieldViolation(name, "is not valid UTF-8")
    except IndexError:
        return FieldViolation(name, "does not parse: the message ends inside this field")
    return None

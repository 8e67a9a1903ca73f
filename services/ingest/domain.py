"""Ingest rules: what a valid candle or tick is, and what happened to each one. Pure code.

Inputs arrive as ``Raw*`` records (numbers as sent, timestamps as integer microseconds) so that
every rule is checked here, in one place, whatever the transport.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
import re
from collections.abc import Collection, Mapping, Sequence

from services.common.market import SYMBOL_PATTERN, Candle, Tick, Timeframe, bucket_start, from_us, to_us
from services.common.validation import FieldViolation, ValidationFailed

MAX_ITEMS = 10_000
SOURCE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_SEQUENCE = 2**63 - 1  # uint64 in the proto, BIGINT in ingest_source_batches
EARLIEST = dt.datetime(1990, 1, 1, tzinfo=dt.UTC)
MAX_AHEAD = dt.timedelta(days=1)


@dataclasses.dataclass(frozen=True, slots=True)
class RawCandle:
    """A candle as received; ``timeframe`` is the proto number, ``ts_us`` None when absent."""

    symbol: str
    timeframe: int
    ts_us: int | None
    open: float
    high: float
    low: float
    close: float
    volume: float
    spread: float


@dataclasses.dataclass(frozen=True, slots=True)
class RawTick:
    """A tick as received; ``ts_us`` is None when absent."""

    symbol: str
    ts_us: int | None
    bid: float
    ask: float
    volume: float


class CandleStatus(enum.StrEnum):
    """Outcome of one candle, as the seed API names it."""

    INSERTED = "inserted"
    DUPLICATE = "duplicate"
    UPDATED = "updated"


class TickStatus(enum.StrEnum):
    """Outcome of one tick, as the seed API names it."""

    RECEIVED = "received"
    DUPLICATE = "duplicate"


def _check_symbol(symbol: str, field: str, out: list[FieldViolation]) -> None:
    if not symbol:
        out.append(FieldViolation(field, "is required"))
    elif not SYMBOL_PATTERN.fullmatch(symbol):
        out.append(FieldViolation(field, "must be 1 to 32 letters, digits or ._-#"))


def _check_ts(
    ts_us: int | None, field: str, now: dt.datetime, out: list[FieldViolation]
) -> dt.datetime | None:
    if ts_us is None:
        out.append(FieldViolation(field, "is required"))
        return None
    latest = now + MAX_AHEAD
    if ts_us < _EARLIEST_US:
        out.append(FieldViolation(field, "must not be before 1990-01-01T00:00:00Z"))
        return None
    if ts_us > to_us(latest):
        out.append(FieldViolation(field, "must not be more than one day in the future"))
        return None
    return from_us(ts_us)


def _check_price(value: float, field: str, out: list[FieldViolation]) -> bool:
    if not math.isfinite(value):
        out.append(FieldViolation(field, "must be a finite number"))
        return False
    if value <= 0:
        out.append(FieldViolation(field, "must be greater than 0"))
        return False
    return True


def _check_amount(value: float, field: str, out: list[FieldViolation]) -> None:
    if not math.isfinite(value):
        out.append(FieldViolation(field, "must be a finite number"))
    elif value < 0:
        out.append(FieldViolation(field, "must not be negative"))


_EARLIEST_US = to_us(EARLIEST)


def _check_count(count: int, field: str) -> None:
    if count == 0:
        raise ValidationFailed([FieldViolation(field, "must contain at least one item")])
    if count > MAX_ITEMS:
        raise ValidationFailed(
            [FieldViolation(field, f"must contain at most {MAX_ITEMS} items, got {count}")]
        )


def validate_candles(
    items: Sequence[RawCandle], now: dt.datetime, field: str | None = "items"
) -> list[Candle]:
    """Check every candle and normalize its timestamp to the bucket start.

    ``field`` names the list the candles came in; None means one candle given as top-level fields
    (the seed's single-candle form), whose violations name the bare fields. Raises
    ValidationFailed naming every bad field of every item, so a request is accepted or rejected whole.
    """
    _check_count(len(items), field or "items")
    violations: list[FieldViolation] = []
    candles: list[Candle] = []
    for index, raw in enumerate(items):
        at = f"{field}[{index}]." if field else ""
        found: list[FieldViolation] = []
        _check_symbol(raw.symbol, f"{at}symbol", found)
        timeframe: Timeframe | None = None
        try:
            timeframe = Timeframe(raw.timeframe)
        except ValueError:
            found.append(
                FieldViolation(f"{at}timeframe", "is required: one of " + ", ".join(Timeframe.__members__))
            )
        ts = _check_ts(raw.ts_us, f"{at}ts", now, found)
        prices_ok = all(
            [
                _check_price(getattr(raw, name), f"{at}{name}", found)
                for name in ("open", "high", "low", "close")
            ]
        )
        if prices_ok:
            if raw.high < max(raw.open, raw.close, raw.low):
                found.append(FieldViolation(f"{at}high", "must not be below open, close or low"))
            if raw.low > min(raw.open, raw.close):
                found.append(FieldViolation(f"{at}low", "must not be above open or close"))
        _check_amount(raw.volume, f"{at}volume", found)
        _check_amount(raw.spread, f"{at}spread", found)
        if found or timeframe is None or ts is None:
            violations.extend(found)
            continue
        candles.append(
            Candle(
                raw.symbol,
                timeframe,
                bucket_start(ts, timeframe),
                raw.open,
                raw.high,
                raw.low,
                raw.close,
                raw.volume,
                raw.spread,
            )
        )
    if violations:
        raise ValidationFailed(violations)
    return candles


def _tick_is_valid(raw: RawTick, earliest_us: int, latest_us: int) -> bool:
    """Every tick rule at once, without building messages: the common case costs little."""
    isfinite = math.isfinite
    return (
        raw.ts_us is not None
        and earliest_us <= raw.ts_us <= latest_us
        and isfinite(raw.bid)
        and isfinite(raw.ask)
        and 0 < raw.bid <= raw.ask
        and isfinite(raw.volume)
        and raw.volume >= 0
        and SYMBOL_PATTERN.fullmatch(raw.symbol) is not None
    )


def _tick_violations(raw: RawTick, at: str, now: dt.datetime) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    _check_symbol(raw.symbol, f"{at}.symbol", found)
    _check_ts(raw.ts_us, f"{at}.ts", now, found)
    bid_ok = _check_price(raw.bid, f"{at}.bid", found)
    ask_ok = _check_price(raw.ask, f"{at}.ask", found)
    if bid_ok and ask_ok and raw.ask < raw.bid:
        found.append(FieldViolation(f"{at}.ask", "must not be below bid"))
    _check_amount(raw.volume, f"{at}.volume", found)
    return found


def validate_ticks(items: Sequence[RawTick], now: dt.datetime, field: str = "ticks") -> list[Tick]:
    """Check every tick; raises ValidationFailed naming every bad field of every tick."""
    _check_count(len(items), field)
    earliest_us, latest_us = _EARLIEST_US, to_us(now + MAX_AHEAD)
    ticks: list[Tick] = []
    bad: list[int] = []
    for index, raw in enumerate(items):
        if _tick_is_valid(raw, earliest_us, latest_us):
            assert raw.ts_us is not None
            ticks.append(Tick(raw.symbol, from_us(raw.ts_us), raw.bid, raw.ask, raw.volume))
        else:
            bad.append(index)
    if bad:
        # Only now spell out what is wrong, field by field, for each bad tick.
        raise ValidationFailed([v for i in bad for v in _tick_violations(items[i], f"{field}[{i}]", now)])
    return ticks


def validate_source(source_id: str, sequence: int) -> None:
    """Check a streamed batch's source id and sequence number."""
    found: list[FieldViolation] = []
    if not SOURCE_ID_PATTERN.fullmatch(source_id):
        found.append(FieldViolation("source_id", "must be 1 to 64 letters, digits or ._-"))
    if sequence < 1:
        found.append(FieldViolation("sequence", "must be at least 1"))
    elif sequence > MAX_SEQUENCE:
        # Refused here, whole: past the database it would fail the group commit of every request
        # that shares the transaction.
        found.append(FieldViolation("sequence", f"must be at most {MAX_SEQUENCE} (2**63 - 1)"))
    if found:
        raise ValidationFailed(found)


def classify_candles(
    candles: Sequence[Candle], stored: Mapping[tuple[str, Timeframe, dt.datetime], tuple[float, ...]]
) -> list[CandleStatus]:
    """Compare each candle with the stored one (and earlier ones of the same request)."""
    current = dict(stored)
    statuses: list[CandleStatus] = []
    for candle in candles:
        before = current.get(candle.key)
        if before is None:
            statuses.append(CandleStatus.INSERTED)
        elif before == candle.values:
            statuses.append(CandleStatus.DUPLICATE)
        else:
            statuses.append(CandleStatus.UPDATED)
        current[candle.key] = candle.values
    return statuses


def tick_statuses(
    ticks: Sequence[Tick], inserted: Collection[tuple[str, dt.datetime, float, float]]
) -> list[TickStatus]:
    """The first occurrence of each newly stored key is received; everything else a duplicate."""
    pending = set(inserted)
    statuses: list[TickStatus] = []
    for tick in ticks:
        if tick.key in pending:
            pending.discard(tick.key)
            statuses.append(TickStatus.RECEIVED)
        else:
            statuses.append(TickStatus.DUPLICATE)
    return statuses

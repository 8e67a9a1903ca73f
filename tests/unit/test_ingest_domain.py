"""Ingest's validation rules and per-item outcomes, as pure functions."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.market import Candle, Tick, Timeframe, to_us
from services.common.validation import ValidationFailed
from services.ingest import domain
from services.ingest.domain import CandleStatus, RawCandle, RawTick, TickStatus

NOW = dt.datetime(2025, 10, 20, 12, 0, tzinfo=dt.UTC)
TS = dt.datetime(2025, 10, 20, 3, 0, 7, tzinfo=dt.UTC)
TS_US = int(TS.timestamp()) * 1_000_000
GOOD = RawCandle("EURUSD", Timeframe.M1.value, TS_US, 1.0855, 1.0857, 1.0854, 1.0856, 150, 2)
TICK = RawTick("EURUSD", TS_US + 123_000, 1.0855, 1.0857, 0)


def violations_of(items: list[RawCandle], field: str | None = "items") -> dict[str, str]:
    with pytest.raises(ValidationFailed) as info:
        domain.validate_candles(items, NOW, field)
    return {v.field: v.description for v in info.value.violations}


def test_validate_candles_good_candle_normalizes_ts_to_bucket() -> None:
    (candle,) = domain.validate_candles([GOOD], NOW)
    assert candle.ts == dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC)
    assert candle.timeframe is Timeframe.M1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"symbol": ""}, "items[0].symbol"),
        ({"symbol": "EUR USD"}, "items[0].symbol"),
        ({"symbol": "X" * 33}, "items[0].symbol"),
        ({"symbol": "EURUSD'; DROP TABLE x;--"}, "items[0].symbol"),
        ({"timeframe": 0}, "items[0].timeframe"),
        ({"timeframe": 42}, "items[0].timeframe"),
        ({"ts_us": None}, "items[0].ts"),
        ({"ts_us": -1}, "items[0].ts"),
        ({"ts_us": int(dt.datetime(1989, 12, 31, tzinfo=dt.UTC).timestamp()) * 1_000_000}, "items[0].ts"),
        ({"ts_us": int((NOW + dt.timedelta(days=1, seconds=1)).timestamp()) * 1_000_000}, "items[0].ts"),
        ({"open": float("nan")}, "items[0].open"),
        ({"close": float("inf")}, "items[0].close"),
        ({"low": -float("inf")}, "items[0].low"),
        ({"open": 0.0, "low": 0.0}, "items[0].open"),
        ({"low": -1.0}, "items[0].low"),
        ({"high": 1.0855}, "items[0].high"),  # below close
        ({"low": 1.08555}, "items[0].low"),  # above open
        ({"volume": -1.0}, "items[0].volume"),
        ({"volume": float("nan")}, "items[0].volume"),
        ({"spread": -0.5}, "items[0].spread"),
        ({"spread": float("inf")}, "items[0].spread"),
    ],
)
def test_validate_candles_bad_field_is_named(change: dict[str, object], field: str) -> None:
    assert field in violations_of([dataclasses.replace(GOOD, **change)])  # type: ignore[arg-type]


def test_validate_candles_one_bad_item_rejects_whole_request_naming_its_index() -> None:
    bad = dataclasses.replace(GOOD, high=1.0)
    found = violations_of([GOOD, GOOD, bad])
    assert set(found) == {"items[2].high"}


def test_validate_candles_single_form_names_bare_fields() -> None:
    found = violations_of([dataclasses.replace(GOOD, open=float("nan"))], field=None)
    assert set(found) == {"open"}


def test_validate_candles_future_within_a_day_is_accepted() -> None:
    ahead = int((NOW + dt.timedelta(hours=23)).timestamp()) * 1_000_000
    assert domain.validate_candles([dataclasses.replace(GOOD, ts_us=ahead)], NOW)


@pytest.mark.parametrize(("count", "fragment"), [(0, "at least one"), (domain.MAX_ITEMS + 1, "at most")])
def test_validate_candles_item_count_out_of_bounds_is_rejected(count: int, fragment: str) -> None:
    found = violations_of([GOOD] * count)
    assert fragment in found["items"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"symbol": ""}, "ticks[0].symbol"),
        ({"ts_us": None}, "ticks[0].ts"),
        ({"bid": float("nan")}, "ticks[0].bid"),
        ({"ask": 0.0}, "ticks[0].ask"),
        ({"ask": 1.0}, "ticks[0].ask"),  # below bid
        ({"volume": -2.0}, "ticks[0].volume"),
    ],
)
def test_validate_ticks_bad_field_is_named(change: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        domain.validate_ticks([dataclasses.replace(TICK, **change)], NOW)  # type: ignore[arg-type]
    assert field in {v.field for v in info.value.violations}


def test_validate_ticks_good_tick_keeps_microseconds() -> None:
    (tick,) = domain.validate_ticks([TICK], NOW)
    assert tick.ts.microsecond == 123_000


@pytest.mark.parametrize(
    ("source", "sequence", "field"), [("", 1, "source_id"), ("a b", 1, "source_id"), ("feed", 0, "sequence")]
)
def test_validate_source_bad_values_are_named(source: str, sequence: int, field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        domain.validate_source(source, sequence)
    assert [v.field for v in info.value.violations] == [field]


def candle(close: float) -> Candle:
    return Candle("EURUSD", Timeframe.M1, TS, 1.0, 2.0, 0.5, close, 10, 1)


def test_classify_candles_new_same_changed_are_inserted_duplicate_updated() -> None:
    stored = {candle(1.5).key: candle(1.5).values}
    other = dataclasses.replace(candle(1.5), symbol="GBPUSD")
    statuses = domain.classify_candles([candle(1.5), candle(1.6), other, other], stored)
    assert statuses == [
        CandleStatus.DUPLICATE,
        CandleStatus.UPDATED,
        CandleStatus.INSERTED,
        CandleStatus.DUPLICATE,
    ]


def test_tick_statuses_repeated_key_in_one_request_is_duplicate() -> None:
    tick = Tick("EURUSD", TS, 1.0, 1.1)
    later = dataclasses.replace(tick, ts=TS + dt.timedelta(seconds=1))
    assert domain.tick_statuses([tick, tick, later], {tick.key}) == [
        TickStatus.RECEIVED,
        TickStatus.DUPLICATE,
        TickStatus.DUPLICATE,
    ]


_weird = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, 1.1]))


@settings(max_examples=300, deadline=None)
@given(
    symbol=st.sampled_from(["EURUSD", "", "EUR USD", "X" * 33, "a#b.c-d_e"]),
    ts_us=st.one_of(st.none(), st.integers(min_value=-(2**62), max_value=2**62), st.just(TS_US)),
    bid=_weird,
    ask=_weird,
    volume=_weird,
)
def test_validate_ticks_fast_check_and_violations_agree(
    symbol: str, ts_us: int | None, bid: float, ask: float, volume: float
) -> None:
    """A tick is accepted exactly when the detailed check finds nothing wrong with it."""
    raw = RawTick(symbol, ts_us, bid, ask, volume)
    fast = domain._tick_is_valid(raw, domain._EARLIEST_US, to_us(NOW + domain.MAX_AHEAD))
    assert fast == (not domain._tick_violations(raw, "ticks[0]", NOW))

"""The indicator engine against TA-Lib's batch functions over the full series of final bars.

Every comparison is exact (``==``): a streaming handle is bit-identical to the batch function, a
revision replays the same operations from a copy of the handles, and ``warm`` opens on the same
history, so no floating-point order ever differs from batch TA-Lib's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
import talib
from hypothesis import event, given, settings
from hypothesis import strategies as st

from services.aggregator.bars import AggregationSettings, Aggregator, Bar, BarSource
from services.common.market import Timeframe
from services.common.validation import ValidationFailed
from services.indicators.catalog import lookback
from services.indicators.engine import (
    DEFAULT_CHECKPOINTS,
    MAX_PERIOD,
    IndicatorEngine,
    IndicatorSettings,
    IndicatorValues,
    NeedsHistory,
)
from tests.market_data import make_ticks

T0 = dt.datetime(2025, 3, 3, tzinfo=dt.UTC)
SYMBOL = "EURUSD"
M1 = Timeframe.M1
MINUTE = dt.timedelta(minutes=1)
Row = tuple[float | None, ...]
# talib's stubs type matype as an MA_Type enum that talib does not export; the function takes an int.
BBANDS: Callable[..., tuple[npt.NDArray[np.float64], ...]] = talib.BBANDS


def make_bar(
    ts: dt.datetime,
    close: float,
    high: float,
    low: float,
    *,
    final: bool = True,
    revision: int = 0,
    symbol: str = SYMBOL,
    timeframe: Timeframe = M1,
) -> Bar:
    return Bar(symbol, timeframe, ts, close, high, low, close, 1.0, 0.0, 1, BarSource.TICKS, revision, final)


def make_bars(
    n: int,
    seed: int,
    *,
    step: dt.timedelta = dt.timedelta(minutes=1),
    gaps: bool = False,
    symbol: str = SYMBOL,
    timeframe: Timeframe = M1,
) -> list[Bar]:
    """A random walk of final bars; with ``gaps``, some steps skip minutes, hours or a weekend."""
    rng = np.random.default_rng(seed)
    close = 100 + np.cumsum(rng.normal(0, 1, n))
    high = close + rng.random(n)
    low = close - rng.random(n)
    steps = rng.choice([1, 1, 1, 1, 3, 60, 2 * 24 * 60], size=n) if gaps else np.ones(n, dtype=np.int64)
    offsets = np.cumsum(steps) - steps[0]
    return [
        make_bar(T0 + int(k) * step, float(c), float(h), float(lo), symbol=symbol, timeframe=timeframe)
        for k, c, h, lo in zip(offsets, close, high, low, strict=True)
    ]


def batch(bars: list[Bar], s: IndicatorSettings | None = None) -> list[Row]:
    """Batch TA-Lib over the whole series, one row per bar, NaN as None."""
    s = s or IndicatorSettings()
    high = np.array([b.high for b in bars], dtype=np.float64)
    low = np.array([b.low for b in bars], dtype=np.float64)
    close = np.array([b.close for b in bars], dtype=np.float64)
    columns = [
        talib.RSI(close, s.rsi_period),
        *talib.MACD(close, s.macd_fast, s.macd_slow, s.macd_signal),
        talib.ATR(high, low, close, s.atr_period),
        *BBANDS(close, s.bb_period, s.bb_dev_up, s.bb_dev_down, matype=0),
    ]
    return [tuple(None if np.isnan(x) else float(x) for x in row) for row in zip(*columns, strict=True)]


def rows(values: list[IndicatorValues]) -> list[Row]:
    return [
        (v.rsi, v.macd, v.macd_signal, v.macd_hist, v.atr, v.bb_upper, v.bb_middle, v.bb_lower)
        for v in values
    ]


def run(engine: IndicatorEngine, bars: list[Bar]) -> list[IndicatorValues]:
    out: list[IndicatorValues] = []
    for bar in bars:
        values = engine.on_bar(bar)
        assert len(values) == 1
        out.extend(values)
    return out


def moved(
    bar: Bar, close: float, spread: float = 0.5, revision: int | None = None, final: bool = True
) -> Bar:
    """The bar with new prices (a revision, or a forming version)."""
    return dataclasses.replace(
        bar,
        close=close,
        high=close + spread,
        low=close - spread,
        revision=bar.revision + 1 if revision is None else revision,
        final=final,
    )


# --- exactness -------------------------------------------------------------------------------------


def test_engine_default_settings_long_random_walk_equals_batch_talib_exactly() -> None:
    bars = make_bars(5_000, seed=1)
    got = run(IndicatorEngine(), bars)
    assert rows(got) == batch(bars)
    assert [(v.ts, v.final, v.revision) for v in got] == [(b.ts, True, 0) for b in bars]


@pytest.mark.parametrize(
    "s",
    [
        IndicatorSettings(
            rsi_period=7, macd_fast=5, macd_slow=35, macd_signal=5, atr_period=21, bb_period=50
        ),
        IndicatorSettings(rsi_period=2, macd_fast=2, macd_slow=3, macd_signal=1, atr_period=1, bb_period=2),
        IndicatorSettings(bb_dev_up=1.5, bb_dev_down=2.5, macd_signal=20, rsi_period=30),
    ],
    ids=["longer", "shortest", "asymmetric-bands"],
)
def test_engine_non_default_periods_equal_batch_talib_exactly(s: IndicatorSettings) -> None:
    bars = make_bars(3_000, seed=2)
    assert rows(run(IndicatorEngine(s), bars)) == batch(bars, s)


def test_engine_gapped_timestamps_values_depend_only_on_bar_sequence() -> None:
    gapped = make_bars(2_000, seed=3, gaps=True)
    contiguous = [dataclasses.replace(b, ts=T0 + dt.timedelta(minutes=i)) for i, b in enumerate(gapped)]
    assert gapped[-1].ts - gapped[0].ts > dt.timedelta(days=30)  # the gaps are real
    got = rows(run(IndicatorEngine(), gapped))
    assert got == batch(gapped)
    assert got == rows(run(IndicatorEngine(), contiguous))


def test_engine_series_are_independent_per_symbol_and_timeframe() -> None:
    series = {
        ("EURUSD", M1): make_bars(300, seed=4),
        ("EURUSD", Timeframe.H1): make_bars(300, seed=5, timeframe=Timeframe.H1, step=dt.timedelta(hours=1)),
        ("XAUUSD", M1): make_bars(300, seed=6, symbol="XAUUSD"),
    }
    engine = IndicatorEngine()
    got: dict[tuple[str, Timeframe], list[IndicatorValues]] = {key: [] for key in series}
    for i in range(300):  # interleaved, as the aggregator publishes them
        for key, bars in series.items():
            got[key] += engine.on_bar(bars[i])
    for key, bars in series.items():
        assert rows(got[key]) == batch(bars), key
        assert {(v.symbol, v.timeframe) for v in got[key]} == {key}


# --- warming up ------------------------------------------------------------------------------------


def test_engine_warming_up_values_are_none_exactly_where_batch_is_nan() -> None:
    bars = make_bars(60, seed=7)
    got = run(IndicatorEngine(), bars)
    expected = batch(bars)
    assert rows(got) == expected
    # RSI and ATR from bar 14, BBANDS from 19, MACD from 33: TA-Lib's lookbacks.
    first = {
        name: next(i for i, row in enumerate(expected) if row[col] is not None)
        for name, col in (("rsi", 0), ("macd", 1), ("atr", 4), ("bb", 5))
    }
    assert first == {"rsi": 14, "macd": 33, "atr": 14, "bb": 19}
    assert [v.warming_up for v in got] == [i < 33 for i in range(60)]
    assert got[14].rsi is not None
    assert got[13].rsi is None


def test_engine_series_state_reports_which_indicators_are_ready() -> None:
    engine = IndicatorEngine()
    bars = make_bars(40, seed=8)
    run(engine, bars[:20])
    state = engine.series_state(SYMBOL, M1)
    assert state is not None
    assert (state.bars, state.last_final, state.ready) == (
        20,
        bars[19].ts,
        frozenset({"rsi", "atr", "bbands"}),
    )
    run(engine, bars[20:])
    state = engine.series_state(SYMBOL, M1)
    assert state is not None
    assert state.ready == frozenset({"rsi", "macd", "atr", "bbands"})


# --- forming bars ----------------------------------------------------------------------------------


@pytest.mark.parametrize("at", [0, 5, 14, 19, 33, 34, 200])
def test_engine_forming_bar_peeks_batch_over_series_plus_forming_and_commits_nothing(at: int) -> None:
    bars = make_bars(at + 5, seed=9)
    engine = IndicatorEngine()
    run(engine, bars[:at])
    nxt = bars[at]
    for close in (nxt.close - 3, nxt.close + 2, nxt.close):  # the forming bar moves, then closes
        forming = moved(nxt, close, spread=0.7, revision=0, final=False)
        (peeked,) = engine.on_bar(forming)
        assert not peeked.final
        assert (peeked.ts, peeked.revision) == (nxt.ts, 0)
        assert rows([peeked]) == batch([*bars[:at], forming])[-1:]
    # Nothing was committed: the final bars that follow are still exact.
    assert rows(run(engine, bars[at:])) == batch(bars)[at:]


def test_engine_forming_bar_at_or_before_last_final_is_ignored() -> None:
    bars = make_bars(50, seed=10)
    engine = IndicatorEngine()
    run(engine, bars)
    assert engine.on_bar(moved(bars[-1], 90.0, revision=0, final=False)) == []
    assert engine.on_bar(moved(bars[-5], 90.0, revision=0, final=False)) == []
    nxt = make_bar(bars[-1].ts + dt.timedelta(minutes=1), 101.0, 102.0, 100.0)
    assert rows(engine.on_bar(nxt)) == batch([*bars, nxt])[-1:]


# --- revisions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("back", [0, 1, 7, 40, DEFAULT_CHECKPOINTS - 1])
def test_engine_revision_k_bars_back_equals_batch_over_corrected_series(back: int) -> None:
    bars = make_bars(500, seed=11)
    engine = IndicatorEngine()
    run(engine, bars)
    pos = len(bars) - 1 - back
    revised = moved(bars[pos], bars[pos].close + 4.0)
    corrected = [*bars[:pos], revised, *bars[pos + 1 :]]
    got = engine.on_bar(revised)
    assert [v.ts for v in got] == [b.ts for b in corrected[pos:]]
    assert [v.revision for v in got] == [1] + [0] * back
    assert all(v.final for v in got)
    assert rows(got) == batch(corrected)[pos:]
    assert rows(got) != batch(bars)[pos:]  # the revision did change the values
    # The corrected series carries on exactly.
    tail = make_bars(510, seed=11)[500:]
    tail = [dataclasses.replace(b, ts=bars[-1].ts + dt.timedelta(minutes=i + 1)) for i, b in enumerate(tail)]
    assert rows(run(engine, tail)) == batch([*corrected, *tail])[500:]


def test_engine_revision_older_than_window_raises_needs_history_and_changes_nothing() -> None:
    bars = make_bars(300, seed=12)
    engine = IndicatorEngine()
    run(engine, bars)
    pos = len(bars) - 1 - DEFAULT_CHECKPOINTS
    revised = moved(bars[pos], 50.0)
    with pytest.raises(NeedsHistory) as caught:
        engine.on_bar(revised)
    assert (caught.value.symbol, caught.value.timeframe, caught.value.ts) == (SYMBOL, M1, bars[pos].ts)
    # Untouched: a new bar continues the uncorrected series exactly.
    nxt = make_bar(bars[-1].ts + dt.timedelta(minutes=1), 101.0, 102.0, 100.0)
    assert rows(engine.on_bar(nxt)) == batch([*bars, nxt])[-1:]
    # What the service does next: warm from stored history (with the revision) and republish.
    corrected = [*bars[:pos], revised, *bars[pos + 1 :], nxt]
    republished = engine.warm(SYMBOL, M1, corrected, report_from=revised.ts)
    assert [v.ts for v in republished] == [b.ts for b in corrected[pos:]]
    assert rows(republished) == batch(corrected)[pos:]


def test_engine_late_bar_filling_a_gap_is_inserted_and_later_values_recomputed() -> None:
    bars = make_bars(200, seed=13, step=dt.timedelta(minutes=2))
    engine = IndicatorEngine()
    run(engine, bars)
    late = make_bar(bars[180].ts + dt.timedelta(minutes=1), 97.0, 98.5, 96.0)  # between bars 180 and 181
    corrected = [*bars[:181], late, *bars[181:]]
    got = engine.on_bar(late)
    assert [v.ts for v in got] == [b.ts for b in corrected[181:]]
    assert rows(got) == batch(corrected)[181:]


def test_engine_late_bar_before_window_raises_needs_history() -> None:
    bars = make_bars(200, seed=14, step=dt.timedelta(minutes=2))
    engine = IndicatorEngine()
    run(engine, bars)
    with pytest.raises(NeedsHistory):
        engine.on_bar(make_bar(bars[10].ts + dt.timedelta(minutes=1), 97.0, 98.5, 96.0))


def test_engine_revision_of_unread_prices_returns_same_values_with_new_revision() -> None:
    bars = make_bars(100, seed=15)
    engine = IndicatorEngine()
    before = run(engine, bars)
    revised = dataclasses.replace(bars[90], open=1.0, volume=99.0, revision=1)  # high, low, close unchanged
    (got,) = engine.on_bar(revised)
    assert got == dataclasses.replace(before[90], revision=1)
    assert engine.on_bar(dataclasses.replace(revised, revision=0)) == []  # an older version is ignored


def test_engine_revision_while_warming_up_equals_batch() -> None:
    bars = make_bars(40, seed=16)
    engine = IndicatorEngine()
    run(engine, bars[:25])  # MACD is not open yet
    revised = moved(bars[3], 80.0)
    corrected = [*bars[:3], revised, *bars[4:]]
    assert rows(engine.on_bar(revised)) == batch(corrected[:25])[3:]
    assert rows(run(engine, bars[25:])) == batch(corrected)[25:]


def test_engine_revision_older_than_window_while_warming_up_replays_from_first_bar() -> None:
    bars = make_bars(60, seed=25)
    engine = IndicatorEngine(checkpoints=8)
    run(engine, bars[:30])  # MACD needs 34 bars: the whole series is still held
    state = engine.series_state(SYMBOL, M1)
    assert state is not None
    assert state.revisable_after is None
    revised = moved(bars[2], 130.0)
    corrected = [*bars[:2], revised, *bars[3:]]
    assert rows(engine.on_bar(revised)) == batch(corrected[:30])[2:]
    assert rows(run(engine, bars[30:])) == batch(corrected)[30:]
    state = engine.series_state(SYMBOL, M1)
    assert state is not None
    assert state.revisable_after == bars[60 - 8 - 1].ts  # every handle open: only the window is held


CHECKPOINTS = 12


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 90),
    seed=st.integers(0, 2**32 - 1),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.booleans(), st.floats(60, 140), st.floats(0, 3)),
        min_size=1,
        max_size=5,
    ),
)
def test_engine_random_revisions_and_inserts_equal_batch_or_need_history(
    n: int, seed: int, edits: list[tuple[int, bool, float, float]]
) -> None:
    # Bars two minutes apart leave room for a late bar between any two.
    series = make_bars(n, seed, step=dt.timedelta(minutes=2))
    engine = IndicatorEngine(checkpoints=CHECKPOINTS)
    assert rows(run(engine, series)) == batch(series)
    for pick, insert, close, spread in edits:
        pos = pick % len(series)
        # A late bar goes halfway into the gap before bar ``pos`` (a minute before the first bar).
        ts = series[pos].ts - (series[pos].ts - series[pos - 1].ts) / 2 if pos else series[0].ts - MINUTE
        if insert and (pos == 0 or ts > series[pos - 1].ts):
            bar = make_bar(ts, close, close + spread, close - spread)
            corrected = [*series[:pos], bar, *series[pos:]]
        else:
            insert = False
            bar = moved(series[pos], close, spread)
            corrected = [*series[:pos], bar, *series[pos + 1 :]]
        state = engine.series_state(SYMBOL, M1)
        assert state is not None
        held = state.revisable_after is None or bar.ts > state.revisable_after
        depth = len(series) - pos  # bars at or after the edit
        if depth <= CHECKPOINTS:
            assert held  # the promised window
        event("insert" if insert else "revise")
        event("held" if held else "needs history")
        if held:
            got = engine.on_bar(bar)
            # Same high, low and close: only the bar's own values come back, under its new revision.
            old = series[pos]
            same = not insert and (bar.high, bar.low, bar.close) == (old.high, old.low, old.close)
            end = pos + 1 if same else None
            assert [(v.ts, v.revision) for v in got] == [(b.ts, b.revision) for b in corrected[pos:end]]
            assert rows(got) == batch(corrected)[pos:end]
        else:
            with pytest.raises(NeedsHistory):
                engine.on_bar(bar)
            assert rows(engine.warm(SYMBOL, M1, corrected, report_from=bar.ts)) == batch(corrected)[pos:]
        series = corrected
    # Whatever happened, the series carries on exactly, forming bars included.
    nxt = make_bar(series[-1].ts + dt.timedelta(minutes=2), 100.0, 101.0, 99.0)
    (peeked,) = engine.on_bar(moved(nxt, 103.0, revision=0, final=False))
    assert rows([peeked]) == batch([*series, moved(nxt, 103.0, revision=0)])[-1:]
    assert rows(engine.on_bar(nxt)) == batch([*series, nxt])[-1:]


def test_engine_fed_by_aggregator_with_late_ticks_matches_batch_over_final_bars() -> None:
    ticks = make_ticks(12_000, seed=17, span_hours=20)
    rng = np.random.default_rng(17)
    # 3% of the ticks arrive 10 s to 50 min late: after their bar is final, within the retention.
    delay = np.where(rng.random(len(ticks)) < 0.03, rng.integers(10, 3_000, len(ticks)) * 1_000_000, 0)
    arrival = ticks.take(np.argsort(ticks.ts + delay, kind="stable"))
    aggregator, engine = Aggregator(AggregationSettings()), IndicatorEngine()
    latest_bar: dict[tuple[Timeframe, dt.datetime], Bar] = {}
    latest_values: dict[tuple[Timeframe, dt.datetime], IndicatorValues] = {}
    emitted = []
    for a in range(0, len(arrival), 100):
        part = arrival.take(slice(a, a + 100))
        emitted.append(aggregator.add_ticks(SYMBOL, part.ts, part.bid, part.ask, part.volume))
    emitted.append(aggregator.advance_clock(dt.datetime(2030, 1, 1, tzinfo=dt.UTC)))
    for out in emitted:
        for bar in [*out.final, *out.forming]:
            for values in engine.on_bar(bar):
                if values.final:
                    latest_values[(values.timeframe, values.ts)] = values
            if bar.final:
                latest_bar[(bar.timeframe, bar.ts)] = bar
    assert any(bar.revision for bar in latest_bar.values())  # late ticks did revise final bars
    for tf in Timeframe:
        keys = sorted(k for k in latest_bar if k[0] is tf)
        assert sorted(k for k in latest_values if k[0] is tf) == keys
        bars = [latest_bar[k] for k in keys]
        assert rows([latest_values[k] for k in keys]) == batch(bars), tf
        assert [latest_values[k].revision for k in keys] == [b.revision for b in bars]


# --- warm restart ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [0, 1, 20, 33, 34, 97, 98, 500, 2_999, 3_000])
def test_engine_warm_prefix_then_updates_equal_uninterrupted_run_and_batch(prefix: int) -> None:
    bars = make_bars(3_000, seed=18, gaps=True)
    restarted = IndicatorEngine()
    assert restarted.warm(SYMBOL, M1, bars[:prefix]) == []
    after = rows(run(restarted, bars[prefix:]))
    assert after == rows(run(IndicatorEngine(), bars))[prefix:]
    assert after == batch(bars)[prefix:]


def test_engine_warm_lays_down_checkpoints_for_revisions() -> None:
    bars = make_bars(1_000, seed=19)
    engine = IndicatorEngine()
    engine.warm(SYMBOL, M1, bars[::-1])  # any order: warm sorts by time
    pos = len(bars) - DEFAULT_CHECKPOINTS  # the oldest revisable bar
    state = engine.series_state(SYMBOL, M1)
    assert state is not None
    assert (state.bars, state.revisable_after) == (1_000, bars[pos - 1].ts)
    revised = moved(bars[pos], 120.0)
    corrected = [*bars[:pos], revised, *bars[pos + 1 :]]
    assert rows(engine.on_bar(revised)) == batch(corrected)[pos:]
    with pytest.raises(NeedsHistory):
        engine.on_bar(moved(bars[pos - 1], 120.0))


def test_engine_warm_report_from_returns_values_equal_batch() -> None:
    bars = make_bars(400, seed=20)
    reported = IndicatorEngine().warm(SYMBOL, M1, bars, report_from=bars[100].ts)
    assert [v.ts for v in reported] == [b.ts for b in bars[100:]]
    assert rows(reported) == batch(bars)[100:]
    assert all(v.final for v in reported)


@pytest.mark.parametrize(
    ("length", "held"),
    [
        (30, 30),
        (DEFAULT_CHECKPOINTS, DEFAULT_CHECKPOINTS),
        (DEFAULT_CHECKPOINTS + 1, DEFAULT_CHECKPOINTS + 1),  # one bar before: too few to open on
        (400, DEFAULT_CHECKPOINTS),
    ],
)
def test_engine_warm_report_revisable_returns_every_bar_a_revision_recomputes_in_place(
    length: int, held: int
) -> None:
    bars = make_bars(length, seed=24)
    engine = IndicatorEngine()
    reported = engine.warm(SYMBOL, M1, bars, report_revisable=True)
    state = engine.series_state(SYMBOL, M1)
    assert state is not None
    assert state.revisable_after == (None if held == length else bars[-held - 1].ts)
    assert [v.ts for v in reported] == [b.ts for b in bars[-held:]]
    assert rows(reported) == batch(bars)[-held:]
    # With report_from too: the earlier of the two.
    both = IndicatorEngine().warm(SYMBOL, M1, bars, report_from=bars[-3].ts, report_revisable=True)
    assert both == reported


@pytest.mark.parametrize("back", [1, 20, DEFAULT_CHECKPOINTS - 1, DEFAULT_CHECKPOINTS, 300])
def test_engine_restart_after_a_revision_it_missed_reports_batch_values_of_every_later_bar(back: int) -> None:
    bars = make_bars(500, seed=25)
    stored = {v.ts: v for v in run(IndicatorEngine(), bars)}  # published before going down
    pos = len(bars) - back
    revised = moved(bars[pos], 150.0)
    corrected = [*bars[:pos], revised, *bars[pos + 1 :]]
    # Restarted: warmed from the stored bars, the revision included; then the feed replays it.
    restarted = IndicatorEngine()
    stored |= {v.ts: v for v in restarted.warm(SYMBOL, M1, corrected, report_revisable=True)}
    try:
        replayed = restarted.on_bar(revised)
    except NeedsHistory:  # older than the checkpoints: rebuilt from storage, as the stage does
        replayed = restarted.warm(SYMBOL, M1, corrected, report_from=revised.ts)
    stored |= {v.ts: v for v in replayed}
    assert rows([stored[b.ts] for b in corrected]) == batch(corrected)
    assert stored[revised.ts].revision == 1


def test_engine_warm_replaces_what_the_engine_held() -> None:
    engine = IndicatorEngine()
    run(engine, make_bars(200, seed=21))
    fresh = make_bars(150, seed=22)
    engine.warm(SYMBOL, M1, fresh[:100])
    assert rows(run(engine, fresh[100:])) == batch(fresh)[100:]


def test_engine_warm_rejects_forming_duplicate_foreign_and_non_finite_bars() -> None:
    bars = make_bars(10, seed=23)
    bad = [
        *bars[:3],
        dataclasses.replace(bars[3], final=False),
        bars[4],
        bars[4],
        dataclasses.replace(bars[6], symbol="XAUUSD"),
        dataclasses.replace(bars[7], close=float("nan")),
    ]
    engine = IndicatorEngine()
    with pytest.raises(ValidationFailed) as caught:
        engine.warm(SYMBOL, M1, bad)
    assert [v.field for v in caught.value.violations] == [
        "bars[3].final",
        "bars[5].ts",
        "bars[6]",
        "bars[7].close",
    ]
    assert engine.series_state(SYMBOL, M1) is None


# --- input checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["high", "low", "close"])
def test_engine_non_finite_price_is_rejected_and_state_unchanged(field: str) -> None:
    bars = make_bars(60, seed=24)
    engine = IndicatorEngine()
    run(engine, bars[:50])
    high, low, close = (float("inf") if name == field else 100.0 for name in ("high", "low", "close"))
    with pytest.raises(ValidationFailed) as caught:
        engine.on_bar(make_bar(bars[50].ts, close, high, low))
    assert [v.field for v in caught.value.violations] == [field]
    assert rows(run(engine, bars[50:])) == batch(bars)[50:]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rsi_period": 1}, "rsi_period"),
        ({"macd_fast": 1}, "macd_fast"),
        ({"macd_slow": MAX_PERIOD + 1}, "macd_slow"),
        ({"macd_signal": 0}, "macd_signal"),
        ({"atr_period": 0}, "atr_period"),
        ({"bb_period": 1}, "bb_period"),
        ({"bb_period": 20.5}, "bb_period"),
        ({"macd_fast": 26}, "macd_fast"),
        ({"bb_dev_up": float("nan")}, "bb_dev_up"),
        ({"bb_dev_down": -1.0}, "bb_dev_down"),
    ],
)
def test_settings_out_of_range_value_raises_naming_field(changes: dict[str, float], field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        IndicatorSettings(**changes)  # type: ignore[arg-type]
    assert [v.field for v in caught.value.violations] == [field]
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("function", "parameter", "minimum"),
    [
        ("RSI", "timeperiod", 2),
        ("MACD", "fastperiod", 2),
        ("MACD", "slowperiod", 2),
        ("MACD", "signalperiod", 1),
        ("ATR", "timeperiod", 1),
        ("BBANDS", "timeperiod", 2),
    ],
)
def test_settings_bounds_agree_with_talib_ranges(function: str, parameter: str, minimum: int) -> None:
    assert lookback(function, {parameter: minimum - 1}) == -1
    assert lookback(function, {parameter: minimum}) >= 0
    assert lookback(function, {parameter: MAX_PERIOD + 1}) == -1


def test_engine_checkpoints_below_one_is_rejected() -> None:
    with pytest.raises(ValidationFailed, match="checkpoints"):
        IndicatorEngine(checkpoints=0)

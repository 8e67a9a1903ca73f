"""The aggregation core against an independent pandas reference, and its properties."""

from __future__ import annotations

import datetime as dt
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.aggregator.bars import AggregationSettings, Aggregator, Bar, BarSource
from services.common.market import Candle, Timeframe, to_us
from tests.market_data import Ticks, make_ticks, reference

FAR_FUTURE = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def final_bars(
    agg: Aggregator, symbol: str, ticks: Ticks, batches: list[slice] | None = None
) -> dict[tuple[Timeframe, dt.datetime], Bar]:
    """Feed ticks (in batches), let the clock pass everything, keep the last version of each bar."""
    out: dict[tuple[Timeframe, dt.datetime], Bar] = {}
    emitted: list[Bar] = []
    for part in batches or [slice(None)]:
        t = ticks.take(part)
        emitted += agg.add_ticks(symbol, t.ts, t.bid, t.ask, t.volume).final
    emitted += agg.advance_clock(FAR_FUTURE).final
    for bar in emitted:
        out[(bar.timeframe, bar.ts)] = bar
    return out


def assert_matches_reference(
    bars: dict[tuple[Timeframe, dt.datetime], Bar],
    ref: dict[tuple[Timeframe, dt.datetime], tuple[float, ...]],
) -> None:
    assert set(bars) == set(ref)
    for key, bar in bars.items():
        o, h, low, c, v, s = ref[key]
        assert (bar.open, bar.high, bar.low, bar.close) == (o, h, low, c), key
        assert bar.volume == pytest.approx(v, rel=1e-12), key
        # Mean spread: the same ticks summed in another order (per child bar first) -> 1e-12 relative.
        assert bar.spread == pytest.approx(s, rel=1e-12), key


@pytest.mark.parametrize("with_volume", [False, True])
def test_aggregator_every_timeframe_matches_pandas_resample(with_volume: bool) -> None:
    ticks = make_ticks(30_000, seed=1, with_volume=with_volume)
    bars = final_bars(Aggregator(), "EURUSD", ticks)
    assert_matches_reference(bars, reference(ticks))
    assert {bar.source for key, bar in bars.items() if key[0] is Timeframe.M1} == {BarSource.TICKS}
    assert {bar.source for key, bar in bars.items() if key[0] is not Timeframe.M1} == {BarSource.ROLLUP}
    assert all(bar.revision == 0 and bar.final for bar in bars.values())


def test_aggregator_bucket_boundaries_week_and_month_start_correctly() -> None:
    bars = final_bars(Aggregator(), "EURUSD", make_ticks(5_000, seed=2, span_hours=200))
    weeks = sorted(ts for tf, ts in bars if tf is Timeframe.W1)
    months = sorted(ts for tf, ts in bars if tf is Timeframe.MN1)
    assert all(ts.weekday() == 0 and ts.hour == 0 for ts in weeks)
    assert months == [dt.datetime(2025, 10, 1, tzinfo=dt.UTC), dt.datetime(2025, 11, 1, tzinfo=dt.UTC)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3_999), max_size=12, unique=True), st.integers(0, 10_000))
def test_aggregator_any_split_into_batches_gives_same_bars(cuts: list[int], seed: int) -> None:
    ticks = make_ticks(4_000, seed=seed, span_hours=30)
    edges = [0, *sorted(cuts), len(ticks)]
    batches = [slice(a, b) for a, b in itertools.pairwise(edges)]
    assert final_bars(Aggregator(), "X", ticks, batches) == final_bars(Aggregator(), "X", ticks)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 50))
def test_aggregator_redelivered_batch_is_ignored(seed: int, size: int) -> None:
    ticks = make_ticks(2_000, seed=seed, span_hours=5)
    cursors = np.arange(1, len(ticks) + 1, dtype=np.int64)
    once, twice = Aggregator(), Aggregator()
    for a in range(0, len(ticks), size):
        part = slice(a, a + size)
        once.add_ticks("X", ticks.ts[part], ticks.bid[part], ticks.ask[part], cursors=cursors[part])
        for _ in range(2):  # the same cursors again, as after a reconnect
            twice.add_ticks("X", ticks.ts[part], ticks.bid[part], ticks.ask[part], cursors=cursors[part])
    assert once.advance_clock(FAR_FUTURE) == twice.advance_clock(FAR_FUTURE)
    assert once.symbols["X"].forming() == twice.symbols["X"].forming()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_aggregator_shuffle_within_lateness_gives_same_final_bars(seed: int, shuffle_seed: int) -> None:
    ticks = make_ticks(3_000, seed=seed, span_hours=3)
    lateness_us = AggregationSettings().lateness // dt.timedelta(microseconds=1)
    # Swap neighbours whose times are within the lateness: no tick ever arrives late.
    coin = np.random.default_rng(shuffle_seed).random(len(ticks))
    order = list(range(len(ticks)))
    for i in range(len(order) - 1):
        a, b = order[i], order[i + 1]
        if ticks.ts[b] - ticks.ts[a] < lateness_us and coin[i] < 0.5:
            order[i], order[i + 1] = b, a
    shuffled = ticks.take(np.array(order))
    got = final_bars(Aggregator(), "X", shuffled)
    assert got == final_bars(Aggregator(), "X", ticks)
    assert all(bar.revision == 0 for bar in got.values())


def test_aggregator_late_tick_revises_bar_and_final_parents_once() -> None:
    agg = Aggregator()
    base = to_us(dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC))
    ts = np.array([base + 10 * 1_000_000, base + 70 * 1_000_000, base + 400 * 1_000_000], dtype=np.int64)
    agg.add_ticks("X", ts, np.array([1.0, 1.1, 1.2]), np.array([1.0002, 1.1002, 1.2002]))
    # 03:06:40 has passed 03:01 + 2 s lateness: the 03:00 M1 bar is final; M5 03:00 is final too.
    late = agg.add_ticks("X", np.array([base + 20 * 1_000_000]), np.array([1.5]), np.array([1.5002]))
    revised = {(b.timeframe, b.ts): b for b in late.final}
    m1 = revised[(Timeframe.M1, dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC))]
    m5 = revised[(Timeframe.M5, dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC))]
    assert (m1.revision, m1.high, m1.close, m1.tick_count) == (1, 1.5001, 1.5001, 2)
    assert (m5.revision, m5.high) == (1, 1.5001)
    assert len(late.final) == 2  # M15 and above are still forming: updated, not revised
    assert all(not b.final for b in late.forming)


def test_aggregator_tick_older_than_retention_is_counted_and_dropped() -> None:
    agg = Aggregator()
    base = to_us(dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC))
    agg.add_ticks(
        "X", np.array([base, base + 2 * 3600 * 1_000_000]), np.array([1.0, 1.0]), np.array([1.1, 1.1])
    )
    out = agg.add_ticks("X", np.array([base + 1_000_000]), np.array([2.0]), np.array([2.1]))
    assert out.final == []
    assert agg.late_dropped == 1


def test_aggregator_quiet_market_finalizes_after_grace() -> None:
    agg = Aggregator()
    minute = dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC)
    agg.add_ticks("X", np.array([to_us(minute) + 5_000_000]), np.array([1.0]), np.array([1.1]))
    assert agg.advance_clock(minute + dt.timedelta(seconds=64)).final == []
    done = agg.advance_clock(minute + dt.timedelta(seconds=65)).final
    assert [(b.timeframe, b.final) for b in done] == [(Timeframe.M1, True)]


def ea(
    close: float, tf: Timeframe = Timeframe.M1, ts: dt.datetime = dt.datetime(2025, 10, 20, 3, tzinfo=dt.UTC)
) -> Candle:
    return Candle("X", tf, ts, 1.0, max(1.2, close), 0.9, close, 100, 2)


def test_aggregator_ea_candle_takes_precedence_and_flags_disagreement() -> None:
    agg = Aggregator()
    minute = dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC)
    agg.add_ticks("X", np.array([to_us(minute) + 1_000_000]), np.array([1.0]), np.array([1.0002]))
    out = agg.add_ea_candle(ea(1.1))
    (m1,) = [b for b in out.final if b.timeframe is Timeframe.M1]
    assert (m1.source, m1.close, m1.final, m1.revision, m1.ea_disagrees) == (BarSource.EA, 1.1, True, 0, True)
    m5 = next(b for b in out.forming if b.timeframe is Timeframe.M5)
    assert m5.close == 1.1  # the EA bar rolls up
    repost = agg.add_ea_candle(ea(1.15)).final
    assert [(b.timeframe, b.revision, b.close) for b in repost] == [(Timeframe.M1, 1, 1.15)]
    assert agg.add_ea_candle(ea(1.15)).final == []  # an identical re-post changes nothing


def test_aggregator_ea_history_of_higher_timeframe_rolls_up_and_closes_without_clock() -> None:
    agg = Aggregator()
    day = dt.datetime(2025, 10, 20, tzinfo=dt.UTC)
    final: list[Bar] = []
    for h in range(24):
        final += agg.add_ea_candle(
            Candle(
                "X", Timeframe.H1, day + dt.timedelta(hours=h), 1.0 + h / 100, 1.5, 0.5, 1.01 + h / 100, 10, 2
            )
        ).final
    # No tick and no clock: the EA's own bars close what they roll up into (the last hour, the day).
    bars = {(b.timeframe, b.ts): b for b in final}
    d1 = bars[(Timeframe.D1, day)]
    assert (d1.open, d1.close, d1.volume, d1.source) == (1.0, 1.24, 240, BarSource.ROLLUP)
    assert bars[(Timeframe.H4, day + dt.timedelta(hours=4))].open == 1.04


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3_999))
def test_aggregator_restore_from_stored_versions_continues_identically(seed: int, cut: int) -> None:
    ticks = make_ticks(4_000, seed=seed, span_hours=30)
    first = Aggregator()
    stored: dict[tuple[Timeframe, dt.datetime], Bar] = {}
    emitted = first.add_ticks("X", ticks.ts[:cut], ticks.bid[:cut], ticks.ask[:cut])
    for bar in [*emitted.final, *emitted.forming]:
        stored[(bar.timeframe, bar.ts)] = bar  # what the service writes: the latest version of each bar
    restored = Aggregator()
    restored.restore("X", stored.values(), first.symbols["X"].latest_tick_us, first.symbols["X"].last_cursor)
    rest = ticks.take(slice(cut, None))
    after_restart = final_bars(restored, "X", rest)
    uninterrupted = final_bars(first, "X", rest)
    assert after_restart == uninterrupted


def test_aggregator_backfill_of_old_ticks_is_not_finalized_by_wall_clock() -> None:
    ticks = make_ticks(3_000, seed=4, span_hours=6)
    agg = Aggregator()
    wall = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    emitted: list[Bar] = []
    for i, a in enumerate(range(0, len(ticks), 100)):
        part = slice(a, a + 100)
        now = wall + dt.timedelta(milliseconds=50 * i)  # pages keep arriving: the symbol is not quiet
        emitted += agg.add_ticks("X", ticks.ts[part], ticks.bid[part], ticks.ask[part], arrived=now).final
        emitted += agg.advance_clock(now + dt.timedelta(milliseconds=25)).final
    emitted += agg.advance_clock(wall + dt.timedelta(hours=1)).final  # quiet now: everything closes
    bars = {(b.timeframe, b.ts): b for b in emitted}
    assert agg.late_dropped == 0
    assert all(b.revision == 0 for b in emitted)
    assert bars == final_bars(Aggregator(), "X", ticks)


def test_aggregator_ea_candle_for_pruned_bar_after_adopt_is_a_revision() -> None:
    agg = Aggregator()
    minute = dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC)
    stored: dict[tuple[Timeframe, dt.datetime], Bar] = {}
    forming = agg.add_ticks("X", np.array([to_us(minute) + 1_000_000]), np.array([1.0]), np.array([1.0002]))
    # Three hours of market time later: final, then pruned (older than the retention window).
    later = np.array([to_us(minute) + 3 * 3_600_000_000], dtype=np.int64)
    closed = agg.add_ticks("X", later, np.array([1.0]), np.array([1.0002]))
    for bar in [*forming.forming, *closed.final, *closed.forming]:  # as published: the latest wins
        stored[(bar.timeframe, bar.ts)] = bar
    assert not agg.is_live("X", Timeframe.M1, minute)
    agg.adopt("X", stored.values())
    final = {b.timeframe: b for b in agg.add_ea_candle(ea(1.1)).final}
    assert (final[Timeframe.M1].revision, final[Timeframe.M1].ea_disagrees) == (1, True)
    assert final[Timeframe.M5].revision == 1  # the change cascades to the final M5 bar
    assert final[Timeframe.M5].close == 1.1


def test_aggregator_adopt_for_an_ea_candle_leaves_siblings_under_a_live_parent_alone() -> None:
    # An EA posting H1 history: the first H4 bar closes and leaves memory while its day is still live.
    day = dt.datetime(2025, 10, 20, tzinfo=dt.UTC)
    history = [
        Candle("X", Timeframe.H1, day + dt.timedelta(hours=h), 1.0, 1.5, 0.5, 1.0 + h / 100, 10, 2)
        for h in range(7)
    ]
    agg = Aggregator()
    stored: dict[tuple[Timeframe, dt.datetime], Bar] = {}
    for candle in history[:6]:
        out = agg.add_ea_candle(candle)
        stored |= {(b.timeframe, b.ts): b for b in [*out.final, *out.forming]}
    assert not agg.is_live("X", Timeframe.H4, day)  # pruned: it ended more than the retention ago
    assert agg.is_live("X", Timeframe.D1, day)
    # The candle of 06:00 is offered every stored bar of the symbol, its closed sibling H4 included.
    agg.adopt("X", stored.values(), (Timeframe.H1, day + dt.timedelta(hours=6)))
    assert not agg.is_live("X", Timeframe.H4, day)  # the live day holds its values already
    out = agg.add_ea_candle(history[6])
    d1 = next(b for b in out.forming if b.timeframe is Timeframe.D1)
    assert (d1.open, d1.close, d1.volume) == (1.0, 1.06, 70)


def test_aggregator_adopt_links_every_stored_child_of_a_parent() -> None:
    agg = Aggregator()
    minute = dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC)
    ts = np.array([to_us(minute) + i * 60_000_000 + 1_000_000 for i in range(3)], dtype=np.int64)
    forming = agg.add_ticks("X", ts, np.array([1.0, 0.8, 1.4]), np.array([1.0002, 0.8002, 1.4002]))
    later = np.array([to_us(minute) + 3 * 3_600_000_000], dtype=np.int64)  # M5 03:00 falls out of retention
    closed = agg.add_ticks("X", later, np.array([1.0]), np.array([1.0002]))
    closed.extend(agg.advance_clock(FAR_FUTURE))
    stored = {(b.timeframe, b.ts): b for b in [*forming.forming, *closed.forming, *closed.final]}
    assert not agg.is_live("X", Timeframe.M5, minute)
    agg.adopt("X", stored.values())  # M1 bars and their M5 parent, all pruned before
    m5 = next(b for b in agg.add_ea_candle(ea(1.1)).final if b.timeframe is Timeframe.M5)
    # The EA bar replaced the first minute; the other two minutes still count.
    assert (m5.low, m5.high, m5.close, m5.revision) == (0.8001, 1.4001, 1.4001, 1)


# --- the wall clock never makes a tick too old: it judges nothing but a quiet market ---------------


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=2_999), max_size=6, unique=True), st.integers(0, 10_000))
def test_aggregator_replay_paused_longer_than_grace_anywhere_loses_no_tick(
    pauses: list[int], seed: int
) -> None:
    ticks = make_ticks(3_000, seed=seed, span_hours=3)
    agg = Aggregator()
    wall = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # old ticks: years before the wall clock
    latest: dict[tuple[Timeframe, dt.datetime], Bar] = {}
    edges = [0, *sorted(pauses), len(ticks)]
    for k, (a, b) in enumerate(itertools.pairwise(edges)):
        now = wall + dt.timedelta(minutes=k)
        part = ticks.take(slice(a, b))
        out = agg.add_ticks("X", part.ts, part.bid, part.ask, arrived=now)
        # The feed pauses for longer than the grace: the clock closes every bar it holds.
        out.extend(agg.advance_clock(now + dt.timedelta(seconds=30)))
        latest |= {(bar.timeframe, bar.ts): bar for bar in out.final}
    latest |= {(bar.timeframe, bar.ts): bar for bar in agg.advance_clock(FAR_FUTURE).final}
    assert agg.late_dropped == 0
    assert_matches_reference(latest, reference(ticks))


def test_aggregator_tick_for_bar_the_clock_closed_revises_it_and_resumes_the_tick_horizon() -> None:
    agg = Aggregator()
    minute = dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC)
    wall = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    agg.add_ticks("X", np.array([to_us(minute) + 5_000_000]), np.array([1.0]), np.array([1.1]), arrived=wall)
    closed = agg.advance_clock(wall + dt.timedelta(seconds=6)).final
    assert (Timeframe.M1, minute, 0) in {(b.timeframe, b.ts, b.revision) for b in closed}
    # The feed goes on in the same minute: the tick revises the bar instead of being dropped ...
    resumed = agg.add_ticks(
        "X", np.array([to_us(minute) + 40_000_000]), np.array([1.4]), np.array([1.5]), arrived=wall
    )
    m1 = next(b for b in resumed.final if b.timeframe is Timeframe.M1)
    assert (m1.revision, m1.close, m1.tick_count) == (1, 1.45, 2)
    assert agg.late_dropped == 0
    # ... and the next minute forms again: only tick times move the horizon once ticks are back. Its
    # parents, which the clock closed, take it in as a revision.
    nxt = agg.add_ticks(
        "X", np.array([to_us(minute) + 70_000_000]), np.array([1.2]), np.array([1.3]), arrived=wall
    )
    assert (Timeframe.M1, minute + dt.timedelta(minutes=1)) in {(b.timeframe, b.ts) for b in nxt.forming}
    assert Timeframe.M1 not in {b.timeframe for b in nxt.final}
    m5 = next(b for b in nxt.final if b.timeframe is Timeframe.M5)
    assert (m5.revision, m5.close, m5.tick_count) == (2, 1.25, 3)


def test_aggregator_restored_symbol_waits_a_grace_before_the_clock_closes_its_bars() -> None:
    ticks = make_ticks(2_000, seed=7, span_hours=2)
    cut = 1_000
    first = Aggregator()
    emitted = first.add_ticks("X", ticks.ts[:cut], ticks.bid[:cut], ticks.ask[:cut])
    stored = {(b.timeframe, b.ts): b for b in [*emitted.final, *emitted.forming]}
    restored = Aggregator()
    wall = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    state = first.symbols["X"]
    restored.restore("X", stored.values(), state.latest_tick_us, state.last_cursor, restored=wall)
    grace = AggregationSettings().grace
    assert restored.advance_clock(wall + grace - dt.timedelta(microseconds=1)).final == []
    assert restored.advance_clock(wall + grace).final != []  # idle for the grace: now it is quiet
    rest = ticks.take(slice(cut, None))
    latest = {key: bar for key, bar in final_bars(restored, "X", rest).items()}
    assert restored.late_dropped == 0
    for key, values in reference(ticks).items():
        bar = latest.get(key) or stored[key]
        assert (bar.open, bar.high, bar.low, bar.close) == values[:4], key


def test_aggregator_clock_waits_a_grace_after_ea_candles_before_closing_their_roll_up() -> None:
    agg = Aggregator()
    day = dt.datetime(2025, 10, 20, tzinfo=dt.UTC)
    wall = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for h in range(2):  # the first two hours of an H4 bar, posted as history
        agg.add_ea_candle(
            Candle("X", Timeframe.H1, day + dt.timedelta(hours=h), 1.0, 1.5, 0.5, 1.0 + h / 100, 10, 2), wall
        )
    # Within the grace the clock leaves the H4 bar forming: the EA may still be posting its history.
    assert [
        b for b in agg.advance_clock(wall + dt.timedelta(seconds=1)).final if b.timeframe is Timeframe.H4
    ] == []
    after = agg.advance_clock(wall + agg.settings.grace + dt.timedelta(seconds=1)).final
    (h4,) = [b for b in after if b.timeframe is Timeframe.H4]
    assert (h4.ts, h4.close, h4.revision) == (day, 1.01, 0)


def test_aggregator_ea_only_symbol_without_clock_keeps_only_its_retention_window() -> None:
    # EA candles and no tick, with the clock never advancing (as while the aggregator works through a
    # tick backlog): bars older than the retention window before the newest EA bar leave memory.
    agg = Aggregator()
    start = dt.datetime(2025, 10, 20, tzinfo=dt.UTC)
    for m in range(6 * 60):
        agg.add_ea_candle(ea(1.1, ts=start + dt.timedelta(minutes=m)))
    held = agg.symbols["X"].slots[Timeframe.M1]
    retention_minutes = agg.settings.retention // dt.timedelta(minutes=1)
    assert retention_minutes < len(held) <= retention_minutes + 2  # pruned once per minute
    assert not agg.is_live("X", Timeframe.M1, start)
    assert agg.is_live("X", Timeframe.M1, start + dt.timedelta(minutes=6 * 60 - 1))


def test_aggregator_tick_for_ea_bar_the_clock_pruned_is_dropped_not_started_afresh() -> None:
    agg = Aggregator()
    agg.add_ea_candle(ea(1.1))
    agg.advance_clock(FAR_FUTURE)  # no ticks: the clock's retention window prunes the EA bars
    assert not agg.is_live("X", Timeframe.M1, dt.datetime(2025, 10, 20, 3, tzinfo=dt.UTC))
    tick = to_us(dt.datetime(2025, 10, 20, 3, 0, 30, tzinfo=dt.UTC))
    out = agg.add_ticks("X", np.array([tick]), np.array([1.0]), np.array([1.0002]))
    assert (out.final, out.forming, agg.late_dropped) == ([], [], 1)

"""Indicators benchmark: ``make bench-indicators`` (``python -m bench.indicators_bench``).

Four measurements over the four default indicators (RSI 14, MACD 12/26/9, ATR 14, BBANDS 20/2/2), all
in one run on this machine:

(a) the service's per-candle update: ``IndicatorEngine.on_bar`` of every final bar of a 50,000-bar
    series (one O(1) TA-Lib streaming update per indicator), per candle and per indicator update
    (divided by 4); also the same 50,000 bars spread over 50 interleaved series, the path the stage
    takes (``bar_from_pb`` + ``on_bar`` under its histogram timer), the per-call distribution, and
    what TA-Lib's own ``update`` and the checkpoint ``copy()`` cost of it. The engine's values are
    checked bit for bit against TA-Lib's batch functions over the whole series;
(b) the seed's method ("Indicators Worker"): for every new bar, recompute the last 200 bars with pandas
    rolling windows (SMA-based RSI, MACD with ``ewm``, ATR as a rolling mean of the true range,
    Bollinger = rolling mean ± 2 rolling std) — over the last 2,000 bars of the series by default, the
    cost per bar extrapolated to the whole series;
(c) TA-Lib's batch functions over the last 200 bars for every new bar (every bar from the 200th);
(d) end to end on PostgreSQL: real ingest, aggregator and indicators processes on loopback; a client
    process subscribed at the same time to the aggregator's ``SubscribeCandles`` (final M1 bars) and to
    the indicators' ``SubscribeIndicators`` (M1 values); "live-ish" ticks of several symbols streamed
    into ingest in small batches every 50 ms with simulated time running 30 times faster than the wall
    clock, so every symbol's M1 bar closes every 2 s. Latency of a bar = arrival of its indicator
    values at the indicator subscriber minus arrival of its final candle at the candle subscriber (the
    same ``time.monotonic()`` clock). The values received are checked bit for bit against TA-Lib's
    batch functions over the candles received. Recorded alongside: the CPU time of every process, the
    indicators service's own metrics (``on_bar`` calls, of which forming-bar peeks), PostgreSQL
    checkpoints and autovacuum runs during the live phase, and every measured bar's latency. With
    ``--probe``, a further client subscribed like the indicators service's own input splits the
    latency at that input. Afterwards, on the same database, the pieces of the path are timed on their
    own: the indicators' commit (``IndicatorStore.commit``), the subscriber's read (``values_after``),
    a bare durable commit, a round trip and a thread hop.

Costs in (a) to (c) are CPU time of the measuring thread (``time.thread_time``), best of several runs:
the machine is shared, and preemption by other processes adds wall time that is not the method's cost
(wall time is recorded too). Ratios use the figures of this same run; targets are judged here, not
written down. Results go to ``bench/results/indicators.json`` and a table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import math
import multiprocessing
import pathlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pandas as pd
import psycopg
import talib
from google.protobuf import timestamp_pb2
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_grpc
from mt5.indicators.v1 import indicators_service_pb2 as ind_pb
from mt5.indicators.v1 import indicators_service_pb2_grpc as ind_grpc
from mt5.ingest.v1 import ingest_service_pb2 as ingest_pb
from mt5.market.v1 import market_pb2
from talib import stream

from bench.common import (
    MIB,
    CpuMeter,
    ScenarioFailed,
    machine_info,
    metric_delta,
    plain_url,
    postgres_pids,
    publish,
    scrape,
    scratch_folder,
    stats_ms,
    step,
    wait_for_quiet,
)
from services.aggregator.bars import M1_US, AggregationSettings, Bar, BarSource, to_us
from services.aggregator.convert import bar_to_pb
from services.common import db
from services.common.channels import api_key_metadata
from services.common.market import Timeframe
from services.indicators import metrics as indicator_metrics
from services.indicators.engine import IndicatorEngine, IndicatorSettings, IndicatorValues
from services.indicators.stage import bar_from_pb
from services.indicators.store import IndicatorStore, IndicatorWork
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "bench" / "results" / "indicators.json"
QUICK_OUTPUT = pathlib.Path(tempfile.gettempdir()) / "indicators-bench-quick.json"
INDICATOR_COUNT = 4  # RSI, MACD, ATR, BBANDS: "per indicator update" is a candle's cost / 4
OUTPUTS = ("rsi", "macd", "macd_signal", "macd_hist", "atr", "bb_upper", "bb_middle", "bb_lower")
SERIES_START = dt.datetime(2020, 1, 6, tzinfo=dt.UTC)
SIM_START = dt.datetime(2025, 11, 3, tzinfo=dt.UTC)  # simulated time of the end-to-end ticks
SOURCE_ID = "bench-indicators"
STREAM_TICKS = "/mt5.ingest.v1.IngestService/StreamTicks"
BACKFILL_BATCH = 1000  # ticks per batch of the history sent before the live-ish phase
SHORT_WINDOW = 50  # (c) is also run over this window, to split its cost into per call and per bar
BURST_GAP = 0.005  # final candles arriving within this many seconds of the previous one: one burst

TARGETS: dict[str, tuple[str, str, float]] = {
    "a_us_per_indicator_update": ("(a) µs per indicator update", "<=", 5.0),
    "c_over_a": ("(c) / (a): TA-Lib batch recompute vs streaming", ">=", 30.0),
    "b_over_a": ("(b) / (a): seed pandas recompute vs streaming", ">=", 300.0),
    "e2e_p99_ms": ("(d) final candle -> indicator values, p99 ms", "<=", 5.0),
}
MIN_E2E_BARS = 200  # the latency target is stated over at least this many bars


@dataclasses.dataclass(frozen=True)
class Params:
    """What one run measures; see ``parse_args``."""

    bars: int
    series: int
    repeats: int
    window: int
    seed_bars: int
    seed_repeats: int
    batch_bars: int | None
    batch_repeats: int
    symbols: int
    speedup: float
    tick_interval: float
    batch_interval: float
    history_minutes: int
    live_seconds: float
    warmup_seconds: float
    drain_timeout: float
    store_repeats: int
    stream_window: int
    feed_poll_seconds: float
    probe: bool
    service_env: dict[str, str]
    wait_quiet: float
    noisy_retries: int
    quick: bool
    output: pathlib.Path

    @property
    def lateness_us(self) -> int:
        """The aggregator's allowed lateness, as the services run with it."""
        default = AggregationSettings().lateness.total_seconds()
        return round(float(self.service_env.get("AGGREGATOR_LATENESS_SECONDS", default)) * 1_000_000)


# --- synthetic bars --------------------------------------------------------------------------------

_Array = npt.NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class Series:
    """Final M1 bars in the order the engine gets them, and their prices as arrays (per series)."""

    bars: list[Bar]
    high: _Array
    low: _Array
    close: _Array


def make_series(count: int, symbol: str, seed: int) -> Series:
    """A random-walk M1 series: open = previous close, high/low around the body."""
    rng = np.random.default_rng(seed)
    close = 1.1 + np.cumsum(rng.normal(0.0, 1e-4, count))
    opens = np.r_[close[0], close[:-1]]
    high = np.maximum(opens, close) + np.abs(rng.normal(0.0, 5e-5, count))
    low = np.minimum(opens, close) - np.abs(rng.normal(0.0, 5e-5, count))
    bars = [
        Bar(
            symbol,
            Timeframe.M1,
            SERIES_START + dt.timedelta(minutes=i),
            o,
            h,
            lo,
            c,
            float(10 + i % 7),
            1.5,
            10 + i % 7,
            BarSource.TICKS,
            0,
            True,
        )
        for i, (o, h, lo, c) in enumerate(
            zip(opens.tolist(), high.tolist(), low.tolist(), close.tolist(), strict=True)
        )
    ]
    return Series(bars, high, low, close)


def interleave(parts: Sequence[Series]) -> list[Bar]:
    """The bars of several series minute by minute, as the stage gets them when all symbols close."""
    out: list[Bar] = []
    for row in zip(*(p.bars for p in parts), strict=True):
        out.extend(row)
    return out


def bar_message(bar: Bar) -> agg_pb.SubscribeCandlesResponse:
    """A bar as the aggregator's feed delivers it to the indicators stage."""
    return agg_pb.SubscribeCandlesResponse(cursor=1, bar=bar_to_pb(bar))


# --- timing helpers --------------------------------------------------------------------------------


@dataclasses.dataclass
class Timed:
    """CPU (this thread) and wall seconds of one run, and what it produced."""

    cpu: float
    wall: float
    output: Any = None


def timed(run: Callable[[], Any]) -> Timed:
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    output = run()
    return Timed(time.thread_time() - cpu0, time.perf_counter() - wall0, output)


def best_of(repeats: int, run: Callable[[], Any]) -> tuple[Timed, list[Timed]]:
    """Run ``repeats`` times; the run with the least CPU time, and all of them."""
    runs = [timed(run) for _ in range(repeats)]
    return min(runs, key=lambda r: r.cpu), runs


def per_item(best: Timed, runs: Sequence[Timed], count: int) -> dict[str, Any]:
    """µs per item: CPU of the best run (the figure used), its wall time, and every run's CPU."""
    return {
        "items": count,
        "us_cpu": round(best.cpu / count * 1e6, 3),
        "us_wall": round(best.wall / count * 1e6, 3),
        "us_cpu_by_run": [round(r.cpu / count * 1e6, 3) for r in runs],
        "us_wall_by_run": [round(r.wall / count * 1e6, 3) for r in runs],
    }


def stats_us(values_ns: Sequence[int] | npt.NDArray[np.int64]) -> dict[str, float]:
    a = np.asarray(values_ns, dtype=np.float64) / 1000
    q = np.percentile(a, [50, 90, 99, 99.9], method="inverted_cdf")
    return {
        "p50": round(float(q[0]), 2),
        "p90": round(float(q[1]), 2),
        "p99": round(float(q[2]), 2),
        "p99_9": round(float(q[3]), 2),
        "max": round(float(a.max()), 1),
    }


# --- (a) the engine --------------------------------------------------------------------------------


def engine_run(bars: Sequence[Bar]) -> list[list[IndicatorValues]]:
    engine = IndicatorEngine(IndicatorSettings())
    on_bar = engine.on_bar
    return [on_bar(bar) for bar in bars]


def stage_run(messages: Sequence[agg_pb.SubscribeCandlesResponse]) -> int:
    """What ``IndicatorStage._apply`` does with a final bar, minus the commit hand-off."""
    engine = IndicatorEngine(IndicatorSettings())
    on_bar = engine.on_bar
    timer = indicator_metrics.UPDATE_SECONDS.time
    pending: list[IndicatorValues] = []
    for item in messages:
        bar = bar_from_pb(item.bar)
        with timer():
            values = on_bar(bar)
        pending.extend(values)
    return len(pending)


def engine_per_call(bars: Sequence[Bar]) -> tuple[list[int], int]:
    """Wall ns of every on_bar call, and the cost of the timer pair alone (ns)."""
    engine = IndicatorEngine(IndicatorSettings())
    on_bar = engine.on_bar
    clock = time.perf_counter_ns
    out: list[int] = []
    for bar in bars:
        t0 = clock()
        on_bar(bar)
        out.append(clock() - t0)
    empty = []
    for _ in range(10_000):
        t0 = clock()
        empty.append(clock() - t0)
    return out, int(np.median(empty))


def talib_parts(series: Series, repeats: int) -> dict[str, Any]:
    """TA-Lib's own share of a candle: the four handles' ``update``, and the four ``copy()`` calls the
    engine makes for its revision checkpoint."""
    s = IndicatorSettings()
    first = 100
    h, lo, c = series.high, series.low, series.close
    handles = (
        stream.RSI(c[:first], timeperiod=s.rsi_period),
        stream.MACD(c[:first], fastperiod=s.macd_fast, slowperiod=s.macd_slow, signalperiod=s.macd_signal),
        stream.ATR(h[:first], lo[:first], c[:first], timeperiod=s.atr_period),
        stream.BBANDS(c[:first], timeperiod=s.bb_period, nbdevup=2.0, nbdevdn=2.0, matype=0),
    )
    highs, lows, closes = h[first:].tolist(), lo[first:].tolist(), c[first:].tolist()
    count = len(closes)

    def updates() -> None:
        rsi, macd, atr, bb = (handles[0].copy(), handles[1].copy(), handles[2].copy(), handles[3].copy())
        for high, low, close in zip(highs, lows, closes, strict=True):
            rsi.update(close)
            macd.update(close)
            atr.update(high, low, close)
            bb.update(close)

    def copies() -> None:
        rsi, macd, atr, bb = handles
        for _ in range(count):
            rsi.copy()
            macd.copy()
            atr.copy()
            bb.copy()

    best_u, runs_u = best_of(repeats, updates)
    best_c, runs_c = best_of(repeats, copies)
    return {"update_x4": per_item(best_u, runs_u, count), "copy_x4": per_item(best_c, runs_c, count)}


def check_exact(series: Series, values: Sequence[list[IndicatorValues]]) -> dict[str, Any]:
    """The engine's value of every bar against TA-Lib's batch functions over the whole series."""
    h, lo, c = series.high, series.low, series.close
    batch = [
        talib.RSI(c, 14),
        *talib.MACD(c, 12, 26, 9),
        talib.ATR(h, lo, c, 14),
        *talib.BBANDS(c, 20, 2.0, 2.0),
    ]
    got = np.array(
        [[math.nan if v is None else v for v in (getattr(x[0], n) for n in OUTPUTS)] for x in values]
    )
    expected = np.column_stack(batch)
    same = (got == expected) | (np.isnan(got) & np.isnan(expected))
    return {
        "bars": len(values),
        "one_value_per_bar": all(len(x) == 1 for x in values),
        "values_not_bit_equal": int((~same).sum()),
        "first_bar_with_every_value": int(np.argmax(~np.isnan(got).any(axis=1))),
    }


def bench_engine(params: Params) -> tuple[dict[str, Any], Series, list[list[IndicatorValues]]]:
    print(f"... (a) IndicatorEngine.on_bar over {params.bars:,} final bars", flush=True)
    series = make_series(params.bars, "EURUSD", seed=11)
    best, runs = best_of(params.repeats, lambda: engine_run(series.bars))
    single = per_item(best, runs, params.bars)
    values: list[list[IndicatorValues]] = best.output
    exact = check_exact(series, values)
    per_series = max(1, params.bars // params.series)
    parts = [make_series(per_series, f"SYM{k:03d}", seed=100 + k) for k in range(params.series)]
    mixed = interleave(parts)
    best_m, runs_m = best_of(params.repeats, lambda: engine_run(mixed))
    interleaved = per_item(best_m, runs_m, len(mixed)) | {"series": params.series, "bars_each": per_series}
    messages = [bar_message(b) for b in series.bars]
    best_s, runs_s = best_of(params.repeats, lambda: stage_run(messages))
    staged = per_item(best_s, runs_s, len(messages))
    calls_ns, timer_ns = engine_per_call(series.bars)
    steady = calls_ns[100:]
    result = {
        "bars": params.bars,
        "single_series": single,
        "us_cpu_per_indicator_update": round(single["us_cpu"] / INDICATOR_COUNT, 3),
        "us_wall_per_indicator_update": round(single["us_wall"] / INDICATOR_COUNT, 3),
        "interleaved": interleaved,
        "stage_path": staged
        | {"what": "bar_from_pb(message) + on_bar under the stage's UPDATE_SECONDS histogram timer"},
        "per_call_wall_us_after_first_100": stats_us(steady) | {"timer_overhead_ns": timer_ns},
        "per_call_wall_us_first_100": stats_us(calls_ns[:100]),
        "talib": talib_parts(series, params.repeats),
        "exact_vs_talib_batch": exact,
    }
    t = result["talib"]
    print(
        f"    on_bar {single['us_cpu']:.2f} µs CPU per candle ({result['us_cpu_per_indicator_update']:.2f} "
        f"per indicator), wall {single['us_wall']:.2f}; {params.series} series "
        f"{interleaved['us_cpu']:.2f}; stage path {staged['us_cpu']:.2f}; TA-Lib update x4 "
        f"{t['update_x4']['us_cpu']:.2f}, copy x4 {t['copy_x4']['us_cpu']:.2f}; "
        f"{exact['values_not_bit_equal']} values differ from TA-Lib batch",
        flush=True,
    )
    return result, series, values


# --- (b) the seed's pandas recompute, (c) TA-Lib batch recompute -----------------------------------


def seed_indicators(frame: pd.DataFrame) -> tuple[float, ...]:
    """The seed's Indicators Worker over a window of bars (seed docs, "Indicators Worker"); the values of
    the last bar. The seed computed the whole window and wrote it back; only the computing is timed."""
    close, high, low = frame["close"], frame["high"], frame["low"]
    delta = close.diff()
    gain = delta.where(delta > 0, 0.0)
    loss = -delta.where(delta < 0, 0.0)
    avg_gain = gain.rolling(window=14, min_periods=14).mean()
    avg_loss = loss.rolling(window=14, min_periods=14).mean()
    rsi = 100 - (100 / (1 + avg_gain / avg_loss))
    ema_fast = close.ewm(span=12, adjust=False).mean()
    ema_slow = close.ewm(span=26, adjust=False).mean()
    macd = ema_fast - ema_slow
    signal = macd.ewm(span=9, adjust=False).mean()
    hist = macd - signal
    previous = close.shift(1)
    true_range = pd.concat([high - low, (high - previous).abs(), (low - previous).abs()], axis=1).max(axis=1)
    atr = true_range.rolling(window=14, min_periods=14).mean()
    middle = close.rolling(window=20, min_periods=20).mean()
    std = close.rolling(window=20, min_periods=20).std()
    upper = middle + 2.0 * std
    lower = middle - 2.0 * std
    return tuple(float(s.iloc[-1]) for s in (rsi, macd, signal, hist, atr, upper, middle, lower))


def talib_batch_indicators(high: _Array, low: _Array, close: _Array) -> tuple[float, ...]:
    """TA-Lib's batch functions over a window; the values of the last bar."""
    rsi = talib.RSI(close, 14)
    macd, signal, hist = talib.MACD(close, 12, 26, 9)
    atr = talib.ATR(high, low, close, 14)
    upper, middle, lower = talib.BBANDS(close, 20, 2.0, 2.0)
    return tuple(float(a[-1]) for a in (rsi, macd, signal, hist, atr, upper, middle, lower))


def agreement(
    got: Sequence[tuple[float, ...]], engine_values: Sequence[list[IndicatorValues]], first: int
) -> dict[str, Any]:
    """Largest difference of each output from the exact (whole-history) value the engine gives."""
    exact = np.array(
        [
            [math.nan if v is None else v for v in (getattr(x[0], n) for n in OUTPUTS)]
            for x in engine_values[first : first + len(got)]
        ]
    )
    a = np.array(got)
    diff = np.abs(a - exact)
    return {
        name: {
            "max_abs_diff": float(np.nanmax(diff[:, k])) if np.isfinite(diff[:, k]).any() else None,
            "bit_equal_share": round(float(np.mean(a[:, k] == exact[:, k])), 4),
        }
        for k, name in enumerate(OUTPUTS)
    }


def bench_recompute(
    params: Params, series: Series, engine_values: Sequence[list[IndicatorValues]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    w, n = params.window, params.bars
    frame = pd.DataFrame({"high": series.high, "low": series.low, "close": series.close})
    seed_first = max(w - 1, n - params.seed_bars)
    seed_count = n - seed_first
    print(
        f"... (b) the seed's pandas recompute of the last {w} bars, for each of the last {seed_count:,} bars",
        flush=True,
    )

    def seed() -> list[tuple[float, ...]]:
        return [seed_indicators(frame.iloc[i - w + 1 : i + 1]) for i in range(seed_first, n)]

    best_b, runs_b = best_of(params.seed_repeats, seed)
    b = per_item(best_b, runs_b, seed_count)
    b |= {
        "window": w,
        "new_bars_measured": seed_count,
        "extrapolated_cpu_seconds_for_all_bars": round(b["us_cpu"] * n / 1e6, 1),
        "extrapolated": seed_count < n,
        "vs_exact_talib": agreement(best_b.output, engine_values, seed_first),
    }
    batch_first = w - 1 if params.batch_bars is None else max(w - 1, n - params.batch_bars)
    batch_count = n - batch_first
    print(f"... (c) TA-Lib batch over the last {w} bars, for each of {batch_count:,} bars", flush=True)
    h, lo, c = series.high, series.low, series.close

    def batch() -> list[tuple[float, ...]]:
        return [
            talib_batch_indicators(h[i - w + 1 : i + 1], lo[i - w + 1 : i + 1], c[i - w + 1 : i + 1])
            for i in range(batch_first, n)
        ]

    best_c, runs_c = best_of(params.batch_repeats, batch)
    cc = per_item(best_c, runs_c, batch_count)
    # The same over a short window: what a call costs whatever the window, and what a bar of it adds.
    short = SHORT_WINDOW
    short_count = min(batch_count, 10_000)

    def batch_short() -> list[tuple[float, ...]]:
        return [
            talib_batch_indicators(
                h[i - short + 1 : i + 1], lo[i - short + 1 : i + 1], c[i - short + 1 : i + 1]
            )
            for i in range(n - short_count, n)
        ]

    best_s, runs_s = best_of(params.batch_repeats, batch_short)
    short_item = per_item(best_s, runs_s, short_count)
    per_window_bar = (cc["us_cpu"] - short_item["us_cpu"]) / (w - short) if w > short else math.nan
    cc["short_window"] = short_item | {
        "window": short,
        "us_cpu_per_window_bar": round(per_window_bar, 4),
        "us_cpu_fixed_per_bar_extrapolated_to_window_0": round(
            short_item["us_cpu"] - short * per_window_bar, 2
        ),
    }
    cc |= {
        "window": w,
        "new_bars_measured": batch_count,
        "extrapolated_cpu_seconds_for_all_bars": round(cc["us_cpu"] * n / 1e6, 2),
        "extrapolated": batch_count < n,
        "vs_exact_talib": agreement(best_c.output, engine_values, batch_first),
    }
    print(f"    (b) {b['us_cpu']:,.1f} µs CPU per bar; (c) {cc['us_cpu']:,.2f} µs CPU per bar", flush=True)
    return b, cc


# --- (d) end to end: ticks for several symbols, simulated time running faster than the clock --------


@dataclasses.dataclass(frozen=True)
class TickPlan:
    """Ticks of every symbol in send order, their StreamTicks batches, and when each is due."""

    names: tuple[str, ...]
    sym: npt.NDArray[np.int32]
    ts: npt.NDArray[np.int64]
    batch_of: npt.NDArray[np.int64]
    requests: list[bytes]
    sizes: list[int]
    due: npt.NDArray[np.float64]  # seconds after the live phase starts (0 for the backfill)
    backfill_batches: int
    live_start_us: int


def make_plan(params: Params) -> TickPlan:
    """Poisson ticks every ``tick_interval`` simulated seconds per symbol (on average): first
    ``history_minutes`` of backfill in batches of 1,000, then ``live_seconds`` of wall time at
    ``speedup`` times real time, in one batch per ``batch_interval`` of wall time."""
    rng = np.random.default_rng(29)
    names = tuple(f"SYM{k:02d}" for k in range(params.symbols))
    start = to_us(SIM_START)
    live_start = start + params.history_minutes * M1_US
    end = live_start + round(params.live_seconds * params.speedup * 1e6)
    mean_gap = params.tick_interval * 1e6
    per_symbol = math.ceil((end - start) / mean_gap * 1.3) + 50
    ts_parts, sym_parts, mid_parts = [], [], []
    for k in range(params.symbols):
        gaps = np.maximum(params.symbols, np.round(rng.exponential(mean_gap, per_symbol))).astype(np.int64)
        # Distinct across symbols too: symbol k's times are k modulo the number of symbols.
        ts = start + np.cumsum(gaps) // params.symbols * params.symbols + k
        ts = ts[ts < end]
        ts_parts.append(ts)
        sym_parts.append(np.full(len(ts), k, dtype=np.int32))
        mid_parts.append((0.8 + 0.05 * k) + np.cumsum(rng.normal(0.0, 2e-5, len(ts))))
    order = np.argsort(np.concatenate(ts_parts), kind="stable")
    ts_all = np.concatenate(ts_parts)[order]
    sym = np.concatenate(sym_parts)[order]
    mid = np.concatenate(mid_parts)[order]
    spread = rng.integers(1, 30, len(ts_all)).astype(np.float64) * 1e-5
    bid = np.round(mid - spread / 2, 6)
    ask = np.round(bid + spread, 6)
    backfill = int(np.searchsorted(ts_all, live_start))
    batch_of = np.empty(len(ts_all), dtype=np.int64)
    batch_of[:backfill] = np.arange(backfill) // BACKFILL_BATCH
    backfill_batches = math.ceil(backfill / BACKFILL_BATCH)
    slot = ((ts_all[backfill:] - live_start) / 1e6 / params.speedup // params.batch_interval).astype(np.int64)
    slots, live_batch = np.unique(slot, return_inverse=True)
    batch_of[backfill:] = backfill_batches + live_batch
    due = np.r_[np.zeros(backfill_batches), (slots + 1) * params.batch_interval]
    requests: list[bytes] = []
    sizes: list[int] = []
    bounds = np.flatnonzero(np.r_[True, batch_of[1:] != batch_of[:-1], True])
    for b, (a, z) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        ticks = [
            market_pb2.Tick(
                symbol=names[s],
                ts=timestamp_pb2.Timestamp(seconds=t // 1_000_000, nanos=t % 1_000_000 * 1000),
                bid=bi,
                ask=ak,
            )
            for s, t, bi, ak in zip(
                sym[a:z].tolist(), ts_all[a:z].tolist(), bid[a:z].tolist(), ask[a:z].tolist(), strict=True
            )
        ]
        request = ingest_pb.StreamTicksRequest(source_id=SOURCE_ID, sequence=b + 1, ticks=ticks)
        requests.append(request.SerializeToString())
        sizes.append(z - a)
    return TickPlan(names, sym, ts_all, batch_of, requests, sizes, due, backfill_batches, live_start)


def expected_m1(plan: TickPlan, lateness_us: int) -> dict[tuple[str, int], int]:
    """Every M1 bar the ticks make final (symbol, bucket µs) -> the batch holding the tick that moves
    its symbol's horizon past the bar's end (the first tick at or after end + lateness)."""
    out: dict[tuple[str, int], int] = {}
    for k, name in enumerate(plan.names):
        index = np.flatnonzero(plan.sym == k)
        ts = plan.ts[index]
        buckets = np.unique(ts - ts % M1_US)
        first_past = np.searchsorted(ts, buckets + M1_US + lateness_us, side="left")
        for bucket, i in zip(buckets.tolist(), first_past.tolist(), strict=True):
            if i < len(ts):
                out[(name, bucket)] = int(plan.batch_of[index[i]])
    return out


@dataclasses.dataclass
class SendLog:
    """When each batch went out and was acknowledged (time.monotonic(); NaN if never)."""

    sent: npt.NDArray[np.float64]
    acked: npt.NDArray[np.float64]
    live_start: float = math.nan


async def stream_plan(address: str, plan: TickPlan, window: int, on_live: Callable[[], None]) -> SendLog:
    """The backfill as fast as ingest acknowledges, then every live batch at its due time, over one
    StreamTicks call with at most ``window`` batches unacknowledged."""
    n = len(plan.requests)
    log = SendLog(np.full(n, np.nan), np.full(n, np.nan))
    acked = 0
    room = asyncio.Event()
    backfilled = asyncio.Event()
    if plan.backfill_batches == 0:
        backfilled.set()

    async def generate() -> AsyncIterator[bytes]:
        for k, data in enumerate(plan.requests):
            if k == plan.backfill_batches:
                await backfilled.wait()
                on_live()
                log.live_start = time.monotonic()
            if k >= plan.backfill_batches:
                delay = log.live_start + float(plan.due[k]) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            while k - acked >= window:
                room.clear()
                await room.wait()
            log.sent[k] = time.monotonic()
            yield data

    options = [("grpc.max_send_message_length", 64 * MIB)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        method = channel.stream_stream(
            STREAM_TICKS,
            request_serializer=None,
            response_deserializer=ingest_pb.StreamTicksResponse.FromString,
        )
        try:
            async for ack in method(generate(), metadata=api_key_metadata(helpers.API_KEY)):
                k = ack.sequence - 1
                log.acked[k] = time.monotonic()
                acked += 1
                room.set()
                if acked >= plan.backfill_batches:
                    backfilled.set()
                if ack.stored != plan.sizes[k] or ack.replayed:
                    raise ScenarioFailed(f"batch {ack.sequence}: stored {ack.stored} of {plan.sizes[k]}")
        except grpc.aio.AioRpcError as exc:
            raise ScenarioFailed(f"StreamTicks failed: {exc.code().name} {exc.details()}") from exc
    if acked != n:
        raise ScenarioFailed(f"{acked} of {n} batches acknowledged")
    return log


# Arrivals at the client: symbol, bar start (µs), revision, cursor, time.monotonic() on arrival, and the
# prices (candles: high, low, close) or the 8 values (NaN where absent).
Arrival = tuple[str, int, int, int, float, tuple[float, ...]]


def _micros(stamp: timestamp_pb2.Timestamp) -> int:
    return int(stamp.seconds) * 1_000_000 + int(stamp.nanos) // 1000


async def _subscribe_both(
    agg_address: str, ind_address: str, api_key: str, stop: Any, counts: Any, probe: bool
) -> tuple[list[Arrival], list[Arrival], list[str]]:
    """Both subscriptions; with ``probe``, instead, one subscription to the aggregator made like the
    indicators service's own input (every symbol and timeframe, forming bars included), of which the
    final M1 bars are recorded: when such a subscriber gets them."""
    candles: list[Arrival] = []
    values: list[Arrival] = []
    errors: list[str] = []
    metadata = api_key_metadata(api_key)
    options = [("grpc.max_receive_message_length", 64 * MIB)]
    # The probe opens no channel to the indicators service (it is given the aggregator's address).
    async with (
        grpc.aio.insecure_channel(agg_address, options=options) as agg_channel,
        grpc.aio.insecure_channel(agg_address if probe else ind_address, options=options) as ind_channel,
    ):
        await asyncio.wait_for(agg_channel.channel_ready(), 30)
        await asyncio.wait_for(ind_channel.channel_ready(), 30)
        request = (
            agg_pb.SubscribeCandlesRequest(include_forming=True)
            if probe
            else agg_pb.SubscribeCandlesRequest(timeframes=[market_pb2.M1])
        )
        candle_call = agg_grpc.AggregatorServiceStub(agg_channel).SubscribeCandles(request, metadata=metadata)
        value_call = (
            None
            if probe
            else ind_grpc.IndicatorsServiceStub(ind_channel).SubscribeIndicators(
                ind_pb.SubscribeIndicatorsRequest(timeframes=[market_pb2.M1]), metadata=metadata
            )
        )

        async def read_candles() -> None:
            try:
                async for item in candle_call:
                    now = time.monotonic()
                    bar = item.bar
                    c = bar.candle
                    if probe and (not bar.final or c.timeframe != market_pb2.M1):
                        continue
                    if not bar.final:
                        errors.append(f"a forming candle arrived: {c.symbol} {c.ts}")
                    candles.append(
                        (c.symbol, _micros(c.ts), bar.revision, item.cursor, now, (c.high, c.low, c.close))
                    )
                    counts[0] = len(candles)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    errors.append(f"SubscribeCandles: {exc.code().name} {exc.details()}")

        async def read_values() -> None:
            assert value_call is not None
            try:
                async for item in value_call:
                    now = time.monotonic()
                    v = item.values
                    outputs = tuple(getattr(v, n) if v.HasField(n) else math.nan for n in OUTPUTS)
                    values.append((v.symbol, _micros(v.ts), v.revision, item.cursor, now, outputs))
                    counts[1] = len(values)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    errors.append(f"SubscribeIndicators: {exc.code().name} {exc.details()}")

        readers = [asyncio.create_task(read_candles())]
        if not probe:
            readers.append(asyncio.create_task(read_values()))
        counts[2] = 1  # channels ready, calls started
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        candle_call.cancel()
        if value_call is not None:
            value_call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return candles, values, errors


def subscribe_both(
    agg_address: str, ind_address: str, api_key: str, stop: Any, counts: Any, out: Any, probe: bool
) -> None:
    """A client process: the subscriptions from cursor 0 on one event loop; reports at ``stop``."""
    try:
        result = asyncio.run(_subscribe_both(agg_address, ind_address, api_key, stop, counts, probe))
    except Exception as exc:  # reported to the parent, which fails the scenario
        result = ([], [], [f"client failed: {exc!r}"])
    out.send(result)
    out.close()


class Subscribers:
    """Runs ``subscribe_both`` in a spawned process and collects what it saw."""

    def __init__(self, agg_address: str, ind_address: str, *, probe: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._counts = ctx.Array("q", 3)
        self._conn, sender = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=subscribe_both,
            args=(agg_address, ind_address, helpers.API_KEY, self._stop, self._counts, sender, probe),
            name="indicator-bench-probe" if probe else "indicator-bench-client",
            daemon=True,
        )
        self._proc.start()
        sender.close()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def counts(self) -> tuple[int, int]:
        return int(self._counts[0]), int(self._counts[1])

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._counts[2]:
            if time.monotonic() > deadline or not self._proc.is_alive():
                raise ScenarioFailed("the subscribing client did not start")
            time.sleep(0.05)

    def wait_for(self, done: Callable[[int, int], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done(*self.counts()):
            if time.monotonic() > deadline or not self._proc.is_alive():
                return False
            time.sleep(0.05)
        return True

    def finish(self, timeout: float = 30.0) -> tuple[list[Arrival], list[Arrival], list[str]]:
        self._stop.set()
        if not self._conn.poll(timeout):
            raise ScenarioFailed("the subscribing client did not report")
        result: tuple[list[Arrival], list[Arrival], list[str]] = self._conn.recv()
        self._proc.join(10)
        return result

    def close(self) -> None:
        self._stop.set()
        if self._proc.is_alive():
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


@dataclasses.dataclass
class Trio:
    """Ingest, the aggregator following it and the indicators service following the aggregator."""

    ingest: helpers.ServiceProcess
    aggregator: helpers.ServiceProcess
    indicators: helpers.ServiceProcess
    aggregator_metrics: int
    indicators_metrics: int

    def services(self) -> tuple[helpers.ServiceProcess, ...]:
        return (self.ingest, self.aggregator, self.indicators)

    def pid(self, service: helpers.ServiceProcess) -> int:
        assert service.proc is not None
        return service.proc.pid

    def check_alive(self) -> None:
        for service in self.services():
            assert service.proc is not None
            code = service.proc.poll()
            if code is not None:
                tail = service.log_path.read_text(errors="replace")[-2000:]
                raise ScenarioFailed(f"{service.name} exited with code {code} during the scenario: {tail}")


@contextlib.contextmanager
def running_trio(url: str, workdir: pathlib.Path, params: Params) -> Iterator[Trio]:
    """The three services as real processes (metrics served for scraping); stopped afterwards, also on
    failure."""
    common = {"MT5MESH_HEALTH_PROBE_SECONDS": "2"} | params.service_env
    ingest = helpers.make_service("ingest", url, workdir, common)
    agg_port, ind_port = helpers.free_port(), helpers.free_port()
    aggregator = helpers.make_service(
        "aggregator",
        url,
        workdir,
        common | {"AGGREGATOR_INGEST_ADDRESS": ingest.address, "AGGREGATOR_METRICS_PORT": str(agg_port)},
    )
    indicators = helpers.make_service(
        "indicators",
        url,
        workdir,
        common
        | {
            "INDICATORS_AGGREGATOR_ADDRESS": aggregator.address,
            "INDICATORS_METRICS_PORT": str(ind_port),
            "INDICATORS_FEED_POLL_SECONDS": str(params.feed_poll_seconds),
        },
    )
    trio = Trio(ingest, aggregator, indicators, agg_port, ind_port)
    try:
        ingest.start()  # serving means migrated: the others then find their tables
        aggregator.start()
        indicators.start()
        yield trio
    finally:
        for service in (indicators, aggregator, ingest):
            if service.proc is not None:
                with contextlib.suppress(Exception):
                    service.terminate(timeout=10)
                service.kill()


def checkpoints() -> dict[str, float]:
    """PostgreSQL's checkpoint count (the whole server: other databases' writes count too)."""
    with psycopg.connect(helpers.PG_ADMIN, autocommit=True) as conn:
        row = conn.execute("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter").fetchone()
    return {"checkpoints": float(row[0]) if row else 0.0}


def autovacuum_events(url: str, start: float, end: float) -> list[tuple[str, str, float]]:
    """Autovacuum and autoanalyze runs on the benchmark's tables between two monotonic times, as
    (table, kind, seconds after ``start``) of the last run of each kind per table."""
    offset = time.time() - time.monotonic()
    events: list[tuple[str, str, float]] = []
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT relname, extract(epoch FROM last_autovacuum), extract(epoch FROM last_autoanalyze) "
            "FROM pg_stat_user_tables"
        ).fetchall()
    for name, vacuum, analyze in rows:
        for kind, at in (("autovacuum", vacuum), ("autoanalyze", analyze)):
            if at is not None and start <= float(at) - offset <= end:
                events.append((str(name), kind, round(float(at) - offset - start, 2)))
    return sorted(events, key=lambda e: e[2])


def verify_values(candles: Sequence[Arrival], values: Sequence[Arrival]) -> dict[str, Any]:
    """Every symbol's M1 values as received against TA-Lib's batch functions over its final candles
    as received (both from cursor 0): equal bit for bit, NaN where absent."""
    mismatched = 0
    compared = 0
    by_value = {(v[0], v[1]): v[5] for v in values}
    for symbol in sorted({c[0] for c in candles}):
        rows = sorted((c for c in candles if c[0] == symbol), key=lambda c: c[1])
        high, low, close = (np.array([r[5][i] for r in rows]) for i in range(3))
        batch = np.column_stack(
            [
                talib.RSI(close, 14),
                *talib.MACD(close, 12, 26, 9),
                talib.ATR(high, low, close, 14),
                *talib.BBANDS(close, 20, 2.0, 2.0),
            ]
        )
        for r, expected in zip(rows, batch, strict=True):
            got = by_value.get((symbol, r[1]))
            if got is None:
                continue
            compared += 1
            a = np.array(got)
            if not bool(np.all((a == expected) | (np.isnan(a) & np.isnan(expected)))):
                mismatched += 1
    return {"bars_compared": compared, "bars_not_bit_equal": mismatched}


def analyse_e2e(
    params: Params,
    plan: TickPlan,
    log: SendLog,
    expected: dict[tuple[str, int], int],
    candles: Sequence[Arrival],
    values: Sequence[Arrival],
    errors: Sequence[str],
    probed: Sequence[Arrival] | None = None,
) -> dict[str, Any]:
    first_candle: dict[tuple[str, int], Arrival] = {}
    first_value: dict[tuple[str, int], Arrival] = {}
    for c in candles:
        first_candle.setdefault((c[0], c[1]), c)
    for v in values:
        first_value.setdefault((v[0], v[1]), v)
    measure_from = log.live_start + params.warmup_seconds
    rows = []
    for key, batch in expected.items():
        if batch < plan.backfill_batches or key not in first_candle or key not in first_value:
            continue
        sent = float(log.sent[batch])
        if sent < measure_from:
            continue
        rows.append((sent, first_candle[key][4], first_value[key][4], key))
    rows.sort()
    sent_t = np.array([r[0] for r in rows])
    final_t = np.array([r[1] for r in rows])
    value_t = np.array([r[2] for r in rows])
    latency = value_t - final_t
    warm = sum(1 for r in rows if not math.isnan(first_value[r[3]][5][0]))
    received_keys = set(first_candle)
    checks = {
        "m1_bars_expected_final_by_ticks": len(expected),
        "m1_final_candles_received": len(candles),
        "m1_value_sets_received": len(values),
        "expected_bars_missing_candle": len(set(expected) - received_keys),
        "candles_without_values": len(received_keys - set(first_value)),
        "values_without_candle": len(set(first_value) - received_keys),
        "duplicate_candles": len(candles) - len(first_candle),
        "duplicate_values": len(values) - len(first_value),
        "revised": sum(1 for c in candles if c[2] != 0) + sum(1 for v in values if v[2] != 0),
        "negative_latencies": int((latency < 0).sum()),
        "measured_bars_with_all_values": warm,
        "client_errors": list(errors),
    } | verify_values(candles, values)
    checks["ok"] = (
        not errors
        and checks["expected_bars_missing_candle"] == 0
        and checks["candles_without_values"] == 0
        and checks["duplicate_candles"] == 0
        and checks["duplicate_values"] == 0
        and checks["revised"] == 0
        and checks["bars_not_bit_equal"] == 0
        and warm == len(rows)
    )
    # When a subscriber made like the indicators' own input got each bar (``--probe``).
    probe_split: dict[str, Any] | None = None
    probe_t = np.full(len(rows), np.nan)
    if probed is not None:
        first_probe: dict[tuple[str, int], float] = {}
        for p in probed:
            first_probe.setdefault((p[0], p[1]), p[4])
        probe_t = np.array([first_probe.get(r[3], math.nan) for r in rows])
        seen = np.isfinite(probe_t)
        probe_split = {
            "bars": int(seen.sum()),
            "final_candle_to_probe_ms": stats_ms((probe_t - final_t)[seen]),
            "probe_to_values_ms": stats_ms((value_t - probe_t)[seen]),
        }
    per_bar = [
        [
            r[3][0],
            (r[3][1] - plan.live_start_us) // M1_US,
            round(r[1] - log.live_start, 4),
            round((r[2] - r[1]) * 1000, 3),
            None if math.isnan(pt) else round((pt - r[1]) * 1000, 3),
        ]
        for r, pt in zip(rows, probe_t.tolist(), strict=True)
    ]
    # All symbols' M1 bars close at the same simulated minute: their final candles come in bursts.
    order = np.argsort(final_t)
    burst_id = np.cumsum(np.r_[True, np.diff(final_t[order]) > BURST_GAP]) if len(rows) else np.array([], int)
    burst_size = np.bincount(burst_id)[burst_id] if len(rows) else np.array([], int)
    by_order = latency[order]
    bursts = {
        "gap_ms": BURST_GAP * 1000,
        "bursts": int(burst_id.max()) if len(rows) else 0,
        "mean_bars_per_burst": round(len(rows) / burst_id.max(), 2) if len(rows) else None,
        "latency_alone_ms": stats_ms(by_order[burst_size == 1]),
        "latency_in_bursts_ms": stats_ms(by_order[burst_size > 1]),
    }
    live = slice(plan.backfill_batches, len(plan.requests))
    ack = log.acked[live] - log.sent[live]
    return {
        "database": "postgresql",
        "symbols": params.symbols,
        "speedup": params.speedup,
        "m1_bar_every_s": round(60 / params.speedup, 2),
        "live_batches": len(plan.requests) - plan.backfill_batches,
        "live_ticks": int(len(plan.ts) - np.searchsorted(plan.ts, plan.live_start_us)),
        "backfill_ticks": int(np.searchsorted(plan.ts, plan.live_start_us)),
        "backfill_batches": plan.backfill_batches,
        "live_ticks_per_s": round(
            (len(plan.ts) - int(np.searchsorted(plan.ts, plan.live_start_us))) / params.live_seconds
        ),
        "live_start_monotonic": log.live_start,
        "live_start_sim_us": plan.live_start_us,
        "bars_measured": len(rows),
        "latency_final_candle_to_values_ms": stats_ms(latency),
        "latency_tick_sent_to_final_candle_ms": stats_ms(final_t - sent_t),
        "latency_tick_sent_to_values_ms": stats_ms(value_t - sent_t),
        "ingest_ack_ms": stats_ms(ack[np.isfinite(ack)]),
        "bursts": bursts,
        "probe_split": probe_split,
        "per_bar_columns": [
            "symbol",
            "live minute",
            "final candle at s after live start",
            "latency ms",
            "probe latency ms (final candle to probe)",
        ],
        "per_bar": per_bar,
        "latency_p50_by_third_ms": [
            stats_ms(part).get("p50") for part in np.array_split(latency, 3) if len(part)
        ],
        "checks": checks,
    }


def bench_end_to_end(params: Params, workdir: pathlib.Path, plan: TickPlan) -> dict[str, Any]:
    """One end-to-end run on a fresh PostgreSQL database (dropped afterwards)."""
    expected = expected_m1(plan, params.lateness_us)
    with helpers.postgres_database() as url:
        with running_trio(url, workdir, params) as trio:
            pids = {s.name: trio.pid(s) for s in trio.services()}
            client = Subscribers(trio.aggregator.address, trio.indicators.address)
            probe = (
                Subscribers(trio.aggregator.address, trio.aggregator.address, probe=True)
                if params.probe
                else None
            )
            try:
                client.wait_started(60)
                if probe is not None:
                    probe.wait_started(60)
                clients = [client] + ([probe] if probe is not None else [])
                meter = CpuMeter(
                    {
                        "ingest": lambda: [pids["ingest"]],
                        "aggregator": lambda: [pids["aggregator"]],
                        "indicators": lambda: [pids["indicators"]],
                        "postgres": postgres_pids,
                        "client": lambda: [c.pid for c in clients],
                    }
                )
                ind_prefixes = ("mt5_indicators_update_seconds_", "mt5_indicators_values_total")
                agg_prefixes = ("mt5_aggregator_commit_seconds_",)
                scraped: dict[str, dict[str, float]] = {}

                def on_live() -> None:
                    scraped["pg_before"] = checkpoints()
                    scraped["ind_before"] = scrape(trio.indicators_metrics, ind_prefixes)
                    scraped["agg_before"] = scrape(trio.aggregator_metrics, agg_prefixes)
                    meter.start()

                limit = params.live_seconds + 180  # the backfill and the live phase, with room to spare
                try:
                    log = asyncio.run(
                        asyncio.wait_for(
                            stream_plan(trio.ingest.address, plan, params.stream_window, on_live), limit
                        )
                    )
                except TimeoutError as exc:
                    raise ScenarioFailed(f"sending the ticks took more than {limit:g} s") from exc
                cpu = meter.stop()
                live_end = time.monotonic()
                scraped["pg_after"] = checkpoints()
                scraped["ind_after"] = scrape(trio.indicators_metrics, ind_prefixes)
                scraped["agg_after"] = scrape(trio.aggregator_metrics, agg_prefixes)
                drained = client.wait_for(lambda c, v: c >= len(expected) and v >= c, params.drain_timeout)
                if drained:
                    time.sleep(0.5)  # anything arriving now would be a duplicate or a revision
                candles, values, errors = client.finish()
                probed = probe.finish()[0] if probe is not None else None
            finally:
                client.close()
                if probe is not None:
                    probe.close()
            trio.check_alive()
            maintenance = autovacuum_events(url, log.live_start, live_end)
        result = analyse_e2e(params, plan, log, expected, candles, values, errors, probed)
        result["drained_within_timeout"] = drained
        if not drained:
            result["checks"]["ok"] = False
        seconds = live_end - log.live_start
        ib, ia = scraped["ind_before"], scraped["ind_after"]
        calls = metric_delta(ib, ia, "mt5_indicators_update_seconds_count")
        finals = metric_delta(ib, ia, "mt5_indicators_values_total")
        ab, aa = scraped["agg_before"], scraped["agg_after"]
        commits = metric_delta(ab, aa, "mt5_aggregator_commit_seconds_count")
        result["live_seconds"] = round(seconds, 1)
        result["cpu_cores"] = cpu
        result["indicators_service"] = {
            "on_bar_calls": int(calls),
            "on_bar_calls_per_s": round(calls / seconds, 1),
            "final_values_committed": int(finals),
            # Forming bars peeked for provisional values (no subscriber asked for them here); about,
            # as a revision gives several values and the counters are read a moment apart.
            "forming_bar_peeks": max(0, int(calls - finals)),
            "mean_us_per_on_bar_in_service": round(
                metric_delta(ib, ia, "mt5_indicators_update_seconds_sum") / calls * 1e6, 2
            )
            if calls
            else None,
            "feed_poll_seconds": params.feed_poll_seconds,
        }
        result["aggregator_commits"] = {
            "commits": int(commits),
            "per_s": round(commits / seconds, 1),
            "mean_ms": round(metric_delta(ab, aa, "mt5_aggregator_commit_seconds_sum") / commits * 1000, 2)
            if commits
            else None,
        }
        result["postgres_during_live"] = {
            "checkpoints_server_wide": int(
                scraped["pg_after"].get("checkpoints", 0) - scraped["pg_before"].get("checkpoints", 0)
            ),
            "autovacuum_events_s_after_live_start": maintenance,
        }
        result["path_parts"] = bench_store(url, params)
    return result


def bench_store(url: str, params: Params) -> dict[str, Any]:
    """The pieces of the path from a final candle to a subscriber, timed alone on the same database
    (the services are stopped): the indicators' commit of one bar's values and of a burst (one per
    symbol), the subscriber's read of a burst, a bare durable commit, a round trip and a thread hop."""
    engine = db.create_db_engine(url)
    store = IndicatorStore(engine)
    repeats = params.store_repeats
    cursor = 10**9
    minute = 0

    def work(count: int) -> IndicatorWork:
        nonlocal cursor, minute
        minute += 1
        cursor += 1
        ts = SIM_START - dt.timedelta(days=30) + dt.timedelta(minutes=minute)
        values = [
            IndicatorValues(
                f"ZZB{k:04d}", Timeframe.M1, ts, 0, True, 50.0, 1e-4, 2e-4, -1e-4, 3e-4, 1.2, 1.1, 1.0
            )
            for k in range(count)
        ]
        return IndicatorWork(values, cursor)

    def commit_times(count: int, runs: int) -> dict[str, float]:
        times = []
        for _ in range(runs):
            w = work(count)
            t0 = time.perf_counter()
            store.commit(w)
            times.append(time.perf_counter() - t0)
        return stats_ms(times)

    try:
        for _ in range(5):  # connections opened, statements cached
            store.commit(work(1))
        burst = params.symbols
        one = commit_times(1, repeats)
        many = commit_times(burst, repeats)
        catch_up = commit_times(1000, max(3, repeats // 40))
        with psycopg.connect(plain_url(url), autocommit=True) as conn:
            top = conn.execute("SELECT coalesce(max(id), 0) FROM ind_log").fetchone()
            last = int(top[0]) if top else 0
        reads = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            page = store.values_after(last - burst, [], [Timeframe.M1], 1000)
            reads.append(time.perf_counter() - t0)
        if len(page) != burst:
            raise ScenarioFailed(f"values_after gave {len(page)} rows, not {burst}")
        with psycopg.connect(plain_url(url)) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS bench_scratch (id bigserial PRIMARY KEY, v float8)")
            conn.commit()
            trips, durable = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                trips.append(time.perf_counter() - t0)
                conn.rollback()
                t0 = time.perf_counter()
                conn.execute("INSERT INTO bench_scratch (v) VALUES (1.0)")
                conn.commit()
                durable.append(time.perf_counter() - t0)
    finally:
        engine.dispose()

    async def hops() -> list[float]:
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            await asyncio.to_thread(int)
            out.append(time.perf_counter() - t0)
        return out

    return {
        "indicators_commit_1_bar_ms": one,
        f"indicators_commit_{burst}_bars_ms": many,
        "indicators_commit_1000_bars_ms": catch_up,
        f"subscriber_read_{burst}_values_ms": stats_ms(reads),
        "postgres_round_trip_ms": stats_ms(trips),
        "postgres_durable_insert_commit_ms": stats_ms(durable),
        "asyncio_to_thread_hop_ms": stats_ms(asyncio.run(hops())),
        "burst": burst,
    }


# --- report ----------------------------------------------------------------------------------------


def evaluate(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    a, b, c, d = results["a_engine"], results["b_seed_pandas"], results["c_talib_batch"], results["d_e2e"]
    a_us = a["single_series"]["us_cpu"]
    lat = d["latency_final_candle_to_values_ms"]
    figures: dict[str, Any] = {
        "a_us_per_candle": a_us,
        "a_us_per_indicator_update": a["us_cpu_per_indicator_update"],
        "a_us_per_candle_wall": a["single_series"]["us_wall"],
        "a_us_per_candle_interleaved": a["interleaved"]["us_cpu"],
        "a_us_per_candle_stage_path": a["stage_path"]["us_cpu"],
        "b_us_per_bar": b["us_cpu"],
        "c_us_per_bar": c["us_cpu"],
        "b_over_a": round(b["us_cpu"] / a_us, 1),
        "c_over_a": round(c["us_cpu"] / a_us, 2),
        "b_over_c": round(b["us_cpu"] / c["us_cpu"], 1),
        # The most (c) / (a) could be if on_bar cost nothing but TA-Lib's four update() calls.
        "c_over_talib_updates_alone": round(c["us_cpu"] / a["talib"]["update_x4"]["us_cpu"], 1),
        "b_over_talib_updates_alone": round(b["us_cpu"] / a["talib"]["update_x4"]["us_cpu"], 1),
        "e2e_bars": d["bars_measured"],
        "e2e_p50_ms": lat.get("p50"),
        "e2e_p99_ms": lat.get("p99"),
        "e2e_database": d["database"],
        "all_checks_ok": bool(d["checks"]["ok"])
        and a["exact_vs_talib_batch"]["values_not_bit_equal"] == 0
        and a["exact_vs_talib_batch"]["one_value_per_bar"],
    }
    targets: dict[str, Any] = {}
    for key, (label, op, bound) in TARGETS.items():
        value = figures[key]
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        targets[key] = {"what": label, "value": value, "target": f"{op} {bound:g}", "met": met}
    if figures["e2e_bars"] < MIN_E2E_BARS:
        targets["e2e_p99_ms"]["met"] = False
        targets["e2e_p99_ms"]["note"] = f"measured over fewer than {MIN_E2E_BARS} bars"
    return figures, targets


def print_table(report: dict[str, Any]) -> None:
    r, m, f = report["results"], report["machine"], report["figures"]
    a, b, c, d = r["a_engine"], r["b_seed_pandas"], r["c_talib_batch"], r["d_e2e"]
    print()
    print(f"indicators benchmark  {report['timestamp']}  {m['nproc']} cores  {m['cpu_model']}")
    print(
        f"PostgreSQL {m['postgres_settings']['server_version']}, Python {m['python']}, grpcio {m['grpcio']}, "
        f"TA-Lib {talib.__version__}, pandas {pd.__version__}"
    )
    print()
    row = "{:<66} {:>13} {:>13} {:>12}"
    print(
        row.format(
            "per candle (all 4 indicators), CPU time of one thread", "µs/candle", "µs/indicator", "wall µs"
        )
    )
    print("-" * 108)

    def line(label: str, item: dict[str, Any]) -> None:
        us = item["us_cpu"]
        print(row.format(label, f"{us:,.2f}", f"{us / INDICATOR_COUNT:,.2f}", f"{item['us_wall']:,.2f}"))

    n = a["bars"]
    line(f"(a) engine on_bar, 1 series of {n:,} final bars", a["single_series"])
    inter = a["interleaved"]
    line(f"(a) engine on_bar, {inter['series']} series x {inter['bars_each']:,} bars interleaved", inter)
    line("(a) stage path: bar_from_pb + on_bar + histogram timer", a["stage_path"])
    line("    of which TA-Lib stream update() x4", a["talib"]["update_x4"])
    line("    of which checkpoint copy() x4", a["talib"]["copy_x4"])
    extrapolated = " (extrapolated)" if b["extrapolated"] else ""
    line(f"(b) seed: pandas recompute of last {b['window']} bars, {b['new_bars_measured']:,} bars", b)
    line(f"(c) TA-Lib batch over last {c['window']} bars, {c['new_bars_measured']:,} bars", c)
    cs = c["short_window"]
    line(f"    same over last {cs['window']} bars, {cs['items']:,} bars", cs)
    print(
        f"    over all {n:,} bars: (a) {a['single_series']['us_cpu'] * n / 1e6:.2f} s, (b) "
        f"{b['extrapolated_cpu_seconds_for_all_bars']:,} s{extrapolated}, (c) "
        f"{c['extrapolated_cpu_seconds_for_all_bars']:,} s"
    )
    pc = a["per_call_wall_us_after_first_100"]
    print(
        f"    (a) per call, wall: p50 {pc['p50']} µs, p99 {pc['p99']} µs, max {pc['max']} µs "
        f"(timer {pc['timer_overhead_ns']} ns); values vs TA-Lib batch over the whole series: "
        f"{a['exact_vs_talib_batch']['values_not_bit_equal']} differ"
    )
    print()
    lat, tf, tv = (
        d["latency_final_candle_to_values_ms"],
        d["latency_tick_sent_to_final_candle_ms"],
        d["latency_tick_sent_to_values_ms"],
    )
    print(
        f"(d) end to end on {d['database']}: {d['symbols']} symbols, M1 bar every "
        f"{d['m1_bar_every_s']} s per symbol, {d['live_ticks_per_s']:,} ticks/s live, "
        f"{d['bars_measured']} bars measured"
    )
    row2 = "{:<66} {:>9} {:>9} {:>9} {:>9}"
    print(row2.format("latency, ms", "p50", "p90", "p99", "max"))
    print("-" * 106)
    for label, s in (
        ("final candle at subscriber -> its indicator values at subscriber", lat),
        ("tick batch sent -> final candle at subscriber (context)", tf),
        ("tick batch sent -> indicator values at subscriber (context)", tv),
    ):
        print(row2.format(label, *(f"{s.get(q, float('nan')):.2f}" for q in ("p50", "p90", "p99", "max"))))
    bu = d["bursts"]
    print(
        f"    {bu['bursts']} bursts of final candles ({bu['mean_bars_per_burst']} bars each on average): "
        f"p50/p99 {bu['latency_alone_ms'].get('p50')}/{bu['latency_alone_ms'].get('p99')} ms alone, "
        f"{bu['latency_in_bursts_ms'].get('p50')}/{bu['latency_in_bursts_ms'].get('p99')} ms in bursts"
    )
    split = d.get("probe_split")
    if split:
        fp, pv = split["final_candle_to_probe_ms"], split["probe_to_values_ms"]
        print(
            f"    probe (subscribed like the indicators' input): final candle -> probe p50/p99 "
            f"{fp.get('p50')}/{fp.get('p99')} ms, probe -> values {pv.get('p50')}/{pv.get('p99')} ms"
        )
    parts = d["path_parts"]
    burst = parts["burst"]
    print("    pieces timed alone on the same database (ms, p50 / p99):")
    for key in (
        "indicators_commit_1_bar_ms",
        f"indicators_commit_{burst}_bars_ms",
        "indicators_commit_1000_bars_ms",
        f"subscriber_read_{burst}_values_ms",
        "postgres_durable_insert_commit_ms",
        "postgres_round_trip_ms",
        "asyncio_to_thread_hop_ms",
    ):
        print(f"      {key:<44} {parts[key]['p50']:>8.3f} / {parts[key]['p99']:.3f}")
    svc, cpu = d["indicators_service"], d["cpu_cores"]
    print(
        f"    indicators service: {svc['on_bar_calls_per_s']}/s on_bar calls, "
        f"{svc['final_values_committed']:,} final values and {svc['forming_bar_peeks']:,} forming peeks, "
        f"{svc['mean_us_per_on_bar_in_service']} µs mean per call"
    )
    pg = d["postgres_during_live"]
    print(
        f"    during the live phase: {pg['checkpoints_server_wide']} PostgreSQL checkpoints (server-wide), "
        f"autovacuum/analyze at s after live start: {pg['autovacuum_events_s_after_live_start']}"
    )
    print(
        "    CPU cores: "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k != "machine_busy")
        + f" (machine {cpu['machine_busy']:.2f})"
    )
    ch = d["checks"]
    print(
        f"    checks: {ch['m1_final_candles_received']:,} candles, "
        f"{ch['m1_value_sets_received']:,} value sets, missing {ch['expected_bars_missing_candle']}, "
        f"without values {ch['candles_without_values']}, "
        f"duplicates {ch['duplicate_candles'] + ch['duplicate_values']}, revised {ch['revised']}, "
        f"{ch['bars_compared']:,} compared with TA-Lib batch, {ch['bars_not_bit_equal']} differ "
        f"-> {'ok' if ch['ok'] else 'FAILED'}"
    )
    print()
    print("{:<52} {:>10} {:>10}  {}".format("target", "reached", "target", "met"))
    print("-" * 84)
    for t in report["targets"].values():
        value = t["value"]
        shown = "n/a" if value is None else f"{value:,.2f}"
        print(
            "{:<52} {:>10} {:>10}  {}".format(t["what"], shown, t["target"], "met" if t["met"] else "MISSED")
        )
    print(
        f"(b) / (c) = {f['b_over_c']:,}x; with on_bar reduced to TA-Lib's four update() calls, (c) / (a) "
        f"would be {f['c_over_talib_updates_alone']:,}x and (b) / (a) {f['b_over_talib_updates_alone']:,}x"
    )
    print(f"results: {report['output']}")


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Params:
    parser = argparse.ArgumentParser(
        prog="python -m bench.indicators_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--bars", type=int, help="final bars of the (a) series (default 50000)")
    parser.add_argument(
        "--series", type=int, help="series the (a) interleaved run spreads them over (default 50)"
    )
    parser.add_argument("--repeats", type=int, help="runs of each (a) measurement, the best kept (default 5)")
    parser.add_argument(
        "--window", type=int, default=200, help="bars recomputed per new bar in (b), (c) (default 200)"
    )
    parser.add_argument(
        "--seed-bars",
        type=int,
        help="new bars (b) recomputes for, cost extrapolated to --bars (default 2000)",
    )
    parser.add_argument("--seed-repeats", type=int, help="runs of (b), the best kept (default 2)")
    parser.add_argument(
        "--batch-bars",
        type=int,
        help="new bars (c) recomputes for (default: every bar from the window's end)",
    )
    parser.add_argument("--batch-repeats", type=int, help="runs of (c), the best kept (default 3)")
    parser.add_argument("--symbols", type=int, help="(d) symbols streamed (default 10)")
    parser.add_argument(
        "--speedup", type=float, default=30.0, help="(d) simulated seconds per wall second (default 30)"
    )
    parser.add_argument(
        "--tick-interval",
        type=float,
        default=2.0,
        help="(d) mean simulated seconds between ticks of a symbol",
    )
    parser.add_argument(
        "--batch-interval",
        type=float,
        default=0.05,
        help="(d) wall seconds between tick batches (default 0.05)",
    )
    parser.add_argument(
        "--history-minutes", type=int, default=40, help="(d) simulated minutes backfilled first (default 40)"
    )
    parser.add_argument("--live-seconds", type=float, help="(d) wall seconds of live-ish ticks (default 75)")
    parser.add_argument(
        "--warmup-seconds", type=float, help="(d) first live seconds left out of the latency (default 10)"
    )
    parser.add_argument(
        "--drain-timeout", type=float, help="(d) seconds to wait for the last bars (default 60)"
    )
    parser.add_argument(
        "--store-repeats", type=int, help="(d) runs of each path piece timed alone (default 200)"
    )
    parser.add_argument(
        "--stream-window", type=int, default=8, help="(d) StreamTicks batches in flight (default 8)"
    )
    parser.add_argument(
        "--feed-poll-seconds",
        type=float,
        default=1.0,
        help="(d) INDICATORS_FEED_POLL_SECONDS: the fallback poll; commits wake subscribers (default 1.0)",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="(d) also subscribe, in another process, like the indicators service's own input (all "
        "timeframes, forming bars included): splits the latency at the indicators' input (off by default: "
        "the extra subscriber loads the aggregator)",
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the three services, for experiments (repeatable)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        help="wait up to this many seconds for an idle machine before (a) and (d) "
        "(default 60; 0 with --quick)",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        help="re-run (d) when other processes disturbed it, at most this often (default 1; 0 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a small run for smoke testing (about 40 s)")
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        help=f"results JSON path (default {DEFAULT_OUTPUT.relative_to(REPO)}; with --quick {QUICK_OUTPUT})",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    defaults: dict[str, Any] = (
        {
            "bars": 5_000,
            "series": 10,
            "repeats": 1,
            "seed_bars": 100,
            "seed_repeats": 1,
            "batch_repeats": 1,
            "symbols": 4,
            "live_seconds": 8.0,
            "warmup_seconds": 2.0,
            "drain_timeout": 20.0,
            "store_repeats": 20,
            "wait_quiet": 0.0,
            "noisy_retries": 0,
        }
        if quick
        else {
            "bars": 50_000,
            "series": 50,
            "repeats": 5,
            "seed_bars": 2_000,
            "seed_repeats": 2,
            "batch_repeats": 3,
            "symbols": 10,
            "live_seconds": 75.0,
            "warmup_seconds": 10.0,
            "drain_timeout": 60.0,
            "store_repeats": 200,
            "wait_quiet": 60.0,
            "noisy_retries": 1,
        }
    )
    values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    env: dict[str, str] = {}
    for item in args.service_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--service-env {item!r}: expected NAME=VALUE")
        env[name] = value
    counts = [values[k] for k in ("bars", "series", "repeats", "seed_bars", "seed_repeats", "batch_repeats")]
    counts += [values["symbols"], values["store_repeats"], args.stream_window, args.window]
    if min(counts) < 1:
        parser.error("counts must be at least 1")
    if args.window < 40 or values["bars"] < args.window + 100 or values["bars"] // values["series"] < 40:
        parser.error("need --window >= 40, --bars >= window + 100 and --bars / --series >= 40")
    if args.batch_bars is not None and args.batch_bars < 1:
        parser.error("--batch-bars must be at least 1")
    if min(args.speedup, args.tick_interval, args.batch_interval, values["live_seconds"]) <= 0:
        parser.error("--speedup, --tick-interval, --batch-interval and --live-seconds must be above 0")
    if not 0 <= values["warmup_seconds"] < values["live_seconds"] or args.history_minutes < 0:
        parser.error("need 0 <= --warmup-seconds < --live-seconds and --history-minutes >= 0")
    return Params(
        bars=int(values["bars"]),
        series=int(values["series"]),
        repeats=int(values["repeats"]),
        window=int(args.window),
        seed_bars=int(values["seed_bars"]),
        seed_repeats=int(values["seed_repeats"]),
        batch_bars=None if args.batch_bars is None else int(args.batch_bars),
        batch_repeats=int(values["batch_repeats"]),
        symbols=int(values["symbols"]),
        speedup=float(args.speedup),
        tick_interval=float(args.tick_interval),
        batch_interval=float(args.batch_interval),
        history_minutes=int(args.history_minutes),
        live_seconds=float(values["live_seconds"]),
        warmup_seconds=float(values["warmup_seconds"]),
        drain_timeout=float(values["drain_timeout"]),
        store_repeats=int(values["store_repeats"]),
        stream_window=int(args.stream_window),
        feed_poll_seconds=float(args.feed_poll_seconds),
        probe=bool(args.probe),
        service_env=env,
        wait_quiet=float(values["wait_quiet"]),
        noisy_retries=int(values["noisy_retries"]),
        quick=quick,
        output=args.output or (QUICK_OUTPUT if quick else DEFAULT_OUTPUT),
    )


def run_all(params: Params, workdir: pathlib.Path) -> dict[str, Any]:
    if params.wait_quiet > 0:
        print("... waiting for a quiet machine", flush=True)
        background = wait_for_quiet(params.wait_quiet)
    else:
        background = None
    a, series, values = bench_engine(params)
    a["background_cores_before"] = None if background is None else round(background, 2)
    b, c = bench_recompute(params, series, values)
    del series, values
    plan = make_plan(params)
    d = step(
        f"(d) end to end: {params.symbols} symbols, {params.live_seconds:g} s of live-ish ticks at "
        f"{params.speedup:g}x, PostgreSQL",
        params,
        lambda: bench_end_to_end(params, workdir, plan),
    )
    return {"a_engine": a, "b_seed_pandas": b, "c_talib_batch": c, "d_e2e": d}


def main(argv: Sequence[str] | None = None) -> int:
    params = parse_args(argv)
    machine = machine_info() | {"talib": talib.__version__, "pandas": pd.__version__, "numpy": np.__version__}
    started = dt.datetime.now(dt.UTC)
    with scratch_folder("indicators-bench-") as workdir:
        results = run_all(params, workdir)
        figures, targets = evaluate(results)
        parts = {
            "machine": machine,
            "parameters": dataclasses.asdict(params) | {"lateness_us": params.lateness_us},
            "results": results,
            "figures": figures,
            "targets": targets,
        }
        publish("indicators", started, params.output, parts, print_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The indicator engine: RSI, MACD, ATR and Bollinger Bands of every (symbol, timeframe), live. Pure.

Bars come from the aggregator (``services.aggregator.bars.Bar``). Each series is the sequence of
*final* bars of one symbol and timeframe, and every value the engine gives equals what TA-Lib's
batch functions return over that whole sequence — ``talib.RSI(close, rsi_period)``,
``talib.MACD(close, fast, slow, signal)``, ``talib.ATR(high, low, close, atr_period)`` and
``talib.BBANDS(close, bb_period, dev_up, dev_down, matype=0)`` — bit for bit, not approximately.
Values depend only on the order of the bars, never on their times: a gap in time is no bar.
A value is ``None`` exactly where the batch function gives NaN (its lookback is warming up).

What on_bar does with a bar:

* a final bar after the last final bar of its series: one O(1) ``update`` of each handle;
* a forming bar after the last final bar: ``peek`` of each handle — provisional values
  (``final=False``), nothing committed, so the next final bar is still exact;
* a final bar at or before the last final one (a revision, or a late bar filling a gap): the
  series is recomputed from a checkpoint — a ``copy()`` of the handles taken just before that bar —
  by re-applying it and every later final bar; the values of all of them come back, in time order.
  Checkpoints are kept for the last ``checkpoints`` final bars (64 by default). The aggregator only
  revises bars within its retention window, 1 h by default, which on M1 is at most 61 final bars
  back (the last final bar and the 60 minutes before it): 64 covers that with room to spare, and
  every higher timeframe has fewer bars in an hour. Give ``checkpoints`` at least
  ``retention / 1 minute + 2`` for a longer retention. A revision older than the window (an EA
  re-post of an old candle) raises ``NeedsHistory``: the caller loads the stored final bars of
  the series and calls ``warm``, which rebuilds the handles and reports the values again.
  A revision that changes none of high, low and close (only open, volume or spread) gives the same
  values: just that bar's come back, under its new revision. A revision older than the one already
  applied to a bar is ignored.

Cost, measured on this machine: a final bar 6.5-7 µs for all four indicators (1.6-1.7 µs per
indicator: 0.15-0.25 µs of TA-Lib ``update``, 0.4 µs of checkpoint ``copy()``, the rest Python), a
forming bar about 3.8 µs, a revision 60 bars back about 360 µs (61 bars re-applied), and ``warm``
over 100,000 stored bars about 150 ms.

What TA-Lib 0.8's streaming API does (explored with ``help(talib.stream.RSI)`` and by experiment
against the batch functions; it is the only place TA-Lib is used here):

* ``talib.stream.RSI(close, timeperiod=14)`` opens a handle on a float64 history, with the same
  inputs and parameters as the batch function: ``ATR_Stream(high, low, close, timeperiod)``,
  ``MACD_Stream(real, fastperiod, slowperiod, signalperiod)``,
  ``BBANDS_Stream(real, timeperiod, nbdevup, nbdevdn, matype)``. ``.value`` is the batch value at
  the last history bar. Opening needs ``lookback + 1`` bars
  (``talib.abstract.Function(name, **params).lookback``: 15 for RSI(14) and ATR(14), 34 for
  MACD(12, 26, 9), 20 for BBANDS(20)) and raises ``talib.InsufficientHistory`` (an ``Exception``
  subclass whose message says how many bars it needs) on less. The docs warn that some functions
  need "a little more" to seed, so the engine tries to open from ``lookback + 1`` bars on, on every
  new bar, until it succeeds; for these four it succeeds at exactly ``lookback + 1``, which is also
  the first index the batch function gives a value at.
* ``update(*bar)`` takes one float per input (``close``; ``high, low, close`` for ATR) and returns
  a float, or a tuple for several outputs in the batch order: MACD ``(macd, macdsignal, macdhist)``,
  BBANDS ``(upperband, middleband, lowerband)``. Opening at 40, 100 or 1,000 bars of a 5,000-bar
  random walk and updating to the end gives exactly (``==``) the batch arrays. ``peek`` has the
  same signature and result and commits nothing. ``copy()`` is an independent handle at the same
  bar (about 0.4 µs; ``update`` and ``peek`` 0.15-0.25 µs). Handles cannot be pickled, so
  checkpoints are in-memory copies and a restart goes through ``warm``.
* A NaN or infinite input makes ``update`` raise a bare ``Exception`` (``TA_BAD_PARAM``) and leaves
  the handle as it was; the engine rejects non-finite bars itself before touching any handle, as a
  bare ``Exception`` cannot be told apart from other failures. float32 arrays and lists are refused.
* ``advance()`` counts a bar that was not fed (``out_range.nbelement`` + 1, ``value`` unchanged);
  ``out_range`` is ``(begidx, nbelement)`` as the batch function reports it (``begidx`` is the
  lookback). The engine does not need either: a series has no bars it does not feed.
* ``open_and_fill(history, **params)`` opens a handle and returns the batch output over the history
  too (NaN while warming up) in one pass; ``warm`` uses it to open on the stored history and report
  the values of stored bars in one go.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import logging
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from talib import stream

from services.aggregator.bars import Bar
from services.common.market import Timeframe
from services.common.validation import FieldViolation, ValidationFailed
from services.indicators.catalog import InsufficientHistory, lookback

logger = logging.getLogger(__name__)

# Revisable final bars per series: the aggregator's default 1 h retention reaches 61 M1 bars back.
DEFAULT_CHECKPOINTS = 64
# TA-Lib's own bounds for these parameters (its lookback is -1 outside them).
MAX_PERIOD = 100_000
MAX_DEVIATION = 3e37
INDICATORS = ("rsi", "macd", "atr", "bbands")

_Array = npt.NDArray[np.float64]
_H = TypeVar("_H")


@dataclasses.dataclass(frozen=True, slots=True)
class IndicatorSettings:
    """Periods of the four indicators; the defaults are TA-Lib's and the usual ones.

    Bounds are TA-Lib's: RSI, MACD fast/slow and Bollinger periods from 2, the MACD signal and ATR
    periods from 1 (no smoothing, or the true range), all up to 100,000. MACD's fast period must be
    below its slow one (TA-Lib silently swaps them otherwise). Band deviations are finite and not
    negative (a negative one would put the "upper" band below the "lower").
    """

    rsi_period: int = 14
    macd_fast: int = 12
    macd_slow: int = 26
    macd_signal: int = 9
    atr_period: int = 14
    bb_period: int = 20
    bb_dev_up: float = 2.0
    bb_dev_down: float = 2.0

    def __post_init__(self) -> None:
        violations: list[FieldViolation] = []
        minimum = {
            "rsi_period": 2,
            "macd_fast": 2,
            "macd_slow": 2,
            "macd_signal": 1,
            "atr_period": 1,
            "bb_period": 2,
        }
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                violations.append(FieldViolation(name, f"must be a whole number, got {value!r}"))
            elif not low <= value <= MAX_PERIOD:
                violations.append(FieldViolation(name, f"must be from {low} to {MAX_PERIOD}, got {value}"))
        fast, slow = self.macd_fast, self.macd_slow
        if isinstance(fast, int) and isinstance(slow, int) and fast >= slow:
            violations.append(FieldViolation("macd_fast", f"must be below macd_slow ({slow}), got {fast}"))
        for name in ("bb_dev_up", "bb_dev_down"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                violations.append(FieldViolation(name, f"must be a number, got {value!r}"))
            elif not (math.isfinite(value) and 0 <= value <= MAX_DEVIATION):
                violations.append(FieldViolation(name, f"must be from 0 to {MAX_DEVIATION:g}, got {value}"))
        if violations:
            raise ValidationFailed(violations)


@dataclasses.dataclass(frozen=True, slots=True)
class IndicatorValues:
    """The indicators of one bar; a value is None while its lookback is warming up (never NaN)."""

    symbol: str
    timeframe: Timeframe
    ts: dt.datetime
    revision: int  # the bar's revision
    final: bool  # False: provisional values of a forming bar
    rsi: float | None
    macd: float | None
    macd_signal: float | None
    macd_hist: float | None
    atr: float | None
    bb_upper: float | None
    bb_middle: float | None
    bb_lower: float | None
    # The bar's own close, volume and spread: with the indicators they are the inference model's
    # inputs, so a consumer of this feed needs nothing else. None only in rows stored before
    # they were recorded.
    close: float | None = None
    volume: float | None = None
    spread: float | None = None

    @property
    def warming_up(self) -> bool:
        """Some indicator has no value yet: too few final bars for its lookback."""
        return (
            self.rsi is None
            or self.macd is None
            or self.macd_signal is None
            or self.macd_hist is None
            or self.atr is None
            or self.bb_upper is None
            or self.bb_middle is None
            or self.bb_lower is None
        )


@dataclasses.dataclass(frozen=True, slots=True)
class SeriesState:
    """What the engine holds for one series (for tests and diagnostics)."""

    bars: int  # final bars seen since the series started (or was warmed)
    last_final: dt.datetime | None
    revisable_after: dt.datetime | None  # newest bar no longer held (None: all are); older: NeedsHistory
    ready: frozenset[str]  # indicators past their warm-up, out of INDICATORS


class NeedsHistory(Exception):
    """A revision reaches further back than the checkpoints: rebuild the series with ``warm``."""

    def __init__(self, symbol: str, timeframe: Timeframe, ts: dt.datetime) -> None:
        super().__init__(
            f"{symbol} {timeframe.name}: the final bar at {ts.isoformat()} is older than the revisable "
            "window; warm() the series from its stored final bars"
        )
        self.symbol = symbol
        self.timeframe = timeframe
        self.ts = ts


class _Handles:
    """The four streaming handles of a series at one bar; None until its lookback is filled."""

    __slots__ = ("atr", "bb", "macd", "rsi")

    def __init__(
        self,
        rsi: stream.RSI | None = None,
        macd: stream.MACD | None = None,
        atr: stream.ATR | None = None,
        bb: stream.BBANDS | None = None,
    ) -> None:
        self.rsi = rsi
        self.macd = macd
        self.atr = atr
        self.bb = bb

    @property
    def ready(self) -> bool:
        return self.rsi is not None and self.macd is not None and self.atr is not None and self.bb is not None

    def copy(self) -> _Handles:
        return _Handles(
            None if self.rsi is None else self.rsi.copy(),
            None if self.macd is None else self.macd.copy(),
            None if self.atr is None else self.atr.copy(),
            None if self.bb is None else self.bb.copy(),
        )


class _Entry:
    """One final bar held: the prices the indicators read, and the handles just before it."""

    __slots__ = ("before", "close", "high", "low", "revision", "spread", "ts", "values", "volume")

    def __init__(self, bar: Bar, before: _Handles | None) -> None:
        self.ts = bar.ts
        self.revision = bar.revision
        self.high = bar.high
        self.low = bar.low
        self.close = bar.close
        self.volume = bar.volume
        self.spread = bar.spread
        # Never mutated: stepping always works on a copy. None for a bar older than the window that
        # is held only for its prices, while a handle warms up (see _Series).
        self.before = before
        self.values: IndicatorValues | None = None


def _entry_ts(entry: _Entry) -> dt.datetime:
    return entry.ts


class _Series:
    """The final bars of one (symbol, timeframe) the engine holds, and the live handles.

    Only the last ``checkpoints`` entries keep their handles (``before``), so memory is bounded by
    the window. Bars older than the window are dropped once every handle is open in the oldest
    checkpoint; until then (a handle still warming up is opened on the whole history) they are held
    for their prices only, ``base`` is 0, and a revision among them replays the series from its
    first bar — cheap, as the series is no longer than the lookback plus the window then.
    """

    __slots__ = ("base", "entries", "floor", "live")

    def __init__(self) -> None:
        self.base = 0  # final bars before entries[0], no longer held
        self.floor: dt.datetime | None = None  # time of the last of them: revisions must come after it
        self.entries: list[_Entry] = []
        self.live = _Handles()


class _History:
    """The prices of a series up to and including one bar, as float64 arrays built on demand."""

    __slots__ = ("_arrays", "_entries", "_extra", "_stop", "length")

    def __init__(
        self, entries: Sequence[_Entry], stop: int, extra: tuple[float, float, float] | None = None
    ) -> None:
        self._entries = entries  # entries[:stop], then ``extra`` (a forming bar) if given
        self._stop = stop
        self._extra = extra
        self._arrays: tuple[_Array, _Array, _Array] | None = None
        self.length = stop + (extra is not None)

    def arrays(self) -> tuple[_Array, _Array, _Array]:
        if self._arrays is None:
            rows = [(e.high, e.low, e.close) for e in self._entries[: self._stop]]
            if self._extra is not None:
                rows.append(self._extra)
            table = np.array(rows, dtype=np.float64).reshape(-1, 3)
            self._arrays = (
                np.ascontiguousarray(table[:, 0]),
                np.ascontiguousarray(table[:, 1]),
                np.ascontiguousarray(table[:, 2]),
            )
        return self._arrays


def _try_open(needed: int, history: _History, factory: Callable[[_History], _H]) -> _H | None:
    """A handle on the history, or None while it is too short."""
    if history.length < needed:
        return None
    try:
        return factory(history)
    except InsufficientHistory:
        return None


def _opt(value: float) -> float | None:
    return None if math.isnan(value) else value


def _check_finite(bar: Bar, field_prefix: str = "") -> None:
    bad = [
        FieldViolation(f"{field_prefix}{name}", f"must be finite, got {value!r}")
        for name, value in (("high", bar.high), ("low", bar.low), ("close", bar.close))
        if not math.isfinite(value)
    ]
    if bad:
        raise ValidationFailed(bad)


class IndicatorEngine:
    """Streaming RSI, MACD, ATR and Bollinger Bands of every (symbol, timeframe); see the module doc."""

    def __init__(
        self, settings: IndicatorSettings | None = None, checkpoints: int = DEFAULT_CHECKPOINTS
    ) -> None:
        if checkpoints < 1:
            raise ValidationFailed([FieldViolation("checkpoints", f"must be at least 1, got {checkpoints}")])
        self.settings = settings or IndicatorSettings()
        self.checkpoints = checkpoints
        self._series: dict[tuple[str, Timeframe], _Series] = {}
        s = self.settings
        # Bars needed to open each handle: the batch function's first value is at index lookback.
        self._need_rsi = lookback("RSI", {"timeperiod": s.rsi_period}) + 1
        self._need_macd = (
            lookback(
                "MACD", {"fastperiod": s.macd_fast, "slowperiod": s.macd_slow, "signalperiod": s.macd_signal}
            )
            + 1
        )
        self._need_atr = lookback("ATR", {"timeperiod": s.atr_period}) + 1
        self._need_bb = (
            lookback(
                "BBANDS",
                {"timeperiod": s.bb_period, "nbdevup": float(s.bb_dev_up), "nbdevdn": float(s.bb_dev_down)},
            )
            + 1
        )

    # --- public API -------------------------------------------------------------------------------

    def on_bar(self, bar: Bar) -> list[IndicatorValues]:
        """The values a bar gives: one for a new final or a forming bar, several for a revision.

        A revision (a final bar at or before the last final bar of its series: a changed bar, or a
        late one filling a gap) returns the values of that bar and of every later final bar, in time
        order. Returns nothing for a forming bar at or before the last final bar, and for a final
        bar whose revision is older than the one already applied. Raises ``NeedsHistory`` for a
        revision older than the checkpoint window (nothing changes then), and ``ValidationFailed``
        for a bar whose high, low or close is not finite.
        """
        _check_finite(bar)
        key = (bar.symbol, bar.timeframe)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        entries = series.entries
        if entries and bar.ts <= entries[-1].ts:
            return self._revise(series, bar) if bar.final else []
        return [self._append(series, bar) if bar.final else self._peek(series, bar)]

    def warm(
        self,
        symbol: str,
        timeframe: Timeframe,
        bars: Sequence[Bar],
        *,
        report_from: dt.datetime | None = None,
        report_revisable: bool = False,
    ) -> list[IndicatorValues]:
        """Rebuild a series from its stored final bars (a restart, or after ``NeedsHistory``).

        Whatever the engine held for the series is replaced; the next bar then gives what one
        uninterrupted run over ``bars`` would have. With ``report_from``, returns the values of the
        bars at or after it (to republish after a deep revision), else nothing.

        With ``report_revisable``, also returns the values of every bar held with a checkpoint (the
        last ``checkpoints``: those a later revision recomputes in place, without ``NeedsHistory``).
        A restart needs them: ``bars`` may already hold a revision the caller has not seen yet, and
        when that revision comes along later it changes no prices here, so nothing would recompute
        the bars after it. An older revision still raises ``NeedsHistory`` when it comes along.
        """
        ordered = sorted(bars, key=lambda b: b.ts)
        violations: list[FieldViolation] = []
        for i, bar in enumerate(ordered):
            if bar.symbol != symbol or bar.timeframe is not timeframe:
                violations.append(
                    FieldViolation(f"bars[{i}]", f"belongs to {bar.symbol} {bar.timeframe.name}")
                )
            if not bar.final:
                violations.append(FieldViolation(f"bars[{i}].final", "only final bars make a series"))
            if i and bar.ts == ordered[i - 1].ts:
                violations.append(FieldViolation(f"bars[{i}].ts", f"{bar.ts.isoformat()} is given twice"))
            try:
                _check_finite(bar, f"bars[{i}].")
            except ValidationFailed as exc:
                violations.extend(exc.violations)
        if violations:
            raise ValidationFailed(violations)

        series = _Series()
        reported: list[IndicatorValues] = []
        split = max(0, len(ordered) - self.checkpoints)
        if split:
            # Open on everything before the window in one pass; the window goes bar by bar to lay
            # down its checkpoints. Too short a prefix to open every handle: step from the start.
            prefix = ordered[:split]
            opened = self._open_and_fill(prefix)
            if opened is None:
                split = 0
            else:
                series.live, outputs = opened
                series.base, series.floor = split, prefix[-1].ts
                if report_from is not None:
                    reported.extend(
                        self._values(bar, True, *(_opt(float(column[i])) for column in outputs))
                        for i, bar in enumerate(prefix)
                        if bar.ts >= report_from
                    )
        if report_revisable and split < len(ordered):
            # Every bar from here on is held: a revision of one of them is recomputed in place.
            held_from = ordered[split].ts
            report_from = held_from if report_from is None else min(report_from, held_from)
        for bar in ordered[split:]:
            values = self._append(series, bar)
            if report_from is not None and bar.ts >= report_from:
                reported.append(values)
        self._series[(symbol, timeframe)] = series
        logger.debug("warmed %s %s from %d final bars", symbol, timeframe.name, len(ordered))
        return reported

    def series_state(self, symbol: str, timeframe: Timeframe) -> SeriesState | None:
        """What the engine holds for a series, or None if it has seen none of its bars."""
        series = self._series.get((symbol, timeframe))
        if series is None:
            return None
        live = series.live
        handles = {"rsi": live.rsi, "macd": live.macd, "atr": live.atr, "bbands": live.bb}
        entries = series.entries
        return SeriesState(
            bars=series.base + len(entries),
            last_final=entries[-1].ts if entries else None,
            revisable_after=series.floor,
            ready=frozenset(name for name, handle in handles.items() if handle is not None),
        )

    def forget(self, symbol: str, timeframe: Timeframe) -> None:
        """Drop a series (its next bar starts it afresh)."""
        self._series.pop((symbol, timeframe), None)

    # --- internals --------------------------------------------------------------------------------

    def _append(self, series: _Series, bar: Bar) -> IndicatorValues:
        entry = _Entry(bar, series.live.copy())
        series.entries.append(entry)
        values = self._step(series, series.live, len(series.entries) - 1, bar.symbol, bar.timeframe)
        entry.values = values
        self._trim(series)
        return values

    def _revise(self, series: _Series, bar: Bar) -> list[IndicatorValues]:
        entries = series.entries
        if series.floor is not None and bar.ts <= series.floor:
            raise NeedsHistory(bar.symbol, bar.timeframe, bar.ts)
        i = bisect.bisect_left(entries, bar.ts, key=_entry_ts)
        if entries[i].ts == bar.ts:
            old = entries[i]
            if bar.revision < old.revision:
                return []  # an older version delivered late: the newer one stands
            if (old.high, old.low, old.close) == (bar.high, bar.low, bar.close) and old.values is not None:
                # Only what the indicators do not read changed (open, volume, spread): same values.
                old.revision = bar.revision
                old.values = dataclasses.replace(old.values, revision=bar.revision)
                return [old.values]
            entries[i] = _Entry(bar, old.before)
        else:
            entries.insert(i, _Entry(bar, entries[i].before))
        checkpoint = entries[i].before
        # No checkpoint: a bar older than the window while warming up; replay from the first bar.
        start, state = (i, checkpoint.copy()) if checkpoint is not None else (0, _Handles())
        out: list[IndicatorValues] = []
        for j in range(start, len(entries)):
            entry = entries[j]
            if j > i:
                entry.before = state.copy()
            entry.values = self._step(series, state, j, bar.symbol, bar.timeframe)
            if j >= i:
                out.append(entry.values)
        series.live = state
        self._trim(series)
        return out

    def _trim(self, series: _Series) -> None:
        entries = series.entries
        excess = len(entries) - self.checkpoints
        if excess <= 0:
            return
        oldest = entries[excess].before
        if oldest is not None and oldest.ready:
            series.floor = entries[excess - 1].ts
            del entries[:excess]
            series.base += excess
            return
        # Still warming up: keep the prices, drop the checkpoints older than the window.
        for k in range(excess - 1, -1, -1):
            if entries[k].before is None:
                break
            entries[k].before = None

    def _step(
        self, series: _Series, state: _Handles, j: int, symbol: str, timeframe: Timeframe
    ) -> IndicatorValues:
        """Commit final bar ``entries[j]`` to ``state`` and give its values."""
        e = series.entries[j]
        high, low, close = e.high, e.low, e.close
        rsi_h, macd_h, atr_h, bb_h = state.rsi, state.macd, state.atr, state.bb
        if rsi_h is not None and macd_h is not None and atr_h is not None and bb_h is not None:
            rsi = rsi_h.update(close)
            macd, signal, hist = macd_h.update(close)
            atr = atr_h.update(high, low, close)
            upper, middle, lower = bb_h.update(close)
            return IndicatorValues(
                symbol,
                timeframe,
                e.ts,
                e.revision,
                True,
                _opt(rsi),
                _opt(macd),
                _opt(signal),
                _opt(hist),
                _opt(atr),
                _opt(upper),
                _opt(middle),
                _opt(lower),
                e.close,
                e.volume,
                e.spread,
            )
        # Still warming up: the series is held from its first bar (see _Series).
        history = _History(series.entries, j + 1)
        outputs = self._slow(state, history, high, low, close, True)
        return _values(symbol, timeframe, e.ts, e.revision, True, outputs, e.close, e.volume, e.spread)

    def _peek(self, series: _Series, bar: Bar) -> IndicatorValues:
        """Provisional values of a forming bar after the last final one; commits nothing."""
        state = series.live
        high, low, close = bar.high, bar.low, bar.close
        rsi_h, macd_h, atr_h, bb_h = state.rsi, state.macd, state.atr, state.bb
        if rsi_h is not None and macd_h is not None and atr_h is not None and bb_h is not None:
            macd, signal, hist = macd_h.peek(close)
            upper, middle, lower = bb_h.peek(close)
            outputs: tuple[float | None, ...] = (
                _opt(rsi_h.peek(close)),
                _opt(macd),
                _opt(signal),
                _opt(hist),
                _opt(atr_h.peek(high, low, close)),
                _opt(upper),
                _opt(middle),
                _opt(lower),
            )
        else:
            history = _History(series.entries, len(series.entries), (high, low, close))
            outputs = self._slow(state, history, high, low, close, False)
        return self._values(bar, False, *outputs)

    def _slow(
        self, state: _Handles, history: _History, high: float, low: float, close: float, commit: bool
    ) -> tuple[float | None, ...]:
        """One bar while some handle is not open yet: open the ones whose lookback is now filled.

        ``history`` ends with this bar. With ``commit`` the bar is final: open handles are updated
        and newly opened ones kept; without it nothing in ``state`` changes.
        """
        s = self.settings
        rsi: float | None = None
        macd: tuple[float, float, float] | None = None
        atr: float | None = None
        bb: tuple[float, float, float] | None = None

        if state.rsi is not None:
            rsi = state.rsi.update(close) if commit else state.rsi.peek(close)
        else:
            rsi_h = _try_open(
                self._need_rsi, history, lambda h: stream.RSI(h.arrays()[2], timeperiod=s.rsi_period)
            )
            if rsi_h is not None:
                rsi = rsi_h.value
                if commit:
                    state.rsi = rsi_h

        if state.macd is not None:
            macd = state.macd.update(close) if commit else state.macd.peek(close)
        else:
            macd_h = _try_open(
                self._need_macd,
                history,
                lambda h: stream.MACD(
                    h.arrays()[2], fastperiod=s.macd_fast, slowperiod=s.macd_slow, signalperiod=s.macd_signal
                ),
            )
            if macd_h is not None:
                macd = macd_h.value
                if commit:
                    state.macd = macd_h

        if state.atr is not None:
            atr = state.atr.update(high, low, close) if commit else state.atr.peek(high, low, close)
        else:
            atr_h = _try_open(
                self._need_atr, history, lambda h: stream.ATR(*h.arrays(), timeperiod=s.atr_period)
            )
            if atr_h is not None:
                atr = atr_h.value
                if commit:
                    state.atr = atr_h

        if state.bb is not None:
            bb = state.bb.update(close) if commit else state.bb.peek(close)
        else:
            bb_h = _try_open(self._need_bb, history, self._open_bb)
            if bb_h is not None:
                bb = bb_h.value
                if commit:
                    state.bb = bb_h

        none3: tuple[None, None, None] = (None, None, None)
        return tuple(None if v is None else _opt(v) for v in (rsi, *(macd or none3), atr, *(bb or none3)))

    def _open_bb(self, history: _History) -> stream.BBANDS:
        s = self.settings
        return stream.BBANDS(
            history.arrays()[2],
            timeperiod=s.bb_period,
            nbdevup=float(s.bb_dev_up),
            nbdevdn=float(s.bb_dev_down),
            matype=0,
        )

    def _open_and_fill(self, bars: Sequence[Bar]) -> tuple[_Handles, list[_Array]] | None:
        """Handles opened on ``bars`` and the batch outputs over them, or None if one cannot open yet."""
        s = self.settings
        high = np.array([b.high for b in bars], dtype=np.float64)
        low = np.array([b.low for b in bars], dtype=np.float64)
        close = np.array([b.close for b in bars], dtype=np.float64)
        try:
            rsi_h, rsi = stream.RSI.open_and_fill(close, timeperiod=s.rsi_period)
            macd_h, macd = stream.MACD.open_and_fill(
                close, fastperiod=s.macd_fast, slowperiod=s.macd_slow, signalperiod=s.macd_signal
            )
            atr_h, atr = stream.ATR.open_and_fill(high, low, close, timeperiod=s.atr_period)
            bb_h, bb = stream.BBANDS.open_and_fill(
                close,
                timeperiod=s.bb_period,
                nbdevup=float(s.bb_dev_up),
                nbdevdn=float(s.bb_dev_down),
                matype=0,
            )
        except InsufficientHistory:
            return None
        return _Handles(rsi_h, macd_h, atr_h, bb_h), [rsi, *macd, atr, *bb]

    @staticmethod
    def _values(bar: Bar, final: bool, *outputs: float | None) -> IndicatorValues:
        return _values(
            bar.symbol, bar.timeframe, bar.ts, bar.revision, final, outputs, bar.close, bar.volume, bar.spread
        )


def _values(
    symbol: str,
    timeframe: Timeframe,
    ts: dt.datetime,
    revision: int,
    final: bool,
    outputs: Sequence[float | None],
    close: float,
    volume: float,
    spread: float,
) -> IndicatorValues:
    """Values from the eight outputs in INDICATOR_NAMES order and the bar's own inputs."""
    rsi, macd, signal, hist, atr, upper, middle, lower = outputs
    return IndicatorValues(
        symbol,
        timeframe,
        ts,
        revision,
        final,
        rsi,
        macd,
        signal,
        hist,
        atr,
        upper,
        middle,
        lower,
        close,
        volume,
        spread,
    )

"""Signals and the per-series candle history the live path builds feature rows from (pure)."""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from services.common.market import Timeframe
from services.common.validation import FieldViolation
from services.inference.features import INPUTS, Array

Inputs = tuple[float, ...]  # one candle's values in the order of features.INPUTS (NaN: missing)


@dataclasses.dataclass(frozen=True, slots=True)
class Signal:
    """The model's call on one final candle."""

    symbol: str
    timeframe: Timeframe
    ts: dt.datetime
    prob_up: float
    label: int
    model_version: str
    candle_revision: int


class SeriesHistory:
    """The latest final candles of one (symbol, timeframe), by time, at most ``keep`` of them.

    ``from_start`` is true while the history holds the series from its very first candle: then a
    candle before the oldest one held cannot exist, and any time is covered.

    The values live in one array with room for ``keep`` more rows than are held: the next candle
    (the common case) is one row written after the others, the oldest one is dropped by moving the
    start, and the rows move back to the front once per ``keep`` candles.
    """

    def __init__(self, keep: int, earlier: list[tuple[dt.datetime, Inputs]], from_start: bool) -> None:
        held = earlier[-keep:] if keep else []
        self._keep = keep
        self._times = [t for t, _ in held]
        self._values = np.empty((2 * keep + 1, len(INPUTS)))
        if held:
            self._values[: len(held)] = [i for _, i in held]
        self._start = 0
        self.from_start = from_start and len(held) == len(earlier)

    def covers(self, ts: dt.datetime) -> bool:
        """Whether every candle before ``ts`` that a row could need is held (or never existed)."""
        return self.from_start or (bool(self._times) and ts >= self._times[0])

    def put(self, ts: dt.datetime, inputs: Inputs) -> None:
        """Add a candle, or replace the one at the same time (a revision)."""
        times = self._times
        n = len(times)
        i = n
        if n and ts <= times[-1]:
            i = bisect.bisect_left(times, ts)
            if times[i] == ts:
                self._values[self._start + i] = inputs
                return
        if self._start + n == len(self._values):  # no row left after the last one: move to the front
            self._values[:n] = self._values[self._start : self._start + n]
            self._start = 0
        at = self._start + i
        self._values[at + 1 : self._start + n + 1] = self._values[at : self._start + n]  # later ones
        self._values[at] = inputs
        times.insert(i, ts)
        if n + 1 > self._keep:
            del times[0]
            self._start += 1
            self.from_start = False

    def window(self, ts: dt.datetime, count: int, out: Array) -> None:
        """Write the last ``count`` candles at or before ``ts`` into ``out``, oldest first.

        ``out`` has ``count`` rows; those before the oldest candle held are NaN.
        """
        end = bisect.bisect_right(self._times, ts)
        held = min(count, end)
        out[count - held :] = self._values[self._start + end - held : self._start + end]
        out[: count - held] = np.nan

    def __len__(self) -> int:
        return len(self._times)


MAX_ROWS = 10_000
# How far from the training mean, in standard deviations, a feature value may be and still reach the
# network: far beyond any market data, far below what overflows the network's float32 arithmetic
# (1e35 standardized with a scale of 1e-4 is +inf in float32, and prob_up NaN).
MAX_STANDARD_DEVIATIONS = 1e12


def row_violations(rows: Sequence[Sequence[float]], width: int, field: str) -> list[FieldViolation]:
    """What is wrong with explicit feature rows: their count, their width, non-finite values.

    ``field`` names a row in the request, with ``{i}`` for its index (``rows[{i}].values``).
    Non-finite values are refused here so that they never reach the model.
    """
    found: list[FieldViolation] = []
    if not rows:
        return [FieldViolation(field.format(i=0), "at least one row is required")]
    if len(rows) > MAX_ROWS:
        return [FieldViolation(field.split("[")[0], f"at most {MAX_ROWS} rows per call, got {len(rows)}")]
    for i, row in enumerate(rows):
        name = field.format(i=i)
        if len(row) != width:
            found.append(
                FieldViolation(name, f"must hold {width} values (the model's features), got {len(row)}")
            )
            continue
        bad = [j for j, x in enumerate(row) if not math.isfinite(x)]
        if bad:
            found.append(FieldViolation(f"{name}[{bad[0]}]", f"must be a finite number, got {row[bad[0]]}"))
    return found


def range_violations(
    rows: npt.NDArray[np.float64], out_of_range: npt.NDArray[np.bool_], field: str
) -> list[FieldViolation]:
    """The rows holding a value the model cannot take, each named by its first such value.

    ``out_of_range`` comes from ``Scorer.out_of_range``: finite in float64 is not enough, the network
    computes in float32 on standardized values.
    """
    found: list[FieldViolation] = []
    for i in np.flatnonzero(out_of_range.any(axis=1)).tolist():
        j = int(np.argmax(out_of_range[i]))
        found.append(
            FieldViolation(
                f"{field.format(i=i)}[{j}]",
                f"out of range for the model: {rows[i, j]} is not finite in float32, or more than "
                f"{MAX_STANDARD_DEVIATIONS:g} standard deviations from its training mean",
            )
        )
    return found

"""Signals and the per-series candle history the live path builds feature rows from (pure)."""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import math
from collections.abc import Sequence

import numpy as np

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
    """

    def __init__(self, keep: int, earlier: list[tuple[dt.datetime, Inputs]], from_start: bool) -> None:
        self._keep = keep
        self._times = [t for t, _ in earlier]
        self._inputs = [i for _, i in earlier]
        self.from_start = from_start
        self._trim()

    def covers(self, ts: dt.datetime) -> bool:
        """Whether every candle before ``ts`` that a row could need is held (or never existed)."""
        return self.from_start or (bool(self._times) and ts >= self._times[0])

    def put(self, ts: dt.datetime, inputs: Inputs) -> None:
        """Add a candle, or replace the one at the same time (a revision)."""
        i = bisect.bisect_left(self._times, ts)
        if i < len(self._times) and self._times[i] == ts:
            self._inputs[i] = inputs
        else:
            self._times.insert(i, ts)
            self._inputs.insert(i, inputs)
            self._trim()

    def until(self, ts: dt.datetime, count: int) -> Array:
        """The last ``count`` candles at or before ``ts``, oldest first, as an ``(n, len(INPUTS))`` array."""
        end = bisect.bisect_right(self._times, ts)
        chosen = self._inputs[max(0, end - count) : end]
        return np.array(chosen, dtype=np.float64).reshape(len(chosen), len(INPUTS))

    def __len__(self) -> int:
        return len(self._times)

    def _trim(self) -> None:
        excess = len(self._times) - self._keep
        if excess > 0:
            del self._times[:excess]
            del self._inputs[:excess]
            self.from_start = False


MAX_ROWS = 10_000


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

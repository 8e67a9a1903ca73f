"""The live path's per-series history and the checks on explicit feature rows."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np

from services.inference.domain import MAX_ROWS, SeriesHistory, row_violations
from services.inference.features import INPUTS

T0 = dt.datetime(2025, 1, 6, tzinfo=dt.UTC)


def _at(i: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=i)


def _inputs(x: float) -> tuple[float, ...]:
    return tuple(x for _ in INPUTS)


def test_history_until_returns_the_last_candles_at_or_before_oldest_first() -> None:
    history = SeriesHistory(10, [(_at(i), _inputs(i)) for i in range(5)], from_start=True)
    got = history.until(_at(3), 2)
    assert got.shape == (2, len(INPUTS))
    assert np.array_equal(got[:, 0], [2.0, 3.0])


def test_history_revision_replaces_the_candle_at_the_same_time() -> None:
    history = SeriesHistory(10, [(_at(i), _inputs(i)) for i in range(5)], from_start=True)
    history.put(_at(2), _inputs(20))
    assert len(history) == 5
    assert np.array_equal(history.until(_at(4), 5)[:, 0], [0.0, 1.0, 20.0, 3.0, 4.0])


def test_history_trimmed_past_keep_no_longer_covers_older_times() -> None:
    history = SeriesHistory(3, [], from_start=True)
    assert history.covers(_at(-100))
    for i in range(5):
        history.put(_at(i), _inputs(i))
    assert len(history) == 3
    assert not history.covers(_at(1))
    assert history.covers(_at(2))
    assert np.array_equal(history.until(_at(9), 10)[:, 0], [2.0, 3.0, 4.0])


def test_row_violations_name_the_row_and_value() -> None:
    rows = [[1.0, 2.0], [1.0], [1.0, math.nan], [math.inf, 1.0]]
    found = {v.field: v.description for v in row_violations(rows, 2, "rows[{i}].values")}
    assert set(found) == {"rows[1].values", "rows[2].values[1]", "rows[3].values[0]"}
    assert "must hold 2 values" in found["rows[1].values"]
    assert "finite" in found["rows[2].values[1]"]


def test_row_violations_empty_and_too_many_are_refused() -> None:
    assert row_violations([], 2, "rows[{i}].values")[0].field == "rows[0].values"
    too_many = row_violations([[0.0, 0.0]] * (MAX_ROWS + 1), 2, "rows[{i}].values")
    assert too_many[0].field == "rows"
    assert str(MAX_ROWS) in too_many[0].description

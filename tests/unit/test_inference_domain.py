"""The live path's per-series history and the checks on explicit feature rows."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.inference.domain import MAX_ROWS, SeriesHistory, range_violations, row_violations
from services.inference.features import INPUTS

T0 = dt.datetime(2025, 1, 6, tzinfo=dt.UTC)


def _at(i: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=i)


def _inputs(x: float) -> tuple[float, ...]:
    return tuple(x for _ in INPUTS)


def _window(history: SeriesHistory, ts: dt.datetime, count: int) -> np.ndarray:
    out = np.empty((count, len(INPUTS)))
    history.window(ts, count, out)
    return out


def test_history_window_holds_the_last_candles_at_or_before_oldest_first() -> None:
    history = SeriesHistory(10, [(_at(i), _inputs(i)) for i in range(5)], from_start=True)
    assert np.array_equal(_window(history, _at(3), 2)[:, 0], [2.0, 3.0])
    assert np.array_equal(_window(history, _at(1), 4)[:, 0], [np.nan, np.nan, 0.0, 1.0], equal_nan=True)


def test_history_revision_replaces_the_candle_at_the_same_time() -> None:
    history = SeriesHistory(10, [(_at(i), _inputs(i)) for i in range(5)], from_start=True)
    history.put(_at(2), _inputs(20))
    assert len(history) == 5
    assert np.array_equal(_window(history, _at(4), 5)[:, 0], [0.0, 1.0, 20.0, 3.0, 4.0])


def test_history_trimmed_past_keep_no_longer_covers_older_times() -> None:
    history = SeriesHistory(3, [], from_start=True)
    assert history.covers(_at(-100))
    for i in range(5):
        history.put(_at(i), _inputs(i))
    assert len(history) == 3
    assert not history.covers(_at(1))
    assert history.covers(_at(2))
    assert np.array_equal(_window(history, _at(9), 3)[:, 0], [2.0, 3.0, 4.0])


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


def test_range_violations_name_each_bad_row_by_its_first_value() -> None:
    rows = np.array([[1.0, 2.0, 3.0], [1.0, 1e35, 1e36], [1.0, 2.0, 3.0], [1e30, 2.0, 3.0]])
    out = np.zeros(rows.shape, dtype=bool)
    out[1, 1:] = True
    out[3, 0] = True
    found = {v.field: v.description for v in range_violations(rows, out, "rows[{i}].values")}
    assert set(found) == {"rows[1].values[1]", "rows[3].values[0]"}
    assert found["rows[1].values[1]"].startswith("out of range for the model: 1e+35")
    assert range_violations(rows, np.zeros(rows.shape, dtype=bool), "row.values") == []


@st.composite
def _puts(draw: st.DrawFn) -> list[tuple[int, float]]:
    """Candle minutes and values: mostly the next minute, sometimes a revision or a late one."""
    minute, out = 0, []
    for _ in range(draw(st.integers(0, 60))):
        kind = draw(st.sampled_from(["next", "next", "next", "revise", "gap", "late"]))
        if kind == "next":
            minute += 1
            at = minute
        elif kind == "gap":
            minute += draw(st.integers(2, 5))
            at = minute
        else:
            at = minute - draw(st.integers(0, 8))
        out.append((at, draw(st.floats(-1e3, 1e3))))
    return out


@given(puts=_puts(), keep=st.integers(1, 12), count=st.integers(1, 15))
@settings(max_examples=300, deadline=None)
def test_history_any_puts_equal_a_sorted_dict_of_the_newest_keep(
    puts: list[tuple[int, float]], keep: int, count: int
) -> None:
    history = SeriesHistory(keep, [], from_start=True)
    reference: dict[int, float] = {}
    dropped = False
    for at, x in puts:
        history.put(_at(at), _inputs(x))
        reference[at] = x
        dropped |= len(reference) > keep
        reference = dict(sorted(reference.items())[-keep:])
    assert len(history) == len(reference)
    for probe in {at for at, _ in puts} | {0, 100}:
        before = [x for at, x in reference.items() if at <= probe][-count:]
        expected = np.concatenate([np.full(count - len(before), np.nan), before])
        assert np.array_equal(_window(history, _at(probe), count)[:, 0], expected, equal_nan=True)
        assert history.covers(_at(probe)) == (not dropped or probe >= min(reference))

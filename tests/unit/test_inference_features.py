"""Model features: no look-ahead, live rows equal offline rows, derived values, targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from services.inference.features import (
    FEATURES,
    INPUTS,
    MA_PERIOD,
    complete,
    feature_rows,
    history_needed,
    last_row,
    last_rows,
    targets,
)

MA60 = FEATURES.index("ma60")
RET_1 = FEATURES.index("ret_1")


def random_inputs(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    close = 1.1 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    columns = [close, rng.uniform(1, 500, n), rng.integers(0, 30, n).astype(float)]
    columns += [rng.normal(0, 1, n) for _ in INPUTS[3:]]
    return np.column_stack(columns)


values = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False)
perturbed = st.one_of(values, st.just(float("nan")), st.floats(min_value=-1e6, max_value=1e6))


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(min_value=1, max_value=90),
    window=st.integers(min_value=1, max_value=6),
)
def test_feature_rows_later_candles_changed_row_unchanged(data: st.DataObject, n: int, window: int) -> None:
    inputs = data.draw(hnp.arrays(np.float64, (n, len(INPUTS)), elements=values))
    t = data.draw(st.integers(min_value=0, max_value=n - 1))
    later = data.draw(hnp.arrays(np.float64, (n - t - 1, len(INPUTS)), elements=perturbed))
    changed = inputs.copy()
    changed[t + 1 :] = later
    before, after = feature_rows(inputs, window), feature_rows(changed, window)
    assert np.array_equal(before[t], after[t], equal_nan=True)
    assert complete(before)[t] == complete(after)[t]


def test_feature_rows_live_window_bit_identical_to_offline() -> None:
    window = 10
    need = history_needed(window)
    full = random_inputs(400)
    offline = feature_rows(full, window)
    checked = 0
    for t in range(need - 1, full.shape[0]):
        live = last_row(full[: t + 1], window)
        assert np.array_equal(offline[t], live)
        assert complete(live[None, :])[0]
        checked += 1
    assert checked == 400 - need + 1


@settings(max_examples=30, deadline=None)
@given(data=st.data(), window=st.integers(min_value=1, max_value=12))
def test_feature_rows_any_history_length_bit_identical(data: st.DataObject, window: int) -> None:
    need = history_needed(window)
    n = data.draw(st.integers(min_value=need, max_value=need + 40))
    full = data.draw(hnp.arrays(np.float64, (n, len(INPUTS)), elements=values))
    t = data.draw(st.integers(min_value=need - 1, max_value=n - 1))
    offline = feature_rows(full, window)[t]
    assert np.array_equal(offline, feature_rows(full[t - need + 1 : t + 1], window)[-1])
    # More history than needed changes nothing either.
    assert np.array_equal(offline, feature_rows(full[: t + 1], window)[-1])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), window=st.integers(min_value=1, max_value=12))
def test_last_row_any_history_length_equals_offline_row(data: st.DataObject, window: int) -> None:
    # Short series (incomplete rows), missing values and more history than needed included.
    n = data.draw(st.integers(min_value=1, max_value=history_needed(window) + 20))
    inputs = data.draw(hnp.arrays(np.float64, (n, len(INPUTS)), elements=perturbed))
    assert np.array_equal(last_row(inputs, window), feature_rows(inputs, window)[-1], equal_nan=True)


def test_feature_rows_short_history_incomplete() -> None:
    window = 4
    rows = feature_rows(random_inputs(history_needed(window)), window)
    flags = complete(rows)
    assert not flags[:-1].any()
    assert flags[-1]


def test_feature_rows_missing_indicator_row_incomplete() -> None:
    window = 3
    inputs = random_inputs(100)
    inputs[80, INPUTS.index("rsi")] = np.nan
    flags = complete(feature_rows(inputs, window))
    assert list(np.flatnonzero(~flags[70:]) + 70) == [80, 81, 82]


def test_feature_rows_ma60_and_ret_1_match_pandas() -> None:
    inputs = random_inputs(200, seed=5)
    rows = feature_rows(inputs, 1)
    close = pd.Series(inputs[:, 0])
    np.testing.assert_allclose(rows[:, MA60], close.rolling(MA_PERIOD).mean(), rtol=1e-13, equal_nan=True)
    np.testing.assert_allclose(rows[:, RET_1], close.pct_change(), rtol=1e-13, equal_nan=True)


def test_feature_rows_ma60_of_counting_closes_hand_computed() -> None:
    inputs = np.zeros((70, len(INPUTS)))
    inputs[:, 0] = np.arange(1.0, 71.0)
    rows = feature_rows(inputs, 1)
    assert np.isnan(rows[58, MA60])
    # Mean of 1..60 is 30.5; each later candle shifts the window by one.
    assert rows[59, MA60] == 30.5
    assert rows[69, MA60] == 40.5
    assert rows[1, RET_1] == 1.0  # 2 / 1 - 1
    assert rows[3, RET_1] == 4.0 / 3.0 - 1.0


def test_feature_rows_window_oldest_candle_first() -> None:
    inputs = random_inputs(100)
    window = 3
    per_candle = feature_rows(inputs, 1)
    row = feature_rows(inputs, window)[90].reshape(window, len(FEATURES))
    assert np.array_equal(row, per_candle[88:91])


def test_targets_last_horizon_unknown() -> None:
    close = np.array([1.0, 2.0, 1.5, 1.5, 3.0, 0.5, 2.0])
    out = targets(close, 2)
    assert np.array_equal(out[:5], [1.0, 0.0, 1.0, 0.0, 0.0])
    assert np.isnan(out[5:]).all()


def test_targets_series_shorter_than_horizon_all_unknown() -> None:
    assert np.isnan(targets(np.array([1.0, 2.0]), 5)).all()


def test_targets_missing_close_unknown_not_down() -> None:
    close = np.array([1.0, np.nan, 2.0, 3.0, 0.5])
    out = targets(close, 1)
    assert np.isnan(out[:2]).all()
    assert np.array_equal(out[2:4], [1.0, 0.0])


@given(data=st.data(), window=st.integers(1, 12))
@settings(max_examples=100, deadline=None)
def test_last_rows_padded_windows_equal_each_series_offline_row(data: st.DataObject, window: int) -> None:
    needed = history_needed(window)
    lengths = data.draw(st.lists(st.integers(1, needed + 20), min_size=1, max_size=6))
    series = [
        data.draw(hnp.arrays(np.float64, (n, len(INPUTS)), elements=st.floats(0.5, 2.0))) for n in lengths
    ]
    windows = np.full((len(series), needed, len(INPUTS)), np.nan)
    for k, inputs in enumerate(series):
        recent = inputs[-needed:]
        windows[k, needed - len(recent) :] = recent
    rows = last_rows(windows, window)
    for k, inputs in enumerate(series):
        offline = feature_rows(inputs, window)[-1]
        if np.isnan(offline).any():  # too short: refused either way
            assert np.isnan(rows[k]).any()
        else:
            assert np.array_equal(rows[k], offline)

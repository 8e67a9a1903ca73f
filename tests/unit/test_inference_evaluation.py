"""Classification metrics, threshold tuning and time-ordered splits with purge gaps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.inference.evaluation import (
    NotEnoughData,
    accuracy,
    average_ranks,
    comparison_table,
    evaluate,
    f1,
    log_loss,
    minimum_rows,
    precision,
    recall,
    roc_auc,
    split_by_time,
    tune_threshold,
)

TARGETS = np.array([1, 1, 1, 0, 0, 0, 0, 1], dtype=float)
LABELS = np.array([1, 1, 0, 1, 0, 0, 0, 0], dtype=float)  # tp 2, fp 1, fn 2, tn 3


def pairwise_auc(probs: np.ndarray, targets: np.ndarray) -> float:
    """Independent computation: the share of correctly ordered (rise, fall) pairs, ties half."""
    pos, neg = probs[targets == 1], probs[targets == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_counting_metrics_hand_case_expected_values() -> None:
    assert accuracy(LABELS, TARGETS) == 5 / 8
    assert precision(LABELS, TARGETS) == 2 / 3
    assert recall(LABELS, TARGETS) == 2 / 4
    p, r = 2 / 3, 2 / 4
    assert f1(LABELS, TARGETS) == pytest.approx(2 * p * r / (p + r))


def test_counting_metrics_no_up_calls_zero_not_error() -> None:
    none = np.zeros(4)
    targets = np.array([1.0, 0.0, 1.0, 0.0])
    assert precision(none, targets) == 0.0
    assert recall(none, targets) == 0.0
    assert f1(none, targets) == 0.0
    assert accuracy(none, targets) == 0.5


def test_metrics_targets_not_binary_rejected() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        accuracy(np.array([1.0]), np.array([np.nan]))


def test_average_ranks_ties_share_mean_rank() -> None:
    assert average_ranks([0.3, 0.1, 0.3, 0.2, 0.3]).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_roc_auc_hand_case_expected_value() -> None:
    probs = np.array([0.9, 0.4, 0.6, 0.4])
    targets = np.array([1.0, 1.0, 0.0, 0.0])
    # Pairs (rise, fall): (0.9, 0.6) right, (0.9, 0.4) right, (0.4, 0.6) wrong, (0.4, 0.4) tie.
    assert roc_auc(probs, targets) == 2.5 / 4


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]), st.booleans()),
        min_size=2,
        max_size=40,
    )
)
def test_roc_auc_any_scores_equals_pairwise_share(pairs: list[tuple[float, bool]]) -> None:
    probs = np.array([p for p, _ in pairs])
    targets = np.array([float(t) for _, t in pairs])
    auc = roc_auc(probs, targets)
    if targets.min() == targets.max():
        assert auc is None
    else:
        assert auc == pytest.approx(pairwise_auc(probs, targets), abs=1e-12)


def test_roc_auc_single_class_none() -> None:
    assert roc_auc([0.2, 0.8], [1.0, 1.0]) is None
    assert evaluate([0.2, 0.8], [0.0, 1.0], [0.0, 0.0]).as_dict().get("roc_auc") is None


def test_roc_auc_constant_scores_one_half() -> None:
    assert roc_auc(np.full(6, 0.3), [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]) == 0.5


def test_log_loss_hand_case_expected_value() -> None:
    expected = -(math.log(0.8) + math.log(1 - 0.3) + math.log(0.5)) / 3
    assert log_loss([0.8, 0.3, 0.5], [1.0, 0.0, 1.0]) == pytest.approx(expected, rel=1e-12)


def test_log_loss_certain_miss_clipped_finite() -> None:
    loss = log_loss([0.0, 1.0], [1.0, 0.0])
    assert math.isfinite(loss)
    assert loss == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_tune_threshold_hand_case_best_f1() -> None:
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    targets = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    # At 0.6: tp 3, fp 1, fn 0 -> F1 6/7, the best.
    assert tune_threshold(probs, targets) == 0.6


def test_tune_threshold_equal_f1_highest_threshold() -> None:
    # At 0.8: tp 1, fp 0, fn 1 -> 2/3. At 0.4: tp 2, fp 2, fn 0 -> 2/3. Tie: the higher one.
    probs = np.array([0.8, 0.6, 0.5, 0.4])
    targets = np.array([1.0, 0.0, 0.0, 1.0])
    assert tune_threshold(probs, targets) == 0.8
    # Row order does not matter.
    assert tune_threshold(probs[::-1], targets[::-1]) == 0.8


def test_tune_threshold_ties_in_probability_grouped() -> None:
    # The two rows at 0.5 are called up together or not at all.
    probs = np.array([0.5, 0.5, 0.1])
    targets = np.array([1.0, 0.0, 0.0])
    assert tune_threshold(probs, targets) == 0.5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=30))
def test_tune_threshold_any_scores_no_candidate_better(pairs: list[tuple[float, bool]]) -> None:
    probs = np.array([p for p, _ in pairs])
    targets = np.array([float(t) for _, t in pairs])
    best = tune_threshold(probs, targets)
    best_f1 = f1((probs >= best).astype(float), targets)
    for candidate in np.unique(probs):
        assert f1((probs >= candidate).astype(float), targets) <= best_f1


def test_tune_threshold_no_rows_default() -> None:
    assert tune_threshold(np.empty(0), np.empty(0)) == 0.5


def two_symbol_rows(n: int, *, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two symbols' rows, each in time order, the second shifted and with a hole."""
    start = np.datetime64("2025-01-01T00:00", "m")
    a = start + np.arange(n)
    b = start + offset + np.r_[np.arange(n // 2), np.arange(n // 2 + 7, n + 7)]
    return np.r_[a, b], np.array(["EURUSD"] * n + ["GBPUSD"] * n)


@pytest.mark.parametrize("horizon", [1, 5, 12])
def test_split_by_time_splits_ordered_and_gapped_by_horizon(horizon: int) -> None:
    times, symbols = two_symbol_rows(300, offset=3)
    split = split_by_time(times, symbols, horizon)
    parts = list(split.parts().values())
    # Strict time order between splits, across symbols.
    for earlier, later in itertools.pairwise(parts):
        assert times[earlier].max() < times[later].min()
    for symbol in ("EURUSD", "GBPUSD"):
        rows = np.flatnonzero(symbols == symbol)
        position = {row: k for k, row in enumerate(rows)}
        for earlier, later in itertools.pairwise(parts):
            last = max(position[r] for r in earlier if symbols[r] == symbol)
            first = min(position[r] for r in later if symbols[r] == symbol)
            # At least `horizon` rows (so candles) lie between, so no target reads the next split.
            assert first - last - 1 >= horizon
    assert split.boundaries[0] <= times[split.validation].min()
    assert split.boundaries[1] <= times[split.test].min()


def test_split_by_time_default_fractions_roughly_kept() -> None:
    times, symbols = two_symbol_rows(1000)
    split = split_by_time(times, symbols, horizon=5)
    sizes = [idx.size for idx in split.parts().values()]
    assert sizes[0] == pytest.approx(1400 - 10, abs=4)
    assert sizes[1] == pytest.approx(300 - 10, abs=4)
    assert sizes[2] == pytest.approx(300, abs=4)
    kept = np.concatenate(list(split.parts().values()))
    assert len(set(kept.tolist())) == kept.size


def test_split_by_time_unordered_symbol_rejected() -> None:
    times, symbols = two_symbol_rows(100)
    times[[3, 4]] = times[[4, 3]]
    with pytest.raises(ValueError, match="EURUSD"):
        split_by_time(times, symbols, horizon=1)


def test_split_by_time_too_few_rows_not_enough_data() -> None:
    times, symbols = two_symbol_rows(60)
    with pytest.raises(NotEnoughData, match="split keeps"):
        split_by_time(times, symbols, horizon=5)


def test_minimum_rows_enough_rows_splits() -> None:
    needed = minimum_rows(horizon=5, symbols=2)
    assert needed == 200
    times, symbols = two_symbol_rows(needed // 2)
    split_by_time(times, symbols, horizon=5)


def test_comparison_table_undefined_auc_shown_as_na() -> None:
    metrics = {
        "model": evaluate([0.6, 0.4], [1.0, 0.0], [1.0, 0.0]),
        "majority": evaluate([0.5, 0.5], [0.0, 0.0], [1.0, 1.0]),
    }
    lines = comparison_table(metrics)
    assert lines[0].split() == ["metric", "model", "majority"]
    auc = next(line for line in lines if line.startswith("roc_auc"))
    assert auc.split() == ["roc_auc", "1.0000", "n/a"]

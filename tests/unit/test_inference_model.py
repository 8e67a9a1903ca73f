"""The scorer's range check: values the network's float32 arithmetic cannot take never reach it."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from services.inference.domain import MAX_STANDARD_DEVIATIONS
from services.inference.model import Scorer
from services.inference.registry import ModelRegistry
from tests.inference_models import save_model

SPREAD = 2  # a feature whose scale is 1e-4 in save_model's standardization


@pytest.fixture
def scorer(tmp_path: pathlib.Path) -> Scorer:
    save_model(tmp_path)
    return ModelRegistry(tmp_path).load("signals", "v0001").scorer


def _rows(scorer: Scorer, n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    return 1.08 + rng.normal(0.0, 1e-3, (n, scorer.n_inputs))


def test_scorer_out_of_range_market_like_rows_all_inside(scorer: Scorer) -> None:
    rows = _rows(scorer, 8)
    rows[:, SPREAD] = 1e4  # far from the mean (1e8 standard deviations), still far inside the bound
    assert not scorer.out_of_range(rows).any()
    assert np.isfinite(scorer.probabilities(rows)).all()


def test_scorer_huge_finite_value_overflowing_after_standardization_is_out_of_range(scorer: Scorer) -> None:
    rows = _rows(scorer, 3)
    rows[1, SPREAD] = 1e35  # finite in float32, +inf once standardized in float32
    assert np.isnan(scorer.probabilities(rows)[1])  # what reached the network before the check
    assert np.argwhere(scorer.out_of_range(rows)).tolist() == [[1, SPREAD]]


@pytest.mark.parametrize(
    "value", [np.nan, np.inf, -np.inf, 1e300, -1e39, 1.08 + 1e-4 * MAX_STANDARD_DEVIATIONS * 10]
)
def test_scorer_out_of_range_non_finite_beyond_float32_or_bound_flagged(scorer: Scorer, value: float) -> None:
    rows = _rows(scorer, 2)
    rows[0, SPREAD] = value
    assert np.argwhere(scorer.out_of_range(rows)).tolist() == [[0, SPREAD]]

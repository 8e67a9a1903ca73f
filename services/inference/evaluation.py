"""How good a signal model is, and on which rows it may be judged (pure numpy).

Metrics are for binary targets (1.0: the close went up over the horizon) and the model's
probability of "up". A decision threshold is tuned on the validation split only, and the test
split is never looked at before the final report.

Rows are split by time, never shuffled: a model that has seen the future of a series would look
far better than it is. Every earlier split also gives up its last ``horizon`` rows of each symbol
(a purge gap), because a row's target is the close ``horizon`` candles later — without the gap the
last training targets would be read from the validation period.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
Indices = npt.NDArray[np.intp]

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
SPLIT_NAMES = ("train", "validation", "test")
# Fewer rows than this in a split make its metrics (and a threshold tuned on it) mere noise.
MIN_SPLIT_ROWS = 20
# Log loss clips probabilities away from 0 and 1: one confident miss must not make it infinite.
LOG_LOSS_EPS = 1e-7


class NotEnoughData(ValueError):
    """Too few rows to train and judge a model; the message says how many are needed."""


@dataclasses.dataclass(frozen=True, slots=True)
class Metrics:
    """Classification metrics of one model on one split.

    ``roc_auc`` is None when the split holds a single class: ranking is then undefined.
    """

    rows: int
    positive_rate: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float | None
    log_loss: float

    def as_dict(self) -> dict[str, float]:
        """Float values only (what a manifest stores); an undefined ROC AUC is left out."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: float(v) for k, v in values.items() if v is not None}


def _binary(targets: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    values = np.asarray(targets, dtype=np.float64)
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("targets must be 0 or 1 (rows without a known target are dropped before)")
    ups: npt.NDArray[np.bool_] = values == 1.0
    return ups


def _counts(labels: npt.ArrayLike, targets: npt.ArrayLike) -> tuple[int, int, int, int]:
    """True positives, false positives, false negatives, true negatives."""
    predicted, actual = _binary(labels), _binary(targets)
    if predicted.shape != actual.shape:
        raise ValueError(f"{predicted.shape[0]} labels for {actual.shape[0]} targets")
    tp = int(np.count_nonzero(predicted & actual))
    fp = int(np.count_nonzero(predicted & ~actual))
    fn = int(np.count_nonzero(~predicted & actual))
    return tp, fp, fn, predicted.size - tp - fp - fn


def accuracy(labels: npt.ArrayLike, targets: npt.ArrayLike) -> float:
    """Share of rows labelled correctly (0.0 for no rows)."""
    tp, fp, fn, tn = _counts(labels, targets)
    total = tp + fp + fn + tn
    return (tp + tn) / total if total else 0.0


def precision(labels: npt.ArrayLike, targets: npt.ArrayLike) -> float:
    """Share of "up" calls that went up; 0.0 when nothing was called up (as scikit-learn does)."""
    tp, fp, _, _ = _counts(labels, targets)
    return tp / (tp + fp) if tp + fp else 0.0


def recall(labels: npt.ArrayLike, targets: npt.ArrayLike) -> float:
    """Share of rises that were called; 0.0 when there was no rise."""
    tp, _, fn, _ = _counts(labels, targets)
    return tp / (tp + fn) if tp + fn else 0.0


def f1(labels: npt.ArrayLike, targets: npt.ArrayLike) -> float:
    """Harmonic mean of precision and recall, ``2 tp / (2 tp + fp + fn)``; 0.0 when undefined."""
    tp, fp, fn, _ = _counts(labels, targets)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def average_ranks(values: npt.ArrayLike) -> Array:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    data = np.asarray(values, dtype=np.float64)
    order = np.argsort(data, kind="stable")
    ordered = data[order]
    # A new group of ties starts wherever the sorted value changes.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    group_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(data.size)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def roc_auc(probabilities: npt.ArrayLike, targets: npt.ArrayLike) -> float | None:
    """Area under the ROC curve by ranks (Mann-Whitney U); None when only one class is present.

    It is the chance that a random rise is scored above a random fall, ties counting half.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    actual = _binary(targets)
    positives = int(np.count_nonzero(actual))
    negatives = actual.size - positives
    if positives == 0 or negatives == 0:
        return None
    rank_sum = float(average_ranks(probs)[actual].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def log_loss(probabilities: npt.ArrayLike, targets: npt.ArrayLike, eps: float = LOG_LOSS_EPS) -> float:
    """Mean binary cross-entropy (natural log), probabilities clipped to ``[eps, 1 - eps]``."""
    probs = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1.0 - eps)
    actual = _binary(targets)
    if actual.size == 0:
        return 0.0
    return float(-np.mean(np.where(actual, np.log(probs), np.log1p(-probs))))


def evaluate(probabilities: npt.ArrayLike, labels: npt.ArrayLike, targets: npt.ArrayLike) -> Metrics:
    """All metrics of one model on one split; labels are given so that a baseline may choose its own."""
    actual = _binary(targets)
    return Metrics(
        rows=int(actual.size),
        positive_rate=float(actual.mean()) if actual.size else 0.0,
        accuracy=accuracy(labels, targets),
        precision=precision(labels, targets),
        recall=recall(labels, targets),
        f1=f1(labels, targets),
        roc_auc=roc_auc(probabilities, targets),
        log_loss=log_loss(probabilities, targets),
    )


def tune_threshold(probabilities: npt.ArrayLike, targets: npt.ArrayLike) -> float:
    """The threshold (a row is "up" when its probability is at least it) with the best F1.

    Candidates are the distinct probabilities themselves: between two of them F1 cannot change.
    Ties go to the highest threshold — the fewest "up" calls for the same F1 — which also makes
    the choice independent of row order. Without any rise every threshold scores F1 = 0, so the
    highest probability is returned. With no rows at all, 0.5.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    actual = _binary(targets)
    if probs.shape != actual.shape:
        raise ValueError(f"{probs.shape[0]} probabilities for {actual.shape[0]} targets")
    if probs.size == 0:
        return 0.5
    order = np.argsort(-probs, kind="stable")
    ordered = probs[order]
    true_positives = np.cumsum(actual[order])
    # The last row of each group of equal probabilities: a threshold there calls that group up too.
    last = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])
    called = last + 1
    scores = 2.0 * true_positives[last] / (called + np.count_nonzero(actual))
    # argmax takes the first maximum; thresholds run from highest to lowest.
    return float(ordered[last[int(np.argmax(scores))]])


def minimum_rows(
    horizon: int,
    symbols: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    per_split: int = MIN_SPLIT_ROWS,
) -> int:
    """Rows needed so that the smallest split keeps ``per_split`` rows after its purge gap.

    It assumes the symbols cover the same period; uneven coverage is caught by the split itself.
    """
    return math.ceil((per_split + horizon * symbols) / min(fractions))


@dataclasses.dataclass(frozen=True, slots=True)
class Split:
    """Row indices of the three splits (ascending) and the two time boundaries between them.

    ``train`` rows are before ``boundaries[0]``, ``validation`` rows from it to before
    ``boundaries[1]``, ``test`` rows from ``boundaries[1]`` on; the purged rows are in none.
    """

    train: Indices
    validation: Indices
    test: Indices
    boundaries: tuple[Any, Any]

    def parts(self) -> Mapping[str, Indices]:
        """The splits by name, in time order."""
        return {"train": self.train, "validation": self.validation, "test": self.test}


def split_by_time(
    times: npt.NDArray[Any],
    symbols: npt.NDArray[Any],
    horizon: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    per_split: int = MIN_SPLIT_ROWS,
) -> Split:
    """Split rows at two global time boundaries, then purge ``horizon`` rows before each boundary.

    The boundaries are the times at the 70% and 85% points (by default) of all rows pooled, so
    every split covers the same period for every symbol and all test rows come after all
    validation rows, which come after all training rows. Then, per symbol, the last ``horizon``
    rows of train and of validation are dropped: a row's target is the close ``horizon`` candles
    later, and rows are a subset of the candles in time order, so the remaining rows' targets are
    all read before the next split starts.

    ``times`` may be any ordered numpy type (datetime64, integers); each symbol's rows must be in
    strictly increasing time order. ``NotEnoughData`` when a split keeps fewer than ``per_split``.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three positive numbers adding up to 1, got {tuple(fractions)}")
    if horizon < 1:
        raise ValueError("horizon must be at least 1")
    if times.shape != symbols.shape or times.ndim != 1:
        raise ValueError("times and symbols must be one-dimensional and of the same length")
    n = times.shape[0]
    if n == 0:
        raise NotEnoughData(f"need at least {per_split} rows in each split, found no rows")
    pooled = np.sort(times, kind="stable")
    first = pooled[min(int(n * fractions[0]), n - 1)]
    second = pooled[min(int(n * (fractions[0] + fractions[1])), n - 1)]
    part = np.where(times < first, 0, np.where(times < second, 1, 2))
    keep = np.ones(n, dtype=bool)
    for symbol in np.unique(symbols):
        rows = np.flatnonzero(symbols == symbol)
        if not (times[rows][1:] > times[rows][:-1]).all():
            raise ValueError(f"rows of {symbol} are not in strictly increasing time order")
        for earlier in (0, 1):
            in_part = rows[part[rows] == earlier]
            keep[in_part[max(in_part.size - horizon, 0) :]] = False
    train, validation, test = (np.flatnonzero(keep & (part == k)) for k in range(3))
    split = Split(train=train, validation=validation, test=test, boundaries=(first, second))
    for name, indices in split.parts().items():
        if indices.size < per_split:
            raise NotEnoughData(
                f"the {name} split keeps {indices.size} rows after the {horizon}-candle gap, "
                f"need at least {per_split} (widen the range)"
            )
    return split


def comparison_table(metrics: Mapping[str, Metrics]) -> list[str]:
    """Models side by side, one metric a line, as the ``mt5mesh train`` report prints them."""
    names = list(metrics)
    width = max(11, *(len(n) for n in names))
    lines = ["metric".ljust(10) + "".join(n.rjust(width) for n in names)]
    for field in ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"):
        cells = []
        for name in names:
            value = getattr(metrics[name], field)
            cells.append(("n/a" if value is None else f"{value:.4f}").rjust(width))
        lines.append(field.ljust(10) + "".join(cells))
    return lines

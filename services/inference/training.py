"""Train the signal network and judge it against two baselines (the torch adapter).

The rows are split by time (``evaluation.split_by_time``: train, then validation, then test, with a
purge gap of ``horizon`` rows per symbol). The standardization is fitted on the training split
only and stored in the network. Training minimises binary cross-entropy with Adam and stops early
when the validation loss has not improved for ``patience`` epochs, keeping the best epoch's
weights. The decision threshold is tuned on validation for F1; the test split is used once, for
the report.

A model is only worth serving if it beats what costs nothing, so the report carries, on the same
test rows: the majority class of the training split (its probability is the training base rate)
and a logistic regression (``SignalNet`` without hidden layers: one Linear on the same
standardized rows, trained and thresholded the same way).

Runs are reproducible: with the same data and seed the weights are bit-identical. Everything
random is seeded (weights, dropout, shuffling with a numpy ``Generator``), torch runs with
deterministic algorithms and a fixed thread count, and the global RNG state, determinism flag and
thread count are restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import logging
import math
import sys
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from tqdm import tqdm  # type: ignore[import-untyped]

from services.inference import evaluation, features
from services.inference.dataset import Dataset
from services.inference.evaluation import Metrics, NotEnoughData
from services.inference.model import Scorer, SignalNet
from services.inference.registry import Manifest, ModelRegistry

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]
MODELS = ("model", "majority", "logistic")


@dataclasses.dataclass(frozen=True, slots=True)
class TrainingSettings:
    """What to learn (window, horizon) and how (network, optimiser, early stopping, seed).

    ``threads`` is fixed because a different thread count may sum floats in a different order:
    bit-identical weights need the same count on every run.
    """

    window: int = 10
    horizon: int = 5
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    epochs: int = 100
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10
    seed: int = 42
    fractions: tuple[float, float, float] = evaluation.DEFAULT_FRACTIONS
    threads: int = 1

    def __post_init__(self) -> None:
        positive = {
            "window": self.window,
            "horizon": self.horizon,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "patience": self.patience,
            "threads": self.threads,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if any(size < 1 for size in self.hidden):
            raise ValueError(f"hidden layer sizes must be at least 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be positive and weight_decay not negative")
        if self.seed < 0:
            raise ValueError(f"seed must not be negative, got {self.seed}")


@dataclasses.dataclass(frozen=True, slots=True)
class SplitSummary:
    """Size, class balance and time span of one split (times as RFC 3339 UTC)."""

    name: str
    rows: int
    positive_rate: float
    first: str
    last: str


@dataclasses.dataclass(frozen=True, slots=True)
class FitSummary:
    """How one network's training went."""

    epochs_run: int
    best_epoch: int
    validation_loss: float


@dataclasses.dataclass(frozen=True, slots=True)
class TrainingReport:
    """Test metrics of the model and its baselines, thresholds, and what the splits held."""

    test: Mapping[str, Metrics]
    threshold: float
    logistic_threshold: float
    splits: tuple[SplitSummary, ...]
    fit: FitSummary
    logistic_fit: FitSummary
    horizon: int

    def beats_baselines(self) -> bool | None:
        """Whether the model has a higher ROC AUC and a lower log loss than both baselines on test.

        None when ROC AUC is undefined (the test split holds a single class).
        """
        model = self.test["model"]
        baselines = [self.test["majority"], self.test["logistic"]]
        if model.roc_auc is None or any(b.roc_auc is None for b in baselines):
            return None
        return all(model.roc_auc > (b.roc_auc or 0.0) and model.log_loss < b.log_loss for b in baselines)

    def verdict(self) -> str:
        """One honest sentence on whether the model is worth more than the baselines."""
        outcome = self.beats_baselines()
        if outcome is None:
            return "Verdict: undecided: the test split holds a single class, so ROC AUC is undefined."
        if outcome:
            return "Verdict: the model beats both baselines on test ROC AUC and log loss."
        model = self.test["model"]
        shortfalls = []
        for name in ("majority", "logistic"):
            other = self.test[name]
            if model.roc_auc is not None and other.roc_auc is not None and model.roc_auc <= other.roc_auc:
                shortfalls.append(f"ROC AUC {model.roc_auc:.4f} is not above {name}'s {other.roc_auc:.4f}")
            if model.log_loss >= other.log_loss:
                shortfalls.append(f"log loss {model.log_loss:.4f} is not below {name}'s {other.log_loss:.4f}")
        return "Verdict: the model does NOT beat both baselines on test: " + "; ".join(shortfalls) + "."

    def lines(self) -> list[str]:
        """The human-readable report ``mt5mesh train`` prints."""
        out = [f"{'split':<11}{'rows':>8}{'up share':>10}  {'first row':<21}{'last row':<21}"]
        for s in self.splits:
            out.append(f"{s.name:<11}{s.rows:>8}{s.positive_rate:>10.1%}  {s.first:<21}{s.last:<21}")
        out.append(f"(a gap of {self.horizon} rows per symbol is left before each boundary)")
        out.append(
            f"model: best epoch {self.fit.best_epoch} of {self.fit.epochs_run}, "
            f"validation loss {self.fit.validation_loss:.4f}; "
            f"logistic: best epoch {self.logistic_fit.best_epoch} of {self.logistic_fit.epochs_run}"
        )
        majority = "up" if self.splits[0].positive_rate > 0.5 else "not up"
        out.append(
            f"thresholds tuned on validation for F1: model {self.threshold:.4f}, "
            f"logistic {self.logistic_threshold:.4f}; majority always says {majority}"
        )
        out.append("")
        out.append(f"test split ({self.test['model'].rows} rows):")
        out.extend(evaluation.comparison_table(self.test))
        out.append("")
        out.append(self.verdict())
        return [line.rstrip() for line in out]

    def manifest_metrics(self) -> dict[str, dict[str, float]]:
        """Test metrics per model, plus the split sizes and class balance, all as floats."""
        metrics = {name: self.test[name].as_dict() for name in MODELS}
        splits: dict[str, float] = {}
        for s in self.splits:
            splits[f"{s.name}_rows"] = float(s.rows)
            splits[f"{s.name}_positive_rate"] = s.positive_rate
        metrics["splits"] = splits
        metrics["thresholds"] = {"model": self.threshold, "logistic": self.logistic_threshold}
        return metrics


@dataclasses.dataclass(frozen=True, slots=True)
class TrainingResult:
    """The trained network (standardization included, best epoch) and its report."""

    net: SignalNet
    report: TrainingReport
    settings: TrainingSettings


@contextlib.contextmanager
def _reproducible(seed: int, threads: int) -> Iterator[None]:
    """Seeded, deterministic torch for the block; the caller's RNG state and flags come back after."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(previous_threads)


def _fit(
    net: SignalNet,
    data: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    settings: TrainingSettings,
    label: str,
    progress: bool,
) -> FitSummary:
    """Adam on BCE-with-logits, early stopping on validation loss; leaves the best epoch's weights."""
    train_x, train_y = data["train"]
    val_x, val_y = data["validation"]
    shuffle = np.random.default_rng(settings.seed)
    optimizer = torch.optim.Adam(
        net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    loss_fn = nn.BCEWithLogitsLoss()
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(net.state_dict())
    epochs_run = 0
    bar = tqdm(range(1, settings.epochs + 1), desc=label, unit="epoch", file=sys.stderr, disable=not progress)
    for epoch in bar:
        epochs_run = epoch
        net.train()
        order = torch.from_numpy(shuffle.permutation(train_x.shape[0]))
        for start in range(0, order.shape[0], settings.batch_size):
            batch = order[start : start + settings.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(net(train_x[batch]), train_y[batch])
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(net(val_x), val_y))
        if val_loss < best_loss:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(net.state_dict())
        bar.set_postfix(val_loss=f"{val_loss:.4f}", best_epoch=best_epoch)
        if epoch - best_epoch >= settings.patience:
            break
    bar.close()
    net.load_state_dict(best_state)
    net.eval()
    logger.info("%s: best epoch %d of %d, validation loss %.4f", label, best_epoch, epochs_run, best_loss)
    return FitSummary(epochs_run, best_epoch, best_loss)


def _iso(moment: np.datetime64) -> str:
    return f"{np.datetime_as_string(moment, unit='s')}Z"


def _majority(train_targets: Array, n: int) -> tuple[Array, npt.NDArray[np.float64]]:
    """Probabilities (the training base rate) and labels (the training majority; a tie says not up)."""
    rate = float(train_targets.mean())
    return np.full(n, rate), np.full(n, 1.0 if rate > 0.5 else 0.0)


def train(dataset: Dataset, settings: TrainingSettings, *, progress: bool = True) -> TrainingResult:
    """Split, train the network and the logistic baseline, tune thresholds, report on test.

    ``NotEnoughData`` when the rows cannot fill the three splits.
    """
    if dataset.window != settings.window or dataset.horizon != settings.horizon:
        raise ValueError("the dataset was built with another window or horizon than the settings")
    symbols = len(np.unique(dataset.symbols))
    needed = evaluation.minimum_rows(settings.horizon, max(symbols, 1), settings.fractions)
    if len(dataset) < needed:
        raise NotEnoughData(f"need at least {needed} complete rows, found {len(dataset)}")
    split = evaluation.split_by_time(dataset.times, dataset.symbols, settings.horizon, settings.fractions)
    parts = split.parts()
    rows = {name: dataset.rows[idx] for name, idx in parts.items()}
    targets = {name: dataset.targets[idx] for name, idx in parts.items()}
    summaries = tuple(
        SplitSummary(
            name=name,
            rows=int(idx.size),
            positive_rate=float(targets[name].mean()),
            first=_iso(dataset.times[idx].min()),
            last=_iso(dataset.times[idx].max()),
        )
        for name, idx in parts.items()
    )
    # Fitted on train only: validation and test must not leak into the inputs' scale either.
    mean, scale = rows["train"].mean(axis=0), rows["train"].std(axis=0)
    tensors = {
        name: (
            torch.from_numpy(rows[name].astype(np.float32)),
            torch.from_numpy(targets[name].astype(np.float32)),
        )
        for name in ("train", "validation")
    }
    n_inputs = dataset.rows.shape[1]
    with _reproducible(settings.seed, settings.threads):
        net = SignalNet(n_inputs, settings.hidden, settings.dropout)
        net.set_standardization(mean, scale)
        fit = _fit(net, tensors, settings, "model", progress)
    with _reproducible(settings.seed, settings.threads):
        logistic = SignalNet(n_inputs, hidden=(), dropout=0.0)
        logistic.set_standardization(mean, scale)
        logistic_fit = _fit(logistic, tensors, settings, "logistic", progress)
    test: dict[str, Metrics] = {}
    thresholds: dict[str, float] = {}
    for name, candidate in (("model", net), ("logistic", logistic)):
        scorer = Scorer(candidate, threshold=0.5)
        scorer.threshold = thresholds[name] = evaluation.tune_threshold(
            scorer.probabilities(rows["validation"]), targets["validation"]
        )
        probs = scorer.probabilities(rows["test"])
        test[name] = evaluation.evaluate(probs, scorer.labels(probs), targets["test"])
    test["majority"] = evaluation.evaluate(
        *_majority(targets["train"], len(targets["test"])), targets["test"]
    )
    report = TrainingReport(
        test={name: test[name] for name in MODELS},
        threshold=thresholds["model"],
        logistic_threshold=thresholds["logistic"],
        splits=summaries,
        fit=fit,
        logistic_fit=logistic_fit,
        horizon=settings.horizon,
    )
    logger.info("%s", report.verdict())
    return TrainingResult(net, report, settings)


def save(
    registry: ModelRegistry,
    result: TrainingResult,
    *,
    name: str,
    timeframe: str,
    symbols: Sequence[str],
    data_from: dt.datetime,
    data_to: dt.datetime,
) -> Manifest:
    """Write the network as the next version of ``name``; the registry fills version, hash, time."""
    settings = result.settings
    manifest = Manifest(
        name=name,
        version="",
        created="",
        timeframe=timeframe,
        symbols=tuple(symbols),
        data_from=data_from.astimezone(dt.UTC).isoformat(),
        data_to=data_to.astimezone(dt.UTC).isoformat(),
        features=features.FEATURES,
        window=settings.window,
        horizon=settings.horizon,
        threshold=result.report.threshold,
        hidden=settings.hidden,
        seed=settings.seed,
        metrics=result.report.manifest_metrics(),
        weights_file="",
        weights_sha256="",
        torch_version="",
    )
    return registry.save(result.net, manifest)

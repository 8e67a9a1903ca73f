"""Training end to end: a learnable stored history in a real database → ``mt5mesh train`` → registry."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import talib
from sqlalchemy import insert

from services.common import db
from services.common.schema import ind_values
from services.inference import features
from services.inference.dataset import load_dataset
from services.inference.registry import ModelRegistry
from services.mesh import cli
from tests import helpers

START = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
CANDLES = 800
SYMBOLS = ("EURUSD", "GBPUSD")
METRIC_NAMES = {"rows", "positive_rate", "accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """A migrated database holding the synthetic history, on an SQLite file or on PostgreSQL."""
    if request.param == "sqlite":
        yield seeded(helpers.sqlite_url(tmp_path))
    else:
        with helpers.postgres_database() as url:
            yield seeded(url)


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """``cli.main`` points the root logger at the (captured) stdout; put the handlers back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def history(seed: int, n: int) -> dict[str, np.ndarray]:
    """A slow random walk plus a mean-reverting deviation: the deviation makes the next closes
    weakly predictable. Indicators come from TA-Lib's batch functions, as the service computes them."""
    rng = np.random.default_rng(seed)
    trend = np.cumsum(rng.normal(0, 1e-4, n))
    deviation = np.zeros(n)
    shocks = rng.normal(0, 5e-4, n)
    for i in range(1, n):
        deviation[i] = 0.75 * deviation[i - 1] + shocks[i]
    close = 1.1 * np.exp(trend + deviation)
    opens = np.r_[close[0], close[:-1]]
    high = np.maximum(opens, close) + np.abs(rng.normal(0, 1e-4, n))
    low = np.minimum(opens, close) - np.abs(rng.normal(0, 1e-4, n))
    macd, signal, hist = talib.MACD(close, 12, 26, 9)
    upper, middle, lower = talib.BBANDS(close, 20, 2, 2)
    return {
        "close": close,
        "volume": rng.integers(50, 500, n).astype(float),
        "spread": rng.integers(1, 20, n).astype(float),
        "rsi": talib.RSI(close, 14),
        "macd": macd,
        "macd_signal": signal,
        "macd_hist": hist,
        "atr": talib.ATR(high, low, close, 14),
        "bb_upper": upper,
        "bb_middle": middle,
        "bb_lower": lower,
    }


def seeded(url: str) -> str:
    engine = db.create_db_engine(url)
    db.migrate(engine)
    rows: list[dict[str, Any]] = []
    for k, symbol in enumerate(SYMBOLS):
        values = history(k, CANDLES)
        for i in range(CANDLES):
            row: dict[str, Any] = {
                "symbol": symbol,
                "timeframe": "M1",
                "ts": START + dt.timedelta(minutes=i),
                "revision": 0,
            }
            # Warming-up indicators are stored as NULL, as the indicators service stores them.
            row |= {name: None if math.isnan(v[i]) else float(v[i]) for name, v in values.items()}
            rows.append(row)
    # A bar of another timeframe and one outside the range: neither may be read.
    rows.append({**rows[-1], "timeframe": "M5"})
    rows.append({**rows[-1], "timeframe": "M1", "ts": START + dt.timedelta(days=3)})
    with engine.begin() as conn:
        conn.execute(insert(ind_values), rows)
    engine.dispose()
    return url


def train_args(url: str, models: pathlib.Path, *extra: str) -> list[str]:
    return [
        "train",
        "--database-url",
        url,
        "--symbols",
        ",".join(SYMBOLS),
        "--timeframe",
        "M1",
        "--from",
        "2025-01-01T00:00:00Z",
        "--to",
        "2025-01-02T00:00:00Z",
        "--models-dir",
        str(models),
        "--epochs",
        "15",
        "--no-progress",
        *extra,
    ]


def test_train_cli_stored_history_saves_reproducible_versions(
    store_url: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    assert cli.main(train_args(store_url, models)) == 0
    first_out = capsys.readouterr().out
    assert cli.main(train_args(store_url, models)) == 0
    second_out = capsys.readouterr().out

    folder = models / "signals"
    assert sorted(p.name for p in folder.iterdir()) == ["v0001", "v0002"]
    manifests = [json.loads((folder / v / "manifest.json").read_text()) for v in ("v0001", "v0002")]
    first = manifests[0]
    assert first["name"] == "signals"
    assert first["version"] == "v0001"
    assert manifests[1]["version"] == "v0002"
    assert first["timeframe"] == "M1"
    assert first["symbols"] == list(SYMBOLS)
    assert first["features"] == list(features.FEATURES)
    assert (first["window"], first["horizon"], first["seed"]) == (10, 5, 42)
    assert first["hidden"] == [64, 32]
    assert first["data_from"] == "2025-01-01T00:00:00+00:00"
    assert first["data_to"] == "2025-01-02T00:00:00+00:00"
    assert 0.0 <= first["threshold"] <= 1.0
    weights = folder / "v0001" / first["weights_file"]
    assert first["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    for model in ("model", "majority", "logistic"):
        assert set(first["metrics"][model]) == METRIC_NAMES
        assert all(isinstance(v, float) for v in first["metrics"][model].values())
    assert first["metrics"]["majority"]["roc_auc"] == 0.5

    # Same data, same seed: bit-identical weights and identical metrics.
    assert (folder / "v0002" / "weights.safetensors").read_bytes() == weights.read_bytes()
    assert manifests[1]["metrics"] == first["metrics"]
    assert manifests[1]["threshold"] == first["threshold"]

    # The history is learnable: both trained models rank test rows better than chance.
    assert first["metrics"]["logistic"]["roc_auc"] > 0.55
    assert first["metrics"]["model"]["roc_auc"] > 0.55

    loaded = ModelRegistry(models).load("signals", "v0002")
    assert loaded.manifest.weights_sha256 == first["weights_sha256"]

    for out, version in ((first_out, "v0001"), (second_out, "v0002")):
        assert "model   majority   logistic" in out
        assert any(line.startswith("roc_auc") for line in out.splitlines())
        assert "Verdict: the model" in out
        assert f"saved signals {version} in {folder / version}" in out


def test_train_cli_other_seed_other_weights(tmp_path: pathlib.Path) -> None:
    url = seeded(helpers.sqlite_url(tmp_path))
    models = tmp_path / "models"
    assert cli.main(train_args(url, models, "--epochs", "2")) == 0
    assert cli.main(train_args(url, models, "--epochs", "2", "--seed", "7")) == 0
    weights = [(models / "signals" / v / "weights.safetensors").read_bytes() for v in ("v0001", "v0002")]
    assert weights[0] != weights[1]


def test_load_dataset_stored_bars_rows_as_computed_offline(tmp_path: pathlib.Path) -> None:
    url = seeded(helpers.sqlite_url(tmp_path))
    engine = db.create_db_engine(url)
    window, horizon = 10, 5
    dataset = load_dataset(
        engine, SYMBOLS, "M1", START, START + dt.timedelta(days=1), window=window, horizon=horizon
    )
    engine.dispose()
    assert dataset.candles == {"EURUSD": CANDLES, "GBPUSD": CANDLES}
    assert np.isfinite(dataset.rows).all()
    for k, symbol in enumerate(SYMBOLS):
        values = history(k, CANDLES)
        inputs = np.column_stack([values[name] for name in features.INPUTS])
        expected_rows = features.feature_rows(inputs, window)
        expected_targets = features.targets(inputs[:, 0], horizon)
        mine = dataset.symbols == symbol
        # The first complete row needs the 60-candle average over the whole window: nothing before
        # the range is read, so the rows start history_needed(window) - 1 candles after it.
        first = features.history_needed(window) - 1
        assert mine.sum() == CANDLES - first - horizon
        assert dataset.times[mine][0] == np.datetime64("2025-01-01T00:00") + np.timedelta64(first, "m")
        assert np.array_equal(dataset.rows[mine], expected_rows[first : CANDLES - horizon])
        assert np.array_equal(dataset.targets[mine], expected_targets[first : CANDLES - horizon])


@pytest.mark.parametrize(
    ("change", "option", "message"),
    [
        ({"--symbols": "EURUSD,XAUUSD"}, "--symbols", "no stored M1 bars for XAUUSD"),
        ({"--symbols": " , "}, "--symbols", "at least one symbol"),
        ({"--timeframe": "M2"}, "--timeframe", "'M2' is not one of"),
        ({"--from": "2025-01-02T00:00:00Z"}, "--from", "is not before --to"),
        ({"--from": "2025-01-01T00:00:00"}, "--from", "zone"),
        # 120 candles a symbol: rows 68 .. 114 are complete with a known target, 47 each.
        ({"--to": "2025-01-01T02:00:00Z"}, "--from/--to", "need at least 200 complete rows, found 94"),
        ({"--window": "0"}, "--window", "must be at least 1"),
        ({"--name": "../escape"}, "--name", "model name"),
    ],
)
def test_train_cli_bad_input_exits_2_naming_option(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    option: str,
    message: str,
) -> None:
    url = seeded(helpers.sqlite_url(tmp_path))
    args = train_args(url, tmp_path / "models", "--epochs", "1")
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"mt5mesh train: error: {option}: ")
    assert message in err[0]
    assert not (tmp_path / "models" / "signals").exists()


def test_models_cli_trained_versions_listed(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    assert cli.main(["models", "--models-dir", str(models)]) == 0
    assert "no trained models" in capsys.readouterr().out
    url = seeded(helpers.sqlite_url(tmp_path))
    assert cli.main(train_args(url, models, "--epochs", "2")) == 0
    capsys.readouterr()
    assert cli.main(["models", "--models-dir", str(models)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["name", "version", "created"]
    assert lines[1].split()[:2] == ["signals", "v0001"]
    assert lines[1].endswith("EURUSD,GBPUSD")

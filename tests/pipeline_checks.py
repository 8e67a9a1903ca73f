"""What the pipeline stored, against what independent offline code says it should have stored.

Shared by the integration tests of the indicators and inference services, the proving-ground tests
and ``bench.proving``: candles against the pandas reference (``tests.market_data.reference``),
indicator values against batch TA-Lib over the stored final candles, signals against the offline
feature rows scored by the same model version, and duplicate versions in each stage's log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import talib
from sqlalchemy import Table, func, select

from services.common import db
from services.common.market import Timeframe
from services.common.schema import (
    INDICATOR_NAMES,
    agg_candle_log,
    agg_candles,
    ind_log,
    ind_values,
    inf_signal_log,
    inf_signals,
)
from services.inference.features import INPUTS, complete, feature_rows
from services.inference.registry import ModelRegistry

IndicatorRows = dict[tuple[str, dt.datetime], tuple[float | None, ...]]
CandleRows = dict[tuple[Timeframe, dt.datetime], tuple[float, ...]]
FeatureRows = dict[tuple[str, dt.datetime], npt.NDArray[np.float64]]
SignalRows = dict[tuple[str, dt.datetime], tuple[float, int, str, int]]
# Rows scored in batches of any size equal the offline batch to float32 rounding.
SCORE_TOLERANCE = 1e-6

# --- candles ---------------------------------------------------------------------------------------


def final_candles(url: str, symbol: str) -> CandleRows:
    """The aggregator's final bars of one symbol: (open, high, low, close, volume, spread)."""
    engine = db.create_db_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(agg_candles).where(agg_candles.c.symbol == symbol, agg_candles.c.final)
            )
            return {
                (Timeframe[r.timeframe], r.ts): (r.open, r.high, r.low, r.close, r.volume, r.spread)
                for r in rows
            }
    finally:
        engine.dispose()


@dataclasses.dataclass(frozen=True, slots=True)
class Mismatches:
    """Keys expected but absent, present but not expected, and present with other values."""

    missing: int
    extra: int
    different: int
    # A few of the keys, to start looking from (not compared).
    examples: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @property
    def total(self) -> int:
        return self.missing + self.extra + self.different


def _examples(missing: set[Any], extra: set[Any], different: set[Any], prefix: str = "") -> tuple[str, ...]:
    out: list[str] = []
    for label, keys in (("missing", missing), ("extra", extra), ("different", different)):
        out.extend(f"{prefix}{label} {k}" for k in sorted(map(_key, keys))[:3])
    return tuple(out)


def _key(key: tuple[Any, ...]) -> str:
    return " ".join(
        k.name if isinstance(k, Timeframe) else k.isoformat() if isinstance(k, dt.datetime) else str(k)
        for k in key
    )


def candle_mismatches(got: CandleRows, reference: CandleRows, label: str = "") -> Mismatches:
    """Stored bars against the reference: OHLC bit for bit, volume and spread to 1e-12 relative."""
    different = set()
    for key in got.keys() & reference.keys():
        stored, expected = got[key], reference[key]
        if stored[:4] != expected[:4] or not all(
            math.isclose(a, b, rel_tol=1e-12) for a, b in zip(stored[4:], expected[4:], strict=True)
        ):
            different.add(key)
    missing, extra = reference.keys() - got.keys(), got.keys() - reference.keys()
    return Mismatches(len(missing), len(extra), len(different), _examples(missing, extra, different, label))


def log_duplicates(url: str, table: Table, *version: str) -> int:
    """Rows of an append-only log beyond one per distinct version (the columns named in ``version``)."""
    engine = db.create_db_engine(url)
    columns = [table.c[name] for name in version]
    try:
        with engine.connect() as conn:
            versions = select(*columns).distinct().subquery()
            return int(
                conn.execute(select(func.count()).select_from(table)).scalar_one()
                - conn.execute(select(func.count()).select_from(versions)).scalar_one()
            )
    finally:
        engine.dispose()


def repeated_versions(
    url: str, table: Table, key: Sequence[str], version: Sequence[str], examples: list[str] | None = None
) -> int:
    """Log rows equal to the previous row of the same ``key`` in every ``version`` column.

    A stage that applied the same input twice logs the same version twice in a row. Unlike
    ``log_duplicates`` this holds when earlier inputs are revised: the indicators of a later bar
    are then published again under the bar's own revision, with other values.
    """
    engine = db.create_db_engine(url)
    columns = [table.c[name] for name in (*key, *version)]
    last: dict[tuple[Any, ...], tuple[int, tuple[Any, ...]]] = {}
    repeated = 0
    try:
        with engine.connect() as conn:
            for row in conn.execute(select(table.c.id, *columns).order_by(table.c.id)):
                k, v = tuple(row[1 : len(key) + 1]), tuple(row[len(key) + 1 :])
                previous = last.get(k)
                if previous is not None and previous[1] == v:
                    repeated += 1
                    if examples is not None and len(examples) < 3:
                        examples.append(f"{table.name} ids {previous[0]} and {row[0]}: {_key(k)}")
                last[k] = (row[0], v)
    finally:
        engine.dispose()
    return repeated


def candle_log_duplicates(url: str) -> int:
    """Final bar versions logged more than once (same bar and revision)."""
    return log_duplicates(url, agg_candle_log, "symbol", "timeframe", "ts", "revision")


# --- indicators ------------------------------------------------------------------------------------


def indicators_expected_and_stored(url: str, symbol: str) -> tuple[IndicatorRows, IndicatorRows]:
    """Batch TA-Lib over each timeframe's final candles, and what the service stored.

    Keys are (timeframe name, ts); values follow ``INDICATOR_NAMES``, None where TA-Lib gives NaN.
    """
    engine = db.create_db_engine(url)
    expected: IndicatorRows = {}
    try:
        with engine.connect() as conn:
            c = agg_candles.c
            rows = conn.execute(
                select(agg_candles).where(c.symbol == symbol, c.final).order_by(c.timeframe, c.ts)
            ).all()
            for tf in sorted({r.timeframe for r in rows}):
                bars = [r for r in rows if r.timeframe == tf]
                high, low, close = (np.array([getattr(r, k) for r in bars]) for k in ("high", "low", "close"))
                columns = [
                    talib.RSI(close, 14),
                    *talib.MACD(close, 12, 26, 9),
                    talib.ATR(high, low, close, 14),
                    *talib.BBANDS(close, 20, 2, 2),
                ]
                for i, bar in enumerate(bars):
                    expected[(tf, bar.ts)] = tuple(
                        None if math.isnan(col[i]) else float(col[i]) for col in columns
                    )
            t = ind_values.c
            stored = {
                (r.timeframe, r.ts): tuple(getattr(r, n) for n in INDICATOR_NAMES)
                for r in conn.execute(select(ind_values).where(t.symbol == symbol))
            }
    finally:
        engine.dispose()
    return expected, stored


def indicator_mismatches(expected: IndicatorRows, stored: IndicatorRows, label: str = "") -> Mismatches:
    """Stored values against batch TA-Lib, bit for bit (None exactly where TA-Lib gives NaN)."""
    different = {key for key in expected.keys() & stored.keys() if expected[key] != stored[key]}
    missing, extra = expected.keys() - stored.keys(), stored.keys() - expected.keys()
    return Mismatches(len(missing), len(extra), len(different), _examples(missing, extra, different, label))


def indicator_log_duplicates(url: str) -> int:
    """Indicator versions logged more than once (same bar and revision)."""
    return log_duplicates(url, ind_log, "symbol", "timeframe", "ts", "revision")


def indicator_repeated_versions(url: str, examples: list[str] | None = None) -> int:
    """Indicator versions logged twice in a row with the same revision and values."""
    version = ("revision", *INDICATOR_NAMES)
    return repeated_versions(url, ind_log, ("symbol", "timeframe", "ts"), version, examples)


# --- signals ---------------------------------------------------------------------------------------


def expected_signal_rows(url: str, window: int, timeframe: str = "M1") -> FeatureRows:
    """Offline feature rows of every stored final candle of ``timeframe`` whose row is complete."""
    engine = db.create_db_engine(url)
    out: FeatureRows = {}
    try:
        with engine.connect() as conn:
            t = ind_values.c
            rows = conn.execute(
                select(ind_values).where(t.timeframe == timeframe).order_by(t.symbol, t.ts)
            ).all()
    finally:
        engine.dispose()
    for symbol in sorted({r.symbol for r in rows}):
        series = [r for r in rows if r.symbol == symbol]
        inputs = np.array(
            [[np.nan if getattr(r, n) is None else getattr(r, n) for n in INPUTS] for r in series]
        )
        features = feature_rows(inputs, window)
        for r, row, ok in zip(series, features, complete(features), strict=True):
            if ok:
                out[(symbol, r.ts)] = row
    return out


def stored_signals(url: str) -> SignalRows:
    """The latest signal of every candle: (prob_up, label, model version, candle revision)."""
    engine = db.create_db_engine(url)
    try:
        with engine.connect() as conn:
            return {
                (r.symbol, r.ts): (r.prob_up, r.label, r.model_version, r.candle_revision)
                for r in conn.execute(select(inf_signals))
            }
    finally:
        engine.dispose()


def signal_log_duplicates(url: str) -> int:
    """Signal versions logged more than once (same candle, revision and model)."""
    return log_duplicates(
        url, inf_signal_log, "symbol", "timeframe", "ts", "candle_revision", "model_version"
    )


def signal_repeated_versions(url: str, examples: list[str] | None = None) -> int:
    """Signal versions logged twice in a row with the same candle revision, model and score."""
    version = ("candle_revision", "model_version", "prob_up", "label")
    return repeated_versions(url, inf_signal_log, ("symbol", "timeframe", "ts"), version, examples)


def signal_revision_mismatches(url: str, timeframe: str = "M1") -> int:
    """Signals made from another revision of their candle than the one the indicators hold."""
    engine = db.create_db_engine(url)
    try:
        with engine.connect() as conn:
            t = ind_values.c
            revisions = {
                (r.symbol, r.ts): r.revision
                for r in conn.execute(select(t.symbol, t.ts, t.revision).where(t.timeframe == timeframe))
            }
            s = inf_signals.c
            signals = conn.execute(
                select(s.symbol, s.ts, s.candle_revision).where(s.timeframe == timeframe)
            ).all()
    finally:
        engine.dispose()
    return sum(1 for r in signals if revisions.get((r.symbol, r.ts), r.candle_revision) != r.candle_revision)


def signal_score_mismatches(
    models: pathlib.Path, expected: FeatureRows, stored: SignalRows, version: str
) -> int:
    """Signals of expected rows whose score, label or model version differs from the offline scoring."""
    keys = sorted(expected.keys() & stored.keys())
    if not keys:
        return 0
    scorer = ModelRegistry(models).load("signals", version).scorer
    offline = scorer.probabilities(np.array([expected[k] for k in keys]))
    labels = scorer.labels(offline)
    bad = 0
    for k, prob, label in zip(keys, offline, labels, strict=True):
        live = stored[k]
        # A score within rounding of the threshold may fall on either side of it.
        label_ok = live[1] == label or abs(prob - scorer.threshold) <= SCORE_TOLERANCE
        bad += int(abs(live[0] - prob) > SCORE_TOLERANCE or not label_ok or live[2] != version)
    return bad


def assert_signals_equal_offline(
    models: pathlib.Path, expected: FeatureRows, stored: SignalRows, version: str
) -> None:
    """Live scores equal the offline batch to float32 rounding; labels and version agree."""
    scorer = ModelRegistry(models).load("signals", version).scorer
    keys = sorted(expected)
    offline = scorer.probabilities(np.array([expected[k] for k in keys]))
    live = np.array([stored[k][0] for k in keys])
    np.testing.assert_allclose(live, offline, rtol=0, atol=SCORE_TOLERANCE)
    away = np.abs(offline - scorer.threshold) > SCORE_TOLERANCE
    assert np.array_equal(np.array([stored[k][1] for k in keys])[away], scorer.labels(offline)[away])
    assert {stored[k][2] for k in keys} == {version}

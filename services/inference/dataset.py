"""Training rows from the database (adapter): stored final bars of ``ind_values`` → features, targets.

``ind_values`` holds, per final bar, the candle's close, volume and spread and the indicators the
indicators service computed — the very values the live inference path receives on that service's
stream. Building rows from them with ``features.feature_rows`` makes training and live scoring
see identical inputs.

Reading starts at ``start``, not ``history_needed(window) - 1`` candles before it: the first rows
of each symbol, whose window or 60-candle average would need older bars, are simply incomplete
and dropped, like rows with an indicator still warming up. Only complete rows (all finite) with a
known target are returned, so nothing non-finite ever reaches the model.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from sqlalchemy import Engine, select

from services.common.schema import ind_values
from services.inference import features

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]
Times = npt.NDArray[np.datetime64]


class UnknownSymbols(ValueError):
    """Symbols with no stored bars at all for the timeframe; ``symbols`` lists them."""

    def __init__(self, symbols: Sequence[str], timeframe: str) -> None:
        super().__init__(f"no stored {timeframe} bars for {', '.join(symbols)}")
        self.symbols = tuple(symbols)


@dataclasses.dataclass(frozen=True, slots=True)
class Series:
    """One symbol's stored bars in a range, oldest first: ``inputs`` columns are ``features.INPUTS``."""

    symbol: str
    times: Times
    inputs: Array


@dataclasses.dataclass(frozen=True, slots=True)
class Dataset:
    """Complete rows with known targets, grouped by symbol (in the order asked), oldest first.

    ``candles`` counts the stored bars read per symbol, before incomplete rows were dropped.
    """

    rows: Array
    targets: Array
    times: Times
    symbols: npt.NDArray[np.str_]
    candles: Mapping[str, int]
    window: int
    horizon: int

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def _utc_naive(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        raise ValueError("naive datetime given where UTC is needed")
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def unknown_symbols(engine: Engine, symbols: Sequence[str], timeframe: str) -> list[str]:
    """The symbols without a single stored bar of the timeframe (one indexed probe each)."""
    t = ind_values.c
    missing = []
    with engine.connect() as conn:
        for symbol in symbols:
            probe = select(t.ts).where(t.symbol == symbol, t.timeframe == timeframe).limit(1)
            if conn.execute(probe).first() is None:
                missing.append(symbol)
    return missing


def load_series(
    engine: Engine, symbols: Sequence[str], timeframe: str, start: dt.datetime, end: dt.datetime
) -> list[Series]:
    """Stored final bars in ``[start, end)`` per symbol, oldest first; a NULL value becomes NaN."""
    t = ind_values.c
    columns = [t[name] for name in features.INPUTS]
    series = []
    with engine.connect() as conn:
        for symbol in symbols:
            query = (
                select(t.ts, *columns)
                .where(t.symbol == symbol, t.timeframe == timeframe, t.ts >= start, t.ts < end)
                .order_by(t.ts)
            )
            rows = conn.execute(query).all()
            times = np.array([_utc_naive(r[0]) for r in rows], dtype="datetime64[us]")
            # numpy turns None (a warming-up indicator) into NaN for a float array.
            inputs = np.array([tuple(r[1:]) for r in rows], dtype=np.float64).reshape(
                len(rows), len(features.INPUTS)
            )
            series.append(Series(symbol, times, inputs))
    return series


def assemble(series: Sequence[Series], window: int, horizon: int) -> Dataset:
    """Feature rows and targets per symbol; keep rows that are complete and have a known target."""
    if window < 1 or horizon < 1:
        raise ValueError("window and horizon must be at least 1")
    width = window * len(features.FEATURES)
    parts_rows: list[Array] = [np.empty((0, width))]
    parts_targets: list[Array] = [np.empty(0)]
    parts_times: list[Times] = [np.empty(0, dtype="datetime64[us]")]
    parts_symbols: list[npt.NDArray[np.str_]] = [np.empty(0, dtype=np.str_)]
    for one in series:
        rows = features.feature_rows(one.inputs, window)
        target = features.targets(one.inputs[:, 0], horizon)
        keep = features.complete(rows) & np.isfinite(target)
        logger.info(
            "%s: %d stored bars, %d complete rows with a known target", one.symbol, len(one.times), keep.sum()
        )
        parts_rows.append(rows[keep])
        parts_targets.append(target[keep])
        parts_times.append(one.times[keep])
        parts_symbols.append(np.full(int(keep.sum()), one.symbol))
    return Dataset(
        rows=np.concatenate(parts_rows),
        targets=np.concatenate(parts_targets),
        times=np.concatenate(parts_times),
        symbols=np.concatenate(parts_symbols),
        candles={one.symbol: len(one.times) for one in series},
        window=window,
        horizon=horizon,
    )


def load_dataset(
    engine: Engine,
    symbols: Sequence[str],
    timeframe: str,
    start: dt.datetime,
    end: dt.datetime,
    *,
    window: int,
    horizon: int,
) -> Dataset:
    """Read the stored bars and build the training rows; ``UnknownSymbols`` if a symbol has none."""
    if start >= end:
        raise ValueError(f"start {start.isoformat()} is not before end {end.isoformat()}")
    missing = unknown_symbols(engine, symbols, timeframe)
    if missing:
        raise UnknownSymbols(missing, timeframe)
    return assemble(load_series(engine, symbols, timeframe, start, end), window, horizon)

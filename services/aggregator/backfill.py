"""Rebuild stored bars of a symbol and time range from ingest's stored ticks and EA candles.

Every bar lying entirely inside ``[start, end)`` is recomputed with the same core the live stage
uses; a bar that is missing is stored, one that differs is stored as a new revision, one that
matches is left alone — so running a backfill twice changes nothing the second time. Bars only
partly inside the range are not touched (their other ticks were not read).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import numpy as np

from services.aggregator.bars import (
    AggregationSettings,
    Aggregator,
    Bar,
    Emitted,
    bucket_bounds,
    from_us,
    to_us,
)
from services.aggregator.store import AggregatorStore, UnitOfWork
from services.common.market import Timeframe
from services.ingest.store import IngestStore

_FOREVER = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class BackfillReport:
    """What a backfill did."""

    ticks: int
    ea_candles: int
    bars: int
    inserted: int
    revised: int
    unchanged: int


def _same(a: Bar, b: Bar) -> bool:
    # OHLC are copied values: exact. Volume and mean spread are sums whose order depends on how
    # the live feed happened to be paged: equal within 1e-12.
    exact = (a.open, a.high, a.low, a.close, a.source, a.ea_disagrees) == (
        b.open,
        b.high,
        b.low,
        b.close,
        b.source,
        b.ea_disagrees,
    )
    return exact and all(
        math.isclose(x, y, rel_tol=1e-12, abs_tol=0.0)
        for x, y in ((a.volume, b.volume), (a.spread, b.spread))
    )


def backfill(
    ingest: IngestStore,
    store: AggregatorStore,
    symbol: str,
    start: dt.datetime,
    end: dt.datetime,
    settings: AggregationSettings | None = None,
) -> BackfillReport:
    """Recompute and store the bars of ``symbol`` inside ``[start, end)``."""
    core = Aggregator(settings)
    emitted = Emitted()
    ticks = ingest.ticks_between(symbol, start, end)
    if ticks:
        emitted = core.add_ticks(
            symbol,
            np.array([to_us(t.tick.ts) for t in ticks], dtype=np.int64),
            np.array([t.tick.bid for t in ticks]),
            np.array([t.tick.ask for t in ticks]),
            np.array([t.tick.volume for t in ticks]),
        )
    candles = ingest.candles_between(symbol, start, end)
    for candle in candles:
        emitted.extend(core.add_ea_candle(candle))
    emitted.extend(core.advance_clock(_FOREVER))
    computed: dict[tuple[Timeframe, dt.datetime], Bar] = {}
    for bar in emitted.final:
        computed[(bar.timeframe, bar.ts)] = bar  # the last version of each bar
    inside = {
        k: b
        for k, b in computed.items()
        if b.ts >= start and from_us(bucket_bounds(to_us(b.ts), b.timeframe)[1]) <= end
    }
    work = UnitOfWork()
    inserted = revised = 0
    for (timeframe, ts), bar in sorted(inside.items(), key=lambda kv: (kv[0][0].value, kv[0][1])):
        stored = store.candles(symbol, timeframe, ts, ts + dt.timedelta(microseconds=1), 1)
        if not stored:
            version = dataclasses.replace(bar, revision=0, final=True)
            inserted += 1
        elif _same(stored[0], bar):
            continue
        else:
            version = dataclasses.replace(bar, revision=stored[0].revision + 1, final=True)
            revised += 1
        work.add([version], final=True)
    if work:
        store.commit(work)
    return BackfillReport(
        len(ticks), len(candles), len(inside), inserted, revised, len(inside) - inserted - revised
    )

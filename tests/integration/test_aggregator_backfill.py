"""`mt5mesh backfill` rebuilds bars from stored ticks, idempotently, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

from sqlalchemy import select, update

from services.common import db
from services.common.market import Tick, Timeframe, from_us
from services.common.schema import agg_candle_log, agg_candles
from services.ingest.store import IngestStore, TickBatch
from tests.helpers import REPO
from tests.market_data import START, make_ticks, reference

RANGE_START = START + dt.timedelta(hours=1)
RANGE_END = START + dt.timedelta(hours=3)


def run_backfill(database_url: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.mesh",
            "backfill",
            "--database-url",
            database_url,
            "--symbol",
            "BKF",
            "--from",
            RANGE_START.isoformat(),
            "--to",
            RANGE_END.isoformat(),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


def test_backfill_rebuilds_bars_inside_range_and_second_run_changes_nothing(database_url: str) -> None:
    engine = db.create_db_engine(database_url)
    db.migrate(engine)
    ticks = make_ticks(5_000, seed=31, span_hours=4)
    rows = [
        Tick("BKF", from_us(int(t)), float(b), float(a))
        for t, b, a in zip(ticks.ts, ticks.bid, ticks.ask, strict=True)
    ]
    IngestStore(engine).commit([TickBatch(rows)], [])
    first = run_backfill(database_url)
    in_range = (ticks.ts >= int(RANGE_START.timestamp() * 1e6)) & (
        ticks.ts < int(RANGE_END.timestamp() * 1e6)
    )
    ref = {
        k: v
        for k, v in reference(ticks.take(in_range.nonzero()[0])).items()
        if k[0] in (Timeframe.M1, Timeframe.M5, Timeframe.M15, Timeframe.M30, Timeframe.H1)
    }
    with engine.connect() as conn:
        stored = {(Timeframe[r.timeframe], r.ts): r for r in conn.execute(select(agg_candles))}
    assert set(stored) == set(ref)
    for key, values in ref.items():
        row = stored[key]
        assert (row.open, row.high, row.low, row.close) == values[:4]
        assert row.final
        assert row.revision == 0
    assert f"{len(ref)} inserted, 0 revised" in first
    assert f"0 inserted, 0 revised, {len(ref)} unchanged" in run_backfill(database_url)
    # A bar that went wrong (say, by hand) is put right as a new revision.
    key = min(ref, key=lambda k: (k[0].value, k[1]))
    with engine.begin() as conn:
        conn.execute(
            update(agg_candles)
            .where(agg_candles.c.timeframe == key[0].name, agg_candles.c.ts == key[1])
            .values(close=99.0)
        )
    assert "1 revised" in run_backfill(database_url)
    with engine.connect() as conn:
        log = conn.execute(
            select(agg_candle_log.c.revision, agg_candle_log.c.close)
            .where(agg_candle_log.c.timeframe == key[0].name, agg_candle_log.c.ts == key[1])
            .order_by(agg_candle_log.c.id)
        ).all()
    assert [(r.revision, r.close) for r in log] == [(0, ref[key][3]), (1, ref[key][3])]
    engine.dispose()

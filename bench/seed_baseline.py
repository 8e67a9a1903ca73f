"""The seed system's way of storing ticks, kept only as the benchmark's baseline.

A minimal FastAPI app (run by uvicorn with one worker): ``POST /ingest/tick`` takes
``{"ticks": [...]}`` and, like the seed did, inserts the ticks row by row, each its own
``INSERT ... ON CONFLICT DO NOTHING`` through SQLAlchemy, with one commit per request. It writes the
same ``ingest_ticks`` table the ingest service writes (migrated beforehand by the benchmark), so the
two are compared on the same rows and the same schema.

Run: ``DATABASE_URL=postgresql+psycopg://... BASELINE_API_KEY=... uvicorn --factory
bench.seed_baseline:create_app --workers 1``.
"""

from __future__ import annotations

import datetime as dt
import hmac
import os

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

INSERT_TICK = text(
    "INSERT INTO ingest_ticks (symbol, ts, bid, ask, volume, source_id) "
    "VALUES (:symbol, :ts, :bid, :ask, :volume, :source_id) "
    "ON CONFLICT (symbol, ts, bid, ask) DO NOTHING"
)


class TickIn(BaseModel):
    """One tick as the seed's EA posted it."""

    symbol: str
    ts: dt.datetime
    bid: float
    ask: float
    volume: float = 0.0


class TicksIn(BaseModel):
    """The seed's ``POST /ingest/tick`` body."""

    ticks: list[TickIn]


class TicksOut(BaseModel):
    """What the baseline answers: counts only."""

    ok: bool
    received: int
    inserted: int


def create_app() -> FastAPI:
    """Build the app from ``DATABASE_URL`` and ``BASELINE_API_KEY``."""
    # The seed's engine settings that matter here: a pool with pre-ping.
    engine = create_engine(os.environ["DATABASE_URL"], pool_pre_ping=True)
    api_key = os.environ["BASELINE_API_KEY"]
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "healthy"}

    @app.post("/ingest/tick")
    def ingest_tick(body: TicksIn, x_api_key: str = Header(default="")) -> TicksOut:
        if not hmac.compare_digest(x_api_key.encode(), api_key.encode()):
            raise HTTPException(status_code=401, detail="invalid API key")
        inserted = 0
        with Session(engine) as session:
            for tick in body.ticks:
                result = session.execute(
                    INSERT_TICK,
                    {
                        "symbol": tick.symbol,
                        "ts": tick.ts,
                        "bid": tick.bid,
                        "ask": tick.ask,
                        "volume": tick.volume,
                        "source_id": "bench",  # the source id the streamed rows carry
                    },
                )
                inserted += int(getattr(result, "rowcount", 0))
            session.commit()
        return TicksOut(ok=True, received=len(body.ticks), inserted=inserted)

    return app

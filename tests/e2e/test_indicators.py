"""Ticks posted through the gateway come back as indicator values over REST; the TA-Lib catalog too."""

from __future__ import annotations

import asyncio
import datetime as dt
import math

import httpx
import numpy as np
import talib

from tests.e2e.conftest import Mesh
from tests.helpers import API_KEY
from tests.market_data import make_ticks

SYMBOL = "INDUSD"


def _tick_json(ts_us: int, bid: float, ask: float) -> dict[str, object]:
    ts = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ts_us)
    return {"symbol": SYMBOL, "ts": ts.isoformat().replace("+00:00", "Z"), "bid": bid, "ask": ask}


async def test_ticks_posted_through_gateway_give_talib_indicators_over_rest(mesh: Mesh) -> None:
    ticks = make_ticks(4_000, seed=61, span_hours=3)
    async with httpx.AsyncClient(base_url=mesh.url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        for a in range(0, len(ticks), 1_000):
            body = {
                "ticks": [
                    _tick_json(int(t), float(b), float(k))
                    for t, b, k in zip(
                        ticks.ts[a : a + 1_000],
                        ticks.bid[a : a + 1_000],
                        ticks.ask[a : a + 1_000],
                        strict=True,
                    )
                ]
            }
            assert (await client.post("/ingest/tick", json=body)).status_code == 200
        candles: list[dict[str, object]] = []
        values: list[dict[str, object]] = []
        for _ in range(200):
            candles = [
                b
                for b in (await client.get(f"/v1/candles/{SYMBOL}/M1", params={"limit": 10_000})).json()[
                    "bars"
                ]
                if b["final"]
            ]
            values = (await client.get(f"/v1/indicators/{SYMBOL}/M1", params={"limit": 10_000})).json()[
                "values"
            ]
            if len(candles) == 180 and len(values) == 180:
                break
            await asyncio.sleep(0.1)
    assert len(candles) == len(values) == 180
    close = np.array([c["candle"]["close"] for c in candles])  # type: ignore[index]
    rsi = talib.RSI(close, 14)
    upper, middle, lower = talib.BBANDS(close, 20, 2, 2)
    for i, v in enumerate(values):
        assert ("rsi" in v) == (not math.isnan(rsi[i]))  # absent while warming up, never NaN or 0
        if "rsi" in v:
            assert v["rsi"] == rsi[i]
        if "bb_upper" in v:
            assert (v["bb_upper"], v["bb_middle"], v["bb_lower"]) == (upper[i], middle[i], lower[i])
    assert values[-1]["final"] is True


async def test_catalog_and_compute_through_gateway(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        catalog = (await client.get("/v1/indicators/catalog")).json()["functions"]
        macd = next(f for f in catalog if f["name"] == "MACD")
        assert macd["outputs"] == ["macd", "macdsignal", "macdhist"]
        assert [p["name"] for p in macd["parameters"]] == ["fastperiod", "slowperiod", "signalperiod"]
        assert len(catalog) > 100
        unknown = await client.post(
            "/v1/indicators:compute", json={"function": "NOPE", "symbol": SYMBOL, "timeframe": "M1"}
        )
        assert unknown.status_code == 400
        assert "function" in unknown.text
        bad_param = await client.post(
            "/v1/indicators:compute",
            json={"function": "RSI", "symbol": SYMBOL, "timeframe": "M1", "parameters": {"timeperod": 10}},
        )
        assert bad_param.status_code == 400
        assert "parameters.timeperod" in bad_param.text
        too_little = await client.post(
            "/v1/indicators:compute", json={"function": "RSI", "symbol": "NODATA", "timeframe": "M1"}
        )
        assert too_little.status_code == 400
        assert "not enough data" in too_little.text

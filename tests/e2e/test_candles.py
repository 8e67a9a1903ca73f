"""Ticks streamed over gRPC through the gateway come back as candles of every timeframe over REST."""

from __future__ import annotations

import asyncio
import datetime as dt

import httpx
import pytest

from services.common.market import Timeframe
from services.ingest.client import TickStreamer
from tests.e2e.conftest import Mesh
from tests.helpers import API_KEY
from tests.market_data import make_ticks, reference, tick_batches


async def test_ticks_through_gateway_candles_back_through_rest_equal_reference(mesh: Mesh) -> None:
    ticks = make_ticks(3_000, seed=21, span_hours=8)
    report = await TickStreamer(f"127.0.0.1:{mesh.envoy.port}", API_KEY, "e2e-candles").send(
        tick_batches(ticks, "E2EUSD", 250)
    )
    assert report.ticks_stored == 3_000
    ref = reference(ticks)
    async with httpx.AsyncClient(base_url=mesh.url, headers={"X-API-Key": API_KEY}, timeout=10) as client:
        for tf in Timeframe:
            expected = sorted((ts, v) for (t, ts), v in ref.items() if t is tf)
            bars: list[dict[str, object]] = []
            for _ in range(100):
                body = (await client.get(f"/v1/candles/E2EUSD/{tf.name}", params={"limit": 10_000})).json()
                bars = [b for b in body["bars"] if b["final"]]
                if len(bars) == len(expected):
                    break
                await asyncio.sleep(0.1)
            assert len(bars) == len(expected), tf
            for bar, (ts, values) in zip(bars, expected, strict=True):
                candle = bar["candle"]
                assert isinstance(candle, dict)
                assert dt.datetime.fromisoformat(candle["ts"]) == ts
                assert candle["timeframe"] == tf.name
                got = (candle["open"], candle["high"], candle["low"], candle["close"])
                assert got == values[:4]
                assert (candle["volume"], candle["spread"]) == pytest.approx(values[4:], rel=1e-12)


async def test_get_candles_unknown_timeframe_400_names_field(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.url, headers={"X-API-Key": API_KEY}) as client:
        response = await client.get("/v1/candles/EURUSD/M7")
    assert response.status_code == 400
    assert "timeframe" in response.text


def _ea(symbol: str, timeframe: str, ts: dt.datetime, close: float) -> dict[str, object]:
    return {
        "symbol": symbol,
        "timeframe": timeframe,
        "ts": ts.isoformat().replace("+00:00", "Z"),
        "open": 1.0,
        "high": max(1.3, close),
        "low": 0.9,
        "close": close,
        "volume": 10,
        "spread": 2,
    }


async def _final_bars(
    client: httpx.AsyncClient, symbol: str, timeframe: str, count: int
) -> list[dict[str, object]]:
    bars: list[dict[str, object]] = []
    for _ in range(150):
        bars = [
            b for b in (await client.get(f"/v1/candles/{symbol}/{timeframe}")).json()["bars"] if b["final"]
        ]
        if len(bars) >= count:
            break
        await asyncio.sleep(0.1)
    return bars


async def test_ea_history_of_h1_rolls_up_and_ea_bar_overrides_ticks(mesh: Mesh) -> None:
    day = dt.datetime(2025, 10, 20, tzinfo=dt.UTC)
    hours = [_ea("EAHIST", "H1", day + dt.timedelta(hours=h), 1.0 + h / 100) for h in range(8)]
    async with httpx.AsyncClient(base_url=mesh.url, headers={"X-API-Key": API_KEY}, timeout=10) as client:
        assert (await client.post("/ingest_batch", json=hours)).json()["inserted"] == 8
        (h4a, h4b) = await _final_bars(client, "EAHIST", "H4", 2)
        assert (h4a["candle"]["open"], h4a["candle"]["close"], h4a["source"]) == (  # type: ignore[index]
            1.0,
            1.03,
            "CANDLE_SOURCE_ROLLUP",
        )
        assert h4b["candle"]["close"] == 1.07  # type: ignore[index]
        # A tick-built M1 bar, then the EA bar for the same minute: the EA bar wins, and says it differs.
        minute = dt.datetime(2025, 10, 21, 3, 0, tzinfo=dt.UTC)
        tick = {
            "symbol": "EAOVR",
            "ts": (minute + dt.timedelta(seconds=5)).isoformat().replace("+00:00", "Z"),
            "bid": 1.1,
            "ask": 1.1002,
        }
        await client.post("/ingest/tick", json={"ticks": [tick]})
        await _final_bars(client, "EAOVR", "M1", 1)
        await client.post("/ingest_batch", json=[_ea("EAOVR", "M1", minute, 1.2)])
        for _ in range(150):
            (bar,) = await _final_bars(client, "EAOVR", "M1", 1)
            if bar["source"] == "CANDLE_SOURCE_EA":
                break
            await asyncio.sleep(0.1)
    assert bar["source"] == "CANDLE_SOURCE_EA"
    assert bar["candle"]["close"] == 1.2  # type: ignore[index]
    assert bar["ea_disagrees"] is True
    assert bar["revision"] == 1

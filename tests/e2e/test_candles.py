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

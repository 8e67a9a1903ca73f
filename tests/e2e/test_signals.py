"""From EA candles through the gateway to a trained model's signals, over REST and over gRPC."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import grpc
import httpx
import numpy as np
from mt5.inference.v1 import inference_service_pb2 as pb
from mt5.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.mesh import cli
from tests.e2e.conftest import Mesh
from tests.helpers import API_KEY, wait_until

HEADERS = {"X-API-Key": API_KEY}
START = dt.datetime(2025, 6, 2, tzinfo=dt.UTC)
CANDLES = 420


def _candles(first: int, count: int) -> list[dict[str, Any]]:
    """M1 candles of a random walk with a mean-reverting pull, as the EA posts them."""
    rng = np.random.default_rng(3)
    closes = 1.1 + np.cumsum(rng.normal(0, 2e-4, first + count))
    out = []
    for i in range(first, first + count):
        close = float(closes[i])
        open_ = float(closes[i - 1]) if i else close
        out.append(
            {
                "symbol": "SIGUSD",
                "timeframe": "M1",
                "ts": (START + dt.timedelta(minutes=i)).isoformat().replace("+00:00", "Z"),
                "open": open_,
                "high": max(open_, close) + 1e-4,
                "low": min(open_, close) - 1e-4,
                "close": close,
                "volume": float(rng.integers(50, 500)),
                "spread": 2.0,
            }
        )
    return out


def _post(mesh: Mesh, candles: list[dict[str, Any]]) -> None:
    for a in range(0, len(candles), 100):
        response = httpx.post(
            mesh.url + "/ingest_batch", json=candles[a : a + 100], headers=HEADERS, timeout=30
        )
        assert response.status_code == 200, response.text


def _get(mesh: Mesh, path: str, **params: Any) -> httpx.Response:
    return httpx.get(mesh.url + path, params=params, headers=HEADERS, timeout=10)


def _indicators_stored(mesh: Mesh, count: int) -> bool:
    response = _get(mesh, "/v1/indicators/SIGUSD/M1", limit=10_000)
    return response.status_code == 200 and len(response.json()["values"]) >= count


async def _subscribe_until(mesh: Mesh, newest: dt.datetime) -> list[pb.SubscribeSignalsResponse]:
    """Signals from cursor 0 through the gateway (native gRPC), posting one more candle meanwhile."""
    async with grpc.aio.insecure_channel(mesh.url.removeprefix("http://")) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        call = stub.SubscribeSignals(
            pb.SubscribeSignalsRequest(symbols=["SIGUSD"], timeframes=["M1"]),
            metadata=(("x-api-key", API_KEY),),
        )
        await asyncio.to_thread(_post, mesh, _candles(CANDLES, 1))
        seen: list[pb.SubscribeSignalsResponse] = []
        async for item in call:
            seen.append(item)
            if item.signal.ts.ToDatetime(dt.UTC) == newest:
                break
        call.cancel()
    return seen


def test_candles_to_trained_model_to_signal_over_rest_and_subscribe(mesh: Mesh) -> None:
    _post(mesh, _candles(0, CANDLES))
    wait_until(lambda: _indicators_stored(mesh, CANDLES), 60, what="indicators of every candle")

    # The user's command: train on the stored history, into the registry the service watches.
    args = [
        "train",
        "--database-url",
        mesh.database_url,
        "--models-dir",
        str(mesh.models_dir),
        "--symbols",
        "SIGUSD",
        "--timeframe",
        "M1",
        "--from",
        "2025-06-02T00:00:00Z",
        "--to",
        "2025-06-03T00:00:00Z",
        "--epochs",
        "5",
        "--no-progress",
    ]
    assert cli.main(args) == 0

    wait_until(lambda: _get(mesh, "/model").status_code == 200, 30, what="model served")
    model = _get(mesh, "/model").json()
    assert model["version"] == "v0001"
    assert model["timeframe"] == "M1"
    assert set(model["metrics"]) >= {"model", "majority", "logistic"}
    assert {"accuracy", "precision", "recall", "f1", "log_loss"} <= set(model["metrics"]["model"])

    # Signals for the stored history (every candle with a complete feature row) then a live one.
    newest = START + dt.timedelta(minutes=CANDLES)
    seen = asyncio.run(_subscribe_until(mesh, newest))
    last = seen[-1].signal
    assert last.model_version == "v0001"
    assert 0.0 <= last.prob_up <= 1.0
    assert last.label in (0, 1)
    assert len({s.signal.ts.ToDatetime(dt.UTC) for s in seen}) == len(seen)  # one per candle

    # The seed's REST routes, through Envoy.
    current = _get(mesh, "/signals", timeframe="M1").json()
    assert isinstance(current, list)
    ours = [s for s in current if s["symbol"] == "SIGUSD"]
    assert len(ours) == 1
    assert ours[0]["ts"] == newest.isoformat().replace("+00:00", "Z")
    assert ours[0]["prob_up"] == last.prob_up
    assert ours[0]["label"] == last.label
    assert ours[0]["model_version"] == "v0001"

    saved = httpx.post(mesh.url + "/signals/save", params={"timeframe": "M1"}, headers=HEADERS, timeout=10)
    assert saved.status_code == 200
    assert saved.json()["timeframe"] == "M1"
    assert saved.json()["saved"] >= 1
    latest = _get(mesh, "/signals/latest", timeframe="M1").json()
    assert [s for s in latest if s["symbol"] == "SIGUSD"] == ours
    history = _get(mesh, "/signals/history", symbol="SIGUSD", timeframe="M1", limit=5).json()
    assert history == ours

    bad = _get(mesh, "/signals/history", symbol="SIG USD", timeframe="M1")
    assert bad.status_code == 400
    assert "symbol" in bad.text

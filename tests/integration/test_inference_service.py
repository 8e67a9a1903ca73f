"""The inference service as a real process behind real ingest, aggregator and indicators processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
import random
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mt5.inference.v1 import inference_service_pb2 as pb
from mt5.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.ingest.client import TickStreamer
from tests.helpers import API_KEY, ServiceProcess, pipeline, wait_until
from tests.inference_models import save_model
from tests.market_data import make_ticks, tick_batches
from tests.pipeline_checks import (
    FeatureRows,
    SignalRows,
    assert_signals_equal_offline,
    expected_signal_rows,
    signal_log_duplicates,
    stored_signals,
)

METADATA = (("x-api-key", API_KEY),)
WINDOW = 3
Chain = tuple[ServiceProcess, ServiceProcess, ServiceProcess, ServiceProcess]


@pytest.fixture
def models(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "models"


@pytest.fixture
def chain(database_url: str, tmp_path: pathlib.Path, models: pathlib.Path) -> Iterator[Chain]:
    extra = {"inference": {"INFERENCE_MODELS_DIR": str(models)}}
    with pipeline(database_url, tmp_path, "inference", extra) as (ingest, aggregator, indicators, inference):
        yield ingest, aggregator, indicators, inference


async def settle(url: str, minimum: int) -> tuple[FeatureRows, SignalRows]:
    """Wait until every complete row has its signal (and no other signal exists)."""
    expected: FeatureRows = {}
    stored: SignalRows = {}
    for _ in range(400):
        expected, stored = expected_signal_rows(url, WINDOW), stored_signals(url)
        if len(expected) >= minimum and set(stored) == set(expected):
            break
        await asyncio.sleep(0.1)
    return expected, stored


def named_health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="mt5.inference.v1.InferenceService"), timeout=2
        )
    return int(reply.status)


async def send(ingest: ServiceProcess, seed: int, symbols: tuple[str, ...], hours: float = 6.0) -> None:
    for k, symbol in enumerate(symbols):
        ticks = make_ticks(3_000, seed=seed + k, span_hours=hours)
        await TickStreamer(ingest.address, API_KEY, f"inf-{seed}-{symbol}").send(
            tick_batches(ticks, symbol, 500)
        )


async def test_inference_without_model_answers_unavailable_then_signals_equal_offline_rows(
    chain: Chain, database_url: str, models: pathlib.Path
) -> None:
    ingest, _, _, inference = chain
    assert named_health(inference.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    async with grpc.aio.insecure_channel(inference.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for call in (
            stub.ListSignals(pb.ListSignalsRequest(timeframe="M1"), metadata=METADATA),
            stub.GetModel(pb.GetModelRequest(), metadata=METADATA),
            stub.Predict(pb.PredictRequest(rows=[pb.FeatureRow(values=[1.0] * 30)]), metadata=METADATA),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert caught.value.details() == "no model: run mt5mesh train"

        await send(ingest, 61, ("EURUSD", "GBPUSD"))
        save_model(models, window=WINDOW)
        wait_until(
            lambda: named_health(inference.address) == health_pb2.HealthCheckResponse.SERVING,
            30,
            what="model",
        )
        expected, stored = await settle(database_url, minimum=500)
        assert len(expected) >= 500
        assert set(stored) == set(expected)  # one signal per final candle with a complete row, no other
        assert_signals_equal_offline(models, expected, stored, "v0001")
        assert signal_log_duplicates(database_url) == 0

        # The stream replays every stored signal from cursor 0, in cursor order, then goes live.
        received = []
        call = stub.SubscribeSignals(pb.SubscribeSignalsRequest(timeframes=["M1"]), metadata=METADATA)
        async for item in call:
            received.append(item)
            if len(received) == len(stored):
                break
        call.cancel()
        assert [r.cursor for r in received] == sorted(r.cursor for r in received)
        assert {(r.signal.symbol, r.signal.ts.ToDatetime(dt.UTC)) for r in received} == set(stored)

        # Predict scores explicit rows the same way.
        keys = sorted(expected)[:20]
        reply = await stub.Predict(
            pb.PredictRequest(rows=[pb.FeatureRow(values=list(expected[k])) for k in keys]), metadata=METADATA
        )
        assert reply.model_version == "v0001"
        np.testing.assert_allclose(
            [p.prob_up for p in reply.predictions], [stored[k][0] for k in keys], atol=1e-6
        )

        # PredictStream answers each row in order, with the same scores.
        async def rows() -> AsyncIterator[pb.PredictStreamRequest]:
            for k in keys:
                yield pb.PredictStreamRequest(row=pb.FeatureRow(values=list(expected[k])))

        streamed = [r async for r in stub.PredictStream(rows(), metadata=METADATA)]
        assert [r.model_version for r in streamed] == ["v0001"] * len(keys)
        np.testing.assert_allclose(
            [r.prediction.prob_up for r in streamed], [stored[k][0] for k in keys], atol=1e-6
        )

        async def bad_rows() -> AsyncIterator[pb.PredictStreamRequest]:
            yield pb.PredictStreamRequest(row=pb.FeatureRow(values=list(expected[keys[0]])))
            yield pb.PredictStreamRequest(row=pb.FeatureRow(values=[float("inf")] * len(expected[keys[0]])))

        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for answer in stub.PredictStream(bad_rows(), metadata=METADATA):
                answers.append(answer)
        assert len(answers) == 1
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "row.values[0]" in (caught.value.details() or "")

        listed = await stub.ListSignals(pb.ListSignalsRequest(timeframe="M1"), metadata=METADATA)
        latest = {s: max(ts for (sym, ts) in stored if sym == s) for s in ("EURUSD", "GBPUSD")}
        assert {(s.symbol, s.ts.ToDatetime(dt.UTC)) for s in listed.signals} == set(latest.items())

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Predict(
                pb.PredictRequest(
                    rows=[pb.FeatureRow(values=[1.0] * 29), pb.FeatureRow(values=[float("nan")] * 30)]
                ),
                metadata=METADATA,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "rows[0].values" in (caught.value.details() or "")
        assert "rows[1].values[0]" in (caught.value.details() or "")


async def test_inference_killed_at_random_moments_loses_and_duplicates_no_signal(
    chain: Chain, database_url: str, models: pathlib.Path
) -> None:
    ingest, _, _, inference = chain
    save_model(models, window=WINDOW)
    wait_until(
        lambda: named_health(inference.address) == health_pb2.HealthCheckResponse.SERVING, 30, what="model"
    )
    rng = random.Random(7)

    async def chaos() -> None:
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            inference.kill()
            await asyncio.to_thread(inference.start)

    chaos_task = asyncio.create_task(chaos())
    await send(ingest, 71, ("USDJPY", "AUDUSD"), hours=8.0)
    await chaos_task
    expected, stored = await settle(database_url, minimum=700)
    assert set(stored) == set(expected)
    assert_signals_equal_offline(models, expected, stored, "v0001")
    assert signal_log_duplicates(database_url) == 0


async def test_inference_new_model_version_is_served_without_restart(
    chain: Chain, database_url: str, models: pathlib.Path
) -> None:
    ingest, _, _, inference = chain
    save_model(models, window=WINDOW)
    await send(ingest, 81, ("EURUSD",), hours=3.0)
    expected, _ = await settle(database_url, minimum=100)
    save_model(models, window=WINDOW, seed=5)
    async with grpc.aio.insecure_channel(inference.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def served() -> str:
            reply: pb.GetModelResponse = await stub.GetModel(pb.GetModelRequest(), metadata=METADATA)
            return reply.version

        for _ in range(100):
            if await served() == "v0002":
                break
            await asyncio.sleep(0.1)
        assert await served() == "v0002"
    await send(ingest, 82, ("GBPUSD",), hours=3.0)
    _, stored = await settle(database_url, minimum=len(expected) + 100)
    versions = {key[0]: set() for key in stored}  # type: dict[str, set[str]]
    for (symbol, _), value in stored.items():
        versions[symbol].add(value[2])
    assert versions["EURUSD"] == {"v0001"}
    assert versions["GBPUSD"] == {"v0002"}

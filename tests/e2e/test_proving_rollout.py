"""Proving ground, short form: a rolling restart of each service under load.

One mesh on PostgreSQL (probed services behind the real Envoy). For each service in turn, while
ticks stream in through the gateway, a REST client calls the service's route (retrying failures the
way an EA should: a few times, with a pause) and a subscriber follows its feed from its cursor:
a unary call is made to wait inside the service (its table is locked), the service gets SIGTERM,
its health is watched, the lock is released, the process exits and is started again. Then: the
in-flight call finished OK, the subscriber resumed on the new process with no duplicate, no REST call
failed for good, and every streamed tick was acknowledged. The full form is in ``bench/proving/load.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_grpc
from mt5.indicators.v1 import indicators_service_pb2 as ind_pb
from mt5.indicators.v1 import indicators_service_pb2_grpc as ind_grpc
from mt5.inference.v1 import inference_service_pb2 as inf_pb
from mt5.inference.v1 import inference_service_pb2_grpc as inf_grpc
from mt5.ingest.v1 import ingest_service_pb2 as ingest_pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from mt5.market.v1 import market_pb2

from bench.proving.traffic import (
    METADATA,
    Follower,
    ProvingMesh,
    RestClient,
    TickMaker,
    TickPump,
    proving_mesh,
    watch_health,
)
from tests import helpers
from tests.inference_models import save_model

pytestmark = [pytest.mark.postgres, pytest.mark.envoy]

SYMBOLS = ("ROLLA", "ROLLB", "ROLLC", "ROLLD")
MARKET_START_US = int(dt.datetime(2025, 10, 20, tzinfo=dt.UTC).timestamp() * 1_000_000)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRAIN_SECONDS = 2.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvingMesh]:
    workdir = tmp_path_factory.mktemp("proving-rollout")
    save_model(workdir / "models")
    # Production drains 5 s (MT5MESH_DRAIN_SECONDS); 2 s here is still two of Envoy's health checks.
    extra = {name: {"MT5MESH_DRAIN_SECONDS": str(DRAIN_SECONDS)} for name in helpers.SERVICES}
    with helpers.postgres_database() as url, proving_mesh(url, workdir, extra) as running:
        yield running


@dataclasses.dataclass(frozen=True)
class Target:
    """What is called, locked and followed for one service."""

    table: str  # locked to hold a unary call inside the service
    rest: tuple[str, str, dict[str, Any] | None]  # method, path, JSON body
    call: Callable[[grpc.Channel], Any]  # the unary call held in flight (straight to the service)
    follow: Callable[[grpc.aio.Channel, int], grpc.aio.UnaryStreamCall]  # the feed, from a cursor


def _candle(symbol: str) -> dict[str, Any]:
    return helpers.SEED_CANDLE | {"symbol": symbol}


TARGETS = {
    "ingest": Target(
        "ingest_candles",
        ("POST", "/ingest", _candle("ROLLREST")),
        lambda ch: ingest_grpc.IngestServiceStub(ch).IngestCandles(
            ingest_pb.IngestCandlesRequest(
                items=[
                    market_pb2.Candle(
                        symbol="ROLLFLIGHT",
                        timeframe=market_pb2.M1,
                        ts={"seconds": 1_760_929_200},
                        open=1.0,
                        high=1.1,
                        low=0.9,
                        close=1.0,
                        volume=1,
                        spread=1,
                    )
                ]
            ),
            metadata=METADATA,
            timeout=20,
        ),
        lambda ch, cursor: ingest_grpc.IngestServiceStub(ch).SubscribeTicks(
            ingest_pb.SubscribeTicksRequest(from_cursor=cursor, symbols=list(SYMBOLS)), metadata=METADATA
        ),
    ),
    "aggregator": Target(
        "agg_candles",
        ("GET", "/v1/candles/ROLLA/M1", None),
        lambda ch: agg_grpc.AggregatorServiceStub(ch).GetCandles(
            agg_pb.GetCandlesRequest(symbol="ROLLA", timeframe=market_pb2.M1), metadata=METADATA, timeout=20
        ),
        lambda ch, cursor: agg_grpc.AggregatorServiceStub(ch).SubscribeCandles(
            agg_pb.SubscribeCandlesRequest(from_cursor=cursor, symbols=list(SYMBOLS)), metadata=METADATA
        ),
    ),
    "indicators": Target(
        "ind_values",
        ("GET", "/v1/indicators/ROLLA/M1", None),
        lambda ch: ind_grpc.IndicatorsServiceStub(ch).GetIndicators(
            ind_pb.GetIndicatorsRequest(symbol="ROLLA", timeframe=market_pb2.M1),
            metadata=METADATA,
            timeout=20,
        ),
        lambda ch, cursor: ind_grpc.IndicatorsServiceStub(ch).SubscribeIndicators(
            ind_pb.SubscribeIndicatorsRequest(from_cursor=cursor, symbols=list(SYMBOLS)), metadata=METADATA
        ),
    ),
    "inference": Target(
        "inf_signals",
        ("GET", "/signals?timeframe=M1", None),
        lambda ch: inf_grpc.InferenceServiceStub(ch).ListSignals(
            inf_pb.ListSignalsRequest(timeframe=market_pb2.M1), metadata=METADATA, timeout=20
        ),
        lambda ch, cursor: inf_grpc.InferenceServiceStub(ch).SubscribeSignals(
            inf_pb.SubscribeSignalsRequest(from_cursor=cursor, symbols=list(SYMBOLS)), metadata=METADATA
        ),
    ),
}


@dataclasses.dataclass
class Rollout:
    """What one SIGTERM and restart looked like."""

    in_flight: str
    exit_code: int
    health_after_sigterm: list[tuple[float, int | None]]  # (seconds after SIGTERM, status)
    restarted_at: float
    sigterm_at: float


def _roll(mesh: ProvingMesh, name: str) -> Rollout:
    service, target = mesh.services[name], TARGETS[name]
    assert service.proc is not None
    result: list[str] = []
    health: list[tuple[float, int | None]] = []
    watching = threading.Event()

    def in_flight() -> None:
        with grpc.insecure_channel(service.address) as channel:
            try:
                target.call(channel)
                result.append("OK")
            except grpc.RpcError as exc:
                result.append(exc.code().name)

    with helpers.table_locked(mesh.database_url, target.table) as release:
        caller = threading.Thread(target=in_flight)
        caller.start()
        helpers.wait_until(
            lambda: helpers.lock_waiters(mesh.database_url) >= 1, 10, what=f"a call waiting inside {name}"
        )
        watcher = threading.Thread(target=watch_health, args=(service.address, watching, health))
        sigterm_at = time.monotonic()
        service.proc.terminate()
        watcher.start()
        time.sleep(0.5)  # the call is still waiting for the lock: it is in flight
        release()
        caller.join(20)
        exit_code = service.proc.wait(20)
        watching.set()
        watcher.join()
    service.start(wait_serving=True)
    return Rollout(
        result[0] if result else "no answer",
        exit_code,
        [(t - sigterm_at, status) for t, status in health],
        time.monotonic(),
        sigterm_at,
    )


@pytest.mark.parametrize("name", helpers.SERVICES)
async def test_sigterm_under_load_in_flight_call_finishes_streams_resume_no_failed_call(
    mesh: ProvingMesh, name: str
) -> None:
    target = TARGETS[name]
    # A market clock running 200 times the wall clock (bars, indicator values and signals within
    # seconds), each test's six hours after the previous one's start.
    start = MARKET_START_US + helpers.SERVICES.index(name) * 6 * 3_600_000_000
    maker = TickMaker(SYMBOLS, market_start_us=start, market_step_us=100_000)
    pump = TickPump(mesh.gateway, SYMBOLS, 2_000, batch_size=200, source_id=f"roll-{name}", maker=maker)
    method, path, body = target.rest
    rest = RestClient(mesh.url, method, path, body)
    follower = Follower(target.follow, mesh.gateway)
    stop = asyncio.Event()
    pumping = asyncio.create_task(pump.run(stop))
    tasks = [asyncio.create_task(t.run(stop)) for t in (rest, follower)]
    try:
        await asyncio.to_thread(
            helpers.wait_until, lambda: len(follower.cursors) > 2, 60, 0.1, f"the {name} feed to deliver"
        )
        rollout = await asyncio.to_thread(_roll, mesh, name)
        # Let everything find the new process (Envoy's health checks run every 5 s).
        await asyncio.sleep(3)
        await asyncio.to_thread(
            helpers.wait_until, lambda: follower.cursors[-1][0] > rollout.restarted_at, 30, 0.1, "resume"
        )
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        report = await pumping
    assert rollout.in_flight == "OK", f"the call in flight at SIGTERM ended {rollout.in_flight}"
    assert rollout.exit_code == 0
    cursors = [c for _, c in follower.cursors]
    assert cursors == sorted(set(cursors)), "the feed repeated or reordered items across the restart"
    assert follower.breaks, "the subscriber never noticed the restart"
    assert not rest.failed, (
        f"{len(rest.failed)} of {rest.calls} REST calls failed after retries: {rest.failed[:3]}"
    )
    assert report.acked_ticks == report.sent, report.as_dict()


def test_sigterm_health_reports_not_serving_while_still_serving(mesh: ProvingMesh) -> None:
    rollout = _roll(mesh, "aggregator")
    # Polled every 10 ms: for its drain period a stopping server keeps answering its health checks
    # (and every other call), NOT_SERVING, so that a load balancer takes it out before it stops.
    # (The first probes may come before the process has handled the signal.)
    seen = [status for at, status in rollout.health_after_sigterm if at < DRAIN_SECONDS - 0.2]
    assert NOT_SERVING in seen, seen
    draining = seen[seen.index(NOT_SERVING) :]
    assert len(draining) >= 10, seen
    assert all(status == NOT_SERVING for status in draining), seen

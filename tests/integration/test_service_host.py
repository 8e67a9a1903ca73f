"""The shared service host on a real loopback gRPC server: stopping during warm-up, and the drain."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import RuntimeConfig
from services.common.server import ServiceHost

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _host(drain_seconds: float) -> ServiceHost:
    env = {
        "MT5MESH_API_KEY": "k" * 32,
        "PROBE_LISTEN": "127.0.0.1:0",
        "PROBE_METRICS_PORT": "0",
        "MT5MESH_HEALTH_PROBE_SECONDS": "0.05",
        "MT5MESH_SHUTDOWN_GRACE_SECONDS": "1",
        "MT5MESH_DRAIN_SECONDS": str(drain_seconds),
    }
    config = RuntimeConfig.from_env(env, service_name="probe", default_port=0, default_metrics_port=0)
    return ServiceHost(config, "test.Probe")


async def _nothing() -> None:
    return None


async def _ready() -> bool:
    return True


async def _health(port: int) -> int | None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.aio.AioRpcError:
            return None
    return int(reply.status)


async def _until_serving(host: ServiceHost) -> None:
    async with asyncio.timeout(10):
        while True:  # polls the real server, as a load balancer would
            if host.port and await _health(host.port) == SERVING:
                return
            await asyncio.sleep(0.02)


async def test_stop_requested_during_a_warmup_that_never_ends_stops_promptly() -> None:
    host = _host(drain_seconds=30)
    warming = asyncio.Event()
    cancelled = asyncio.Event()

    async def warmup() -> None:
        warming.set()
        try:
            await asyncio.Event().wait()  # e.g. an upstream that never answers
        finally:
            cancelled.set()

    run = asyncio.create_task(host.run(warmup=warmup, ready=_ready, cleanup=_nothing))
    await warming.wait()
    started = time.monotonic()
    host.request_stop()
    async with asyncio.timeout(10):
        await run
    # No drain: it never served.
    assert time.monotonic() - started < 5
    assert cancelled.is_set()


async def test_stop_drain_period_not_serving_while_still_answering_then_stopped() -> None:
    host = _host(drain_seconds=1.0)
    run = asyncio.create_task(host.run(warmup=_nothing, ready=_ready, cleanup=_nothing))
    await _until_serving(host)
    stopped_at = time.monotonic()
    host.request_stop()
    answers: list[tuple[float, int | None]] = []
    while not run.done():
        answers.append((time.monotonic() - stopped_at, await _health(host.port)))
        await asyncio.sleep(0.05)
    await run
    draining = [status for at, status in answers if 0.1 < at < 0.9]
    assert len(draining) >= 5
    assert set(draining) == {NOT_SERVING}, answers
    assert await _health(host.port) is None


async def test_second_stop_request_skips_the_drain() -> None:
    host = _host(drain_seconds=30)
    run = asyncio.create_task(host.run(warmup=_nothing, ready=_ready, cleanup=_nothing))
    await _until_serving(host)
    host.request_stop()
    await asyncio.sleep(0.2)
    assert await _health(host.port) == NOT_SERVING
    started = time.monotonic()
    host.request_stop()
    async with asyncio.timeout(10):
        await run
    assert time.monotonic() - started < 5

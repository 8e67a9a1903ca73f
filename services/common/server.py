"""The grpc.aio server every service runs: health with real status, reflection, auth, graceful stop.

Health is NOT_SERVING while the service warms up, whenever its readiness probe fails (for example
the database is unreachable), and from SIGTERM until ``server.stop(grace)`` has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine

from services.common import db, telemetry
from services.common.auth import ApiKeyInterceptor
from services.common.config import RuntimeConfig
from services.common.errors import RequestGuardInterceptor

logger = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]
# Above Envoy's max_request_headers_kb (32): a request head Envoy lets through, which it forwards
# with headers of its own (x-envoy-original-path repeats a long URL), must reach the service and
# get its 401/400 rather than RESOURCE_EXHAUSTED (HTTP 429). gRPC's defaults are 8 KiB / 16 KiB.
MAX_METADATA_BYTES = 96 * 1024


class ServiceHost:
    """Owns one service's grpc.aio server and its health status."""

    def __init__(
        self,
        config: RuntimeConfig,
        service_name: str,
        *,
        open_methods: Iterable[str] = (),
        also_served: Iterable[str] = (),
    ) -> None:
        self.config = config
        self.service_name = service_name
        self._also_served = tuple(also_served)  # further services registered on the server (reflection)
        self.health = health.aio.HealthServicer()
        interceptors = [
            *telemetry.server_interceptors(bool(config.otlp_endpoint)),
            ApiKeyInterceptor(config.api_keys, open_methods),
            RequestGuardInterceptor(),
        ]
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_concurrent_streams", config.max_concurrent_streams),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.so_reuseport", 0),
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES + 16 * 1024),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self._serving: tuple[bool, bool] | None = None  # ("" status, named service status)
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # a second SIGTERM/SIGINT: stop without the drain period

    async def start(self) -> int:
        """Bind and start the server, NOT_SERVING until told otherwise; return the bound port."""
        reflection.enable_server_reflection(
            (
                self.service_name,
                *self._also_served,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = self.server.add_insecure_port(self.config.listen_address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {self.config.listen_address}")
        await self.set_serving(False)
        await self.server.start()
        logger.info("listening on %s (port %d)", self.config.listen_address, self.port)
        return self.port

    async def set_serving(self, serving: bool, service_serving: bool | None = None) -> None:
        """Report SERVING or NOT_SERVING for the server ("") and for the named service.

        The named service follows the server unless ``service_serving`` says otherwise: a service
        can be up and answering (the server is SERVING) while its main function is not ready yet.
        """
        named = serving if service_serving is None else serving and service_serving
        if (serving, named) == self._serving:
            return
        for name, ok in (("", serving), (self.service_name, named)):
            status = (
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self.health.set(name, status)
        logger.info(
            "health: %s%s",
            "SERVING" if serving else "NOT_SERVING",
            "" if named == serving else f" ({self.service_name}: {'SERVING' if named else 'NOT_SERVING'})",
        )
        self._serving = (serving, named)

    @property
    def serving(self) -> bool:
        """What health last reported for the named service."""
        return self._serving is not None and self._serving[1]

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does); a second request skips the drain period."""
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()

    async def run(
        self,
        *,
        warmup: Callable[[], Awaitable[None]],
        ready: Probe,
        cleanup: Callable[[], Awaitable[None]],
        service_ready: Callable[[], bool] = lambda: True,
    ) -> None:
        """Serve until SIGTERM/SIGINT: warm up, then track readiness, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        if self.config.metrics_port:
            prometheus_client.start_http_server(self.config.metrics_port, addr="0.0.0.0")  # noqa: S104
        await self.start()
        monitor: asyncio.Task[None] | None = None
        try:
            if await self._warmed_up(warmup):
                monitor = asyncio.create_task(self._track_readiness(ready, service_ready), name="readiness")
                await self._stopping.wait()
        finally:
            # From here on health stays NOT_SERVING whatever the readiness probe says.
            await self.health.enter_graceful_shutdown()
            if monitor is not None:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
            if monitor is not None and self._stopping.is_set() and self.config.drain_seconds > 0:
                # Still serving, NOT_SERVING: load balancers take this process out before it stops.
                logger.info(
                    "stopping: NOT_SERVING for %.1fs before refusing calls", self.config.drain_seconds
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), self.config.drain_seconds)
            logger.info("stopping: finishing calls for up to %.1fs", self.config.shutdown_grace_seconds)
            await self.server.stop(self.config.shutdown_grace_seconds)
            await cleanup()
            logger.info("stopped")

    async def _warmed_up(self, warmup: Callable[[], Awaitable[None]]) -> bool:
        """Run the warm-up unless a stop is requested first (then cancel it); whether it finished."""
        warming = asyncio.ensure_future(warmup())
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({warming, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not warming.done():
                warming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warming
        if warming.cancelled():
            logger.info("stop requested during the warm-up")
            return False
        warming.result()  # a failed warm-up fails the service
        return True

    async def _track_readiness(self, ready: Probe, service_ready: Callable[[], bool]) -> None:
        while True:
            try:
                ok = await asyncio.wait_for(ready(), timeout=self.config.health_probe_seconds * 2)
            except Exception:  # a failing probe means not ready, whatever the cause
                logger.warning("readiness probe failed", exc_info=True)
                ok = False
            await self.set_serving(ok, service_ready())
            await asyncio.sleep(self.config.health_probe_seconds)


async def run_with_database(
    host: ServiceHost,
    engine: Engine,
    work: Callable[[], Coroutine[Any, Any, None]],
    *,
    prepare: Callable[[], Awaitable[None]] | None = None,
    close: Callable[[], Awaitable[None]] | None = None,
    service_ready: Callable[[], bool] = lambda: True,
) -> None:
    """Serve a service whose heart is one background task over a database.

    Warm-up migrates (waiting while the database is unreachable), runs ``prepare`` (e.g. restore
    state) and starts ``work``. The server is ready while that task runs and the database
    answers: a task that died would otherwise leave every caller waiting forever. The named
    service is ready when, in addition, ``service_ready`` holds (e.g. a model is loaded).
    """
    tasks: list[asyncio.Task[None]] = []

    async def warmup() -> None:
        await db.migrate_when_reachable(engine)
        if prepare is not None:
            await prepare()
        task = asyncio.create_task(work(), name=f"{host.service_name} work")
        task.add_done_callback(_report_failure)
        tasks.append(task)

    async def ready() -> bool:
        if not tasks or tasks[0].done():
            return False
        return await asyncio.to_thread(db.ping, engine)

    async def cleanup() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if close is not None:
            await close()
        engine.dispose()

    await host.run(warmup=warmup, ready=ready, cleanup=cleanup, service_ready=service_ready)


def _report_failure(task: asyncio.Task[None]) -> None:
    # The work only ends by cancellation; anything else is a bug, which readiness now reports too.
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s stopped", task.get_name(), exc_info=task.exception())

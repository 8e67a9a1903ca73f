"""Builds and runs the aggregator service: storage, the stage, the servicer, health."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mt5.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc

from services.aggregator.config import SERVICE_NAME, AggregatorConfig
from services.aggregator.servicer import AggregatorServicer
from services.aggregator.stage import AggregationStage
from services.aggregator.store import AggregatorStore
from services.common import db
from services.common.channels import open_channel
from services.common.server import ServiceHost

logger = logging.getLogger(__name__)


def _report_failure(task: asyncio.Task[None]) -> None:
    # The stage only ends by cancellation; anything else is a bug that readiness now reports.
    if not task.cancelled() and task.exception() is not None:
        logger.error("the aggregation stage stopped", exc_info=task.exception())


async def serve(config: AggregatorConfig, host: ServiceHost | None = None) -> None:
    """Run until SIGTERM (or ``host.request_stop()``)."""
    engine = db.create_db_engine(config.runtime.database_url)
    ingest = open_channel(
        config.ingest_address,
        config.runtime.api_keys[0],
        tracing=bool(config.runtime.otlp_endpoint),
        max_message_bytes=config.runtime.max_message_bytes,
    )
    stage = AggregationStage(config, AggregatorStore(engine), ingest)
    host = host or ServiceHost(config.runtime, SERVICE_NAME)
    pb_grpc.add_AggregatorServiceServicer_to_server(
        AggregatorServicer(stage, config.max_subscribers), host.server
    )
    running: list[asyncio.Task[None]] = []

    async def warmup() -> None:
        await db.migrate_when_reachable(engine)
        await stage.restore()
        task = asyncio.create_task(stage.run(), name="aggregation")
        task.add_done_callback(_report_failure)
        running.append(task)

    async def ready() -> bool:
        if not running or running[0].done():
            return False
        return await asyncio.to_thread(db.ping, engine)

    async def cleanup() -> None:
        for task in running:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await ingest.close()
        engine.dispose()

    await host.run(warmup=warmup, ready=ready, cleanup=cleanup)

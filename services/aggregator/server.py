"""Builds and runs the aggregator service: storage, the stage, the servicer, health."""

from __future__ import annotations

from mt5.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc

from services.aggregator import metrics
from services.aggregator.config import SERVICE_NAME, AggregatorConfig
from services.aggregator.servicer import AggregatorServicer
from services.aggregator.stage import AggregationStage
from services.aggregator.store import AggregatorStore
from services.common import db
from services.common import metrics as common_metrics
from services.common.channels import open_channel
from services.common.schema import agg_candle_log
from services.common.server import ServiceHost, run_with_database


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
    common_metrics.FEED_LAG.set_head(metrics.CANDLES_FEED, lambda: db.max_id(engine, agg_candle_log))
    pb_grpc.add_AggregatorServiceServicer_to_server(
        AggregatorServicer(stage, config.max_subscribers), host.server
    )
    await run_with_database(host, engine, stage.run, prepare=stage.restore, close=ingest.close)

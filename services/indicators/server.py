"""Builds and runs the indicators service: storage, the stage, the servicer, health."""

from __future__ import annotations

from mt5.indicators.v1 import indicators_service_pb2_grpc as pb_grpc

from services.common import db
from services.common import metrics as common_metrics
from services.common.channels import open_channel
from services.common.schema import ind_log
from services.common.server import ServiceHost, run_with_database
from services.indicators import metrics
from services.indicators.config import SERVICE_NAME, IndicatorsConfig
from services.indicators.servicer import IndicatorsServicer
from services.indicators.stage import IndicatorStage
from services.indicators.store import IndicatorStore


async def serve(config: IndicatorsConfig, host: ServiceHost | None = None) -> None:
    """Run until SIGTERM (or ``host.request_stop()``); NOT_SERVING until every series is warm."""
    engine = db.create_db_engine(config.runtime.database_url)
    aggregator = open_channel(
        config.aggregator_address,
        config.runtime.api_keys[0],
        tracing=bool(config.runtime.otlp_endpoint),
        max_message_bytes=config.runtime.max_message_bytes,
        unary_deadline=30.0,
    )
    stage = IndicatorStage(config, IndicatorStore(engine), aggregator)
    host = host or ServiceHost(config.runtime, SERVICE_NAME)
    common_metrics.FEED_LAG.set_head(metrics.VALUES_FEED, lambda: db.max_id(engine, ind_log))
    pb_grpc.add_IndicatorsServiceServicer_to_server(
        IndicatorsServicer(stage, config.max_subscribers), host.server
    )
    await run_with_database(host, engine, stage.run, prepare=stage.restore, close=aggregator.close)

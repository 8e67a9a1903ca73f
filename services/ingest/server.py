"""Builds and runs the ingest service: storage, commit queue, servicer, health."""

from __future__ import annotations

from mt5.ingest.v1 import ingest_service_pb2_grpc as pb_grpc

from services.common import db
from services.common import metrics as common_metrics
from services.common.peers import PeerHealth
from services.common.schema import ingest_candle_log, ingest_ticks
from services.common.server import ServiceHost, run_with_database
from services.ingest import metrics
from services.ingest.commits import CommitQueue
from services.ingest.config import SERVICE_NAME, IngestConfig
from services.ingest.servicer import IngestServicer
from services.ingest.store import IngestStore

OPEN_METHODS = (f"/{SERVICE_NAME}/CheckHealth",)


async def serve(config: IngestConfig, host: ServiceHost | None = None) -> None:
    """Run until SIGTERM (or ``host.request_stop()``)."""
    engine = db.create_db_engine(config.runtime.database_url)
    store = IngestStore(engine)
    commits = CommitQueue(
        store, max_pending_jobs=config.max_pending_commits, max_group_rows=config.max_group_rows
    )
    peers = PeerHealth(config.mesh_peers, deadline_seconds=config.peer_check_seconds)
    host = host or ServiceHost(config.runtime, SERVICE_NAME, open_methods=OPEN_METHODS)
    common_metrics.FEED_LAG.set_head(metrics.TICKS_FEED, lambda: db.max_id(engine, ingest_ticks))
    common_metrics.FEED_LAG.set_head(metrics.CANDLES_FEED, lambda: db.max_id(engine, ingest_candle_log))

    async def unhealthy_services() -> list[str]:
        down = await peers.not_serving()
        return down if host.serving else ["ingest", *down]

    pb_grpc.add_IngestServiceServicer_to_server(
        IngestServicer(config, commits, store, unhealthy_services), host.server
    )
    await run_with_database(host, engine, commits.run, close=peers.close)

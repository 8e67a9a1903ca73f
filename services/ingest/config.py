"""Ingest's configuration, read once from the environment."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from services.common import env as envreader
from services.common.config import RuntimeConfig

SERVICE_NAME = "mt5.ingest.v1.IngestService"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9101


@dataclasses.dataclass(frozen=True, slots=True)
class IngestConfig:
    """Everything the ingest service can be told."""

    runtime: RuntimeConfig
    mesh_peers: Mapping[str, str]
    max_pending_commits: int
    max_group_rows: int
    max_in_flight_batches: int
    max_subscribers: int
    feed_page_size: int
    feed_poll_seconds: float
    peer_check_seconds: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> IngestConfig:
        """Read ``INGEST_*`` and the shared variables."""
        return cls(
            runtime=RuntimeConfig.from_env(
                env,
                service_name="ingest",
                default_port=DEFAULT_PORT,
                default_metrics_port=DEFAULT_METRICS_PORT,
            ),
            # The other services whose health GET /health reports, e.g. "aggregator=127.0.0.1:50052".
            mesh_peers=envreader.get_address_map(env, "INGEST_MESH_PEERS"),
            max_pending_commits=envreader.get_int(env, "INGEST_MAX_PENDING_COMMITS", 256, minimum=1),
            max_group_rows=envreader.get_int(env, "INGEST_MAX_GROUP_ROWS", 50_000, minimum=1),
            max_in_flight_batches=envreader.get_int(env, "INGEST_MAX_IN_FLIGHT_BATCHES", 8, minimum=1),
            max_subscribers=envreader.get_int(env, "INGEST_MAX_SUBSCRIBERS", 32, minimum=1),
            feed_page_size=envreader.get_int(env, "INGEST_FEED_PAGE_SIZE", 1000, minimum=1),
            feed_poll_seconds=envreader.get_float(env, "INGEST_FEED_POLL_SECONDS", 1.0, minimum=0.01),
            peer_check_seconds=envreader.get_float(env, "INGEST_PEER_CHECK_SECONDS", 1.0, minimum=0.05),
        )

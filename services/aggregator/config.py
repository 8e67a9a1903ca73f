"""Aggregator's configuration, read once from the environment."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping

from services.aggregator.bars import AggregationSettings
from services.common import env as envreader
from services.common.config import RuntimeConfig

SERVICE_NAME = "mt5.aggregator.v1.AggregatorService"
DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9102


@dataclasses.dataclass(frozen=True, slots=True)
class AggregatorConfig:
    """Everything the aggregator service can be told."""

    runtime: RuntimeConfig
    ingest_address: str
    bars: AggregationSettings
    clock_seconds: float
    max_pending_bars: int
    max_subscribers: int
    forming_queue: int
    forming_max_delay: float
    feed_page_size: int
    feed_poll_seconds: float
    shard_count: int
    shard_index: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AggregatorConfig:
        """Read ``AGGREGATOR_*`` and the shared variables."""
        # Shard k of N owns the symbols whose CRC-32 modulo N is k (services.common.market.shard_of).
        count = envreader.get_int(env, "AGGREGATOR_SHARD_COUNT", 1, minimum=1)
        return cls(
            runtime=RuntimeConfig.from_env(
                env,
                service_name="aggregator",
                default_port=DEFAULT_PORT,
                default_metrics_port=DEFAULT_METRICS_PORT,
            ),
            ingest_address=envreader.get_str(env, "AGGREGATOR_INGEST_ADDRESS", "127.0.0.1:50051"),
            bars=AggregationSettings(
                lateness=dt.timedelta(seconds=envreader.get_float(env, "AGGREGATOR_LATENESS_SECONDS", 2.0)),
                grace=dt.timedelta(seconds=envreader.get_float(env, "AGGREGATOR_GRACE_SECONDS", 5.0)),
                retention=dt.timedelta(
                    seconds=envreader.get_float(env, "AGGREGATOR_RETENTION_SECONDS", 3600.0)
                ),
            ),
            # How often the wall clock finalizes bars of quiet markets.
            clock_seconds=envreader.get_float(env, "AGGREGATOR_CLOCK_SECONDS", 0.5, minimum=0.01),
            # Past this many uncommitted bar versions, reading input pauses until a commit ends.
            max_pending_bars=envreader.get_int(env, "AGGREGATOR_MAX_PENDING_BARS", 50_000, minimum=1),
            max_subscribers=envreader.get_int(env, "AGGREGATOR_MAX_SUBSCRIBERS", 32, minimum=1),
            # Series with an unread forming update a subscriber may have before it is cut off.
            forming_queue=envreader.get_int(env, "AGGREGATOR_FORMING_QUEUE", 10_000, minimum=1),
            # Seconds its oldest unread forming update may wait before it is cut off.
            forming_max_delay=envreader.get_float(
                env, "AGGREGATOR_FORMING_MAX_DELAY_SECONDS", 5.0, minimum=0.01
            ),
            feed_page_size=envreader.get_int(env, "AGGREGATOR_FEED_PAGE_SIZE", 1000, minimum=1),
            feed_poll_seconds=envreader.get_float(env, "AGGREGATOR_FEED_POLL_SECONDS", 1.0, minimum=0.01),
            shard_count=count,
            shard_index=envreader.get_shard_index(env, "AGGREGATOR_SHARD_INDEX", count),
        )

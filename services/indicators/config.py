"""Indicators' configuration, read once from the environment."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from services.common import env as envreader
from services.common.config import RuntimeConfig
from services.indicators.engine import IndicatorSettings

SERVICE_NAME = "mt5.indicators.v1.IndicatorsService"
DEFAULT_PORT = 50053
DEFAULT_METRICS_PORT = 9103


@dataclasses.dataclass(frozen=True, slots=True)
class IndicatorsConfig:
    """Everything the indicators service can be told."""

    runtime: RuntimeConfig
    aggregator_address: str
    settings: IndicatorSettings
    max_subscribers: int
    forming_queue: int
    forming_max_delay: float
    feed_page_size: int
    feed_poll_seconds: float
    shard_count: int
    shard_index: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> IndicatorsConfig:
        """Read ``INDICATORS_*`` and the shared variables."""
        # Shard k of N owns the symbols whose CRC-32 modulo N is k (services.common.market.shard_of).
        count = envreader.get_int(env, "INDICATORS_SHARD_COUNT", 1, minimum=1)
        return cls(
            runtime=RuntimeConfig.from_env(
                env,
                service_name="indicators",
                default_port=DEFAULT_PORT,
                default_metrics_port=DEFAULT_METRICS_PORT,
            ),
            # "{shard}" in the address is replaced by this shard's index, e.g.
            # "aggregator-{shard}.aggregator:50052": provisional values need the forming bars of this
            # shard's symbols, which only the aggregator shard with the same index has (equal counts).
            aggregator_address=envreader.get_str(
                env, "INDICATORS_AGGREGATOR_ADDRESS", "127.0.0.1:50052"
            ).replace("{shard}", str(envreader.get_shard_index(env, "INDICATORS_SHARD_INDEX", count))),
            settings=IndicatorSettings(
                rsi_period=envreader.get_int(env, "INDICATORS_RSI_PERIOD", 14, minimum=2),
                macd_fast=envreader.get_int(env, "INDICATORS_MACD_FAST", 12, minimum=2),
                macd_slow=envreader.get_int(env, "INDICATORS_MACD_SLOW", 26, minimum=2),
                macd_signal=envreader.get_int(env, "INDICATORS_MACD_SIGNAL", 9, minimum=1),
                atr_period=envreader.get_int(env, "INDICATORS_ATR_PERIOD", 14, minimum=1),
                bb_period=envreader.get_int(env, "INDICATORS_BB_PERIOD", 20, minimum=2),
                bb_dev_up=envreader.get_float(env, "INDICATORS_BB_DEV_UP", 2.0),
                bb_dev_down=envreader.get_float(env, "INDICATORS_BB_DEV_DOWN", 2.0),
            ),
            max_subscribers=envreader.get_int(env, "INDICATORS_MAX_SUBSCRIBERS", 32, minimum=1),
            # Series with an unread provisional update a subscriber may have before it is cut off.
            forming_queue=envreader.get_int(env, "INDICATORS_FORMING_QUEUE", 10_000, minimum=1),
            # Seconds its oldest unread forming update may wait before it is cut off.
            forming_max_delay=envreader.get_float(
                env, "INDICATORS_FORMING_MAX_DELAY_SECONDS", 5.0, minimum=0.01
            ),
            feed_page_size=envreader.get_int(env, "INDICATORS_FEED_PAGE_SIZE", 1000, minimum=1),
            feed_poll_seconds=envreader.get_float(env, "INDICATORS_FEED_POLL_SECONDS", 1.0, minimum=0.01),
            shard_count=count,
            shard_index=envreader.get_shard_index(env, "INDICATORS_SHARD_INDEX", count),
        )

"""Aggregator's configuration, read once from the environment."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from services.common.config import RuntimeConfig

SERVICE_NAME = "mt5.aggregator.v1.AggregatorService"
DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9102


@dataclasses.dataclass(frozen=True, slots=True)
class AggregatorConfig:
    """Everything the aggregator service can be told."""

    runtime: RuntimeConfig

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AggregatorConfig:
        """Read the shared variables (`AGGREGATOR_LISTEN`, `AGGREGATOR_METRICS_PORT`, ...)."""
        return cls(
            runtime=RuntimeConfig.from_env(
                env,
                service_name="aggregator",
                default_port=DEFAULT_PORT,
                default_metrics_port=DEFAULT_METRICS_PORT,
            )
        )

"""Indicators's configuration, read once from the environment."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from services.common.config import RuntimeConfig

SERVICE_NAME = "mt5.indicators.v1.IndicatorsService"
DEFAULT_PORT = 50053
DEFAULT_METRICS_PORT = 9103


@dataclasses.dataclass(frozen=True, slots=True)
class IndicatorsConfig:
    """Everything the indicators service can be told."""

    runtime: RuntimeConfig

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> IndicatorsConfig:
        """Read the shared variables (`INDICATORS_LISTEN`, `INDICATORS_METRICS_PORT`, ...)."""
        return cls(
            runtime=RuntimeConfig.from_env(
                env,
                service_name="indicators",
                default_port=DEFAULT_PORT,
                default_metrics_port=DEFAULT_METRICS_PORT,
            )
        )

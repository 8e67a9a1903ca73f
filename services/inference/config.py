"""Inference's configuration, read once from the environment."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from services.common.config import RuntimeConfig

SERVICE_NAME = "mt5.inference.v1.InferenceService"
DEFAULT_PORT = 50054
DEFAULT_METRICS_PORT = 9104


@dataclasses.dataclass(frozen=True, slots=True)
class InferenceConfig:
    """Everything the inference service can be told."""

    runtime: RuntimeConfig

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InferenceConfig:
        """Read the shared variables (`INFERENCE_LISTEN`, `INFERENCE_METRICS_PORT`, ...)."""
        return cls(
            runtime=RuntimeConfig.from_env(
                env,
                service_name="inference",
                default_port=DEFAULT_PORT,
                default_metrics_port=DEFAULT_METRICS_PORT,
            )
        )

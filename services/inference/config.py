"""Inference's configuration, read once from the environment."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping

from services.common import env as envreader
from services.common.config import RuntimeConfig

SERVICE_NAME = "mt5.inference.v1.InferenceService"
DEFAULT_PORT = 50054
DEFAULT_METRICS_PORT = 9104


@dataclasses.dataclass(frozen=True, slots=True)
class InferenceConfig:
    """Everything the inference service can be told."""

    runtime: RuntimeConfig
    indicators_address: str
    models_dir: pathlib.Path
    model_name: str
    reload_seconds: float
    max_batch: int
    max_wait_seconds: float
    max_queue: int
    max_subscribers: int
    feed_page_size: int
    feed_poll_seconds: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InferenceConfig:
        """Read ``INFERENCE_*`` and the shared variables."""
        return cls(
            runtime=RuntimeConfig.from_env(
                env,
                service_name="inference",
                default_port=DEFAULT_PORT,
                default_metrics_port=DEFAULT_METRICS_PORT,
            ),
            indicators_address=envreader.get_str(env, "INFERENCE_INDICATORS_ADDRESS", "127.0.0.1:50053"),
            models_dir=pathlib.Path(envreader.get_str(env, "INFERENCE_MODELS_DIR", "models")),
            model_name=envreader.get_str(env, "INFERENCE_MODEL_NAME", "signals"),
            reload_seconds=envreader.get_float(env, "INFERENCE_RELOAD_SECONDS", 5.0, minimum=0.05),
            # Dynamic micro-batching: a forward pass takes up to MAX_BATCH rows, waiting at most
            # MAX_WAIT after the first one for others to join.
            max_batch=envreader.get_int(env, "INFERENCE_MAX_BATCH", 512, minimum=1),
            max_wait_seconds=envreader.get_float(env, "INFERENCE_MAX_WAIT_MS", 2.0) / 1000,
            max_queue=envreader.get_int(env, "INFERENCE_MAX_QUEUE", 10_000, minimum=1),
            max_subscribers=envreader.get_int(env, "INFERENCE_MAX_SUBSCRIBERS", 32, minimum=1),
            feed_page_size=envreader.get_int(env, "INFERENCE_FEED_PAGE_SIZE", 1000, minimum=1),
            feed_poll_seconds=envreader.get_float(env, "INFERENCE_FEED_POLL_SECONDS", 1.0, minimum=0.01),
        )

"""Inference's Prometheus metrics (served on the metrics port by the shared runtime)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SIGNALS = Counter("mt5_inference_signals_total", "Signal versions committed.")
ROWS_REJECTED = Counter(
    "mt5_inference_rows_rejected_total",
    "Candles that got no signal because their feature row could not reach the model.",
    # warming_up (not enough history or an indicator still warming up); non_finite (a value the
    # model cannot take: not finite in float32, or out of its range once standardized);
    # model_changed (built for the model served before a new version of another width)
    ["reason"],
)
MODELS_REFUSED = Counter(
    "mt5_inference_models_refused_total", "Model versions refused at load (tampered, pickled, malformed)."
)
MODEL_INFO = Gauge("mt5_inference_model_info", "1 for the model version being served.", ["model", "version"])
BATCH_ROWS = Histogram(
    "mt5_inference_batch_size",
    "Rows scored per forward pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
QUEUE_SECONDS = Histogram(
    "mt5_inference_queue_seconds",
    "Time rows waited for their batch.",
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
SCORE_SECONDS = Histogram(
    "mt5_inference_score_seconds",
    "Time of one forward pass.",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
)


def set_model(name: str, version: str, previous: str | None) -> None:
    """Point the model-info gauge at the version now served."""
    if previous is not None:
        MODEL_INFO.labels(model=name, version=previous).set(0)
    MODEL_INFO.labels(model=name, version=version).set(1)

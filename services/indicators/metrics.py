"""Indicators' Prometheus metrics (served on the metrics port by the shared runtime)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

VALUES = Counter("mt5_indicators_values_total", "Final indicator versions committed.")
UPDATE_SECONDS = Histogram(
    "mt5_indicators_update_seconds",
    "Time to update every indicator of one series for one bar.",
    buckets=(0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.01, 0.1),
)

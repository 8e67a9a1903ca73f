"""Aggregator's Prometheus metrics (served on the metrics port by the shared runtime)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TICKS = Counter("mt5_aggregator_ticks_total", "Ticks read from ingest's feed.")
BARS = Counter(
    "mt5_aggregator_bars_total", "Final bar versions published, by timeframe and kind.", ["timeframe", "kind"]
)
LATE_DROPPED = Gauge(
    "mt5_aggregator_late_ticks_dropped", "Ticks older than the retention window, not applied."
)
EA_DISAGREEMENTS = Counter(
    "mt5_aggregator_ea_disagreements_total",
    "Final bars where the EA's bar differs from the bar built from ticks.",
)
COMMIT_SECONDS = Histogram(
    "mt5_aggregator_commit_seconds",
    "Time to commit one unit of work.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

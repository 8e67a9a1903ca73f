"""Aggregator's Prometheus metrics (served on the metrics port by the shared runtime).

Also exported by the aggregator, from services.common.metrics: ``mt5_grpc_server_*``,
``mt5_db_query_seconds``, ``mt5_data_age_seconds{stage="aggregator"}`` (newest tick applied per
symbol) and ``mt5_feed_lag_*{feed="aggregator.candles"}`` (each subscriber's lag).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGE = "aggregator"
CANDLES_FEED = "aggregator.candles"

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
BAR_CLOSE_SECONDS = Histogram(
    "mt5_aggregator_bar_close_seconds",
    "From the end of a bar's interval to its first final version (the watermark's allowed lateness, "
    "or the grace period when ticks stop, plus processing), by timeframe.",
    ["timeframe"],
    buckets=(0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 300.0, 3600.0),
)
INPUT_CURSOR = Gauge(
    "mt5_aggregator_input_cursor", "The last cursor applied from each of ingest's feeds.", ["feed"]
)

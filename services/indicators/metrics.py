"""Indicators' Prometheus metrics (served on the metrics port by the shared runtime).

Also exported by indicators, from services.common.metrics: ``mt5_grpc_server_*``,
``mt5_db_query_seconds``, ``mt5_data_age_seconds{stage="indicators"}`` (end of the newest final bar
with values per symbol) and ``mt5_feed_lag_*{feed="indicators.values"}`` (each subscriber's lag).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

STAGE = "indicators"
VALUES_FEED = "indicators.values"

VALUES = Counter("mt5_indicators_values_total", "Final indicator versions committed.")
UPDATE_SECONDS = Histogram(
    "mt5_indicators_update_seconds",
    "Time to update every indicator of one series for one bar.",
    buckets=(0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.01, 0.1),
)
REVISIONS = Counter(
    "mt5_indicators_revisions_total",
    "Revised final bars whose indicator values were recomputed, by timeframe.",
    ["timeframe"],
)
REBUILDS = Counter(
    "mt5_indicators_rebuilds_total",
    "Series rebuilt from stored bars because a revision was older than the engine's checkpoints.",
)
COMMIT_SECONDS = Histogram(
    "mt5_indicators_commit_seconds",
    "Time to commit one unit of work (values and the input cursor).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

"""Ingest's Prometheus metrics (served on the metrics port by the shared runtime)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ITEMS = Counter(
    "mt5_ingest_items_total", "Candles and ticks accepted, by kind and outcome.", ["kind", "status"]
)
REJECTED = Counter("mt5_ingest_rejected_requests_total", "Requests rejected as bad input, by kind.", ["kind"])
COMMIT_SECONDS = Histogram(
    "mt5_ingest_commit_seconds",
    "Time to commit one group of requests.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
GROUP_ROWS = Histogram(
    "mt5_ingest_commit_group_rows",
    "Candles and ticks committed together in one transaction.",
    buckets=(1, 10, 100, 1_000, 5_000, 10_000, 50_000),
)
COMMIT_FAILURES = Counter("mt5_ingest_commit_failures_total", "Commit groups the database refused.")

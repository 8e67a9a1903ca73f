"""Ingest's Prometheus metrics (served on the metrics port by the shared runtime).

Also exported by ingest, from services.common.metrics: ``mt5_grpc_server_*`` (requests by method and
code), ``mt5_db_query_seconds``, ``mt5_data_age_seconds{stage="ingest"}`` (newest tick or EA candle
per symbol) and ``mt5_feed_lag_*{feed="ingest.ticks"|"ingest.candles"}`` (each subscriber's lag).
Duplicates are ``mt5_ingest_items_total{status="duplicate"}``.
"""

from __future__ import annotations

import re

from prometheus_client import Counter, Histogram

STAGE = "ingest"
TICKS_FEED = "ingest.ticks"
CANDLES_FEED = "ingest.candles"

ITEMS = Counter(
    "mt5_ingest_items_total", "Candles and ticks accepted, by kind and outcome.", ["kind", "status"]
)
REJECTED = Counter(
    "mt5_ingest_rejected_requests_total",
    "Requests (or streamed batches) rejected as bad input, by kind and by the field of the first "
    "violation (e.g. high, ts, symbol).",
    ["kind", "reason"],
)
REPLAYED_BATCHES = Counter(
    "mt5_ingest_replayed_batches_total",
    "Streamed batches re-sent after being committed already (acknowledged, not applied again).",
)
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

_INDEX = re.compile(r"\[\d+\]")


def rejection_reason(field: str) -> str:
    """A violation's field path as a bounded label: ``items[3].high`` -> ``high``, ``ticks`` -> ``ticks``.

    Paths are built by ingest's own validation from the proto's field names, so the set is bounded.
    """
    return _INDEX.sub("", field).rsplit(".", 1)[-1] or "request"

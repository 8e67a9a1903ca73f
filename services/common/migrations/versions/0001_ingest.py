"""Ingest tables: ticks, streamed batches, EA candles and the candle change log.

Revision ID: 0001_ingest
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from services.common.schema import Cursor, Price, UtcDateTime

revision = "0001_ingest"
down_revision = None
branch_labels = None
depends_on = None

_CANDLE_COLUMNS = ("open", "high", "low", "close", "volume", "spread")


def _timescale_available() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    found = bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"))
    return found.first() is not None


def upgrade() -> None:
    """Create the ingest tables; with TimescaleDB, time tables become compressed hypertables."""
    op.create_table(
        "ingest_ticks",
        sa.Column("id", Cursor, primary_key=True, autoincrement=True),
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("ts", UtcDateTime(), nullable=False),
        sa.Column("bid", Price, nullable=False),
        sa.Column("ask", Price, nullable=False),
        sa.Column("volume", Price, nullable=False),
        sa.Column("source_id", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_ingest_ticks"),
        sa.UniqueConstraint("symbol", "ts", "bid", "ask", name="uq_ingest_ticks_symbol_ts_bid_ask"),
    )
    op.create_table(
        "ingest_source_batches",
        sa.Column("source_id", sa.String(64), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("ticks", sa.Integer(), nullable=False),
        sa.Column("committed_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("source_id", "sequence", name="pk_ingest_source_batches"),
    )
    op.create_table(
        "ingest_candles",
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("timeframe", sa.String(3), nullable=False),
        sa.Column("ts", UtcDateTime(), nullable=False),
        *(sa.Column(name, Price, nullable=False) for name in _CANDLE_COLUMNS),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("symbol", "timeframe", "ts", name="pk_ingest_candles"),
    )
    op.create_table(
        "ingest_candle_log",
        sa.Column("id", Cursor, primary_key=True, autoincrement=True),
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("timeframe", sa.String(3), nullable=False),
        sa.Column("ts", UtcDateTime(), nullable=False),
        *(sa.Column(name, Price, nullable=False) for name in _CANDLE_COLUMNS),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ingest_candle_log"),
    )
    if _timescale_available():
        # Only the candle table is partitioned by time: a hypertable's unique keys must contain the
        # time column, which the tick table's cursor (id) cannot, and the cursor must stay global.
        op.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        op.execute(
            "SELECT create_hypertable('ingest_candles', 'ts', chunk_time_interval => INTERVAL '7 days')"
        )
        op.execute(
            "ALTER TABLE ingest_candles SET (timescaledb.compress, "
            "timescaledb.compress_segmentby = 'symbol, timeframe')"
        )
        op.execute("SELECT add_compression_policy('ingest_candles', INTERVAL '30 days')")


def downgrade() -> None:
    """Drop the ingest tables."""
    for table in ("ingest_candle_log", "ingest_candles", "ingest_source_batches", "ingest_ticks"):
        op.drop_table(table)

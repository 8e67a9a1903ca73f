"""Aggregator tables: latest bar versions, the final-version log, per-symbol state and input cursors.

Revision ID: 0002_aggregator
Revises: 0001_ingest
Create Date: 2026-11-21
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from services.common.schema import Cursor, Price, UtcDateTime

revision = "0002_aggregator"
down_revision = "0001_ingest"
branch_labels = None
depends_on = None


def _bar_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("timeframe", sa.String(3), nullable=False),
        sa.Column("ts", UtcDateTime(), nullable=False),
        *(
            sa.Column(name, Price, nullable=False)
            for name in ("open", "high", "low", "close", "volume", "spread")
        ),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("tick_count", sa.Integer(), nullable=False),
        sa.Column("source", sa.Integer(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("ea_disagrees", sa.Boolean(), nullable=False),
        sa.Column("spread_sum", Price, nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("first_us", sa.BigInteger(), nullable=False),
        sa.Column("last_us", sa.BigInteger(), nullable=False),
    ]


def upgrade() -> None:
    """Create the aggregator's tables."""
    op.create_table(
        "agg_candles",
        *_bar_columns(),
        sa.PrimaryKeyConstraint("symbol", "timeframe", "ts", name="pk_agg_candles"),
    )
    op.create_table(
        "agg_candle_log",
        sa.Column("id", Cursor, primary_key=True, autoincrement=True),
        *_bar_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_agg_candle_log"),
    )
    op.create_table(
        "agg_symbols",
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("latest_tick_us", sa.BigInteger(), nullable=True),
        sa.Column("last_tick_cursor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("symbol", name="pk_agg_symbols"),
    )
    op.create_table(
        "agg_cursors",
        sa.Column("feed", sa.String(16), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("feed", name="pk_agg_cursors"),
    )


def downgrade() -> None:
    """Drop the aggregator's tables."""
    for table in ("agg_cursors", "agg_symbols", "agg_candle_log", "agg_candles"):
        op.drop_table(table)

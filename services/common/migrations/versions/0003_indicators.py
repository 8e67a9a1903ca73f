"""Indicator tables, their cursor, and the seed's wide ``market_data`` view.

Revision ID: 0003_indicators
Revises: 0002_aggregator
Create Date: 2026-11-21
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from services.common.schema import Cursor, Price, UtcDateTime

revision = "0003_indicators"
down_revision = "0002_aggregator"
branch_labels = None
depends_on = None

_NAMES = ("rsi", "macd", "macd_signal", "macd_hist", "atr", "bb_upper", "bb_middle", "bb_lower")


def _columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("timeframe", sa.String(3), nullable=False),
        sa.Column("ts", UtcDateTime(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        *(sa.Column(name, Price, nullable=True) for name in _NAMES),
    ]


def upgrade() -> None:
    """Create the indicator tables and the market_data view."""
    op.create_table(
        "ind_values", *_columns(), sa.PrimaryKeyConstraint("symbol", "timeframe", "ts", name="pk_ind_values")
    )
    op.create_table(
        "ind_log",
        sa.Column("id", Cursor, primary_key=True, autoincrement=True),
        *_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_ind_log"),
    )
    op.create_table(
        "ind_cursors",
        sa.Column("feed", sa.String(16), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("feed", name="pk_ind_cursors"),
    )
    # The seed's wide table, so existing queries keep working: final candles of every timeframe
    # with their indicator values (NULL while warming up or not computed yet).
    op.execute(
        "CREATE VIEW market_data AS SELECT c.symbol, c.timeframe, c.ts, c.open, c.high, c.low, c.close, "
        "c.volume, c.spread, " + ", ".join(f"i.{n}" for n in _NAMES) + " "
        "FROM agg_candles c LEFT JOIN ind_values i "
        "ON i.symbol = c.symbol AND i.timeframe = c.timeframe AND i.ts = c.ts WHERE c.final"
    )


def downgrade() -> None:
    """Drop the view and the indicator tables."""
    op.execute("DROP VIEW market_data")
    for table in ("ind_cursors", "ind_log", "ind_values"):
        op.drop_table(table)

"""Signal tables of the inference service and its cursor.

Revision ID: 0005_inference
Revises: 0004_indicator_inputs
Create Date: 2026-11-21
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from services.common.schema import Cursor, UtcDateTime

revision = "0005_inference"
down_revision = "0004_indicator_inputs"
branch_labels = None
depends_on = None


def _columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("timeframe", sa.String(3), nullable=False),
        sa.Column("ts", UtcDateTime(), nullable=False),
        sa.Column("prob_up", sa.Float(precision=53), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("candle_revision", sa.Integer(), nullable=False),
    ]


def upgrade() -> None:
    """Create the signal tables."""
    op.create_table(
        "inf_signals",
        *_columns(),
        sa.PrimaryKeyConstraint("symbol", "timeframe", "ts", name="pk_inf_signals"),
    )
    op.create_table(
        "inf_signal_log",
        sa.Column("id", Cursor, primary_key=True, autoincrement=True),
        *_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_inf_signal_log"),
    )
    op.create_table(
        "inf_saved_signals",
        *_columns(),
        sa.Column("saved_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint(
            "symbol", "timeframe", "ts", "model_version", "candle_revision", name="pk_inf_saved_signals"
        ),
    )
    op.create_table(
        "inf_cursors",
        sa.Column("feed", sa.String(16), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("feed", name="pk_inf_cursors"),
    )


def downgrade() -> None:
    """Drop the signal tables."""
    for table in ("inf_cursors", "inf_saved_signals", "inf_signal_log", "inf_signals"):
        op.drop_table(table)

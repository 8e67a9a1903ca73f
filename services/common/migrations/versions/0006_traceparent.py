"""Trace context on every feed log (and on ticks), so a trace follows data from stage to stage.

Revision ID: 0006_traceparent
Revises: 0005_inference
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_traceparent"
down_revision = "0005_inference"
branch_labels = None
depends_on = None

_LOGS = ("ingest_ticks", "ingest_candle_log", "agg_candle_log", "ind_log", "inf_signal_log")


def upgrade() -> None:
    """Add a nullable ``traceparent`` to each log (NULL: not traced)."""
    for table in _LOGS:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("traceparent", sa.String(55), nullable=True))


def downgrade() -> None:
    """Drop the columns."""
    for table in _LOGS:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("traceparent")

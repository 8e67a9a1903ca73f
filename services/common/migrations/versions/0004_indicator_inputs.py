"""The bar's close, volume and spread stored with its indicator values (the model's inputs).

Revision ID: 0004_indicator_inputs
Revises: 0003_indicators
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from services.common.schema import Price

revision = "0004_indicator_inputs"
down_revision = "0003_indicators"
branch_labels = None
depends_on = None

_TABLES = ("ind_values", "ind_log")
_COLUMNS = ("close", "volume", "spread")


def upgrade() -> None:
    """Add the columns; rows stored before stay NULL (the inference service skips them)."""
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            for name in _COLUMNS:
                batch.add_column(sa.Column(name, Price, nullable=True))


def downgrade() -> None:
    """Drop the columns."""
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            for name in _COLUMNS:
                batch.drop_column(name)

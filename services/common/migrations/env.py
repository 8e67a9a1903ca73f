"""Alembic environment: runs on the connection that ``services.common.db.migrate`` hands over."""

from __future__ import annotations

from alembic import context

from services.common.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through services.common.db.migrate (mt5mesh migrate)")
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

"""Database engines and migrations: SQLite (WAL) embedded by default, PostgreSQL in production."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import alembic.command
import alembic.config
from sqlalchemy import Connection, Engine, Select, Table, create_engine, event, func, make_url, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from services.common import telemetry

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

MIGRATIONS = pathlib.Path(__file__).with_name("migrations")
# Any constant works; it only has to be the same in every process that migrates or writes.
MIGRATION_LOCK_KEY = 0x6D7435_6D6967
SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(engine: Engine) -> bool:
    """True for the embedded SQLite backend."""
    return engine.dialect.name == "sqlite"


def create_db_engine(url: str, *, pool_size: int = 5) -> Engine:
    """Create an engine; for SQLite, make the folder and switch the file to WAL.

    SQLite writers start with ``BEGIN IMMEDIATE`` (execution option ``sqlite_begin``) so that two
    processes never deadlock upgrading a read lock; ``synchronous=FULL`` makes a commit durable
    before it is acknowledged, which is the promise the services make.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # No pool_pre_ping: it costs a round trip per checkout on the hot path. A connection the
        # server dropped fails its transaction (the caller answers UNAVAILABLE; a re-send is
        # deduplicated) and SQLAlchemy discards the whole pool on such disconnect errors.
        engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size)
        telemetry.instrument_database(engine)
        return engine
    if parsed.database and parsed.database != ":memory:":
        pathlib.Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())

    telemetry.instrument_database(engine)
    return engine


def writer(engine: Engine) -> Engine:
    """The same engine, configured for write transactions."""
    return engine.execution_options(sqlite_begin="IMMEDIATE") if is_sqlite(engine) else engine


def dialect_insert(engine: Engine) -> Callable[..., Any]:
    """The ``insert`` construct with ``on_conflict_do_*`` for this engine's dialect."""
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


def changed(items: Sequence[_T], stored: Mapping[Any, _T], key: Callable[[_T], Any]) -> list[_T]:
    """The items that are new versions, in order.

    New means different from the stored version and from the previous item of the same key in
    ``items``: a unit of work can hold the same version twice (two revisions in a row that leave
    a later bar unchanged), and logging it twice would send it twice to every subscriber.
    """
    latest = dict(stored)
    fresh = []
    for item in items:
        k = key(item)
        if latest.get(k) != item:
            fresh.append(item)
            latest[k] = item
    return fresh


def upsert(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows, or update every non-key column of the row with the same primary key."""
    if not rows:
        return
    keys = [column.name for column in table.primary_key.columns]
    stmt = dialect_insert(conn.engine)(table)
    updates = {name: stmt.excluded[name] for name in rows[0] if name not in keys}
    conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=updates), list(rows))


@contextlib.contextmanager
def write_transaction(engine: Engine, lock_key: int) -> Iterator[Connection]:
    """A write transaction, serialized with every other writer holding ``lock_key``.

    Serializing a table's writers makes its auto-increment ids grow in commit order, which is
    what lets them serve as feed cursors. SQLite writers are serialized by ``BEGIN IMMEDIATE``;
    on PostgreSQL a transaction-scoped advisory lock does it across processes and replicas.
    """
    with writer(engine).begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key})
        yield conn


def page_after(
    table: Table, cursor: int, limit: int, symbols: Sequence[str] = (), timeframes: Sequence[str] = ()
) -> Select[Any]:
    """The rows of an append-only log after ``cursor`` (its ``id``), in cursor order, filtered."""
    query = select(table).where(table.c.id > cursor)
    if symbols:
        query = query.where(table.c.symbol.in_(symbols))
    if timeframes:
        query = query.where(table.c.timeframe.in_(timeframes))
    return query.order_by(table.c.id).limit(limit)


def max_id(engine: Engine, table: Table) -> int:
    """The newest cursor of an append-only log (its largest ``id``; 0 when empty)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.max(table.c.id))).scalar() or 0)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Apply Alembic migrations up to ``revision``; safe to run from several processes at once."""
    config = alembic.config.Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with writer(engine).begin() as conn:
        if not is_sqlite(engine):
            # Serialize concurrent migrators; SQLite's BEGIN IMMEDIATE already does.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = conn
        alembic.command.upgrade(config, revision)
    logger.info("database migrated to %s", revision)


async def migrate_when_reachable(engine: Engine, *, first_delay: float = 0.2, max_delay: float = 5.0) -> None:
    """Migrate, retrying with backoff while the database is unreachable (the service stays NOT_SERVING)."""
    delay = first_delay
    while True:
        try:
            await asyncio.to_thread(migrate, engine)
            return
        except OperationalError as exc:
            logger.warning("database unreachable, retrying in %.1fs: %s", delay, exc.orig or exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)


async def commit_retrying(commit: Callable[[], _T]) -> _T:
    """Run a blocking commit in a worker thread until it succeeds.

    A stage's commit fails only when the database is away (or the transaction hit a conflict): the
    work is kept and retried, in order, with backoff up to 5 s, so nothing is skipped or reordered.
    """
    delay = 0.1
    while True:
        try:
            return await asyncio.to_thread(commit)
        except Exception:  # the database is away: keep the work and retry
            logger.warning("commit failed; retrying in %.1fs", delay, exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def ping(engine: Engine) -> bool:
    """True when the database answers a trivial query."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return True

"""Database engines and migrations: SQLite (WAL) embedded by default, PostgreSQL in production.

Also the bounds that keep a caller's deadline meaningful in the database: statement timeouts from
the remaining deadline, interruption of work whose callers have gone, and threads of its own for
blocking reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import logging
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import alembic.command
import alembic.config
from sqlalchemy import Connection, Engine, Select, Table, create_engine, event, func, make_url, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from services.common import telemetry

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
_P = ParamSpec("_P")

MIGRATIONS = pathlib.Path(__file__).with_name("migrations")
# Any constant works; it only has to be the same in every process that migrates or writes.
MIGRATION_LOCK_KEY = 0x6D7435_6D6967
SQLITE_BUSY_TIMEOUT_MS = 30_000
# A statement bounded by a caller's deadline gives up this long after it: gRPC answers
# DEADLINE_EXCEEDED itself at the deadline, and the database error never races that answer.
DEADLINE_GRACE_SECONDS = 0.05
# Threads for blocking reads: more than the commit path needs (one writer), fewer than an engine's
# connections (pool_size 5 + overflow 5), so reads never starve the writer of a connection.
READ_THREADS = 8
# How often a cancel request is repeated until the interrupted work has ended: a request that
# reaches PostgreSQL between two statements is dropped by the server.
INTERRUPT_REPEAT_SECONDS = 0.1


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


class Interrupted(RuntimeError):
    """The work was interrupted because everyone who asked for it has gone."""


class Interrupt:
    """Stops, from another thread, the transaction of the connection it is attached to.

    A blocking call in a worker thread outlives the coroutine that awaited it: cancelling that
    coroutine (deadline, disconnect) leaves the thread waiting in the database. ``request()``
    cancels the running statement (PostgreSQL cancel request, SQLite ``interrupt()``) and makes
    every later ``check()`` raise, so that the transaction rolls back instead of committing.
    ``request()`` blocks for a round trip to the server: call it off the event loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raw: Any = None
        self._requested = False

    @property
    def requested(self) -> bool:
        """True once ``request()`` was called."""
        return self._requested

    def check(self) -> None:
        """Raise ``Interrupted`` if an interruption was requested."""
        if self._requested:
            raise Interrupted("interrupted: every caller has gone")

    @contextlib.contextmanager
    def attached(self, conn: Connection) -> Iterator[None]:
        """Make ``request()`` cancel what ``conn`` runs, until the block ends."""
        raw = conn.connection.driver_connection
        with self._lock:
            self.check()
            self._raw = raw
        try:
            yield
        finally:
            # Under the lock: a cancel request in flight completes before the connection can be
            # reused, so it never hits someone else's statement.
            with self._lock:
                self._raw = None

    def request(self) -> None:
        """Cancel the running statement, if any, and fail every later ``check()``."""
        with self._lock:
            self._requested = True
            raw = self._raw
            if raw is None:
                return
            try:
                if isinstance(raw, sqlite3.Connection):
                    raw.interrupt()
                else:
                    raw.cancel_safe(timeout=5.0)
            except Exception:  # a lost cancel is repeated, and the statement is bounded anyway
                logger.debug("cancel request failed", exc_info=True)


async def interrupt_until_done(interrupt: Interrupt, work: asyncio.Future[Any]) -> None:
    """Interrupt ``work`` (a blocking call in a thread) and wait until its thread has returned.

    The cancel request is repeated: one that reaches PostgreSQL between two statements is dropped,
    and the next statement would wait again.
    """
    loop = asyncio.get_running_loop()
    while not work.done():
        await loop.run_in_executor(_interrupt_executor(), interrupt.request)
        await asyncio.wait({work}, timeout=INTERRUPT_REPEAT_SECONDS)


def _deadline_ms(timeout: float) -> int:
    """A statement bound in milliseconds for ``timeout`` seconds left to a caller, with grace."""
    return max(1, round((max(timeout, 0.0) + DEADLINE_GRACE_SECONDS) * 1000))


def _bound_statements(conn: Connection, timeout: float | None) -> None:
    """PostgreSQL: every statement of the current transaction gives up after ``timeout`` (+ grace)."""
    if timeout is not None and conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT set_config('statement_timeout', :ms, true)"), {"ms": str(_deadline_ms(timeout))}
        )


@contextlib.contextmanager
def _sqlite_busy_bound(conn: Connection, timeout: float | None) -> Iterator[None]:
    """SQLite: wait for the write lock no longer than ``timeout`` (+ grace), then restore the default.

    SQLite has no statement timeout, and ``interrupt()`` does not end a wait for a lock; the busy
    timeout is the only bound on that wait.
    """
    if timeout is None or not is_sqlite(conn.engine):
        yield
        return
    raw = conn.connection.driver_connection
    assert raw is not None
    raw.execute(f"PRAGMA busy_timeout={min(_deadline_ms(timeout), SQLITE_BUSY_TIMEOUT_MS)}")
    try:
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


@contextlib.contextmanager
def write_transaction(
    engine: Engine, lock_key: int, *, timeout: float | None = None, interrupt: Interrupt | None = None
) -> Iterator[Connection]:
    """A write transaction, serialized with every other writer holding ``lock_key``.

    Serializing a table's writers makes its auto-increment ids grow in commit order, which is
    what lets them serve as feed cursors. SQLite writers are serialized by ``BEGIN IMMEDIATE``;
    on PostgreSQL a transaction-scoped advisory lock does it across processes and replicas.

    ``timeout`` (seconds, the latest deadline of the callers) bounds each statement on PostgreSQL
    and the wait for the write lock on SQLite. ``interrupt`` lets the event loop stop the
    transaction when its callers have gone: it rolls back unless its COMMIT had already begun.
    """
    with (
        writer(engine).connect() as conn,
        _sqlite_busy_bound(conn, timeout),
        interrupt.attached(conn) if interrupt else contextlib.nullcontext(),
        conn.begin(),
    ):
        _bound_statements(conn, timeout)
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key})
        if interrupt:
            interrupt.check()
        yield conn
        if interrupt:
            interrupt.check()  # the last chance to roll back: nothing runs between this and COMMIT


# --- bounded reads -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _ReadBound:
    deadline: float | None  # time.monotonic() at which the caller gives up; None: no deadline
    interrupt: Interrupt

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


# Set by read() in the context its worker thread runs in; read by reading() in the stores.
_read_bound: contextvars.ContextVar[_ReadBound | None] = contextvars.ContextVar("read_bound", default=None)
_interrupting: set[asyncio.Task[None]] = set()


@functools.cache
def read_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process's threads for blocking reads, apart from asyncio's default executor.

    Commits, the readiness probe and everything else run by ``asyncio.to_thread`` stay on the
    default executor, so reads stalled in the database cannot queue them.
    """
    return concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="db-read")


@functools.cache
def _interrupt_executor() -> concurrent.futures.ThreadPoolExecutor:
    # Its own threads: cancelling must not wait behind the very work it cancels.
    return concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="db-interrupt")


async def read(
    time_remaining: float | None, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> _T:
    """Run a blocking read in the read executor, bounded by its caller's deadline.

    ``time_remaining`` is what the caller has left in seconds (``context.time_remaining()``;
    None: no deadline).
    Statements of the connections ``func`` opens with ``reading()`` give up just after that
    deadline; if the caller goes away earlier (cancelled, disconnected) they are interrupted.
    Either way the thread and its connection come back instead of waiting in the database.
    """
    deadline = None if time_remaining is None else time.monotonic() + time_remaining
    bound = _ReadBound(deadline, Interrupt())
    context = contextvars.copy_context()
    context.run(_read_bound.set, bound)
    submitted = read_executor().submit(context.run, functools.partial(func, *args, **kwargs))
    work = asyncio.wrap_future(submitted)
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        submitted.cancel()  # not started yet: it never will
        if not work.done():
            task = asyncio.create_task(_interrupt_read(bound.interrupt, work))
            _interrupting.add(task)
            task.add_done_callback(_interrupting.discard)
        raise


async def _interrupt_read(interrupt: Interrupt, work: asyncio.Future[Any]) -> None:
    await interrupt_until_done(interrupt, work)
    if not work.cancelled() and work.exception() is not None:
        logger.debug("interrupted read ended: %s", work.exception())


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for one read, bounded by the deadline of the ``read()`` that runs it.

    Outside ``read()`` it is a plain ``engine.connect()``.
    """
    bound = _read_bound.get()
    with engine.connect() as conn:
        if bound is None:
            yield conn
            return
        with bound.interrupt.attached(conn):
            _bound_statements(conn, bound.remaining())
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

"""Group commit: concurrent requests share one transaction, in arrival order, with bounded memory.

Each REST call or streamed batch becomes a job on a bounded queue; one task takes every job
waiting (up to a row budget), commits them in one transaction in a worker thread, then answers
each job and signals subscribers. When the queue is full, submitters wait: backpressure instead of
unbounded memory.

Nothing is written for a caller that has gone (its deadline passed, it disconnected): a job whose
caller left before its group started is dropped; a group's transaction is bounded by the latest
deadline of its callers, and as soon as one of them leaves while it runs it is interrupted and
rolled back, then committed again for the callers that remain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.trace import SpanContext

from services.common import db, telemetry
from services.common import metrics as common_metrics
from services.common.feed import CommitSignal
from services.common.market import Candle
from services.ingest import metrics
from services.ingest.domain import CandleStatus
from services.ingest.store import IngestStore, TickBatch, TickBatchResult

logger = logging.getLogger(__name__)


class StoreUnavailable(RuntimeError):
    """The database could not commit; nothing of the failed group was stored."""


@dataclasses.dataclass(slots=True)
class _Job:
    ticks: TickBatch | None
    candles: Sequence[Candle] | None
    future: asyncio.Future[Any]
    deadline: float | None = None  # time.monotonic() at which the caller gives up; None: never
    # The submitter's span, so that the group commit shows up in the request's trace.
    span: SpanContext | None = dataclasses.field(default_factory=telemetry.current_span_context)

    @property
    def size(self) -> int:
        return len(self.ticks.ticks) if self.ticks is not None else len(self.candles or ())


class CommitQueue:
    """The single writer of one ingest process."""

    def __init__(
        self, store: IngestStore, *, max_pending_jobs: int = 256, max_group_rows: int = 50_000
    ) -> None:
        self._store = store
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(max_pending_jobs)
        self._max_group_rows = max_group_rows
        self.committed = CommitSignal()
        self._stopping: set[asyncio.Future[None]] = set()  # interrupts outliving a stop

    async def submit_ticks(self, batch: TickBatch, time_remaining: float | None = None) -> TickBatchResult:
        """Store a tick batch; returns once it is committed.

        ``time_remaining`` is how long the caller waits (``context.time_remaining()``): the
        commit gives up after the latest deadline of its group's callers.
        """
        result: TickBatchResult = await self._submit(
            _Job(batch, None, asyncio.get_running_loop().create_future(), _deadline(time_remaining))
        )
        return result

    async def submit_candles(
        self, candles: Sequence[Candle], time_remaining: float | None = None
    ) -> list[CandleStatus]:
        """Store candles; returns once they are committed (``time_remaining``: see ``submit_ticks``)."""
        result: list[CandleStatus] = await self._submit(
            _Job(None, candles, asyncio.get_running_loop().create_future(), _deadline(time_remaining))
        )
        return result

    async def _submit(self, job: _Job) -> Any:
        await self._queue.put(job)
        return await job.future

    async def run(self) -> None:
        """Commit jobs until cancelled."""
        while True:
            group = [await self._queue.get()]
            rows = group[0].size
            while rows < self._max_group_rows and not self._queue.empty():
                job = self._queue.get_nowait()
                group.append(job)
                rows += job.size
            await self._commit(group)

    async def _commit(self, group: list[_Job]) -> None:
        while True:
            # A caller that left (deadline, disconnect) was never answered: dropping its job keeps
            # "nothing is written after a cancellation" true.
            group = [j for j in group if not j.future.done()]
            if not group or await self._attempt(group):
                return

    async def _attempt(self, group: list[_Job]) -> bool:
        """Commit ``group`` once; False when a caller left mid-commit and the rest must be retried."""
        rows = sum(j.size for j in group)
        metrics.GROUP_ROWS.observe(rows)
        tick_jobs = [j for j in group if j.ticks is not None]
        candle_jobs = [j for j in group if j.candles is not None]
        interrupt = db.Interrupt()
        started = time.perf_counter()
        try:
            attributes = {"mt5.requests": len(group), "mt5.rows": rows}
            with telemetry.group_span("ingest.commit", [j.span for j in group], attributes):
                work = asyncio.ensure_future(
                    asyncio.to_thread(
                        functools.partial(
                            self._store.commit,
                            [j.ticks for j in tick_jobs if j.ticks is not None],
                            [j.candles for j in candle_jobs if j.candles is not None],
                            telemetry.current_traceparent(),
                            timeout=latest_remaining([j.deadline for j in group], time.monotonic()),
                            interrupt=interrupt,
                        )
                    )
                )
                await self._until_done_or_left(work, group, interrupt)
                tick_results, candle_results = work.result()
                # Inside the span: the line carries the trace id of the requests' trace.
                logger.debug("committed %d requests (%d rows)", len(group), rows)
        except Exception as exc:
            if interrupt.requested:
                # Rolled back because a caller left: the others are committed again without it.
                logger.debug("commit of %d requests interrupted: a caller left", len(group))
                return False
            # Any database failure fails the whole group, which stored nothing.
            metrics.COMMIT_FAILURES.inc()
            logger.warning("commit of %d requests failed: %s", len(group), exc)
            for job in group:
                if not job.future.done():
                    job.future.set_exception(StoreUnavailable(str(exc)))
            return True
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        for job, result in [
            *zip(tick_jobs, tick_results, strict=True),
            *zip(candle_jobs, candle_results, strict=True),
        ]:
            # Only a caller that left while the COMMIT itself ran can miss its answer here.
            if not job.future.done():
                job.future.set_result(result)
        self.committed.notify()
        _record_data_age(group)
        return True

    async def _until_done_or_left(
        self, work: asyncio.Future[Any], group: Sequence[_Job], interrupt: db.Interrupt
    ) -> None:
        """Wait for the commit thread; if a caller leaves first, interrupt it and wait until it returns.

        The thread's transaction holds every caller's rows: once one has left, it must not commit.
        """
        left = asyncio.Event()

        def on_done(future: asyncio.Future[Any]) -> None:
            if future.cancelled():
                left.set()

        for job in group:
            job.future.add_done_callback(on_done)
        watch = asyncio.ensure_future(left.wait())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                await db.interrupt_until_done(interrupt, work)
        except asyncio.CancelledError:
            # The writer is stopping: whatever its thread does would be answered to no one.
            interrupt_task = asyncio.ensure_future(db.interrupt_until_done(interrupt, work))
            self._stopping.add(interrupt_task)
            interrupt_task.add_done_callback(self._stopping.discard)
            raise
        finally:
            watch.cancel()
            for job in group:
                job.future.remove_done_callback(on_done)


def _deadline(time_remaining: float | None) -> float | None:
    return None if time_remaining is None else time.monotonic() + time_remaining


def latest_remaining(deadlines: Sequence[float | None], now: float) -> float | None:
    """How long a group may take: until its last caller's deadline; None if one has none."""
    if not deadlines or any(d is None for d in deadlines):
        return None
    return max(0.0, max(d for d in deadlines if d is not None) - now)


def _record_data_age(jobs: Sequence[_Job]) -> None:
    """The newest market time per symbol of what was just committed: one pass over each batch."""
    for job in jobs:
        if job.ticks is not None:
            # Feeds send ticks in time order: a symbol's last tick in a batch is its newest.
            newest = {t.symbol: t.ts for t in job.ticks.ticks}
        else:
            newest = {c.symbol: c.ts for c in sorted(job.candles or (), key=lambda c: c.ts)}
        common_metrics.DATA_AGE.observe(metrics.STAGE, newest)

"""Group commit: concurrent requests share one transaction, in arrival order, with bounded memory.

Each REST call or streamed batch becomes a job on a bounded queue; one task takes every job
waiting (up to a row budget), commits them in one transaction in a worker thread, then answers
each job and signals subscribers. When the queue is full, submitters wait: backpressure instead of
unbounded memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.trace import SpanContext

from services.common import metrics as common_metrics
from services.common import telemetry
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

    async def submit_ticks(self, batch: TickBatch) -> TickBatchResult:
        """Store a tick batch; returns once it is committed."""
        result: TickBatchResult = await self._submit(
            _Job(batch, None, asyncio.get_running_loop().create_future())
        )
        return result

    async def submit_candles(self, candles: Sequence[Candle]) -> list[CandleStatus]:
        """Store candles; returns once they are committed."""
        result: list[CandleStatus] = await self._submit(
            _Job(None, candles, asyncio.get_running_loop().create_future())
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
        # A caller cancelled before its commit started (deadline, disconnect) was never answered:
        # dropping its job keeps "nothing is written after a cancellation" true.
        group = [j for j in group if not j.future.done()]
        if not group:
            return
        rows = sum(j.size for j in group)
        metrics.GROUP_ROWS.observe(rows)
        tick_jobs = [j for j in group if j.ticks is not None]
        candle_jobs = [j for j in group if j.candles is not None]
        started = time.perf_counter()
        try:
            attributes = {"mt5.requests": len(group), "mt5.rows": rows}
            with telemetry.group_span("ingest.commit", [j.span for j in group], attributes):
                tick_results, candle_results = await asyncio.to_thread(
                    self._store.commit,
                    [j.ticks for j in tick_jobs if j.ticks is not None],
                    [j.candles for j in candle_jobs if j.candles is not None],
                    telemetry.current_traceparent(),
                )
                # Inside the span: the line carries the trace id of the requests' trace.
                logger.debug("committed %d requests (%d rows)", len(group), rows)
        except Exception as exc:  # any database failure fails the whole group, which stored nothing
            metrics.COMMIT_FAILURES.inc()
            logger.warning("commit of %d requests failed: %s", len(group), exc)
            for job in group:
                if not job.future.done():
                    job.future.set_exception(StoreUnavailable(str(exc)))
            return
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        for job, result in [
            *zip(tick_jobs, tick_results, strict=True),
            *zip(candle_jobs, candle_results, strict=True),
        ]:
            # A caller that went away still had its data committed; a re-send is deduplicated.
            if not job.future.done():
                job.future.set_result(result)
        self.committed.notify()
        _record_data_age(group)


def _record_data_age(jobs: Sequence[_Job]) -> None:
    """The newest market time per symbol of what was just committed: one pass over each batch."""
    for job in jobs:
        if job.ticks is not None:
            # Feeds send ticks in time order: a symbol's last tick in a batch is its newest.
            newest = {t.symbol: t.ts for t in job.ticks.ticks}
        else:
            newest = {c.symbol: c.ts for c in sorted(job.candles or (), key=lambda c: c.ts)}
        common_metrics.DATA_AGE.observe(metrics.STAGE, newest)

"""The inference service as a stage: final indicator values in, one signal per final candle out.

The stage follows the indicators service's feed of final values (the served model's timeframe)
from its committed cursor. Each value updates its series' candle history, which gives the
candle's feature row; rows go to the micro-batcher without waiting, so candles of many symbols
arriving together are scored in one forward pass. Results are taken back in feed order, and the
signals are committed with the cursor in one transaction, then published. A restart resumes
after the committed cursor: the values re-delivered give the signals already stored, which are
not logged again. A series' history is fetched from the indicators service the first time the
stage sees it (or when a revision reaches further back than it holds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
import numpy.typing as npt
from mt5.indicators.v1 import indicators_service_pb2 as ind_pb
from mt5.indicators.v1 import indicators_service_pb2_grpc as ind_grpc
from opentelemetry.trace import SpanContext

from services.common import db, telemetry
from services.common.feed import CommitSignal
from services.common.live import FeedItem, live_feed, series_filter
from services.common.market import Timeframe
from services.common.protoconv import timestamp, to_datetime
from services.inference import metrics
from services.inference.config import InferenceConfig
from services.inference.convert import inputs_from_pb
from services.inference.domain import Inputs, SeriesHistory, Signal
from services.inference.features import feature_rows, history_needed
from services.inference.serving import MicroBatcher, ModelHolder, Scored
from services.inference.store import LoggedSignal, SignalStore, SignalWork

logger = logging.getLogger(__name__)
# Candles held per series beyond what a row needs, so that recent revisions need no fetch.
REVISION_SLACK = 64

SeriesKey = tuple[str, Timeframe]


@dataclasses.dataclass(slots=True)
class _InFlight:
    """A final candle on its way through the batcher, in feed order."""

    cursor: int
    symbol: str
    timeframe: Timeframe
    ts: dt.datetime
    revision: int
    row: npt.NDArray[np.float64] | None  # None: no signal (the row could not reach the model)
    future: asyncio.Future[Scored] | None
    trace: SpanContext | None  # the span that applied the candle, when its values were traced


class InferenceStage:
    """Runs the follow, collect and commit loops, and serves the signal feed."""

    def __init__(
        self,
        config: InferenceConfig,
        store: SignalStore,
        indicators: grpc.aio.Channel,
        holder: ModelHolder,
        batcher: MicroBatcher,
    ) -> None:
        self._config = config
        self._store = store
        self._indicators = ind_grpc.IndicatorsServiceStub(indicators)
        self._holder = holder
        self._batcher = batcher
        self.committed = CommitSignal()
        self._cursor = 0  # last input cursor handed to the batcher
        self._series: dict[SeriesKey, SeriesHistory] = {}
        self._shape: tuple[Timeframe, int] | None = None  # (timeframe, window) the histories serve
        self._in_flight: asyncio.Queue[_InFlight] = asyncio.Queue(config.max_queue)
        self._pending = SignalWork()
        self._work_ready = asyncio.Event()

    async def restore(self) -> None:
        """Take the committed cursor; histories are fetched lazily, series by series."""
        self._cursor = await asyncio.to_thread(self._store.cursor)
        logger.info("resuming the indicators feed after cursor %d", self._cursor)

    async def run(self) -> None:
        """Follow the indicators, score, and commit, until cancelled."""
        await asyncio.gather(self._follow(), self._collect(), self._committer())

    async def _follow(self) -> None:
        backoff = 0.1
        while True:
            model = await self._holder.wait_loaded()
            shape = (Timeframe[model.manifest.timeframe], model.manifest.window)
            if shape != self._shape:
                self._series.clear()
                self._shape = shape
            request = ind_pb.SubscribeIndicatorsRequest(from_cursor=self._cursor, timeframes=[shape[0].name])
            call = self._indicators.SubscribeIndicators(request)
            try:
                async for item in call:
                    await self._apply(item, *shape)
                    backoff = 0.1
                    current = self._holder.require()
                    if (Timeframe[current.manifest.timeframe], current.manifest.window) != shape:
                        logger.info("model %s reads another shape; resubscribing", current.version)
                        break
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "indicators feed broke (%s); resuming after cursor %d", exc.code().name, self._cursor
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                call.cancel()

    async def _apply(
        self, item: ind_pb.SubscribeIndicatorsResponse, timeframe: Timeframe, window: int
    ) -> None:
        if not item.values.final:
            return
        attributes = {"mt5.symbol": item.values.symbol, "mt5.timeframe": timeframe.name}
        with telemetry.continued_span("inference.apply", item.traceparent, attributes) as traced:
            await self._apply_values(item, timeframe, window, traced)

    async def _apply_values(
        self,
        item: ind_pb.SubscribeIndicatorsResponse,
        timeframe: Timeframe,
        window: int,
        traced: SpanContext | None,
    ) -> None:
        values = item.values
        symbol, ts = values.symbol, to_datetime(values.ts)
        inputs = inputs_from_pb(values)
        needed = history_needed(window)
        key = (symbol, timeframe)
        series = self._series.get(key)
        if series is None or not series.covers(ts):
            earlier = await self._history(symbol, timeframe, ts, needed - 1)
            fetched = SeriesHistory(needed + REVISION_SLACK, earlier, from_start=len(earlier) < needed - 1)
            if series is None:
                series = self._series[key] = fetched
            else:  # a revision older than the history held: work on the fetched one only
                series = fetched
        series.put(ts, inputs)
        candles = series.until(ts, needed)
        row = feature_rows(candles, window)[-1]
        future = None
        # NaN: too little history, or a stored value missing (an indicator warming up).
        if np.isnan(row).any():
            metrics.ROWS_REJECTED.labels(reason="warming_up").inc()
            row_or_none = None
        elif not np.isfinite(row).all():
            metrics.ROWS_REJECTED.labels(reason="non_finite").inc()
            row_or_none = None
        else:
            row_or_none = row
            future = await self._batcher.submit(row[np.newaxis, :])
        await self._in_flight.put(
            _InFlight(item.cursor, symbol, timeframe, ts, values.revision, row_or_none, future, traced)
        )
        self._cursor = item.cursor

    async def _history(
        self, symbol: str, timeframe: Timeframe, before: dt.datetime, count: int
    ) -> list[tuple[dt.datetime, Inputs]]:
        """The newest ``count`` stored final candles of a series before ``before``."""
        if count <= 0:
            return []
        request = ind_pb.GetIndicatorsRequest(
            symbol=symbol, timeframe=timeframe.name, limit=count, newest=True, to=timestamp(before)
        )
        response = await self._indicators.GetIndicators(request, timeout=30)
        return [(to_datetime(v.ts), inputs_from_pb(v)) for v in response.values]

    async def _collect(self) -> None:
        """Take scored candles back in feed order and queue their signals for the committer."""
        while True:
            done = await self._in_flight.get()
            if done.future is not None and done.row is not None:
                scored = await self._scored(done.future, done.row)
                self._pending.signals.append(
                    Signal(
                        done.symbol,
                        done.timeframe,
                        done.ts,
                        float(scored.probabilities[0]),
                        int(scored.labels[0]),
                        scored.version,
                        done.revision,
                    )
                )
            if done.trace is not None:
                self._pending.traces.append(done.trace)
            self._pending.cursor = done.cursor
            self._work_ready.set()

    async def _scored(self, future: asyncio.Future[Scored], row: npt.NDArray[np.float64]) -> Scored:
        delay = 0.1
        while True:
            try:
                return await future
            except Exception:  # the forward pass failed: score this row again, never skip it
                logger.warning("scoring failed; retrying in %.1fs", delay, exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                future = await self._batcher.submit(row[np.newaxis, :])

    async def _committer(self) -> None:
        while True:
            await self._work_ready.wait()
            self._work_ready.clear()
            work, self._pending = self._pending, SignalWork()
            if not work:
                continue
            # The commit joins the traces of the traced values in it; its logged signals carry it on.
            with telemetry.group_span("inference.commit", work.traces, {"mt5.signals": len(work.signals)}):
                traceparent = telemetry.current_traceparent()
                fresh = await db.commit_retrying(functools.partial(self._store.commit, work, traceparent))
            metrics.SIGNALS.inc(fresh)
            self.committed.notify()

    def signals_feed(
        self, cursor: int, symbols: Sequence[str], timeframes: Sequence[Timeframe]
    ) -> AsyncIterator[FeedItem[Signal]]:
        """Signals after ``cursor``: stored ones first, then live ones as they are committed."""

        async def read(after: int, limit: int) -> list[LoggedSignal]:
            return await asyncio.to_thread(self._store.signals_after, after, symbols, timeframes, limit)

        return live_feed(
            read,
            self.committed,
            cursor,
            page_size=self._config.feed_page_size,
            poll_seconds=self._config.feed_poll_seconds,
            unpack=lambda logged: (logged.cursor, logged.signal, logged.traceparent),
            fanout=None,
            wants=series_filter(symbols, timeframes),
            feed="signals",
        )

"""The inference service as a stage: final indicator values in, one signal per final candle out.

The stage follows the indicators service's feed of final values (the served model's timeframe)
from its committed cursor. Each value updates its series' candle history and copies the candles
its feature row needs into the open *burst*. A burst closes when it holds ``max_batch`` candles or
``max_wait`` after its first one (the micro-batcher's settings), whichever comes first; then all
its feature rows are built in one vectorised step (``features.last_rows``), checked, and handed to
the micro-batcher as one request, so candles of many symbols arriving together cost one pass of
numpy and one forward pass.
Results are taken back in feed order, and the signals are committed with the cursor in one
transaction, then published. A restart resumes after the committed cursor: the values re-delivered
give the signals already stored, which are not logged again. A series' history is fetched from the
indicators service the first time the stage sees it (or when a revision reaches further back than
it holds).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from services.inference.features import INPUTS, history_needed, last_rows
from services.inference.serving import MicroBatcher, ModelHolder, Scored
from services.inference.store import LoggedSignal, SignalStore, SignalWork

logger = logging.getLogger(__name__)
# Candles held per series beyond what a row needs, so that recent revisions need no fetch.
REVISION_SLACK = 64

SeriesKey = tuple[str, Timeframe]


@dataclasses.dataclass(slots=True)
class _Candle:
    """A final candle waiting for its signal, in feed order."""

    cursor: int
    symbol: str
    ts: dt.datetime
    revision: int
    trace: SpanContext | None  # the span that applied the candle, when its values were traced


class _Burst:
    """Candles gathered for one vectorised step: each one's history window, in feed order."""

    def __init__(self, timeframe: Timeframe, window: int, capacity: int) -> None:
        self.timeframe = timeframe
        self.window = window
        self.candles: list[_Candle] = []
        self.windows = np.empty((capacity, history_needed(window), len(INPUTS)))
        self.started = 0.0  # event-loop time of the first candle

    @property
    def full(self) -> bool:
        return len(self.candles) == len(self.windows)


@dataclasses.dataclass(slots=True)
class _Scoring:
    """A closed burst on its way through the batcher."""

    timeframe: Timeframe
    candles: list[_Candle]
    scored: npt.NDArray[np.intp]  # indexes of the candles whose rows went to the model
    rows: npt.NDArray[np.float64]  # those rows, to score again if the forward pass fails
    future: asyncio.Future[Scored] | None


class InferenceStage:
    """Runs the follow, burst, collect and commit loops, and serves the signal feed."""

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
        self._cursor = 0  # last input cursor taken into a burst
        self._series: dict[SeriesKey, SeriesHistory] = {}
        self._shape: tuple[Timeframe, int] | None = None  # (timeframe, window) the histories serve
        self._burst: _Burst | None = None  # the open one
        self._burst_opened = asyncio.Event()
        self._burst_full = asyncio.Event()
        self._burst_room = asyncio.Event()
        self._burst_room.set()
        self._in_flight: asyncio.Queue[_Scoring] = asyncio.Queue(
            max(1, config.max_queue // batcher.max_batch)
        )
        self._pending = SignalWork()
        self._work_ready = asyncio.Event()

    async def restore(self) -> None:
        """Take the committed cursor; histories are fetched lazily, series by series."""
        self._cursor = await asyncio.to_thread(self._store.cursor)
        logger.info("resuming the indicators feed after cursor %d", self._cursor)

    async def run(self) -> None:
        """Follow the indicators, score, and commit, until cancelled."""
        await asyncio.gather(self._follow(), self._bursts(), self._collect(), self._committer())

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
        series.put(ts, inputs_from_pb(values))
        burst = await self._open_burst(timeframe, window)
        series.window(ts, needed, burst.windows[len(burst.candles)])
        burst.candles.append(_Candle(item.cursor, symbol, ts, values.revision, traced))
        if burst.full:
            self._burst_room.clear()
            self._burst_full.set()
        self._cursor = item.cursor

    async def _open_burst(self, timeframe: Timeframe, window: int) -> _Burst:
        """The burst taking candles now (a new one when none is open)."""
        await self._burst_room.wait()
        burst = self._burst
        if burst is None or (burst.timeframe, burst.window) != (timeframe, window):
            if burst is not None and burst.candles:  # the model's shape changed: close it first
                self._burst_room.clear()
                self._burst_full.set()
                await self._burst_room.wait()
            burst = self._burst = _Burst(timeframe, window, self._batcher.max_batch)
        if not burst.candles:
            burst.started = asyncio.get_running_loop().time()
            self._burst_opened.set()
        return burst

    async def _bursts(self) -> None:
        """Close each burst when full or ``max_wait`` after its first candle, and send it to be scored."""
        loop = asyncio.get_running_loop()
        while True:
            await self._burst_opened.wait()
            self._burst_opened.clear()
            burst = self._burst
            if burst is None or not burst.candles:
                continue
            remaining = burst.started + self._batcher.max_wait - loop.time()
            if not burst.full and remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._burst_full.wait(), remaining)
            self._burst = None
            self._burst_full.clear()
            self._burst_room.set()
            await self._in_flight.put(await self._score(burst))

    async def _score(self, burst: _Burst) -> _Scoring:
        """Build a burst's feature rows in one step, keep those the model can take, submit them."""
        count = len(burst.candles)
        rows = last_rows(burst.windows[:count], burst.window)
        # NaN: too little history, or a stored value missing (an indicator warming up).
        warming = np.isnan(rows).any(axis=1)
        metrics.ROWS_REJECTED.labels(reason="warming_up").inc(int(warming.sum()))
        scored = np.flatnonzero(~warming)
        model = self._holder.require()
        if rows.shape[1] != model.manifest.n_inputs:  # built for the model served before this one
            metrics.ROWS_REJECTED.labels(reason="model_changed").inc(len(scored))
            scored = scored[:0]
        elif len(scored):
            out_of_range = model.scorer.out_of_range(rows[scored]).any(axis=1)
            metrics.ROWS_REJECTED.labels(reason="non_finite").inc(int(out_of_range.sum()))
            scored = scored[~out_of_range]
        chosen = rows[scored]
        future = await self._batcher.submit(chosen, since=burst.started) if len(scored) else None
        return _Scoring(burst.timeframe, burst.candles, scored, chosen, future)

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
        """Take scored bursts back in feed order and queue their signals for the committer."""
        while True:
            done = await self._in_flight.get()
            scored = None if done.future is None else await self._scored(done.future, done.rows)
            if scored is not None:
                probabilities = scored.probabilities.tolist()
                labels = scored.labels.tolist()
                for k, i in enumerate(done.scored.tolist()):
                    candle = done.candles[i]
                    self._pending.signals.append(
                        Signal(
                            candle.symbol,
                            done.timeframe,
                            candle.ts,
                            probabilities[k],
                            labels[k],
                            scored.version,
                            candle.revision,
                        )
                    )
            self._pending.traces.extend(c.trace for c in done.candles if c.trace is not None)
            self._pending.cursor = done.candles[-1].cursor
            self._work_ready.set()

    async def _scored(self, future: asyncio.Future[Scored], rows: npt.NDArray[np.float64]) -> Scored | None:
        """The burst's scores; None when the model now served cannot take its rows (counted)."""
        delay = 0.1
        while True:
            try:
                return await future
            except Exception:  # the forward pass failed: score these rows again, never skip them
                logger.warning("scoring failed; retrying in %.1fs", delay, exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                try:
                    future = await self._batcher.submit(rows)
                except ValueError:  # a model of another width replaced the one they were built for
                    metrics.ROWS_REJECTED.labels(reason="model_changed").inc(len(rows))
                    return None

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

"""The indicators service as a stage: the aggregator's bars in, indicator values out.

One task owns the engine. It follows the aggregator's candle feed (final versions, and forming
bars for provisional values) from the committed cursor; final values and the cursor are committed
together, then subscribers are woken. On start the engine is warmed from the aggregator's stored
final bars up to the last value this service stored for each series (waiting, NOT_SERVING, while
the aggregator is unreachable), the values of the bars a revision could still reach are committed
again where they changed (a revision may have come while this service was down), and the feed
resumes after the committed cursor, so a restart loses and duplicates nothing. Provisional values
of forming bars are live-only and go to the subscribers that asked for them through bounded queues.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_grpc
from mt5.market.v1 import market_pb2

from services.aggregator.bars import Bar, BarSource, bucket_bounds
from services.common import db, telemetry
from services.common import metrics as common_metrics
from services.common.feed import CommitSignal
from services.common.live import FeedItem, LiveFanout, LiveLimits, live_feed, series_filter, series_key
from services.common.market import Timeframe, shard_of, to_us
from services.common.protoconv import to_datetime
from services.indicators import metrics
from services.indicators.config import IndicatorsConfig
from services.indicators.engine import IndicatorEngine, IndicatorValues, NeedsHistory
from services.indicators.store import CANDLES_FEED, IndicatorStore, IndicatorWork, LoggedValues

logger = logging.getLogger(__name__)
_PAGE = 10_000
# Series whose stored bars are read ahead while one is being warmed at start.
WARM_AHEAD = 8
_T = TypeVar("_T")
# Codes after which a read from the aggregator is tried again: it is away, restarting or overloaded.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
    }
)


async def call_retrying(
    call: Callable[[], Awaitable[_T]],
    what: str,
    *,
    first_delay: float = 0.1,
    max_delay: float = 5.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> _T:
    """Await ``call()`` until it succeeds, backing off up to ``max_delay`` after a retryable failure.

    Any other gRPC failure (a bad request, a wrong key) is raised at once: retrying cannot help.
    """
    delay = first_delay
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE:
                raise
            logger.warning("%s failed (%s); retrying in %.1fs", what, exc.code().name, delay)
        await sleep(delay)
        delay = min(delay * 2, max_delay)


def bar_from_pb(message: market_pb2.Bar) -> Bar:
    """An aggregator bar message as the domain bar the engine takes."""
    c = message.candle
    return Bar(
        c.symbol,
        Timeframe(c.timeframe),
        to_datetime(c.ts),
        c.open,
        c.high,
        c.low,
        c.close,
        c.volume,
        c.spread,
        message.tick_count,
        BarSource(message.source or 2),
        message.revision,
        message.final,
        message.ea_disagrees,
    )


class IndicatorStage:
    """Runs the input and commit loops, and serves the indicator feed."""

    def __init__(self, config: IndicatorsConfig, store: IndicatorStore, aggregator: grpc.aio.Channel) -> None:
        self._config = config
        self._store = store
        self._aggregator = agg_grpc.AggregatorServiceStub(aggregator)
        self.engine = IndicatorEngine(config.settings)
        self.committed = CommitSignal()
        self.forming = LiveFanout[IndicatorValues](
            LiveLimits(config.forming_queue, config.forming_max_delay), series_key
        )
        sharded = config.shard_count > 1
        self._feed_key = (
            f"{CANDLES_FEED}@{config.shard_index}/{config.shard_count}" if sharded else CANDLES_FEED
        )
        self._pending = IndicatorWork(feed=self._feed_key)
        self._work_ready = asyncio.Event()
        self._cursor = 0

    def owns(self, symbol: str) -> bool:
        """Whether this shard handles the symbol."""
        return shard_of(symbol, self._config.shard_count) == self._config.shard_index

    async def restore(self) -> None:
        """Warm this shard's stored series from the aggregator's final bars; take the committed cursor."""
        stored = await asyncio.to_thread(self._store.cursors)
        # A new shard layout starts from the oldest cursor any earlier layout reached; bars it has
        # already published come back with the same revision and values and are not logged again.
        earlier = [c for k, c in stored.items() if k == CANDLES_FEED or k.startswith(f"{CANDLES_FEED}@")]
        self._cursor = stored.get(self._feed_key, min(earlier, default=0))
        owned = [series for series in await asyncio.to_thread(self._store.series) if self.owns(series[0])]

        async def fetch(symbol: str, timeframe: Timeframe, last: dt.datetime) -> list[Bar]:
            # The aggregator may be down too (restarted together, a rollout): wait for it,
            # NOT_SERVING meanwhile, rather than exit.
            return await call_retrying(
                functools.partial(self._stored_bars, symbol, timeframe, until=last),
                f"warm-up read of {symbol} {timeframe.name}",
            )

        # Series are warmed one after the other, in a fixed order, while the bars of the next
        # WARM_AHEAD are being read: the reads' round trips overlap the computing, and at most
        # WARM_AHEAD series' bars wait in memory.
        waiting = iter(owned)
        ahead: collections.deque[tuple[str, Timeframe, asyncio.Future[list[Bar]]]] = collections.deque()
        try:
            while True:
                for symbol, timeframe, last in itertools.islice(waiting, WARM_AHEAD - len(ahead)):
                    ahead.append((symbol, timeframe, asyncio.ensure_future(fetch(symbol, timeframe, last))))
                if not ahead:
                    break
                symbol, timeframe, fetched = ahead.popleft()
                bars = await fetched
                # The stored bars may hold revisions the feed has not brought yet; replayed, they
                # change no prices and recompute nothing. So the values of every bar a revision
                # could reach go out again now: the store logs only those that changed.
                self._pending.values.extend(self.engine.warm(symbol, timeframe, bars, report_revisable=True))
        finally:
            for _, _, fetched in ahead:
                fetched.cancel()
        if self._pending:
            self._work_ready.set()
        logger.info("indicators warm; resuming the candle feed after cursor %d", self._cursor)

    async def _stored_bars(
        self, symbol: str, timeframe: Timeframe, until: dt.datetime | None = None
    ) -> list[Bar]:
        """The aggregator's stored final bars of a series (up to and including ``until``)."""
        end = None if until is None else until + dt.timedelta(microseconds=1)
        return await self.bars_between(symbol, timeframe, None, end)

    async def bars_between(
        self, symbol: str, timeframe: Timeframe, start: dt.datetime | None, end: dt.datetime | None
    ) -> list[Bar]:
        """The aggregator's stored final bars of a series with ``start <= ts < end`` (None: open)."""
        bars: list[Bar] = []
        while True:
            request = agg_pb.GetCandlesRequest(symbol=symbol, timeframe=timeframe.name, limit=_PAGE)
            if start is not None:
                getattr(request, "from").FromDatetime(start)
            if end is not None:
                request.to.FromDatetime(end)
            page = [bar_from_pb(b) for b in (await self._aggregator.GetCandles(request, timeout=30)).bars]
            bars.extend(b for b in page if b.final)
            if len(page) < _PAGE:
                return bars
            start = page[-1].ts + dt.timedelta(microseconds=1)

    async def run(self) -> None:
        """Follow the aggregator and commit, until cancelled."""
        await asyncio.gather(self._follow_candles(), self._committer())

    async def _follow_candles(self) -> None:
        backoff = 0.1
        while True:
            try:
                request = agg_pb.SubscribeCandlesRequest(
                    from_cursor=self._cursor,
                    include_forming=True,
                    shard_count=self._config.shard_count,
                    shard_index=self._config.shard_index,
                )
                async for item in self._aggregator.SubscribeCandles(request):
                    await self._apply(item)
                    backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "aggregator feed broke (%s); resuming after cursor %d", exc.code().name, self._cursor
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _apply(self, item: agg_pb.SubscribeCandlesResponse) -> None:
        bar = bar_from_pb(item.bar)
        attributes = {"mt5.symbol": bar.symbol, "mt5.timeframe": bar.timeframe.name}
        with telemetry.continued_span("indicators.apply", item.traceparent, attributes) as traced:
            await self._apply_bar(item, bar)
            if traced is not None:
                self._pending.traces.append(traced)

    async def _apply_bar(self, item: agg_pb.SubscribeCandlesResponse, bar: Bar) -> None:
        with metrics.UPDATE_SECONDS.time():
            try:
                values = self.engine.on_bar(bar)
            except NeedsHistory:
                # A revision older than the engine's checkpoints: rebuild the series from storage.
                metrics.REBUILDS.inc()
                history = await self._stored_bars(bar.symbol, bar.timeframe)
                values = self.engine.warm(bar.symbol, bar.timeframe, history, report_from=bar.ts)
        if bar.final:
            self._pending.values.extend(values)
            self._pending.cursor = self._cursor = item.cursor
            self._work_ready.set()
            if bar.revision:
                metrics.REVISIONS.labels(bar.timeframe.name).inc()
            end_us = bucket_bounds(to_us(bar.ts), bar.timeframe)[1]
            common_metrics.DATA_AGE.observe(metrics.STAGE, {bar.symbol: end_us / 1e6})
        else:
            self.forming.publish(values)

    def _timed_commit(self, work: IndicatorWork, traceparent: str | None) -> None:
        with metrics.COMMIT_SECONDS.time():
            self._store.commit(work, traceparent)

    async def _committer(self) -> None:
        while True:
            await self._work_ready.wait()
            self._work_ready.clear()
            work, self._pending = self._pending, IndicatorWork(feed=self._feed_key)
            if not work:
                continue
            # The commit joins the traces of the traced bars in it; its logged values carry it on.
            with telemetry.group_span("indicators.commit", work.traces, {"mt5.values": len(work.values)}):
                traceparent = telemetry.current_traceparent()

                await db.commit_retrying(functools.partial(self._timed_commit, work, traceparent))
            metrics.VALUES.inc(len(work.values))
            self.committed.notify()

    def values_feed(
        self,
        cursor: int,
        symbols: Sequence[str],
        timeframes: Sequence[Timeframe],
        include_forming: bool,
        on_overflow: Callable[[], None] = lambda: None,
    ) -> AsyncIterator[FeedItem[IndicatorValues]]:
        """Final values after ``cursor`` (stored, then live), with provisional ones when asked.

        A subscriber that falls behind on provisional values gets ``on_overflow`` called by the
        publisher, then ``SubscriberTooSlow`` raised (``services.common.live``).
        """

        async def read(after: int, limit: int) -> list[LoggedValues]:
            return await asyncio.to_thread(self._store.values_after, after, symbols, timeframes, limit)

        return live_feed(
            read,
            self.committed,
            cursor,
            page_size=self._config.feed_page_size,
            poll_seconds=self._config.feed_poll_seconds,
            unpack=lambda logged: (logged.cursor, logged.values, logged.traceparent),
            fanout=self.forming if include_forming else None,
            wants=series_filter(symbols, timeframes),
            feed=metrics.VALUES_FEED,
            on_overflow=on_overflow,
        )

    def stored(
        self,
        symbol: str,
        timeframe: Timeframe,
        start: dt.datetime | None,
        end: dt.datetime | None,
        limit: int,
        newest: bool = False,
    ) -> list[IndicatorValues]:
        """Stored values, oldest first: the first ``limit`` of the range, or the newest (blocking)."""
        return self._store.values(symbol, timeframe, start, end, limit, newest)

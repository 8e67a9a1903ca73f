"""The aggregator as a stage: ingest's feeds in, bars out, state and cursors committed together.

One task owns the aggregation core. Pages of ticks and EA candles from ingest's feeds (followed from
the committed cursors) go through the core; what it publishes joins a unit of work; a committer
writes each unit of work — latest bar versions, the log of final versions, per-symbol state and the
input cursors — in one transaction, then wakes subscribers. A restart restores the core from the
stored bars and resumes the feeds from the stored cursors: nothing is lost or applied twice.
Forming bars are live-only: they go to subscribers that asked for them through bounded queues.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import numpy as np
from mt5.ingest.v1 import ingest_service_pb2 as ingest_pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc

from services.aggregator import metrics
from services.aggregator.bars import Aggregator, Bar, Emitted, bucket_bounds
from services.aggregator.config import AggregatorConfig
from services.aggregator.store import CANDLES_FEED, TICKS_FEED, AggregatorStore, LoggedBar, UnitOfWork
from services.common import db, telemetry
from services.common import metrics as common_metrics
from services.common.feed import CommitSignal
from services.common.live import FeedItem, LiveFanout, LiveLimits, live_feed, series_filter, series_key
from services.common.market import Candle, Timeframe, shard_of, to_us
from services.common.protoconv import to_datetime

logger = logging.getLogger(__name__)


class AggregationStage:
    """Runs the aggregator's input, clock and commit loops, and serves its feed."""

    def __init__(
        self,
        config: AggregatorConfig,
        store: AggregatorStore,
        ingest: grpc.aio.Channel,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._config = config
        self._store = store
        self._ingest = ingest_grpc.IngestServiceStub(ingest)
        self._now = now
        self.core = Aggregator(config.bars)
        self.committed = CommitSignal()
        self._pending = UnitOfWork()
        self._pending_bars = 0
        self._work_ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        # Each shard keeps its own cursors on ingest's feeds (shared by nobody else).
        sharded = config.shard_count > 1
        self._feed_keys = {
            feed: f"{feed}@{config.shard_index}/{config.shard_count}" if sharded else feed
            for feed in (TICKS_FEED, CANDLES_FEED)
        }
        self._cursors = {TICKS_FEED: 0, CANDLES_FEED: 0}
        # Whether the tick feed last said it is caught up: the wall clock may close the bars of a
        # quiet market only then. A backlog (after a restart, or while the aggregator is slow) is
        # not a quiet market: closing its bars early would only make its ticks revise them.
        self._ticks_at_head = False
        self.forming = LiveFanout[Bar](LiveLimits(config.forming_queue, config.forming_max_delay), series_key)

    # --- start ----------------------------------------------------------------------------------

    async def restore(self) -> None:
        """Rebuild the core from stored bars and take the committed input cursors."""
        settings = self._config.bars
        count, index = self._config.shard_count, self._config.shard_index
        states = await asyncio.to_thread(
            self._store.load_state,
            settings.retention,
            settings.lateness,
            lambda symbol: shard_of(symbol, count) == index,
        )
        restored = self._now()
        for state in states:
            self.core.restore(state.symbol, state.bars, state.latest_tick_us, state.last_cursor, restored)
        stored = await asyncio.to_thread(self._store.cursors)
        for feed, key in self._feed_keys.items():
            # A new shard layout starts from the oldest cursor any earlier layout reached: every
            # symbol's own last applied cursor (restored above) skips what was already applied.
            earlier = [c for k, c in stored.items() if k == feed or k.startswith(f"{feed}@")]
            self._cursors[feed] = stored.get(key, min(earlier, default=0))
        logger.info(
            "restored %d symbols; resuming ticks after %d, candles after %d",
            len(states),
            self._cursors[TICKS_FEED],
            self._cursors[CANDLES_FEED],
        )

    async def run(self) -> None:
        """Follow the inputs, run the clock and commit, until cancelled."""
        await asyncio.gather(
            self._follow_input(TICKS_FEED, self._tick_pages),
            self._follow_input(CANDLES_FEED, self._candle_pages),
            self._clock(),
            self._committer(),
        )

    # --- inputs ---------------------------------------------------------------------------------

    async def _follow_input(self, feed: str, pages: Callable[[int], AsyncIterator[None]]) -> None:
        backoff = 0.1
        while True:
            try:
                async for _ in pages(self._cursors[feed]):
                    backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "ingest %s feed broke (%s); resuming after cursor %d",
                    feed,
                    exc.code().name,
                    self._cursors[feed],
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _tick_pages(self, cursor: int) -> AsyncIterator[None]:
        call = self._ingest.SubscribeTicks(
            ingest_pb.SubscribeTicksRequest(
                from_cursor=cursor, shard_count=self._config.shard_count, shard_index=self._config.shard_index
            )
        )
        self._ticks_at_head = False
        try:
            async for page in call:
                await self._room.wait()
                self._ticks_at_head = page.at_head
                if not page.ticks and page.cursor == self._cursors[TICKS_FEED]:
                    yield None  # nothing new: the feed only says we are caught up
                    continue
                with telemetry.continued_span(
                    "aggregator.apply_ticks", page.traceparents, {"mt5.ticks": len(page.ticks)}
                ) as traced:
                    self._apply_ticks(page)
                    if traced is not None:
                        self._pending.traces.append(traced)
                yield None
        finally:
            self._ticks_at_head = False  # until the next subscription says so again

    async def _candle_pages(self, cursor: int) -> AsyncIterator[None]:
        call = self._ingest.SubscribeCandles(
            ingest_pb.SubscribeCandlesRequest(
                from_cursor=cursor, shard_count=self._config.shard_count, shard_index=self._config.shard_index
            )
        )
        async for item in call:
            await self._room.wait()
            c = item.candle
            candle = Candle(
                c.symbol,
                Timeframe(c.timeframe),
                to_datetime(c.ts),
                c.open,
                c.high,
                c.low,
                c.close,
                c.volume,
                c.spread,
            )
            attributes = {"mt5.symbol": candle.symbol, "mt5.timeframe": candle.timeframe.name}
            with telemetry.continued_span("aggregator.apply_candle", item.traceparent, attributes) as traced:
                if not self.core.is_live(candle.symbol, candle.timeframe, candle.ts):
                    await self._adopt_stored(candle)
                self._record(self.core.add_ea_candle(candle, self._now()))
                if traced is not None:
                    self._pending.traces.append(traced)
            metrics.INPUT_CURSOR.labels(CANDLES_FEED).set(item.cursor)
            self._cursors[CANDLES_FEED] = item.cursor
            self._pending.cursors[self._feed_keys[CANDLES_FEED]] = item.cursor
            yield None

    async def _adopt_stored(self, candle: Candle) -> None:
        """Make an old bar live again, from its latest version, before an EA candle changes it."""
        stored = await asyncio.to_thread(self._store.bars_around, candle.symbol, candle.timeframe, candle.ts)
        # Versions not committed yet are newer than the stored ones.
        latest = {bar.key: bar for bar in stored} | {
            key: bar for key, bar in self._pending.latest.items() if key[0] == candle.symbol
        }
        self.core.adopt(candle.symbol, latest.values(), (candle.timeframe, candle.ts))

    def _apply_ticks(self, page: ingest_pb.SubscribeTicksResponse) -> None:
        arrived = self._now()
        columns: dict[str, tuple[list[int], list[float], list[float], list[float], list[int]]] = defaultdict(
            lambda: ([], [], [], [], [])
        )
        for item in page.ticks:
            t = item.tick
            ts, bid, ask, vol, cur = columns[t.symbol]
            ts.append(t.ts.seconds * 1_000_000 + t.ts.nanos // 1000)
            bid.append(t.bid)
            ask.append(t.ask)
            vol.append(t.volume)
            cur.append(item.cursor)
        for symbol, (ts, bid, ask, vol, cur) in columns.items():
            emitted = self.core.add_ticks(
                symbol,
                np.array(ts, dtype=np.int64),
                np.array(bid),
                np.array(ask),
                np.array(vol),
                np.array(cur, dtype=np.int64),
                arrived,
            )
            self._record(emitted)
            bars = self.core.symbols[symbol]
            self._pending.symbols[symbol] = (bars.latest_tick_us, bars.last_cursor)
        metrics.TICKS.inc(len(page.ticks))
        metrics.LATE_DROPPED.set(self.core.late_dropped)
        metrics.INPUT_CURSOR.labels(TICKS_FEED).set(page.cursor)
        newest = {symbol: self.core.symbols[symbol].latest_tick_us for symbol in columns}
        common_metrics.DATA_AGE.observe(
            metrics.STAGE, {symbol: us / 1e6 for symbol, us in newest.items() if us is not None}
        )
        self._cursors[TICKS_FEED] = page.cursor
        self._pending.cursors[self._feed_keys[TICKS_FEED]] = page.cursor

    async def _clock(self) -> None:
        while True:
            await asyncio.sleep(self._config.clock_seconds)
            if self._ticks_at_head:
                self._record(self.core.advance_clock(self._now()))

    def _record(self, emitted: Emitted) -> None:
        if not emitted.final and not emitted.forming and not self._pending:
            return
        self._pending.add(emitted.final, final=True)
        self._pending.add(emitted.forming, final=False)
        self._pending_bars += len(emitted.final) + len(emitted.forming)
        now_us = to_us(self._now()) if emitted.final else 0
        for bar in emitted.final:
            metrics.BARS.labels(bar.timeframe.name, "revised" if bar.revision else "final").inc()
            if bar.ea_disagrees:
                metrics.EA_DISAGREEMENTS.inc()
            if not bar.revision:
                end_us = bucket_bounds(to_us(bar.ts), bar.timeframe)[1]
                metrics.BAR_CLOSE_SECONDS.labels(bar.timeframe.name).observe(max(0, now_us - end_us) / 1e6)
        self.forming.publish(emitted.forming)
        self._work_ready.set()
        if self._pending_bars >= self._config.max_pending_bars:
            self._room.clear()  # backpressure: stop reading input until the committer catches up

    # --- commits --------------------------------------------------------------------------------

    def _timed_commit(self, work: UnitOfWork, traceparent: str | None) -> None:
        with metrics.COMMIT_SECONDS.time():
            self._store.commit(work, traceparent)

    async def _committer(self) -> None:
        while True:
            await self._work_ready.wait()
            self._work_ready.clear()
            work, self._pending, self._pending_bars = self._pending, UnitOfWork(), 0
            self._room.set()
            if not work:
                continue
            # The commit joins the traces of the traced inputs in it; its logged bars carry it on.
            with telemetry.group_span("aggregator.commit", work.traces, {"mt5.bars": len(work.finals)}):
                traceparent = telemetry.current_traceparent()

                await db.commit_retrying(functools.partial(self._timed_commit, work, traceparent))
            self.committed.notify()

    # --- feed -----------------------------------------------------------------------------------

    def candles(
        self,
        cursor: int,
        symbols: Sequence[str],
        timeframes: Sequence[Timeframe],
        include_forming: bool,
        owns: Callable[[str], bool] = lambda _symbol: True,
        on_overflow: Callable[[], None] = lambda: None,
    ) -> AsyncIterator[FeedItem[Bar]]:
        """Final bar versions after ``cursor`` (stored, then live), with forming bars when asked.

        A subscriber that falls behind on forming bars gets ``on_overflow`` called by the publisher,
        then ``SubscriberTooSlow`` raised (``services.common.live``).
        """

        async def read(after: int, limit: int) -> list[LoggedBar]:
            return await asyncio.to_thread(self._store.candles_after, after, symbols, timeframes, limit)

        return live_feed(
            read,
            self.committed,
            cursor,
            page_size=self._config.feed_page_size,
            poll_seconds=self._config.feed_poll_seconds,
            unpack=lambda logged: (logged.cursor, logged.bar, logged.traceparent),
            fanout=self.forming if include_forming else None,
            wants=series_filter(symbols, timeframes, owns),
            current=lambda: self.core.forming(symbols or None),
            feed=metrics.CANDLES_FEED,
            on_overflow=on_overflow,
        )

    def candles_stored(
        self,
        symbol: str,
        timeframe: Timeframe,
        start: dt.datetime | None,
        end: dt.datetime | None,
        limit: int,
    ) -> list[Bar]:
        """Stored bars of one symbol and timeframe (blocking; run in a thread)."""
        return self._store.candles(symbol, timeframe, start, end, limit)

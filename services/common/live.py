"""Live-only updates (forming bars, provisional values) merged into a durable feed.

Durable items are read from the database page by page (``services.common.feed.follow``), so a reader
that falls behind is held back by gRPC flow control and costs the server one page and its cursor.

Live-only items are snapshots: each subscriber keeps the newest unread version per series (its
``key``, e.g. symbol and timeframe), so a subscriber that reads slower than updates arrive receives
the latest state of every series instead of every intermediate version, and its memory is bounded by
the number of series, not by the update rate. A subscriber is too slow (``SubscriberTooSlow``, which
the servicers answer with RESOURCE_EXHAUSTED; it resumes from its last cursor) when it has more
series unread than its limit, or when its oldest unread update has waited longer than ``max_delay``
seconds. The publisher notices, so a handler blocked writing to a client that stopped reading is cut
off too (``CutOff``). Live items carry the cursor of the last durable item sent before them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable, Sequence
from typing import Generic, Protocol, TypeVar

import grpc

from services.common import metrics
from services.common.feed import CommitSignal, HasCursor, follow
from services.common.market import Timeframe

T = TypeVar("T")
P = TypeVar("P", bound=HasCursor)


# What a feed yields: (cursor, item, traceparent of the commit that wrote it or None).
FeedItem = tuple[int, T, str | None]


class SubscriberTooSlow(Exception):
    """A subscriber fell too far behind on live updates; it must resume from its cursor."""


class _Keyed(Protocol):
    @property
    def symbol(self) -> str: ...
    @property
    def timeframe(self) -> Timeframe: ...


def series_key(item: _Keyed) -> tuple[str, Timeframe]:
    """The series a live item belongs to: a newer version of it replaces an unread older one."""
    return item.symbol, item.timeframe


@dataclasses.dataclass(frozen=True, slots=True)
class LiveLimits:
    """How far behind on live updates a subscriber may fall before it is cut off."""

    series: int  # series with an unread update
    max_delay: float  # seconds the oldest unread update may wait


@dataclasses.dataclass(eq=False)
class LiveSubscription(Generic[T]):
    """One subscriber's filter and its newest unread version per series, oldest series first."""

    wants: Callable[[T], bool]
    limits: LiveLimits
    on_overflow: Callable[[], None] = lambda: None
    unread: dict[Hashable, tuple[float, T]] = dataclasses.field(default_factory=dict)
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    overflowed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def offer(self, key: Hashable, item: T, now: float) -> bool:
        """Keep ``item`` as its series' unread version; False when the subscriber is too slow."""
        queued = self.unread.get(key)
        if queued is not None:
            self.unread[key] = (queued[0], item)  # keeps its place and the time it started waiting
        elif len(self.unread) >= self.limits.series:
            return False
        else:
            self.unread[key] = (now, item)
            self.ready.set()
        oldest = next(iter(self.unread.values()))[0]
        return now - oldest <= self.limits.max_delay

    async def get(self) -> T:
        """The unread update that has waited longest."""
        while not self.unread:
            self.ready.clear()
            await self.ready.wait()
        key = next(iter(self.unread))
        return self.unread.pop(key)[1]


class LiveFanout(Generic[T]):
    """Hands live-only items to every subscriber that wants them, never blocking the publisher."""

    def __init__(self, limits: LiveLimits, key: Callable[[T], Hashable]) -> None:
        self._limits = limits
        self._key = key
        self._subscriptions: set[LiveSubscription[T]] = set()

    @property
    def limits(self) -> LiveLimits:
        """How far behind a subscriber may fall."""
        return self._limits

    def subscribe(self, wants: Callable[[T], bool], on_overflow: Callable[[], None]) -> LiveSubscription[T]:
        """Start receiving; pair with ``unsubscribe``. ``on_overflow`` runs once if it falls behind."""
        subscription = LiveSubscription(wants, self._limits, on_overflow)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: LiveSubscription[T]) -> None:
        """Stop receiving."""
        self._subscriptions.discard(subscription)

    def publish(self, items: Sequence[T], only: LiveSubscription[T] | None = None) -> None:
        """Offer the items each subscriber wants; one that falls behind is dropped and told so."""
        now = time.monotonic()
        for subscription in (only,) if only is not None else tuple(self._subscriptions):
            for item in items:
                if subscription.wants(item) and not subscription.offer(self._key(item), item, now):
                    self.unsubscribe(subscription)
                    subscription.unread.clear()
                    subscription.overflowed.set()
                    subscription.on_overflow()
                    break


TOO_SLOW = "subscriber fell too far behind; resume from your last cursor"


class CutOff:
    """Ends one gRPC subscription that fell behind: RESOURCE_EXHAUSTED, even to a client that stopped reading.

    Create it in the handler's task and pass it as ``on_overflow``. The publisher calls it when the
    subscriber falls behind: the status is sent at once, in order after what the client has not read
    yet, and the handler is cancelled if it is still running ``reset_after`` seconds later (blocked
    writing to a client that does not read), freeing its task, its slot and its place in the feed.
    The handler ends with ``await cut_off.finish()`` when it notices the overflow itself.
    """

    def __init__(self, context: grpc.aio.ServicerContext, reset_after: float | None = 5.0) -> None:
        self._context = context
        self._reset_after = reset_after
        self._handler = asyncio.current_task()
        self._aborting: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        """Start ending the subscription (once); called by the publisher when it fell behind."""
        if self._aborting is not None:
            return
        self._aborting = asyncio.ensure_future(self._abort())
        handler = self._handler
        if handler is not None and self._reset_after is not None and not handler.done():
            timer = asyncio.get_running_loop().call_later(self._reset_after, handler.cancel)
            handler.add_done_callback(lambda _task: timer.cancel())

    async def _abort(self) -> None:
        # Sends the status after the messages already queued; completes once the client has them.
        with contextlib.suppress(Exception):
            await self._context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_SLOW)

    async def finish(self) -> None:
        """End the handler after ``SubscriberTooSlow``: gRPC then reports the status sent here."""
        self()
        assert self._aborting is not None
        await asyncio.shield(self._aborting)  # the reset may cancel the handler, never the status


async def merge_live(
    pages: AsyncGenerator[Sequence[P], None],
    unpack: Callable[[P], tuple[int, T, str | None]],
    fanout: LiveFanout[T] | None,
    wants: Callable[[T], bool],
    cursor: int,
    current: Callable[[], Sequence[T]] = tuple,
    feed: str = "",
    on_overflow: Callable[[], None] = lambda: None,
) -> AsyncIterator[FeedItem[T]]:
    """Durable pages, interleaved with live items when ``fanout`` is given, as (cursor, item, trace).

    ``unpack`` gives a durable entry's cursor, item and stored trace context (``traceparent`` of
    the commit that wrote it, None when not traced); live items carry no trace context.

    ``wants`` filters both kinds (durable pages may hold items the subscriber skips, e.g. other
    shards' symbols; the cursor still moves past them).

    ``current`` gives the live items that exist at subscription time (e.g. the bars forming now).
    When the subscriber falls behind on live items, ``on_overflow`` is called at once, from the
    publisher (the handler may be blocked writing: see ``CutOff``), and ``SubscriberTooSlow`` is
    raised when the feed is next read.
    """

    def overflowed() -> None:
        metrics.FEED_SLOW_SUBSCRIBERS.labels(feed or "unnamed").inc()
        on_overflow()

    subscription = None
    if fanout is not None:
        subscription = fanout.subscribe(wants, overflowed)
        fanout.publish(current(), only=subscription)
    next_page: asyncio.Future[Sequence[P]] = asyncio.ensure_future(anext(pages))
    next_live: asyncio.Future[T] | None = None
    overflow: asyncio.Future[bool] | None = None
    try:
        while True:
            waiting: set[asyncio.Future[object]] = {next_page}  # type: ignore[arg-type]
            if subscription is not None:
                next_live = next_live or asyncio.ensure_future(subscription.get())
                overflow = overflow or asyncio.ensure_future(subscription.overflowed.wait())
                waiting |= {next_live, overflow}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if overflow is not None and overflow in done:
                raise SubscriberTooSlow
            if next_page in done:
                for entry in next_page.result():
                    cursor, item, traceparent = unpack(entry)
                    if wants(item):
                        yield cursor, item, traceparent
                next_page = asyncio.ensure_future(anext(pages))
            if next_live is not None and next_live in done:
                yield cursor, next_live.result(), None
                next_live = None
    finally:
        for future in (next_page, next_live, overflow):
            if future is not None:
                future.cancel()
        with contextlib.suppress(Exception):
            await pages.aclose()
        if fanout is not None and subscription is not None:
            fanout.unsubscribe(subscription)


def series_filter(
    symbols: Sequence[str],
    timeframes: Sequence[Timeframe],
    owns: Callable[[str], bool] = lambda _symbol: True,
) -> Callable[[_Keyed], bool]:
    """A subscriber's filter: its symbols (all when empty), timeframes (all when empty) and shard."""
    wanted_symbols, wanted_timeframes = frozenset(symbols), frozenset(timeframes)

    def wants(item: _Keyed) -> bool:
        return (
            (not wanted_symbols or item.symbol in wanted_symbols)
            and (not wanted_timeframes or item.timeframe in wanted_timeframes)
            and owns(item.symbol)
        )

    return wants


def live_feed(
    read: Callable[[int, int], Awaitable[Sequence[P]]],
    signal: CommitSignal,
    cursor: int,
    *,
    page_size: int,
    poll_seconds: float,
    unpack: Callable[[P], tuple[int, T, str | None]],
    fanout: LiveFanout[T] | None,
    wants: Callable[[T], bool],
    current: Callable[[], Sequence[T]] = tuple,
    feed: str = "",
    on_overflow: Callable[[], None] = lambda: None,
) -> AsyncIterator[FeedItem[T]]:
    """A stage's whole feed: durable pages after ``cursor`` (``follow``) merged with live items.

    A named ``feed`` reports each subscription's lag and cut-offs (services.common.metrics).
    """
    pages = follow(read, signal, cursor, page_size=page_size, poll_seconds=poll_seconds, feed=feed)
    return merge_live(pages, unpack, fanout, wants, cursor, current, feed, on_overflow)

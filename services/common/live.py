"""Live-only updates (forming bars, provisional values) merged into a durable feed.

Durable items are read from the database page by page (``services.common.feed.follow``); live-only
items are pushed to each subscriber that asked for them through a bounded queue. A subscriber that
lets its queue fill up is cut off (``SubscriberTooSlow``) rather than growing the server's memory;
it resumes from its last cursor. Live items carry the cursor of the last durable item sent before them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

from services.common import metrics
from services.common.feed import CommitSignal, HasCursor, follow
from services.common.market import Timeframe

T = TypeVar("T")
P = TypeVar("P", bound=HasCursor)


# What a feed yields: (cursor, item, traceparent of the commit that wrote it or None).
FeedItem = tuple[int, T, str | None]


class SubscriberTooSlow(Exception):
    """A subscriber's bounded queue of live updates overflowed; it must resume from its cursor."""


@dataclasses.dataclass(eq=False)
class LiveSubscription(Generic[T]):
    """One subscriber's filter and bounded queue."""

    wants: Callable[[T], bool]
    queue: asyncio.Queue[T]
    overflowed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class LiveFanout(Generic[T]):
    """Hands live-only items to every subscriber that wants them, never blocking the publisher."""

    def __init__(self, queue_size: int) -> None:
        self._queue_size = queue_size
        self._subscriptions: set[LiveSubscription[T]] = set()

    def subscribe(self, wants: Callable[[T], bool]) -> LiveSubscription[T]:
        """Start receiving; pair with ``unsubscribe``."""
        subscription: LiveSubscription[T] = LiveSubscription(wants, asyncio.Queue(self._queue_size))
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: LiveSubscription[T]) -> None:
        """Stop receiving."""
        self._subscriptions.discard(subscription)

    def publish(self, items: Sequence[T], only: LiveSubscription[T] | None = None) -> None:
        """Queue the items each subscriber wants; a full queue marks its subscriber too slow."""
        for subscription in (only,) if only is not None else tuple(self._subscriptions):
            for item in items:
                if subscription.wants(item):
                    try:
                        subscription.queue.put_nowait(item)
                    except asyncio.QueueFull:
                        subscription.overflowed.set()
                        break


async def merge_live(
    pages: AsyncGenerator[Sequence[P], None],
    unpack: Callable[[P], tuple[int, T, str | None]],
    fanout: LiveFanout[T] | None,
    wants: Callable[[T], bool],
    cursor: int,
    current: Callable[[], Sequence[T]] = tuple,
    feed: str = "",
) -> AsyncIterator[FeedItem[T]]:
    """Durable pages, interleaved with live items when ``fanout`` is given, as (cursor, item, trace).

    ``unpack`` gives a durable entry's cursor, item and stored trace context (``traceparent`` of
    the commit that wrote it, None when not traced); live items carry no trace context.

    ``wants`` filters both kinds (durable pages may hold items the subscriber skips, e.g. other
    shards' symbols; the cursor still moves past them).

    ``current`` gives the live items that exist at subscription time (e.g. the bars forming now).
    Raises ``SubscriberTooSlow`` when the subscriber's live queue overflowed.
    """
    subscription = fanout.subscribe(wants) if fanout is not None else None
    if fanout is not None and subscription is not None:
        fanout.publish(current(), only=subscription)
    next_page: asyncio.Future[Sequence[P]] = asyncio.ensure_future(anext(pages))
    next_live: asyncio.Future[T] | None = None
    overflow: asyncio.Future[bool] | None = None
    try:
        while True:
            waiting: set[asyncio.Future[object]] = {next_page}  # type: ignore[arg-type]
            if subscription is not None:
                next_live = next_live or asyncio.ensure_future(subscription.queue.get())
                overflow = overflow or asyncio.ensure_future(subscription.overflowed.wait())
                waiting |= {next_live, overflow}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if overflow is not None and overflow in done:
                metrics.FEED_SLOW_SUBSCRIBERS.labels(feed or "unnamed").inc()
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


class _Keyed(Protocol):
    @property
    def symbol(self) -> str: ...
    @property
    def timeframe(self) -> Timeframe: ...


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
) -> AsyncIterator[FeedItem[T]]:
    """A stage's whole feed: durable pages after ``cursor`` (``follow``) merged with live items.

    A named ``feed`` reports each subscription's lag and cut-offs (services.common.metrics).
    """
    pages = follow(read, signal, cursor, page_size=page_size, poll_seconds=poll_seconds, feed=feed)
    return merge_live(pages, unpack, fanout, wants, cursor, current, feed)

"""Following a durable feed: everything after a cursor, first from the database, then live.

A subscriber reads pages after its cursor; when it has caught up it waits for the writer's
commit signal (or a short poll, for rows committed by another replica) and reads again. Reading
through the database keeps every subscriber gap-free and duplicate-free across restarts, and
bounds the server's memory per subscriber to one page whatever its speed: a slow reader only
holds a cursor, and gRPC flow control pushes back on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from typing import Protocol, TypeVar

from services.common import metrics

T = TypeVar("T", bound="HasCursor")


class HasCursor(Protocol):
    """A feed item: it knows its own cursor."""

    @property
    def cursor(self) -> int:
        """Position of the item in its feed."""
        ...


class CommitSignal:
    """Wakes subscribers when the writer commits; cheap when nobody listens."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        """Take this before reading, then wait on it, so that no commit in between is missed."""
        return self._event

    def notify(self) -> None:
        """Wake everyone waiting on the current event and start a new one."""
        self._event.set()
        self._event = asyncio.Event()


async def follow(
    read_after: Callable[[int, int], Awaitable[Sequence[T]]],
    signal: CommitSignal,
    cursor: int,
    *,
    page_size: int = 1000,
    poll_seconds: float = 1.0,
    feed: str = "",
    announce_head: bool = False,
) -> AsyncGenerator[Sequence[T], None]:
    """Yield every item after ``cursor`` in cursor order, forever, a page at a time.

    A page shorter than ``page_size`` reached the newest committed item. With ``announce_head``,
    reaching it with nothing new also yields an empty page (once, until new items come), so a
    subscriber learns it is caught up even when there was nothing to send.

    A named ``feed`` reports the subscription's lag (``mt5_feed_lag_*``, see services.common.metrics).
    """
    announced = False
    with metrics.FEED_LAG.track(feed, cursor) if feed else contextlib.nullcontext() as position:
        while True:
            waiter = signal.waiter()
            read_at = time.monotonic()
            items = await read_after(cursor, page_size)
            if items:
                yield items
                cursor = items[-1].cursor
                announced = len(items) < page_size
            elif announce_head and not announced:
                yield items
                announced = True
            if len(items) < page_size:
                if position is not None:
                    # Everything committed before the read started has now been delivered.
                    position.cursor, position.caught_up_at, position.waiting = cursor, read_at, True
                notified = waiter.is_set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), poll_seconds)
                    # Woken by a commit while waiting: nothing older than now is missing.
                    if position is not None and not notified:
                        position.caught_up_at = time.monotonic()
                if position is not None:
                    position.waiting = False
            elif position is not None:
                position.cursor = cursor


class SubscriberSlots:
    """A bound on concurrent subscriptions; past it, new ones are refused, not queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextlib.contextmanager
    def take(self) -> Iterator[bool]:
        """Yield True and hold a slot while one is free; yield False when none is."""
        if self.active >= self.limit:
            yield False
            return
        self.active += 1
        try:
            yield True
        finally:
            self.active -= 1

"""Live-only updates merged into a durable feed: coalescing, the bounds and the cut-off."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Sequence

import grpc
import pytest

from services.common.live import (
    CutOff,
    LiveFanout,
    LiveLimits,
    LiveSubscription,
    SubscriberTooSlow,
    merge_live,
    series_key,
)
from services.common.market import Timeframe


@dataclasses.dataclass(frozen=True)
class Update:
    symbol: str
    timeframe: Timeframe
    version: int


@dataclasses.dataclass(frozen=True)
class Entry:
    cursor: int
    item: Update


def _subscription(series: int = 10, max_delay: float = 5.0) -> LiveSubscription[Update]:
    return LiveSubscription(lambda _u: True, LiveLimits(series, max_delay))


async def _no_pages() -> AsyncGenerator[Sequence[Entry], None]:
    await asyncio.Event().wait()
    yield []


def _unpack(entry: Entry) -> tuple[int, Update, str | None]:
    return entry.cursor, entry.item, None


async def test_subscription_newer_version_replaces_unread_keeps_its_place() -> None:
    subscription = _subscription()
    for version, symbol in enumerate(["A", "B", "A", "A"]):
        assert subscription.offer(symbol, Update(symbol, Timeframe.M1, version), now=0.0)
    assert [await subscription.get(), await subscription.get()] == [
        Update("A", Timeframe.M1, 3),
        Update("B", Timeframe.M1, 1),
    ]
    assert not subscription.unread


async def test_subscription_more_series_than_limit_refused() -> None:
    subscription = _subscription(series=2)
    assert subscription.offer("A", Update("A", Timeframe.M1, 0), now=0.0)
    assert subscription.offer("B", Update("B", Timeframe.M1, 0), now=0.0)
    assert subscription.offer("A", Update("A", Timeframe.M1, 1), now=0.0)  # a known series: fine
    assert not subscription.offer("C", Update("C", Timeframe.M1, 0), now=0.0)


async def test_subscription_oldest_unread_waits_past_max_delay_refused() -> None:
    subscription = _subscription(max_delay=5.0)
    assert subscription.offer("A", Update("A", Timeframe.M1, 0), now=100.0)
    # Replacing its version does not reset how long the series has waited unread.
    assert subscription.offer("A", Update("A", Timeframe.M1, 1), now=104.0)
    assert not subscription.offer("A", Update("A", Timeframe.M1, 2), now=105.5)


async def test_subscription_read_in_time_never_too_old() -> None:
    subscription = _subscription(max_delay=5.0)
    for second in range(100):
        assert subscription.offer("A", Update("A", Timeframe.M1, second), now=float(second))
        assert (await subscription.get()).version == second


async def test_fanout_thousands_of_updates_to_few_series_not_cut_off() -> None:
    fanout = LiveFanout[Update](LiveLimits(series=9, max_delay=60.0), series_key)
    overflows: list[int] = []
    subscription = fanout.subscribe(lambda _u: True, lambda: overflows.append(1))
    frames = list(Timeframe)
    fanout.publish([Update("EURUSD", frames[i % 9], i) for i in range(10_000)])
    assert overflows == []
    assert len(subscription.unread) == 9
    assert {u.version for _, u in subscription.unread.values()} == set(range(10_000 - 9, 10_000))


async def test_fanout_subscriber_past_limit_dropped_told_once() -> None:
    fanout = LiveFanout[Update](LiveLimits(series=2, max_delay=60.0), series_key)
    overflows: list[int] = []
    slow = fanout.subscribe(lambda _u: True, lambda: overflows.append(1))
    other = fanout.subscribe(lambda u: u.symbol == "A", lambda: None)
    fanout.publish([Update(s, Timeframe.M1, 0) for s in "ABC"])
    fanout.publish([Update(s, Timeframe.M1, 1) for s in "ABC"])
    assert overflows == [1]
    assert slow.overflowed.is_set()
    assert not slow.unread
    assert not other.overflowed.is_set()
    assert (await other.get()).version == 1


class FakeContext:
    """The part of grpc.aio.ServicerContext that CutOff uses: abort sends a status, then raises."""

    def __init__(self) -> None:
        self.statuses: list[grpc.StatusCode] = []

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.statuses.append(code)
        raise RuntimeError(details)  # grpc raises its AbortError


async def test_merge_live_subscriber_past_limit_raises_too_slow_aborts_once() -> None:
    fanout = LiveFanout[Update](LiveLimits(series=1, max_delay=60.0), series_key)
    context = FakeContext()

    async def handler() -> None:
        cut_off = CutOff(context, reset_after=None)
        feed = merge_live(_no_pages(), _unpack, fanout, lambda _u: True, 0, on_overflow=cut_off)
        try:
            async for _ in feed:
                pass
        except SubscriberTooSlow:
            await cut_off.finish()

    task = asyncio.create_task(handler())
    await asyncio.sleep(0)
    fanout.publish([Update("A", Timeframe.M1, 0), Update("B", Timeframe.M1, 0)])
    async with asyncio.timeout(5):
        await task
    assert context.statuses == [grpc.StatusCode.RESOURCE_EXHAUSTED]


async def test_merge_live_handler_blocked_writing_status_sent_then_cancelled_after_reset_delay() -> None:
    fanout = LiveFanout[Update](LiveLimits(series=1, max_delay=60.0), series_key)
    context = FakeContext()
    blocked = asyncio.Event()

    async def handler() -> None:
        cut_off = CutOff(context, reset_after=0.05)
        async for _ in merge_live(_no_pages(), _unpack, fanout, lambda _u: True, 0, on_overflow=cut_off):
            blocked.set()
            await asyncio.Event().wait()  # a gRPC write to a client that stopped reading

    task = asyncio.create_task(handler())
    await asyncio.sleep(0)
    fanout.publish([Update("A", Timeframe.M1, 0)])
    await blocked.wait()
    fanout.publish([Update("B", Timeframe.M1, 0), Update("C", Timeframe.M1, 0)])
    await asyncio.sleep(0)
    assert context.statuses == [grpc.StatusCode.RESOURCE_EXHAUSTED]  # sent before the reset
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    assert task.cancelled()


async def test_merge_live_durable_and_live_items_both_delivered_live_after_its_cursor() -> None:
    fanout = LiveFanout[Update](LiveLimits(series=10, max_delay=60.0), series_key)
    page = asyncio.Event()

    async def pages() -> AsyncGenerator[Sequence[Entry], None]:
        await page.wait()
        yield [Entry(7, Update("A", Timeframe.M1, 0))]
        await asyncio.Event().wait()

    feed = merge_live(pages(), _unpack, fanout, lambda _u: True, 3)
    first = asyncio.ensure_future(anext(feed))
    await asyncio.sleep(0)
    page.set()
    assert await first == (7, Update("A", Timeframe.M1, 0), None)
    fanout.publish([Update("A", Timeframe.M1, 1)])
    assert await anext(feed) == (7, Update("A", Timeframe.M1, 1), None)
    await feed.aclose()  # type: ignore[attr-defined]

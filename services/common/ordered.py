"""Pipelined request handling with answers in request order and a bound on work in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

In = TypeVar("In")
Prepared = TypeVar("Prepared")
Out = TypeVar("Out")


async def in_order(
    source: AsyncIterable[In],
    prepare: Callable[[In], Prepared],
    process: Callable[[Prepared], Awaitable[Out]],
    *,
    max_in_flight: int,
) -> AsyncIterator[Out]:
    """Yield ``process(prepare(item))`` for each item, in order, overlapping up to ``max_in_flight``.

    ``prepare`` runs synchronously as each item is read: when it raises, no later item is read or
    processed, the results of earlier items are still yielded, and then the error is raised. That
    keeps a stream's valid prefix committed and acknowledged and nothing after a bad item applied.
    When ``max_in_flight`` items are unanswered, reading stops: the peer feels flow control.
    """
    slots = asyncio.Semaphore(max_in_flight)
    queue: asyncio.Queue[asyncio.Future[Out] | BaseException | None] = asyncio.Queue()

    async def read() -> None:
        try:
            async for item in source:
                prepared = prepare(item)
                await slots.acquire()
                await queue.put(asyncio.ensure_future(process(prepared)))
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)

    reader = asyncio.create_task(read())
    try:
        while True:
            entry = await queue.get()
            if entry is None:
                return
            if isinstance(entry, BaseException):
                raise entry
            try:
                yield await entry
            finally:
                slots.release()
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        while not queue.empty():
            leftover = queue.get_nowait()
            if isinstance(leftover, asyncio.Future):
                # Started work completes in the writer; its data is committed and a re-send is a replay.
                leftover.cancel()

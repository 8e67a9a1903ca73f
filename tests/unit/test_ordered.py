"""The in-order pipeline answers in request order, bounds work in flight, and stops at a bad item."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from services.common.ordered import in_order


async def items(values: list[int]) -> AsyncIterator[int]:
    for v in values:
        yield v


def check(value: int) -> int:
    if value < 0:
        raise ValueError(f"bad {value}")
    return value


async def test_in_order_slow_and_fast_items_answer_in_request_order() -> None:
    rng = random.Random(1)

    async def work(v: int) -> int:
        await asyncio.sleep(rng.random() / 200)
        return v * 10

    got = [x async for x in in_order(items(list(range(50))), check, work, max_in_flight=8)]
    assert got == [v * 10 for v in range(50)]


async def test_in_order_never_exceeds_max_in_flight() -> None:
    running = peak = 0

    async def work(v: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001)
        running -= 1
        return v

    assert [x async for x in in_order(items(list(range(40))), check, work, max_in_flight=3)] == list(
        range(40)
    )
    assert peak == 3


async def test_in_order_bad_item_yields_prefix_then_raises_and_processes_nothing_after() -> None:
    processed: list[int] = []

    async def work(v: int) -> int:
        processed.append(v)
        return v

    got: list[int] = []
    with pytest.raises(ValueError, match="bad -1"):
        async for x in in_order(items([1, 2, -1, 3, 4]), check, work, max_in_flight=4):
            got.append(x)
    assert got == [1, 2]
    assert 3 not in processed
    assert 4 not in processed

"""The signal stage's bursts: rows built together, scored together, signals in feed order.

A real stage, batcher and model (real torch); the indicators feed is replaced by messages handed to
the stage, its histories are given up front (so it never fetches one) and its commits are read from
the unit of work the committer would take.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
from collections.abc import AsyncIterator
from typing import Protocol

import grpc
import numpy as np
import pytest
import sqlalchemy
from mt5.indicators.v1 import indicators_service_pb2 as ind_pb
from mt5.market.v1 import market_pb2
from prometheus_client import REGISTRY

from services.common.market import Timeframe
from services.common.protoconv import timestamp
from services.inference.config import InferenceConfig
from services.inference.domain import SeriesHistory, Signal
from services.inference.features import INPUTS, history_needed, last_row
from services.inference.serving import MicroBatcher, ModelHolder
from services.inference.stage import REVISION_SLACK, InferenceStage
from services.inference.store import SignalStore
from tests.inference_models import served

WINDOW = 3
NEEDED = history_needed(WINDOW)
T0 = dt.datetime(2025, 3, 3, tzinfo=dt.UTC)
SYMBOLS = ("AAA", "BBB", "CCC", "DDD")


def _market(minutes: int, seed: int = 3) -> np.ndarray:
    """``(symbols, minutes, len(INPUTS))`` finite candle values near the model's training scales."""
    rng = np.random.default_rng(seed)
    shape = (len(SYMBOLS), minutes)
    close = 1.08 + np.cumsum(rng.normal(0, 1e-3, shape), axis=1)
    columns = [close, rng.uniform(0.5, 1.5, shape), rng.uniform(1e-4, 3e-4, shape)]
    columns += [rng.uniform(30, 70, shape)] + [rng.normal(0, 1e-4, shape) for _ in range(3)]
    columns += [rng.uniform(1e-4, 3e-4, shape)]
    return np.stack(columns, axis=2)


def _message(symbol: str, minute: int, values: np.ndarray, cursor: int) -> ind_pb.SubscribeIndicatorsResponse:
    named = dict(zip(INPUTS, values.tolist(), strict=True))
    return ind_pb.SubscribeIndicatorsResponse(
        cursor=cursor,
        values=market_pb2.IndicatorValues(
            symbol=symbol,
            timeframe=market_pb2.M1,
            ts=timestamp(T0 + dt.timedelta(minutes=minute)),
            final=True,
            **named,
        ),
    )


class _Running:
    """A stage with its burst and collect loops running; ``work()`` waits for what it would commit."""

    def __init__(self, stage: InferenceStage, batcher: MicroBatcher) -> None:
        self.stage = stage
        self._tasks = [asyncio.create_task(t) for t in (batcher.run(), stage._bursts(), stage._collect())]

    async def work(self, cursor: int) -> tuple[list[Signal], int | None]:
        """Signals queued for commit until the unit of work reaches ``cursor``."""
        signals: list[Signal] = []
        while True:
            await asyncio.wait_for(self.stage._work_ready.wait(), 10)
            self.stage._work_ready.clear()
            signals += self.stage._pending.signals
            self.stage._pending.signals = []
            if self.stage._pending.cursor == cursor:
                return signals, self.stage._pending.cursor

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def holder(tmp_path: pathlib.Path) -> ModelHolder:
    return served(tmp_path, window=WINDOW)[0]


class Start(Protocol):
    """Starts a stage holding ``history`` candles of each symbol of ``market``."""

    def __call__(self, market: np.ndarray, history: int, max_batch: int, max_wait: float) -> _Running: ...


@pytest.fixture
async def start(holder: ModelHolder) -> AsyncIterator[Start]:
    """Start a stage: ``start(market, history held, max_batch, max_wait)``; stopped after the test."""
    running: list[_Running] = []

    def start_stage(market: np.ndarray, history: int, max_batch: int, max_wait: float) -> _Running:
        running.append(_Running(*_stage(holder, market, history, max_batch, max_wait)))
        return running[-1]

    yield start_stage
    for r in running:
        await r.stop()


def _stage(
    holder: ModelHolder, market: np.ndarray, history: int, max_batch: int, max_wait: float
) -> tuple[InferenceStage, MicroBatcher]:
    config = InferenceConfig.from_env({"MT5MESH_API_KEY": "k" * 32, "DATABASE_URL": "sqlite://"})
    batcher = MicroBatcher(holder, max_batch, max_wait, config.max_queue)
    # Histories are held: the stage never calls the indicators service (nothing listens there).
    stage = InferenceStage(
        config,
        SignalStore(sqlalchemy.create_engine("sqlite://")),
        grpc.aio.insecure_channel("127.0.0.1:9"),
        holder,
        batcher,
    )
    stage._shape = (Timeframe.M1, WINDOW)
    stage._series = {
        (symbol, Timeframe.M1): SeriesHistory(
            NEEDED + REVISION_SLACK,
            [(T0 + dt.timedelta(minutes=j), tuple(market[i, j].tolist())) for j in range(history)],
            from_start=True,
        )
        for i, symbol in enumerate(SYMBOLS)
    }
    return stage, batcher


def _alone(holder: ModelHolder, market: np.ndarray, i: int, minute: int) -> float:
    """The candle's probability scored the one-candle way: its own row, one forward pass."""
    row = last_row(market[i, : minute + 1], WINDOW)
    return float(holder.require().scorer.probabilities(row[np.newaxis])[0])


def _batches() -> float:
    return REGISTRY.get_sample_value("mt5_inference_batch_size_count") or 0.0


def _warming_up() -> float:
    return REGISTRY.get_sample_value("mt5_inference_rows_rejected_total", {"reason": "warming_up"}) or 0.0


async def test_stage_minutes_of_many_symbols_scored_in_bursts_equal_each_candle_alone(
    holder: ModelHolder, start: Start
) -> None:
    market = _market(NEEDED + 6)
    run = start(market, NEEDED, max_batch=64, max_wait=0.05)
    stage = run.stage
    passes_before = _batches()
    cursor = 0
    expected = []
    for minute in range(NEEDED, NEEDED + 6):
        for i, symbol in enumerate(SYMBOLS):
            cursor += 1
            await stage._apply(_message(symbol, minute, market[i, minute], cursor), Timeframe.M1, WINDOW)
            expected.append((symbol, T0 + dt.timedelta(minutes=minute), _alone(holder, market, i, minute)))
    signals, committed_cursor = await run.work(cursor)
    assert committed_cursor == cursor
    assert [(s.symbol, s.ts) for s in signals] == [(symbol, ts) for symbol, ts, _ in expected]  # feed order
    np.testing.assert_allclose([s.prob_up for s in signals], [p for _, _, p in expected], rtol=0, atol=1e-6)
    # 24 candles handed over without waiting: far fewer forward passes than candles.
    assert _batches() - passes_before < len(expected) / 4


async def test_stage_max_batch_1_scores_every_candle_in_its_own_pass(
    holder: ModelHolder, start: Start
) -> None:
    market = _market(NEEDED + 2)
    run = start(market, NEEDED, max_batch=1, max_wait=0.05)
    stage = run.stage
    passes_before = _batches()
    for i, symbol in enumerate(SYMBOLS):
        await stage._apply(_message(symbol, NEEDED, market[i, NEEDED], i + 1), Timeframe.M1, WINDOW)
    signals, _ = await run.work(len(SYMBOLS))
    assert [s.symbol for s in signals] == list(SYMBOLS)
    assert _batches() - passes_before == len(SYMBOLS)


async def test_stage_lone_candle_closes_its_burst_after_max_wait(holder: ModelHolder, start: Start) -> None:
    market = _market(NEEDED + 1)
    run = start(market, NEEDED, max_batch=512, max_wait=0.02)
    stage = run.stage
    await stage._apply(_message("AAA", NEEDED, market[0, NEEDED], 7), Timeframe.M1, WINDOW)
    signals, cursor = await run.work(7)  # far fewer than 512 candles: the wait closes the burst
    assert cursor == 7
    assert [s.symbol for s in signals] == ["AAA"]
    assert signals[0].prob_up == pytest.approx(_alone(holder, market, 0, NEEDED), abs=1e-6)


async def test_stage_short_history_gets_no_signal_counted_and_cursor_moves_on(
    holder: ModelHolder, start: Start
) -> None:
    market = _market(NEEDED + 1)
    run = start(market, NEEDED - 5, max_batch=64, max_wait=0.01)
    stage = run.stage
    before = _warming_up()
    # Minute NEEDED - 5 follows the history held; its row lacks 60 closes for ma60: warming up.
    for i, symbol in enumerate(SYMBOLS):
        await stage._apply(_message(symbol, NEEDED - 5, market[i, NEEDED - 5], 10 + i), Timeframe.M1, WINDOW)
    signals, cursor = await run.work(10 + len(SYMBOLS) - 1)
    assert signals == []
    assert cursor == 13
    assert _warming_up() - before == len(SYMBOLS)

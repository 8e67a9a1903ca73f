"""Synthetic ticks and an independent pandas reference for candles, shared by the aggregator tests."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import numpy.typing as npt
import pandas as pd
from google.protobuf import timestamp_pb2
from mt5.market.v1 import market_pb2

from services.common.market import Timeframe, to_us

START = dt.datetime(2025, 10, 30, 22, 0, tzinfo=dt.UTC)  # crosses a day, a week start and a month end
RULES = {
    Timeframe.M1: "1min",
    Timeframe.M5: "5min",
    Timeframe.M15: "15min",
    Timeframe.M30: "30min",
    Timeframe.H1: "1h",
    Timeframe.H4: "4h",
    Timeframe.D1: "1D",
    Timeframe.W1: "W-MON",
    Timeframe.MN1: "MS",
}


@dataclasses.dataclass
class Ticks:
    ts: npt.NDArray[np.int64]
    bid: npt.NDArray[np.float64]
    ask: npt.NDArray[np.float64]
    volume: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, index: npt.NDArray[np.intp] | slice) -> Ticks:
        return Ticks(self.ts[index], self.bid[index], self.ask[index], self.volume[index])


def make_ticks(n: int, seed: int, *, span_hours: float = 80.0, with_volume: bool = False) -> Ticks:
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.integers(0, int(span_hours * 3600e6), n))
    # Distinct times: ties would make "first"/"last" depend on arrival order in any method.
    offsets = offsets + np.arange(n)
    mid = 1.08 + np.cumsum(rng.normal(0, 1e-5, n))
    spread = rng.integers(1, 30, n).astype(np.float64) * 1e-5
    bid: npt.NDArray[np.float64] = np.round(mid - spread / 2, 6)
    ask: npt.NDArray[np.float64] = np.round(bid + spread, 6)
    volume = rng.integers(0, 5, n).astype(np.float64) if with_volume else np.zeros(n)
    return Ticks(to_us(START) + offsets.astype(np.int64), bid, ask, volume)


def reference(ticks: Ticks) -> dict[tuple[Timeframe, dt.datetime], tuple[float, ...]]:
    """pandas resample of the ticks themselves, for every timeframe."""
    frame = pd.DataFrame(
        {
            "mid": (ticks.bid + ticks.ask) / 2,
            "spread": ticks.ask - ticks.bid,
            "volume": np.where(ticks.volume > 0, ticks.volume, 1.0),
        },
        index=pd.to_datetime(ticks.ts, unit="us", utc=True),
    ).sort_index(kind="stable")
    result = {}
    for tf, rule in RULES.items():
        agg = (
            frame.resample(rule, label="left", closed="left")
            .agg({"mid": ["first", "max", "min", "last"], "volume": "sum", "spread": "mean"})
            .dropna()
        )
        for ts, row in zip(agg.index, agg.to_numpy(), strict=True):
            result[(tf, ts.to_pydatetime())] = tuple(float(x) for x in row)
    return result


def tick_batches(ticks: Ticks, symbol: str, size: int) -> list[list[market_pb2.Tick]]:
    """The ticks as protobuf batches for StreamTicks."""
    out = []
    for a in range(0, len(ticks), size):
        out.append(
            [
                market_pb2.Tick(
                    symbol=symbol,
                    ts=timestamp_pb2.Timestamp(seconds=int(t // 1_000_000), nanos=int(t % 1_000_000) * 1000),
                    bid=float(b),
                    ask=float(k),
                    volume=float(v),
                )
                for t, b, k, v in zip(
                    ticks.ts[a : a + size],
                    ticks.bid[a : a + size],
                    ticks.ask[a : a + size],
                    ticks.volume[a : a + size],
                    strict=True,
                )
            ]
        )
    return out

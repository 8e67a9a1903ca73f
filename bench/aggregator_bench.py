"""Aggregator benchmark: ``make bench-aggregator`` (``python -m bench.aggregator_bench``).

Three measurements, all in one run on this machine:

(a) the aggregation core alone (``services.aggregator.bars.Aggregator``), single thread: ticks/s
    building all nine timeframes, fed batches of 1,000 ticks of one symbol, and fed 100 symbols
    interleaved in pages of 1,000 ticks split by symbol as the stage splits a feed page;
(b) end to end on PostgreSQL: ticks streamed into ingest (``StreamTicks``), followed by the real
    aggregator process, final M1 bars received by a ``SubscribeCandles`` client in its own process.
    First as fast as ingest acknowledges (the sustained rate through both services), then paced at a
    rate below it (latency when not saturated). Latency of a bar: from the acknowledgement of the
    batch holding its symbol's first tick at or past bar end + lateness (the tick that moves the
    watermark past the bar) to the arrival of the bar's final version. Every expected M1 bar must
    arrive exactly once with revision 0, equal to the pandas reference for a sample symbol;
(c) the seed's method on the same stored ticks: its ``GROUP BY`` bucket query (M1 only) over
    ``ingest_ticks``, ticks/s, and the delay its 5 s polling adds.

CPU time of each process and the aggregator's (and ingest's) VmRSS are recorded; with py-spy present
a further run profiles the aggregator and ingest. Results go to ``bench/results/aggregator.json``
and a table is printed. Ratios use the figures of this same run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import math
import multiprocessing
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import psycopg
from google.protobuf import timestamp_pb2
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_grpc
from mt5.ingest.v1 import ingest_service_pb2 as ingest_pb
from mt5.market.v1 import market_pb2

from bench.common import (
    MIB,
    CpuMeter,
    RssSampler,
    ScenarioFailed,
    machine_info,
    plain_url,
    postgres_pids,
    publish,
    scratch_folder,
    step,
    wait_for_quiet,
)
from services.aggregator.bars import M1_US, AggregationSettings, Aggregator, to_us
from services.common.channels import api_key_metadata
from services.common.market import Timeframe
from services.ingest.client import TickStreamer
from tests import helpers
from tests.market_data import Ticks, make_ticks, reference

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "bench" / "results" / "aggregator.json"
QUICK_OUTPUT = pathlib.Path(tempfile.gettempdir()) / "aggregator-bench-quick.json"
SOURCE_ID = "bench"
WARMUP_SYMBOL = "WARMUP"
# Crosses midnight at the end of a month early on: day and month bars roll over during the run.
FEED_START = dt.datetime(2025, 10, 31, 23, 40, tzinfo=dt.UTC)
WARMUP_START = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)
STREAM_TICKS = "/mt5.ingest.v1.IngestService/StreamTicks"
SEED_POLL_SECONDS = 5.0  # the seed's TICK_AGG_INTERVAL
TARGET_RATE = 100_000.0  # (b)'s throughput target, also the paced rate's ceiling

# The seed's tick aggregator (seed docs, "Algoritmo de Agregação"), adapted to ingest_ticks: float8
# columns instead of numeric casts out of JSONB, date_trunc('minute') instead of TimescaleDB's
# time_bucket('1 minute') (the same buckets in UTC), every stored tick instead of one polling window.
SEED_QUERY = """
SELECT
  symbol,
  'M1' AS timeframe,
  date_trunc('minute', ts) AS ts,
  (array_agg((bid + ask) / 2 ORDER BY ts))[1] AS open,
  MAX((bid + ask) / 2) AS high,
  MIN((bid + ask) / 2) AS low,
  (array_agg((bid + ask) / 2 ORDER BY ts DESC))[1] AS close,
  COUNT(*) AS volume,
  AVG(ask - bid) AS spread
FROM ingest_ticks
GROUP BY symbol, date_trunc('minute', ts)
"""

# Received bar: symbol, bucket start (µs), cursor, revision, final, tick count, OHLC, volume, spread,
# and the receiver's time.monotonic() when the message arrived.
Record = tuple[str, int, int, int, bool, int, float, float, float, float, float, float, float]
BarKey = tuple[int, int]  # (symbol index, bucket start in µs)


@dataclasses.dataclass(frozen=True)
class Params:
    """What one run measures; see ``parse_args``."""

    core_ticks: int
    core_interleaved_ticks: int
    core_repeats: int
    symbols: int
    tick_rate: float
    batch_size: int
    window: int
    duration: float
    max_rate: float
    paced_rate: float | None
    paced_fraction: float
    drain_timeout: float
    seed_repeats: int
    py_spy: str | None
    profile_duration: float
    service_env: dict[str, str]
    wait_quiet: float
    noisy_retries: int
    quick: bool
    output: pathlib.Path

    @property
    def lateness_us(self) -> int:
        """The aggregator's allowed lateness, as the services run with it."""
        default = AggregationSettings().lateness.total_seconds()
        return round(float(self.service_env.get("AGGREGATOR_LATENESS_SECONDS", default)) * 1_000_000)


# --- ticks -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Feed:
    """A tick stream over several symbols in arrival (= time) order, as columns."""

    names: tuple[str, ...]
    sym: npt.NDArray[np.int32]
    ts: npt.NDArray[np.int64]
    bid: npt.NDArray[np.float64]
    ask: npt.NDArray[np.float64]
    volume: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.ts)

    def ticks_of(self, k: int, count: int) -> Ticks:
        """Symbol ``k``'s ticks among the first ``count``, in the tests' reference form."""
        index = np.flatnonzero(self.sym[:count] == k)
        return Ticks(self.ts[index], self.bid[index], self.ask[index], self.volume[index])


def make_feed(count: int, names: Sequence[str], tick_rate: float, start: dt.datetime, seed: int = 7) -> Feed:
    """``count`` ticks over ``names``: each symbol a random walk quoted ``tick_rate`` times per simulated
    second on average (Poisson arrivals, symbols drawn at random), spreads of 1-29 points; times are
    distinct and increasing, so every symbol's ticks arrive in time order."""
    rng = np.random.default_rng(seed)
    n_sym = len(names)
    gaps = np.maximum(1, np.round(rng.exponential(1e6 / (n_sym * tick_rate), count))).astype(np.int64)
    ts = to_us(start) + np.cumsum(gaps)
    sym = rng.integers(0, n_sym, count).astype(np.int32)
    base = 0.6 + 1.4 * rng.random(n_sym)
    steps = rng.normal(0.0, 1e-5, count) * base[sym]
    # Each symbol's own random walk: a cumulative sum within each symbol's ticks.
    order = np.argsort(sym, kind="stable")
    sorted_steps = steps[order]
    csum = np.cumsum(sorted_steps)
    starts = np.flatnonzero(np.r_[True, sym[order][1:] != sym[order][:-1]])
    lengths = np.diff(np.r_[starts, count])
    walk = np.empty(count)
    walk[order] = csum - np.repeat(csum[starts] - sorted_steps[starts], lengths)
    mid = base[sym] + walk
    points = rng.integers(1, 30, count).astype(np.float64) * 1e-5
    bid = np.round(mid - points / 2, 6)
    ask = np.round(bid + points, 6)
    return Feed(tuple(names), sym, ts, bid, ask, np.zeros(count))


def symbol_names(count: int) -> tuple[str, ...]:
    return tuple(f"SYM{k:03d}" for k in range(count))


def encode_batches(feed: Feed, batch_size: int, source_id: str) -> list[bytes]:
    """Every batch as a serialized StreamTicksRequest (sequence 1, 2, ...), built before the clock runs."""
    out = []
    for b, a in enumerate(range(0, len(feed), batch_size)):
        z = a + batch_size
        secs = (feed.ts[a:z] // 1_000_000).tolist()
        nanos = (feed.ts[a:z] % 1_000_000 * 1000).tolist()
        ticks = [
            market_pb2.Tick(
                symbol=feed.names[s],
                ts=timestamp_pb2.Timestamp(seconds=sec, nanos=ns),
                bid=bid,
                ask=ask,
                volume=vol,
            )
            for s, sec, ns, bid, ask, vol in zip(
                feed.sym[a:z].tolist(),
                secs,
                nanos,
                feed.bid[a:z].tolist(),
                feed.ask[a:z].tolist(),
                feed.volume[a:z].tolist(),
                strict=True,
            )
        ]
        request = ingest_pb.StreamTicksRequest(source_id=source_id, sequence=b + 1, ticks=ticks)
        out.append(request.SerializeToString())
    return out


def stats_ms(seconds: npt.NDArray[np.float64] | Sequence[float]) -> dict[str, float]:
    """Nearest-rank percentiles of durations given in seconds, in milliseconds."""
    values = np.asarray(seconds, dtype=np.float64)
    if len(values) == 0:
        return {"count": 0}
    q = np.percentile(values, [50, 90, 99], method="inverted_cdf") * 1000
    return {
        "count": len(values),
        "min": round(float(values.min()) * 1000, 2),
        "p50": round(float(q[0]), 2),
        "p90": round(float(q[1]), 2),
        "p99": round(float(q[2]), 2),
        "max": round(float(values.max()) * 1000, 2),
        "mean": round(float(values.mean()) * 1000, 2),
    }


# --- (a) the core alone ----------------------------------------------------------------------------

CoreCall = tuple[
    str,
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    dt.datetime,
]


def final_m1_bars(sym: npt.NDArray[np.int32], ts: npt.NDArray[np.int64]) -> int:
    """How many M1 bars the core must have made final: those ending at or before their symbol's
    latest tick minus the (default) lateness."""
    lateness = AggregationSettings().lateness // dt.timedelta(microseconds=1)
    latest = np.full(int(sym.max()) + 1, np.iinfo(np.int64).min)
    np.maximum.at(latest, sym, ts)
    keys = np.unique(np.stack([sym.astype(np.int64), ts - ts % M1_US]), axis=1)
    return int(np.count_nonzero(keys[1] + M1_US <= latest[keys[0]] - lateness))


def single_symbol_calls(params: Params) -> tuple[list[CoreCall], int]:
    """Batches of one symbol's ticks over days; also how many M1 bars must come out final."""
    span_hours = params.core_ticks / params.tick_rate / 3600
    ticks = make_ticks(params.core_ticks, seed=3, span_hours=span_hours)
    cursors = np.arange(1, len(ticks) + 1, dtype=np.int64)
    arrived = dt.datetime.now(dt.UTC)
    calls: list[CoreCall] = []
    for a in range(0, len(ticks), params.batch_size):
        z = a + params.batch_size
        batch = (ticks.ts[a:z], ticks.bid[a:z], ticks.ask[a:z], ticks.volume[a:z], cursors[a:z])
        calls.append(("EURUSD", *batch, arrived))
    return calls, final_m1_bars(np.zeros(len(ticks), dtype=np.int32), ticks.ts)


def interleaved_calls(params: Params) -> tuple[list[CoreCall], int]:
    """Feed pages of ``batch_size`` ticks over all symbols, split by symbol (arrival order kept within
    each symbol), as the stage hands a page to the core; also how many M1 bars must come out final."""
    feed = make_feed(
        params.core_interleaved_ticks, symbol_names(params.symbols), params.tick_rate, FEED_START
    )
    cursors = np.arange(1, len(feed) + 1, dtype=np.int64)
    calls: list[CoreCall] = []
    arrived = dt.datetime.now(dt.UTC)
    for a in range(0, len(feed), params.batch_size):
        z = a + params.batch_size
        order = a + np.argsort(feed.sym[a:z], kind="stable")
        sym = feed.sym[order]
        bounds = np.flatnonzero(np.r_[True, sym[1:] != sym[:-1], True])
        for x, y in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            i = order[x:y]
            calls.append(
                (
                    feed.names[int(sym[x])],
                    feed.ts[i],
                    feed.bid[i],
                    feed.ask[i],
                    feed.volume[i],
                    cursors[i],
                    arrived,
                )
            )
    return calls, final_m1_bars(feed.sym, feed.ts)


def run_core(calls: Sequence[CoreCall]) -> dict[str, Any]:
    """Feed a fresh Aggregator; wall and thread-CPU time of the calls alone."""
    aggregator = Aggregator(AggregationSettings())
    finals: collections.Counter[str] = collections.Counter()
    forming = 0
    cpu0 = time.thread_time()
    started = time.perf_counter()
    for symbol, ts, bid, ask, volume, cursors, arrived in calls:
        out = aggregator.add_ticks(symbol, ts, bid, ask, volume, cursors, arrived)
        for bar in out.final:
            finals[bar.timeframe.name] += 1
        forming += len(out.forming)
    elapsed = time.perf_counter() - started
    cpu = time.thread_time() - cpu0
    return {"seconds": elapsed, "cpu_seconds": cpu, "finals": dict(finals), "forming_versions": forming}


def bench_core(
    params: Params, title: str, calls: Sequence[CoreCall], ticks: int, finals: int
) -> dict[str, Any]:
    """Best of ``core_repeats`` runs (noise on a shared machine only adds time)."""
    runs = []
    for _ in range(params.core_repeats):
        runs.append(run_core(calls))
        print(f"    {title}: {ticks / runs[-1]['seconds']:,.0f} ticks/s", flush=True)
    best = min(runs, key=lambda r: float(r["seconds"]))
    m1_finals = best["finals"].get("M1", 0)
    symbols = len({c[0] for c in calls})
    return {
        "ticks": ticks,
        "symbols": symbols,
        "calls": len(calls),
        "ticks_per_call": round(ticks / len(calls), 1),
        "ticks_per_s": round(ticks / best["seconds"]),
        "ticks_per_cpu_s": round(ticks / best["cpu_seconds"]),
        "us_per_call": round(best["seconds"] / len(calls) * 1e6, 1),
        "seconds_by_run": [round(float(r["seconds"]), 3) for r in runs],
        "final_bars": best["finals"],
        "forming_versions_published": best["forming_versions"],
        "m1_finals_as_expected": m1_finals == finals,
    }


# --- (b) the services ------------------------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    """Ingest and the aggregator following it, each a real process on loopback."""

    ingest: helpers.ServiceProcess
    aggregator: helpers.ServiceProcess
    metrics_port: int

    def pid(self, service: helpers.ServiceProcess) -> int:
        assert service.proc is not None
        return service.proc.pid

    def check_alive(self) -> None:
        for service in (self.ingest, self.aggregator):
            assert service.proc is not None
            code = service.proc.poll()
            if code is not None:
                tail = service.log_path.read_text(errors="replace")[-2000:]
                raise ScenarioFailed(f"{service.name} exited with code {code} during the scenario: {tail}")


@contextlib.contextmanager
def running_pair(url: str, workdir: pathlib.Path, extra: dict[str, str]) -> Iterator[Pair]:
    """Ingest, then the aggregator subscribed to it (its metrics served on ``Pair.metrics_port``);
    both stopped afterwards, also on failure."""
    common = {"MT5MESH_HEALTH_PROBE_SECONDS": "2"}  # the production probe interval, not the tests' 0.2 s
    ingest = helpers.make_service("ingest", url, workdir, common | extra)
    port = helpers.free_port()
    own = {"AGGREGATOR_INGEST_ADDRESS": ingest.address, "AGGREGATOR_METRICS_PORT": str(port)}
    aggregator = helpers.make_service("aggregator", url, workdir, common | own | extra)
    try:
        ingest.start()  # serving means migrated: the aggregator then finds its tables
        aggregator.start()
        yield Pair(ingest, aggregator, port)
    finally:
        for service in (aggregator, ingest):
            if service.proc is not None:
                with contextlib.suppress(Exception):
                    service.terminate(timeout=10)
                service.kill()


def receive_candles(
    address: str, api_key: str, skip: str, stop: Any, ready: Any, count: Any, out: Any
) -> None:
    """The SubscribeCandles client (its own process): every final M1 bar from cursor 0, timestamped on
    arrival with time.monotonic() (the same clock in every process on Linux)."""
    records: list[Record] = []
    error = ""
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * MIB)]) as channel:
        call = agg_grpc.AggregatorServiceStub(channel).SubscribeCandles(
            agg_pb.SubscribeCandlesRequest(timeframes=[market_pb2.M1]),
            metadata=api_key_metadata(api_key),
        )
        threading.Thread(target=lambda: (stop.wait(), call.cancel()), daemon=True).start()
        try:
            for item in call:
                now = time.monotonic()
                ready.set()  # the first message (a warm-up bar): subscribed and caught up
                bar = item.bar
                c = bar.candle
                if c.symbol == skip:
                    continue
                ts = c.ts.seconds * 1_000_000 + c.ts.nanos // 1000
                records.append(
                    (
                        c.symbol,
                        ts,
                        item.cursor,
                        bar.revision,
                        bar.final,
                        bar.tick_count,
                        c.open,
                        c.high,
                        c.low,
                        c.close,
                        c.volume,
                        c.spread,
                        now,
                    )
                )
                count.value = len(records)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                error = f"{exc.code().name}: {exc.details()}"
    out.send((records, error))
    out.close()


class CandleReceiver:
    """Runs ``receive_candles`` in a spawned process and collects what it saw."""

    def __init__(self, address: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._ready = ctx.Event()
        self._count = ctx.Value("q", 0)
        self._conn, sender = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=receive_candles,
            args=(address, helpers.API_KEY, WARMUP_SYMBOL, self._stop, self._ready, self._count, sender),
            name="candle-receiver",
            daemon=True,
        )
        self._proc.start()
        sender.close()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    @property
    def received(self) -> int:
        return int(self._count.value)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if not self._proc.is_alive():
                raise ScenarioFailed(f"the SubscribeCandles client exited ({self._proc.exitcode})")
            if time.monotonic() > deadline:
                raise ScenarioFailed(f"the SubscribeCandles client got no warm-up bar within {timeout}s")

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.received < count:
            if time.monotonic() > deadline or not self._proc.is_alive():
                return False
            time.sleep(0.02)
        return True

    def finish(self, timeout: float = 30.0) -> tuple[list[Record], str]:
        self._stop.set()
        if not self._conn.poll(timeout):
            raise ScenarioFailed("the SubscribeCandles client did not report")
        records, error = self._conn.recv()
        self._proc.join(10)
        return records, error

    def close(self) -> None:
        self._stop.set()
        if self._proc.is_alive():
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


@dataclasses.dataclass
class SendLog:
    """When each batch went out and when ingest acknowledged it (time.monotonic(); NaN if never)."""

    sent: npt.NDArray[np.float64]
    acked: npt.NDArray[np.float64]
    batches: int = 0


async def send_batches(
    address: str,
    requests: Sequence[bytes],
    *,
    window: int,
    batch_size: int,
    rate: float | None,
    duration: float,
) -> SendLog:
    """Stream prebuilt requests over one StreamTicks call, at most ``window`` unacknowledged, paced at
    ``rate`` ticks/s when given; stops sending after ``duration`` seconds, returns at the last ack."""
    log = SendLog(np.full(len(requests), np.nan), np.full(len(requests), np.nan))
    acked = 0
    room = asyncio.Event()

    async def generate() -> AsyncIterator[bytes]:
        started = time.monotonic()
        for k, data in enumerate(requests):
            if rate is not None:
                delay = started + k * batch_size / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            while k - acked >= window:
                room.clear()
                await room.wait()
            now = time.monotonic()
            if now - started >= duration:
                return
            log.sent[k] = now
            log.batches = k + 1
            yield data

    options = [("grpc.max_send_message_length", 64 * MIB)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        method = channel.stream_stream(
            STREAM_TICKS,
            request_serializer=None,
            response_deserializer=ingest_pb.StreamTicksResponse.FromString,
        )
        try:
            async for ack in method(generate(), metadata=api_key_metadata(helpers.API_KEY)):
                log.acked[ack.sequence - 1] = time.monotonic()
                acked += 1
                room.set()
                if ack.stored != batch_size or ack.replayed:
                    raise ScenarioFailed(f"batch {ack.sequence}: stored {ack.stored} of {batch_size}")
        except grpc.aio.AioRpcError as exc:
            raise ScenarioFailed(f"StreamTicks failed: {exc.code().name} {exc.details()}") from exc
    if acked != log.batches:
        raise ScenarioFailed(f"{acked} of {log.batches} batches acknowledged")
    return log


class ProgressSampler:
    """Samples the aggregator's committed input cursor (``agg_cursors``) every 100 ms."""

    def __init__(self, url: str, interval: float = 0.1) -> None:
        self._url = plain_url(url)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self.samples: list[tuple[float, int]] = []

    def _run(self) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute("SELECT cursor FROM agg_cursors WHERE feed = 'ticks'").fetchone()
                self.samples.append((time.monotonic(), int(row[0]) if row else 0))
                self._stop.wait(self._interval)

    def __enter__(self) -> ProgressSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_caught_up(url: str, timeout: float = 60.0) -> int:
    """Until the aggregator committed every stored tick; returns that cursor (the warm-up's last id)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        while time.monotonic() < deadline:
            top = conn.execute("SELECT coalesce(max(id), 0) FROM ingest_ticks").fetchone()
            done = conn.execute("SELECT cursor FROM agg_cursors WHERE feed = 'ticks'").fetchone()
            if top and done and int(done[0]) >= int(top[0]) > 0:
                return int(top[0])
            time.sleep(0.1)
    raise ScenarioFailed(f"the aggregator did not catch up with the warm-up ticks within {timeout}s")


@dataclasses.dataclass
class Expected:
    """Every M1 bar the sent ticks make, its tick count, and the batch whose ack moves the watermark
    past its end (-1 when no later tick of its symbol was sent: the wall clock finalizes it)."""

    ticks: dict[BarKey, int]
    trigger: dict[BarKey, int]


def expected_bars(feed: Feed, count: int, batch_size: int, lateness_us: int) -> Expected:
    ticks: dict[BarKey, int] = {}
    trigger: dict[BarKey, int] = {}
    sym = feed.sym[:count]
    order = np.argsort(sym, kind="stable")
    bounds = np.searchsorted(sym[order], np.arange(len(feed.names) + 1))
    for k in range(len(feed.names)):
        index = order[bounds[k] : bounds[k + 1]]  # symbol k's ticks in arrival order (= time order)
        if len(index) == 0:
            continue
        ts = feed.ts[index]
        buckets, counts = np.unique(ts - ts % M1_US, return_counts=True)
        first_past = np.searchsorted(ts, buckets + M1_US + lateness_us, side="left")
        batch = np.where(first_past < len(ts), index[np.minimum(first_past, len(ts) - 1)] // batch_size, -1)
        for b, n, t in zip(buckets.tolist(), counts.tolist(), batch.tolist(), strict=True):
            ticks[(k, b)] = n
            trigger[(k, b)] = t
    return Expected(ticks, trigger)


def check_bars(
    records: Sequence[Record], expected: Expected, feed: Feed, count: int, error: str
) -> tuple[dict[str, Any], dict[BarKey, Record]]:
    """Every expected M1 bar exactly once, final, revision 0, its tick count, and for the first symbol
    the values of tests.market_data.reference (pandas)."""
    index = {name: k for k, name in enumerate(feed.names)}
    seen: collections.Counter[BarKey] = collections.Counter()
    by_key: dict[BarKey, Record] = {}
    unknown_symbols = 0
    for r in records:
        k = index.get(r[0])
        if k is None:
            unknown_symbols += 1
            continue
        seen[(k, r[1])] += 1
        by_key.setdefault((k, r[1]), r)
    reference_bars = {
        key[1]: values for key, values in reference(feed.ticks_of(0, count)).items() if key[0] is Timeframe.M1
    }
    sample_mismatches = 0
    for when, values in reference_bars.items():
        got = by_key.get((0, to_us(when)))
        if got is None:
            continue  # counted as missing below
        o, h, low, c, v, s = got[6:12]
        if (o, h, low, c) != values[:4] or not math.isclose(v, values[4]) or not math.isclose(s, values[5]):
            sample_mismatches += 1
    checks = {
        "bars_expected": len(expected.ticks),
        "bars_received": len(records),
        "missing": len(set(expected.ticks) - set(seen)),
        "unexpected": len(set(seen) - set(expected.ticks)) + unknown_symbols,
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "revised": sum(1 for r in records if r[3] != 0),
        "not_final": sum(1 for r in records if not r[4]),
        "tick_count_mismatches": sum(1 for key, r in by_key.items() if expected.ticks.get(key) != r[5]),
        "sample_symbol": feed.names[0],
        "sample_reference_bars": len(reference_bars),
        "sample_mismatches": sample_mismatches,
        "subscriber_error": error,
    }
    checks["ok"] = (
        not error
        and len(reference_bars) > 0
        and all(
            checks[k] == 0
            for k in (
                "missing",
                "unexpected",
                "duplicates",
                "revised",
                "not_final",
                "tick_count_mismatches",
                "sample_mismatches",
            )
        )
    )
    return checks, by_key


def progress_rate(samples: Sequence[tuple[float, int]], start: float, end: float) -> float | None:
    """Least-squares slope of the aggregator's committed cursor over [start, end], ticks/s."""
    window = [(t, c) for t, c in samples if start <= t <= end]
    if len(window) < 3 or window[-1][1] == window[0][1]:
        return None
    t = np.array([w[0] for w in window])
    c = np.array([w[1] for w in window], dtype=np.float64)
    return float(np.polyfit(t - t[0], c, 1)[0])


def cursor_at(samples: Sequence[tuple[float, int]], when: float) -> int:
    before = [c for t, c in samples if t <= when]
    return before[-1] if before else 0


def rows_written(url: str) -> dict[str, int]:
    """Rows inserted + updated so far in each aggregator table (PostgreSQL's statistics)."""
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT relname, n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE relname LIKE 'agg\\_%'"
        ).fetchall()
    return {str(name): int(n) for name, n in rows}


def commit_histogram(port: int) -> dict[str, float]:
    """The aggregator's own ``mt5_aggregator_commit_seconds`` histogram (cumulative), from /metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("mt5_aggregator_commit_seconds_"):
            name, _, value = line.rpartition(" ")
            values[name.removeprefix("mt5_aggregator_commit_seconds_")] = float(value)
    return values


def commit_stats(before: dict[str, float], after: dict[str, float], ticks: int) -> dict[str, Any]:
    """Commits of the aggregator between two scrapes: how many, how long (bucket bounds for percentiles)."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    count = delta.get("count", 0.0)
    if count <= 0:
        return {"commits": 0}
    bounds = sorted(
        (float(k.split('le="')[1].rstrip('"}')), v) for k, v in delta.items() if k.startswith("bucket{")
    )

    def upper(q: float) -> float | None:
        bound = next((b for b, n in bounds if n >= q * count), None)
        return None if bound is None or math.isinf(bound) else bound * 1000

    return {
        "commits": int(count),
        "ticks_per_commit": round(ticks / count),
        "mean_ms": round(delta.get("sum", 0.0) / count * 1000, 1),
        "p50_at_most_ms": upper(0.5),
        "p99_at_most_ms": upper(0.99),
    }


# --- py-spy ----------------------------------------------------------------------------------------


def find_py_spy(choice: str) -> str | None:
    if choice == "off":
        return None
    if choice != "auto":
        return choice
    for candidate in (
        shutil.which("py-spy"),
        str(pathlib.Path(sys.executable).parent / "py-spy"),
        "/tmp/pyspy/bin/py-spy",  # noqa: S108 - where this machine's py-spy was unpacked
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@contextlib.contextmanager
def py_spy_recording(
    binary: str | None, pids: dict[str, int], seconds: float, workdir: pathlib.Path
) -> Iterator[dict[str, pathlib.Path]]:
    """``py-spy record --gil`` of each process for ``seconds`` (raw collapsed stacks, one file each)."""
    files: dict[str, pathlib.Path] = {}
    procs: list[subprocess.Popen[bytes]] = []
    if binary is not None:
        for name, pid in pids.items():
            files[name] = workdir / f"py-spy-{name}.txt"
            command = [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
            command += [
                "--rate",
                "100",
                "--gil",
                "--nolineno",
                "--format",
                "raw",
                "--output",
                str(files[name]),
            ]
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield files
    finally:
        for proc in procs:
            try:
                proc.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*)\)$")


def summarize_profile(
    path: pathlib.Path, seconds: float, rate: float = 100.0, top: int = 14
) -> dict[str, Any]:
    """Share of GIL-holding samples per function: where it was (self) and what it was under (inclusive)."""
    if not path.exists():
        return {"error": "no profile written"}
    self_count: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        n = int(number)
        total += n
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            name, file = (match["name"], match["file"]) if match else (frame, "")
            frames.append(f"{name} ({file})" if file else name)
        self_count[frames[-1]] += n
        for frame in set(frames):
            if "services/" in frame or "services." in frame:
                inclusive[frame] += n
    if total == 0:
        return {"error": "no samples"}

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * n / total, 1)) for f, n in counter.most_common(top)]

    return {
        "samples": total,
        # --gil: a sample is taken only while some thread of the process holds the GIL.
        "gil_busy_fraction": round(total / (seconds * rate), 2),
        "self_percent": share(self_count),
        "inclusive_percent_services": share(inclusive),
    }


# --- (b) one end-to-end run ------------------------------------------------------------------------


def bench_pipeline(
    params: Params,
    workdir: pathlib.Path,
    *,
    rate: float | None,
    duration: float,
    seed_query: bool = False,
    py_spy: str | None = None,
) -> dict[str, Any]:
    """Stream ticks of ``params.symbols`` symbols into ingest for ``duration`` seconds (as fast as acks
    allow, or paced at ``rate``) while the aggregator follows and a client receives final M1 bars."""
    batches = math.ceil((rate or params.max_rate) * duration / params.batch_size) + params.window
    feed = make_feed(batches * params.batch_size, symbol_names(params.symbols), params.tick_rate, FEED_START)
    requests = encode_batches(feed, params.batch_size, SOURCE_ID)
    warm_feed = make_feed(20 * params.batch_size, (WARMUP_SYMBOL,), 16.0, WARMUP_START)
    warm = [
        list(ingest_pb.StreamTicksRequest.FromString(r).ticks)
        for r in encode_batches(warm_feed, params.batch_size, "w")
    ]
    with helpers.postgres_database() as url:
        with running_pair(url, workdir, params.service_env) as pair:
            ingest_pid, agg_pid = pair.pid(pair.ingest), pair.pid(pair.aggregator)
            asyncio.run(
                TickStreamer(pair.ingest.address, helpers.API_KEY, "warmup", window=params.window).send(warm)
            )
            offset = wait_caught_up(url)
            receiver = CandleReceiver(pair.aggregator.address)
            try:
                receiver.wait_ready(60)
                meter = CpuMeter(
                    {
                        "ingest": lambda: [ingest_pid],
                        "aggregator": lambda: [agg_pid],
                        "postgres": postgres_pids,
                        "receiver": lambda: [receiver.pid],
                    }
                )
                with (
                    RssSampler(agg_pid) as agg_rss,
                    RssSampler(ingest_pid) as ingest_rss,
                    ProgressSampler(url) as progress,
                    py_spy_recording(
                        py_spy, {"aggregator": agg_pid, "ingest": ingest_pid}, duration, workdir
                    ) as profiles,
                ):
                    commits_before = commit_histogram(pair.metrics_port)
                    rows_before = rows_written(url)
                    meter.start()
                    log = asyncio.run(
                        send_batches(
                            pair.ingest.address,
                            requests,
                            window=params.window,
                            batch_size=params.batch_size,
                            rate=rate,
                            duration=duration,
                        )
                    )
                    cpu = meter.stop()
                    sent_ticks = log.batches * params.batch_size
                    expected = expected_bars(feed, sent_ticks, params.batch_size, params.lateness_us)
                    drained = receiver.wait_for(len(expected.ticks), params.drain_timeout)
                    drain_end = time.monotonic()
                    if drained:
                        time.sleep(1.0)  # anything arriving now would be a duplicate or a revision
                    commits_after = commit_histogram(pair.metrics_port)
                    time.sleep(1.0)  # PostgreSQL publishes table statistics at most once a second
                    rows_after = rows_written(url)
                records, error = receiver.finish()
            finally:
                receiver.close()
            pair.check_alive()
        result = analyse(params, feed, log, expected, records, error, progress.samples, offset, rate)
        result["drained_within_timeout"] = drained
        result["drain_timeout_s"] = params.drain_timeout
        result["cpu_cores"] = cpu
        result["aggregator_commits"] = commit_stats(commits_before, commits_after, sent_ticks)
        result["aggregator_rows_written_per_tick"] = {
            table: round((n - rows_before.get(table, 0)) / max(result["ticks_sent"], 1), 3)
            for table, n in sorted(rows_after.items())
        }
        result["aggregator_rss"] = agg_rss.report()
        result["ingest_rss"] = ingest_rss.report()
        if py_spy is not None:
            result["profile"] = {name: summarize_profile(path, duration) for name, path in profiles.items()}
        if not drained:
            result["checks"]["ok"] = False
        result["wall_seconds_after_sending"] = round(drain_end - float(np.nanmax(log.acked)), 1)
        if seed_query:
            result["seed_query"] = bench_seed_query(url, feed, sent_ticks, expected, params.seed_repeats)
    return result


def analyse(
    params: Params,
    feed: Feed,
    log: SendLog,
    expected: Expected,
    records: Sequence[Record],
    error: str,
    progress: Sequence[tuple[float, int]],
    offset: int,
    rate: float | None,
) -> dict[str, Any]:
    sent_ticks = log.batches * params.batch_size
    checks, by_key = check_bars(records, expected, feed, sent_ticks, error)
    first_sent, last_ack = float(log.sent[0]), float(np.nanmax(log.acked))
    send_seconds = last_ack - first_sent
    # Latency of every bar made final by a later tick (not by the wall clock at the end).
    rows = sorted(
        (trigger, by_key[key][12])
        for key, trigger in expected.trigger.items()
        if trigger >= 0 and key in by_key
    )
    trig = np.array([r[0] for r in rows], dtype=np.int64)
    arrival = np.array([r[1] for r in rows], dtype=np.float64)
    from_ack = arrival - log.acked[trig] if len(rows) else np.array([])
    from_send = arrival - log.sent[trig] if len(rows) else np.array([])
    commit = log.acked[: log.batches] - log.sent[: log.batches]
    thirds = np.array_split(from_ack, 3) if len(from_ack) >= 3 else []
    ingest_rate = sent_ticks / send_seconds
    agg_rate = progress_rate(progress, first_sent, last_ack)
    lag = log.batches * params.batch_size - (cursor_at(progress, last_ack) - offset)
    sim_seconds = (feed.ts[sent_ticks - 1] - feed.ts[0]) / 1e6
    e2e = min(ingest_rate, agg_rate) if agg_rate is not None else 0.0
    return {
        "mode": "paced" if rate is not None else "max",
        "offered_ticks_per_s": round(rate) if rate is not None else None,
        "symbols": params.symbols,
        "batch_size": params.batch_size,
        "window": params.window,
        "ticks_sent": sent_ticks,
        "batches_sent": log.batches,
        "send_seconds": round(send_seconds, 2),
        "simulated_seconds": round(sim_seconds, 1),
        "simulated_speedup": round(sim_seconds / send_seconds, 1),
        "ingest_ticks_per_s": round(ingest_rate),
        "aggregator_ticks_per_s": round(agg_rate) if agg_rate is not None else None,
        "e2e_ticks_per_s": round(e2e),
        "aggregator_lag_at_last_ack_ticks": int(lag),
        "keeps_up": agg_rate is not None and agg_rate >= 0.97 * ingest_rate,
        "latency_from_ack_ms": stats_ms(from_ack),
        "latency_from_send_ms": stats_ms(from_send),
        "ingest_ack_ms": stats_ms(commit),
        "latency_p50_by_third_ms": [stats_ms(t).get("p50") for t in thirds],
        "bars_finalized_by_clock": sum(1 for t in expected.trigger.values() if t < 0),
        "checks": checks,
    }


# --- (c) the seed's query --------------------------------------------------------------------------


def bench_seed_query(url: str, feed: Feed, count: int, expected: Expected, repeats: int) -> dict[str, Any]:
    """The seed's GROUP BY over exactly the ticks (b) sent; best of ``repeats`` runs."""
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        conn.execute("DELETE FROM ingest_ticks WHERE symbol = %s", (WARMUP_SYMBOL,))
        conn.execute("VACUUM ANALYZE ingest_ticks")
        conn.execute("SET TIME ZONE 'UTC'")
        stored = conn.execute("SELECT count(*) FROM ingest_ticks").fetchone()
        settings = {
            name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("jit", "max_parallel_workers_per_gather", "work_mem")
        }
        runs = []
        rows: list[tuple[Any, ...]] = []
        for _ in range(repeats):
            meter = CpuMeter({"postgres": postgres_pids})
            meter.start()
            started = time.perf_counter()
            rows = conn.execute(SEED_QUERY).fetchall()
            runs.append((time.perf_counter() - started, meter.stop()))
    seconds, cpu = min(runs, key=lambda r: r[0])
    ticks = int(stored[0]) if stored else 0
    name = feed.names[0]
    ref = {
        to_us(when): values
        for (tf, when), values in reference(feed.ticks_of(0, count)).items()
        if tf is Timeframe.M1
    }
    mismatches = 0
    for row in rows:
        if row[0] != name:
            continue
        values = ref.get(to_us(row[2]))
        o, h, low, c, v, s = row[3:9]
        if values is None or (o, h, low, c) != values[:4] or v != values[4] or not math.isclose(s, values[5]):
            mismatches += 1
    return {
        "ticks": ticks,
        "ticks_as_sent": ticks == count,
        "bars": len(rows),
        "bars_as_expected": len(rows) == len(expected.ticks),
        "sample_symbol": name,
        "sample_symbol_mismatches": mismatches,
        "seconds": round(seconds, 3),
        "seconds_by_run": [round(r[0], 3) for r in runs],
        "ticks_per_s": round(ticks / seconds),
        # PostgreSQL may run the query in parallel workers; (a) is one thread.
        "ticks_per_postgres_cpu_s": round(ticks / (seconds * cpu["postgres"])) if cpu["postgres"] else None,
        "timeframes": "M1 only (the seed built M5..D1 with TimescaleDB continuous aggregates, "
        "refreshed every minute)",
        "settings": settings,
        "cpu_cores": cpu,
    }


# --- report ----------------------------------------------------------------------------------------


def evaluate(results: dict[str, Any], params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
    a, b, c = results["a_core"], results["b_end_to_end"], results["c_seed_query"]
    seed_rate = c["ticks_per_s"]
    sustained = b["max"]["e2e_ticks_per_s"]
    paced = b["paced"]
    # What the seed's design adds to a bar's latency: waiting for the next 5 s poll (half of it on
    # average), then one query over the ticks of one polling interval at the rate (b) sustained.
    query_s = SEED_POLL_SECONDS * sustained / seed_rate if seed_rate else float("nan")
    rss = max(
        max(s["aggregator_rss"]["peak_sampled_mb"], s["aggregator_rss"]["vm_hwm_mb"])
        for s in (b["max"], b["paced"])
    )
    figures: dict[str, Any] = {
        "core_single_ticks_per_s": a["single"]["ticks_per_s"],
        "core_interleaved_ticks_per_s": a["interleaved"]["ticks_per_s"],
        "e2e_sustained_ticks_per_s": sustained,
        "e2e_ingest_ticks_per_s_when_saturated": b["max"]["ingest_ticks_per_s"],
        "e2e_max_p99_ms": b["max"]["latency_from_ack_ms"].get("p99"),
        "paced_ticks_per_s": paced["ingest_ticks_per_s"],
        "paced_p50_ms": paced["latency_from_ack_ms"].get("p50"),
        "paced_p99_ms": paced["latency_from_ack_ms"].get("p99"),
        "paced_p99_from_send_ms": paced["latency_from_send_ms"].get("p99"),
        "seed_query_ticks_per_s": seed_rate,
        "core_interleaved_vs_seed_ratio": round(a["interleaved"]["ticks_per_s"] / seed_rate, 2),
        "core_single_vs_seed_ratio": round(a["single"]["ticks_per_s"] / seed_rate, 2),
        "seed_added_latency_mean_ms": round((SEED_POLL_SECONDS / 2 + query_s) * 1000),
        "seed_added_latency_max_ms": round((SEED_POLL_SECONDS + query_s) * 1000),
        "aggregator_peak_rss_mb": rss,
        "all_checks_ok": all(b[k]["checks"]["ok"] for k in ("max", "paced"))
        and c["bars_as_expected"]
        and c["ticks_as_sent"]
        and c["sample_symbol_mismatches"] == 0,
    }
    n = params.symbols
    goals = {
        "core_single_ticks_per_s": ("(a) core, 1 symbol, ticks/s", ">=", 1e6),
        "core_interleaved_ticks_per_s": (f"(a) core, {n} symbols interleaved, ticks/s", ">=", 1e6),
        "e2e_sustained_ticks_per_s": ("(b) sustained ticks/s", ">=", TARGET_RATE),
        "paced_p99_ms": (f"(b) p99 ms at {paced['ingest_ticks_per_s']:,} ticks/s", "<=", 50.0),
        "core_single_vs_seed_ratio": ("(a) 1 symbol / (c)", ">=", 10.0),
        "core_interleaved_vs_seed_ratio": (f"(a) {n} symbols / (c)", ">=", 10.0),
        "aggregator_peak_rss_mb": (f"aggregator RSS MB, {n} symbols live", "<=", 300.0),
    }
    targets = {}
    for key, (label, op, bound) in goals.items():
        value = figures[key]
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        targets[key] = {"what": label, "value": value, "target": f"{op} {bound:g}", "met": met}
    # The latency target is stated at >= 100k ticks/s: below that rate, a low p99 does not meet it.
    if paced["ingest_ticks_per_s"] < TARGET_RATE:
        targets["paced_p99_ms"]["met"] = False
        targets["paced_p99_ms"]["note"] = "measured below the 100,000 ticks/s the target is stated at"
    return figures, targets


def print_table(report: dict[str, Any]) -> None:
    r, m, p = report["results"], report["machine"], report["parameters"]
    a, b, c = r["a_core"], r["b_end_to_end"], r["c_seed_query"]
    print()
    print(f"aggregator benchmark  {report['timestamp']}  {m['nproc']} cores  {m['cpu_model']}")
    print(
        f"PostgreSQL {m['postgres_settings']['server_version']}, Python {m['python']}, grpcio {m['grpcio']}"
    )
    print()
    row = "{:<58} {:>17} {:>8} {:>8}  {}"
    print(row.format("scenario", "rate", "p50 ms", "p99 ms", "CPU cores: ingest/aggregator/pg/client/other"))
    print("-" * 136)

    def cores(s: dict[str, Any]) -> str:
        cpu = s.get("cpu_cores", {})
        client = cpu.get("bench_client", 0.0) + cpu.get("receiver", 0.0)
        values = [cpu.get("ingest"), cpu.get("aggregator"), cpu.get("postgres"), client, cpu.get("other")]
        return "/".join("-" if v is None else f"{v:.2f}" for v in values)

    single, inter = a["single"], a["interleaved"]
    print(
        row.format(
            f"(a) core, 1 symbol, {single['ticks']:,} ticks in batches of {p['batch_size']:,}",
            f"{single['ticks_per_s']:,} t/s",
            "",
            "",
            "1 thread",
        )
    )
    per_call = inter["ticks_per_call"]
    label = f"(a) core, {inter['symbols']} symbols, pages of {p['batch_size']:,}, {per_call:g}/call"
    print(row.format(label, f"{inter['ticks_per_s']:,} t/s", "", "", "1 thread"))
    for key, title in (("max", "as fast as acked"), ("paced", "paced"), ("profile", "under py-spy")):
        s = b.get(key)
        if not s:
            continue
        lat = s["latency_from_ack_ms"]
        print(
            row.format(f"(b) {title}: ingest accepted", f"{s['ingest_ticks_per_s']:,} t/s", "", "", cores(s))
        )
        label = f"(b) {title}: through the aggregator" + (
            " (keeps up)" if s["keeps_up"] else " (falls behind)"
        )
        rate = f"{s['e2e_ticks_per_s']:,} t/s"
        p50, p99 = (f"{lat[q]:.1f}" if q in lat else "-" for q in ("p50", "p99"))
        print(row.format(label, rate, p50, p99, ""))
    print(
        row.format(
            f"(c) seed GROUP BY over {c['ticks']:,} stored ticks (M1 only)",
            f"{c['ticks_per_s']:,} t/s",
            "",
            "",
            f"-/-/{c['cpu_cores']['postgres']:.2f}/-/{c['cpu_cores']['other']:.2f}, query {c['seconds']} s",
        )
    )
    f = report["figures"]
    print(
        row.format(
            "(c) seed's polling: added latency (mean / max)",
            "",
            f"{f['seed_added_latency_mean_ms']:,}",
            f"{f['seed_added_latency_max_ms']:,}",
            "p50 column = mean",
        )
    )
    print()
    print("{:<44} {:>14} {:>12}  {}".format("target", "reached", "target", "met"))
    print("-" * 80)
    for t in report["targets"].values():
        value = t["value"]
        if value is None:
            shown = "n/a"
        else:
            shown = f"{value:,.2f}" if isinstance(value, float) and value < 1000 else f"{value:,.0f}"
        print(
            "{:<44} {:>14} {:>12}  {}".format(t["what"], shown, t["target"], "met" if t["met"] else "MISSED")
        )
    print()
    for key in ("max", "paced"):
        ch = b[key]["checks"]
        print(
            f"(b) {key}: {ch['bars_received']:,} of {ch['bars_expected']:,} M1 bars received, missing "
            f"{ch['missing']}, duplicates {ch['duplicates']}, revised {ch['revised']}, tick counts off "
            f"{ch['tick_count_mismatches']}, {ch['sample_symbol']} vs pandas reference: "
            f"{ch['sample_reference_bars'] - ch['sample_mismatches']}/{ch['sample_reference_bars']} equal"
            f" -> {'ok' if ch['ok'] else 'FAILED'}"
        )
    for key in ("max", "paced"):
        s = b[key]
        com, ack, send = s["aggregator_commits"], s["ingest_ack_ms"], s["latency_from_send_ms"]
        print(
            f"(b) {key}: ingest ack p50/p99 {ack.get('p50')}/{ack.get('p99')} ms; latency from send p50/p99 "
            f"{send.get('p50')}/{send.get('p99')} ms; aggregator commits: {com.get('mean_ms')} ms mean, "
            f"{com.get('ticks_per_commit')} ticks each; lag at last ack "
            f"{s['aggregator_lag_at_last_ack_ticks']:,} ticks"
        )
        written = ", ".join(f"{t} {n}" for t, n in s["aggregator_rows_written_per_tick"].items())
        print(f"    rows the aggregator wrote per tick: {written}")
    print(
        f"(c) {c['bars']:,} bars (as expected: {c['bars_as_expected']}), "
        f"{c['sample_symbol_mismatches']} of {c['sample_symbol']}'s differ from the reference"
    )
    profile = (b.get("profile") or {}).get("profile")
    if profile:
        for name, summary in profile.items():
            if "inclusive_percent_services" not in summary:
                continue
            busy = summary["gil_busy_fraction"]
            top = ", ".join(
                f"{fn.split(' (')[0]} {pct}%" for fn, pct in summary["inclusive_percent_services"][:6]
            )
            print(f"py-spy {name} (GIL held {busy:.0%} of the time): {top}")
    print(f"results: {report['output']}")


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Params:
    parser = argparse.ArgumentParser(
        prog="python -m bench.aggregator_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--core-ticks", type=int, help="(a) one-symbol ticks (default 1000000)")
    parser.add_argument(
        "--core-interleaved-ticks", type=int, help="(a) ticks over all symbols (default 300000)"
    )
    parser.add_argument("--core-repeats", type=int, help="(a) runs of each, the best kept (default 3)")
    parser.add_argument(
        "--symbols", type=int, default=100, help="symbols in (a) interleaved and (b) (default 100)"
    )
    parser.add_argument(
        "--tick-rate", type=float, default=5.0, help="ticks per simulated second per symbol (default 5)"
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="ticks per batch / page (default 1000)")
    parser.add_argument("--window", type=int, default=8, help="StreamTicks batches in flight (default 8)")
    parser.add_argument("--duration", type=float, help="seconds of sending in each (b) run (default 25)")
    parser.add_argument(
        "--max-rate",
        type=float,
        help="ticks/s the unpaced (b) run prebuilds batches for; it stops early if they run out "
        "(default 130000)",
    )
    parser.add_argument(
        "--paced-rate", type=float, help="ticks/s of the paced (b) run (default: see --paced-fraction)"
    )
    parser.add_argument(
        "--paced-fraction",
        type=float,
        default=0.5,
        help="without --paced-rate, pace at this fraction of the sustained rate, at most 100000 "
        "(default 0.5)",
    )
    parser.add_argument(
        "--drain-timeout", type=float, help="seconds to wait for the last bars after sending (default 180)"
    )
    parser.add_argument("--seed-repeats", type=int, help="(c) runs of the query, the best kept (default 3)")
    parser.add_argument(
        "--py-spy",
        default=None,
        help="py-spy binary for an extra profiled (b) run, or 'off' (default: auto, found on PATH, next to "
        "python, or /tmp/pyspy/bin; off with --quick)",
    )
    parser.add_argument(
        "--profile-duration", type=float, default=15.0, help="seconds of the profiled run (default 15)"
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for ingest and the aggregator, for experiments (repeatable)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        help="wait up to this many seconds for an idle machine before each run (default 30; 0 with --quick)",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        help="re-run a (b) run disturbed by other processes at most this often (default 1; 0 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run for smoke testing (about a minute)")
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        help=f"results JSON path (default {DEFAULT_OUTPUT.relative_to(REPO)}; with --quick {QUICK_OUTPUT})",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    defaults: dict[str, Any] = (
        {
            "core_ticks": 50_000,
            "core_interleaved_ticks": 20_000,
            "core_repeats": 1,
            "duration": 5.0,
            "max_rate": 40_000.0,
            "drain_timeout": 60.0,
            "seed_repeats": 1,
            "py_spy": "off",
            "wait_quiet": 0.0,
            "noisy_retries": 0,
        }
        if quick
        else {
            "core_ticks": 1_000_000,
            "core_interleaved_ticks": 300_000,
            "core_repeats": 3,
            "duration": 25.0,
            "max_rate": 130_000.0,
            "drain_timeout": 180.0,
            "seed_repeats": 3,
            "py_spy": "auto",
            "wait_quiet": 30.0,
            "noisy_retries": 1,
        }
    )
    values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    env = {}
    for item in args.service_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--service-env {item!r}: expected NAME=VALUE")
        env[name] = value
    counts = (
        values["core_ticks"],
        values["core_interleaved_ticks"],
        values["core_repeats"],
        args.symbols,
        args.batch_size,
        args.window,
        values["seed_repeats"],
    )
    if min(counts) < 1 or values["duration"] <= 0 or args.tick_rate <= 0 or values["max_rate"] <= 0:
        parser.error("counts must be at least 1; --duration, --tick-rate and --max-rate above 0")
    if not 0 < args.paced_fraction <= 1:
        parser.error("--paced-fraction must be in (0, 1]")
    return Params(
        core_ticks=int(values["core_ticks"]),
        core_interleaved_ticks=int(values["core_interleaved_ticks"]),
        core_repeats=int(values["core_repeats"]),
        symbols=int(args.symbols),
        tick_rate=float(args.tick_rate),
        batch_size=int(args.batch_size),
        window=int(args.window),
        duration=float(values["duration"]),
        max_rate=float(values["max_rate"]),
        paced_rate=float(args.paced_rate) if args.paced_rate is not None else None,
        paced_fraction=float(args.paced_fraction),
        drain_timeout=float(values["drain_timeout"]),
        seed_repeats=int(values["seed_repeats"]),
        py_spy=find_py_spy(str(values["py_spy"])),
        profile_duration=float(args.profile_duration),
        service_env=env,
        wait_quiet=float(values["wait_quiet"]),
        noisy_retries=int(values["noisy_retries"]),
        quick=quick,
        output=args.output or (QUICK_OUTPUT if quick else DEFAULT_OUTPUT),
    )


def run_all(params: Params, workdir: pathlib.Path) -> dict[str, Any]:
    print("... (a) the aggregation core alone, one thread", flush=True)
    if params.wait_quiet > 0:
        wait_for_quiet(params.wait_quiet)
    calls, bars = single_symbol_calls(params)
    single = bench_core(params, "1 symbol", calls, params.core_ticks, bars)
    calls, bars = interleaved_calls(params)
    inter = bench_core(params, f"{params.symbols} symbols", calls, params.core_interleaved_ticks, bars)
    del calls
    maximum = step(
        "(b) end to end, as fast as ingest acknowledges, then (c) the seed's query on the stored ticks",
        params,
        lambda: bench_pipeline(params, workdir, rate=None, duration=params.duration, seed_query=True),
    )
    seed = maximum.pop("seed_query")
    rate = params.paced_rate or max(
        params.batch_size, round(min(TARGET_RATE, params.paced_fraction * maximum["e2e_ticks_per_s"]), -3)
    )
    paced = step(
        f"(b) end to end, paced at {rate:,.0f} ticks/s",
        params,
        lambda: bench_pipeline(params, workdir, rate=rate, duration=params.duration),
    )
    b = {"max": maximum, "paced": paced}
    if params.py_spy is not None:
        print(
            f"... (b) as fast as acked again, under py-spy ({params.py_spy}), {params.profile_duration:g} s",
            flush=True,
        )
        if params.wait_quiet > 0:
            wait_for_quiet(params.wait_quiet)
        try:
            b["profile"] = bench_pipeline(
                params, workdir, rate=None, duration=params.profile_duration, py_spy=params.py_spy
            )
        except ScenarioFailed as exc:  # the profile is an extra: its failure spoils nothing else
            print(f"    profiled run failed: {exc}", flush=True)
    return {"a_core": {"single": single, "interleaved": inter}, "b_end_to_end": b, "c_seed_query": seed}


def main(argv: Sequence[str] | None = None) -> int:
    params = parse_args(argv)
    machine = machine_info()
    started = dt.datetime.now(dt.UTC)
    with scratch_folder("aggregator-bench-") as workdir:
        results = run_all(params, workdir)
        figures, targets = evaluate(results, params)
        parts = {
            "machine": machine,
            "parameters": dataclasses.asdict(params) | {"lateness_us": params.lateness_us},
            "results": results,
            "figures": figures,
            "targets": targets,
        }
        publish("aggregator", started, params.output, parts, print_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

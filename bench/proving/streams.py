"""Proving ground, full form: slow and vanishing subscribers, and deadlines into a stalled stage.

``python -m bench.proving.streams`` (``--quick`` for a smoke run). One mesh on a fresh PostgreSQL
database, default settings, probed services (``tests/probed_service.py``) behind the real Envoy.

(a) slow subscribers: ticks at 10,000/s (wall clock, 8 symbols). A latency probe (one tick of its own
    symbol every 50 ms posted through the gateway, timed until its forming bar reaches a subscriber of
    the aggregator through the gateway) runs throughout. After a baseline phase, four subscribers that
    read one message a second join: the aggregator's forming feed (include_forming) and ingest's
    durable tick feed, each straight to the service and through Envoy. Sampled every 5 s: RSS of the
    services, Envoy and this client; when a slow one is cut off (RESOURCE_EXHAUSTED) it resumes from
    its last cursor and the final bar versions it got are checked against the log (no gap, no
    duplicate). Latency p50/p99 of the probe with and without the slow subscribers.
(b) fast subscribers of the forming feed at 10,000 ticks/s over 100 symbols: cut-offs per minute of a
    subscriber reading as fast as it can, and of the indicators stage's own subscription.
(c) 1,000 subscriptions opened, read once and cancelled (half to the aggregator with forming bars,
    half to ingest's tick feed), through the gateway: asyncio tasks, subscriptions and RSS before/after.
(d) deadlines: ``IngestCandles`` with a 200 ms deadline while ``ingest_candles`` is locked (ACCESS
    EXCLUSIVE in an open transaction): time to DEADLINE_EXCEEDED, statements still waiting in
    PostgreSQL afterwards, rows written once the lock is released; the same for a call queued behind the
    stalled commit, and for ``GetCandles`` into a locked ``agg_candles`` (8 calls: the aggregator's
    health and its waiting statements afterwards).
(e) the memory bound stated from the code: queue sizes times the measured size of what they hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import pathlib
import shutil
import statistics
import tempfile
import threading
import time
import tracemalloc
from typing import Any

import grpc
import httpx
import numpy as np
import psycopg
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_grpc
from mt5.ingest.v1 import ingest_service_pb2 as ingest_pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from mt5.market.v1 import market_pb2

from bench.common import machine_info, stats_ms, status_kb
from bench.proving import RESULTS, save_results
from bench.proving.traffic import (
    METADATA,
    QUICK_RESULTS,
    LatencyProbe,
    ProcessSampler,
    ProvingMesh,
    TickPump,
    candle_request,
    metric_sum,
    proving_mesh,
)
from services.aggregator.bars import AggregationSettings, Aggregator
from tests import helpers


@dataclasses.dataclass(frozen=True)
class Params:
    baseline: float
    slow_phase: float
    wide_phase: float
    cycles: int
    deadline_calls: int
    quick: bool


# --- (a) slow subscribers ------------------------------------------------------------------------


@dataclasses.dataclass
class SlowReader:
    """Reads one message every ``interval`` seconds; resumes from its cursor when cut off."""

    name: str
    target: str
    feed: str  # "forming" or "ticks"
    interval: float = 1.0
    read: int = 0
    cursor: int = 0
    finals: list[int] = dataclasses.field(default_factory=list)
    cut_after: float | None = None
    cut_code: str = ""

    def _call(self, channel: grpc.aio.Channel, cursor: int) -> grpc.aio.UnaryStreamCall:
        if self.feed == "forming":
            return agg_grpc.AggregatorServiceStub(channel).SubscribeCandles(
                agg_pb.SubscribeCandlesRequest(include_forming=True, from_cursor=cursor), metadata=METADATA
            )
        return ingest_grpc.IngestServiceStub(channel).SubscribeTicks(
            ingest_pb.SubscribeTicksRequest(from_cursor=cursor), metadata=METADATA
        )

    async def run(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        async with grpc.aio.insecure_channel(self.target) as channel:
            call = self._call(channel, 0)
            try:
                async for item in call:
                    self.read += 1
                    self._note(item)
                    if stop.is_set():
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.interval)
            except grpc.aio.AioRpcError as exc:
                self.cut_after = round(time.monotonic() - started, 1)
                self.cut_code = exc.code().name
            call.cancel()

    def _note(self, item: Any) -> None:
        if self.feed == "forming":
            if item.bar.final:
                self.finals.append(item.cursor)
            self.cursor = max(self.cursor, item.cursor)
        else:
            self.cursor = max(self.cursor, item.cursor)

    async def resume_and_check(self, mesh: ProvingMesh) -> dict[str, Any]:
        """After a cut-off: read from the last cursor up to the log's head; compare with the log."""
        head = _max_id(mesh, "agg_candle_log")
        last = self.cursor
        async with grpc.aio.insecure_channel(self.target) as channel:
            call = self._call(channel, last)
            async with asyncio.timeout(120):
                async for item in call:
                    if item.bar.final:
                        self.finals.append(item.cursor)
                        if item.cursor >= head:
                            break
            call.cancel()
        expected = _ids(mesh, "agg_candle_log", head)
        return {
            "resumed_from_cursor": last,
            "final_versions_received": len(self.finals),
            "duplicates": len(self.finals) - len(set(self.finals)),
            "missing": len(set(expected) - set(self.finals)),
            "no_gap_no_duplicate": self.finals == expected,
        }


def _pg(mesh: ProvingMesh) -> str:
    return mesh.database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _max_id(mesh: ProvingMesh, table: str) -> int:
    with psycopg.connect(_pg(mesh)) as conn:
        row = conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()  # noqa: S608
    return int(row[0]) if row else 0


def _ids(mesh: ProvingMesh, table: str, upto: int) -> list[int]:
    with psycopg.connect(_pg(mesh)) as conn:
        rows = conn.execute(f"SELECT id FROM {table} WHERE id <= %s ORDER BY id", (upto,)).fetchall()  # noqa: S608
    return [int(r[0]) for r in rows]


def _feed_lags(mesh: ProvingMesh, name: str) -> dict[str, float]:
    mesh.metrics(name)
    time.sleep(0.3)
    return {k: v for k, v in mesh.metrics(name, ("mt5_feed_lag_cursors",)).items()}


async def slow_subscribers(mesh: ProvingMesh, params: Params) -> dict[str, Any]:
    stop = asyncio.Event()
    pump = TickPump(mesh.gateway, [f"SYM{i}" for i in range(8)], 10_000, batch_size=500, source_id="slow")
    probe = LatencyProbe(mesh.gateway)
    sampler = ProcessSampler(mesh, 5.0)
    background: list[asyncio.Task[Any]] = [asyncio.create_task(t.run(stop)) for t in (pump, probe, sampler)]
    await asyncio.sleep(params.baseline)
    slow_start = time.monotonic()
    readers = [
        SlowReader("forming_direct", mesh.services["aggregator"].address, "forming"),
        SlowReader("forming_gateway", mesh.gateway, "forming"),
        SlowReader("ticks_direct", mesh.services["ingest"].address, "ticks"),
        SlowReader("ticks_gateway", mesh.gateway, "ticks"),
    ]
    reader_stop = asyncio.Event()
    client_rss: list[tuple[float, float]] = []
    tasks = [asyncio.create_task(r.run(reader_stop)) for r in readers]
    while time.monotonic() - slow_start < params.slow_phase:
        await asyncio.sleep(5)
        client_rss.append((round(time.monotonic() - slow_start, 1), status_kb(os.getpid(), "VmRSS") / 1024))
    lags = {"ingest": await asyncio.to_thread(_feed_lags, mesh, "ingest")}
    lags["aggregator"] = await asyncio.to_thread(_feed_lags, mesh, "aggregator")
    slow_end = time.monotonic()
    reader_stop.set()
    await asyncio.gather(*tasks)
    stop.set()
    await asyncio.gather(*background[1:])
    pump_report = await background[0]
    checks = {}
    for reader in readers:
        if reader.feed == "forming" and reader.cut_after is not None:
            checks[reader.name] = await reader.resume_and_check(mesh)
    base = probe.latencies(0, slow_start)
    during = probe.latencies(slow_start, slow_end)
    return {
        "ticks": pump_report.as_dict(),
        "baseline_seconds": params.baseline,
        "slow_phase_seconds": params.slow_phase,
        "slow_readers": {
            r.name: {
                "messages_read": r.read,
                "cut_off_after_s": r.cut_after,
                "code": r.cut_code or "not cut off",
                "last_cursor": r.cursor,
            }
            for r in readers
        },
        "resumed_after_cut_off": checks,
        "server_feed_lag_cursors_at_end": lags,
        "aggregator_slow_subscribers_total": metric_sum(
            mesh.metrics("aggregator"), "mt5_feed_slow_subscribers_total"
        ),
        "probe_latency_ms": {"without_slow_readers": stats_ms(base), "with_slow_readers": stats_ms(during)},
        "probe_latency_ratio": {
            "p50": _ratio(during, base, 50),
            "p99": _ratio(during, base, 99),
        },
        "probe_errors": {"send": probe.send_errors, "subscriber": probe.subscriber_errors[:10]},
        "rss_samples": sampler.rows,
        "client_rss_mb": client_rss,
    }


def _ratio(a: list[float], b: list[float], q: float) -> float | None:
    if not a or not b:
        return None
    return round(float(np.percentile(a, q) / np.percentile(b, q)), 3)


# --- (b) fast subscribers, many symbols ---------------------------------------------------------


async def wide_forming(mesh: ProvingMesh, params: Params) -> dict[str, Any]:
    stop = asyncio.Event()
    pump = TickPump(mesh.gateway, [f"WIDE{i:03d}" for i in range(100)], 10_000, source_id="wide")
    before = metric_sum(mesh.metrics("aggregator"), "mt5_feed_slow_subscribers_total")
    cuts: list[float] = []
    read = 0

    async def fast() -> None:
        nonlocal read
        async with grpc.aio.insecure_channel(mesh.services["aggregator"].address) as channel:
            stub = agg_grpc.AggregatorServiceStub(channel)
            while not stop.is_set():
                call = stub.SubscribeCandles(
                    agg_pb.SubscribeCandlesRequest(include_forming=True), metadata=METADATA
                )
                try:
                    async for _ in call:
                        read += 1
                        if stop.is_set():
                            break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        cuts.append(time.monotonic())
                call.cancel()

    started = time.monotonic()
    pumping, reading = asyncio.create_task(pump.run(stop)), asyncio.create_task(fast())
    await asyncio.sleep(params.wide_phase)
    stop.set()
    report = await pumping
    await reading
    seconds = time.monotonic() - started
    total = metric_sum(mesh.metrics("aggregator"), "mt5_feed_slow_subscribers_total") - before
    return {
        "symbols": 100,
        "seconds": round(seconds, 1),
        "ticks": report.as_dict(),
        "fast_reader_messages_per_s": round(read / seconds),
        "fast_reader_cut_offs": len(cuts),
        "all_cut_offs_on_aggregator": total,
        "others_cut_off_meanwhile (indicators stage, probe)": total - len(cuts),
    }


# --- (c) connect / disconnect --------------------------------------------------------------------


async def disconnect_cycles(mesh: ProvingMesh, params: Params) -> dict[str, Any]:
    def probe() -> dict[str, float]:
        out: dict[str, float] = {}
        for name in ("ingest", "aggregator"):
            samples = mesh.metrics(name)
            out[f"{name}_tasks"] = samples.get("mt5_probe_asyncio_tasks", -1)
            out[f"{name}_subscriptions"] = metric_sum(samples, "mt5_feed_subscribers")
            out[f"{name}_rss_mb"] = mesh.rss_mb(name)
        out["envoy_rss_mb"] = mesh.rss_mb("envoy")
        return out

    stop = asyncio.Event()
    pump = TickPump(mesh.gateway, ["CYC0", "CYC1"], 2_000, source_id="cycles")
    pumping = asyncio.create_task(pump.run(stop))
    await asyncio.sleep(2)
    before = probe()
    errors: dict[str, int] = {}
    started = time.monotonic()
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        agg = agg_grpc.AggregatorServiceStub(channel)
        ing = ingest_grpc.IngestServiceStub(channel)
        for i in range(params.cycles):
            if i % 2:
                call = agg.SubscribeCandles(
                    agg_pb.SubscribeCandlesRequest(include_forming=True), metadata=METADATA
                )
            else:
                call = ing.SubscribeTicks(ingest_pb.SubscribeTicksRequest(), metadata=METADATA)
            try:
                await call.read()
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            call.cancel()
    seconds = time.monotonic() - started
    stop.set()
    await pumping
    await asyncio.sleep(3)
    after = probe()
    return {
        "cycles": params.cycles,
        "path": "client -> Envoy -> service (half aggregator forming feed, half ingest tick feed)",
        "seconds": round(seconds, 1),
        "errors_on_first_read": errors,
        "before": before,
        "after_3s": after,
    }


# --- (d) deadlines -------------------------------------------------------------------------------


def _count(mesh: ProvingMesh, symbol_prefix: str) -> int:
    with psycopg.connect(_pg(mesh)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM ingest_candles WHERE symbol LIKE %s", (symbol_prefix + "%",)
        ).fetchone()
    return int(row[0]) if row else 0


def deadlines(mesh: ProvingMesh, params: Params) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with grpc.insecure_channel(mesh.gateway) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        stub.CheckHealth(ingest_pb.CheckHealthRequest(), timeout=5)

        def call(symbol: str, timeout: float) -> tuple[str, float]:
            started = time.perf_counter()
            try:
                stub.IngestCandles(candle_request(symbol), metadata=METADATA, timeout=timeout)
            except grpc.RpcError as exc:
                return exc.code().name, time.perf_counter() - started
            return "OK", time.perf_counter() - started

        # One call at a time into the stalled stage: each one's commit starts and waits on the lock.
        elapsed: list[float] = []
        codes: dict[str, int] = {}
        waiting_after: list[int] = []
        for i in range(params.deadline_calls):
            with helpers.table_locked(mesh.database_url, "ingest_candles"):
                code, seconds = call(f"DLA{i:03d}", 0.2)
                codes[code] = codes.get(code, 0) + 1
                elapsed.append(seconds)
                time.sleep(0.2)
                waiting_after.append(helpers.lock_waiters(mesh.database_url))
        time.sleep(1)
        out["grpc_via_gateway_commit_started"] = {
            "calls": params.deadline_calls,
            "codes": codes,
            "elapsed_ms": stats_ms(elapsed),
            "within_250ms": sum(e < 0.25 for e in elapsed),
            "statements_still_waiting_200ms_after_deadline": statistics.mean(waiting_after),
            "rows_written_after_release": _count(mesh, "DLA"),
        }
        # A call queued behind a stalled commit (its own commit never started).
        with helpers.table_locked(mesh.database_url, "ingest_candles"):
            blocker = threading.Thread(target=call, args=("DLBLOCK", 30))
            blocker.start()
            helpers.wait_until(
                lambda: helpers.lock_waiters(mesh.database_url) >= 1, 10, what="the blocker to wait"
            )
            code, seconds = call("DLQUEUED", 0.2)
        blocker.join(30)
        time.sleep(1)
        out["grpc_queued_behind_stalled_commit"] = {
            "code": code,
            "elapsed_ms": round(seconds * 1000, 1),
            "rows_written_after_release": _count(mesh, "DLQUEUED"),
        }
    # REST: the EA's client gives up after 200 ms (it cannot send grpc-timeout through Envoy's REST route).
    rest_elapsed: list[float] = []
    for i in range(5):
        with helpers.table_locked(mesh.database_url, "ingest_candles"):
            started = time.perf_counter()
            with contextlib.suppress(httpx.TimeoutException):
                httpx.post(
                    mesh.url + "/ingest",
                    json=helpers.SEED_CANDLE | {"symbol": f"DLREST{i}"},
                    headers={"X-API-Key": helpers.API_KEY},
                    timeout=0.2,
                )
            rest_elapsed.append(time.perf_counter() - started)
            time.sleep(0.2)
    time.sleep(1)
    out["rest_client_timeout_200ms"] = {
        "calls": 5,
        "elapsed_ms": stats_ms(rest_elapsed),
        "rows_written_after_release": _count(mesh, "DLREST"),
    }
    # Reads into a stalled aggregator: each timed-out GetCandles keeps a worker thread and a pooled
    # connection waiting in PostgreSQL; asyncio's default executor has min(32, cores + 4) = 6 threads.
    address = mesh.services["aggregator"].address
    with (
        helpers.table_locked(mesh.database_url, "agg_candles"),
        grpc.insecure_channel(mesh.gateway) as channel,
    ):
        stub_agg = agg_grpc.AggregatorServiceStub(channel)
        codes = {}
        for _ in range(8):
            try:
                stub_agg.GetCandles(
                    agg_pb.GetCandlesRequest(symbol="SYM0", timeframe=market_pb2.M1),
                    metadata=METADATA,
                    timeout=0.2,
                )
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
        time.sleep(1.5)
        waiting = helpers.lock_waiters(mesh.database_url)
        health = helpers.grpc_status(address, timeout=1)
    out["get_candles_into_locked_agg_candles"] = {
        "calls": 8,
        "codes": codes,
        "statements_waiting_1_5s_later": waiting,
        "aggregator_health_meanwhile": {None: "no answer", 1: "SERVING", 2: "NOT_SERVING"}.get(
            health, health
        ),
    }
    return out


# --- (e) the bound, from the code ----------------------------------------------------------------


def memory_bound() -> dict[str, Any]:
    """Bytes one queued forming bar holds, measured with tracemalloc on bars the real core makes."""
    core = Aggregator(
        AggregationSettings(dt.timedelta(seconds=2), dt.timedelta(seconds=5), dt.timedelta(hours=1))
    )
    t0 = dt.datetime(2025, 10, 20, tzinfo=dt.UTC)
    tracemalloc.start()
    held = []
    for i in range(2_000):
        ts = t0 + dt.timedelta(seconds=i)
        emitted = core.add_ticks(
            f"S{i % 8}",
            np.array([int(ts.timestamp() * 1_000_000)], dtype=np.int64),
            np.array([1.1 + i * 1e-6]),
            np.array([1.1002 + i * 1e-6]),
            np.array([0.0]),
            np.array([i + 1], dtype=np.int64),
            ts,
        )
        held.extend(emitted.forming)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_bar = size / max(len(held), 1)
    queue, subscribers, page = 10_000, 32, 1_000
    return {
        "forming_bars_measured": len(held),
        "bytes_per_queued_forming_bar": round(per_bar),
        "aggregator_forming_queue (series with an unread bar, one bar each)": queue,
        "max_subscribers_per_service": subscribers,
        "feed_page_size": page,
        "per_subscriber_mb": round(queue * per_bar / 2**20, 1),
        "per_service_worst_case_mb": round(subscribers * queue * per_bar / 2**20, 1),
        "note": (
            "unread forming bars are coalesced per (symbol, timeframe), so a subscriber holds at most "
            "one per series; plus one page (1,000 rows) per subscription being read, and gRPC's send buffer"
        ),
    }


# --- main ----------------------------------------------------------------------------------------


async def run_mesh_scenarios(mesh: ProvingMesh, params: Params) -> dict[str, Any]:
    results: dict[str, Any] = {}
    print("... (a) slow subscribers", flush=True)
    results["a_slow_subscribers"] = await slow_subscribers(mesh, params)
    print("... (b) fast subscribers, 100 symbols", flush=True)
    results["b_fast_forming_100_symbols"] = await wide_forming(mesh, params)
    print("... (c) connect/disconnect cycles", flush=True)
    results["c_disconnect_cycles"] = await disconnect_cycles(mesh, params)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the logs folder")
    args = parser.parse_args(argv)
    params = (
        Params(baseline=10, slow_phase=20, wide_phase=10, cycles=100, deadline_calls=5, quick=True)
        if args.quick
        else Params(baseline=30, slow_phase=120, wide_phase=30, cycles=1_000, deadline_calls=20, quick=False)
    )
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="proving-streams-"))
    started = time.monotonic()
    try:
        # The production readiness-probe interval, not the tests' 0.2 s (see bench/proving/load.py).
        extra = {name: {"MT5MESH_HEALTH_PROBE_SECONDS": "2"} for name in helpers.SERVICES}
        with helpers.postgres_database() as url, proving_mesh(url, workdir, extra) as mesh:
            results = asyncio.run(run_mesh_scenarios(mesh, params))
            print("... (d) deadlines", flush=True)
            results["d_deadlines"] = deadlines(mesh, params)
            results["alive_at_end"] = mesh.alive()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["e_memory_bound"] = memory_bound()
    report = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": params.quick,
        "parameters": dataclasses.asdict(params),
        "wall_seconds": round(time.monotonic() - started, 1),
        "machine": machine_info(),
        **results,
    }
    subscribers = {k: v for k, v in report.items() if k != "d_deadlines"}
    deadline_report = {"timestamp": report["timestamp"], "quick": params.quick, **results["d_deadlines"]}
    # A quick run is a smoke test: it does not replace the figures of a full run.
    output = QUICK_RESULTS if params.quick else RESULTS
    save_results("subscribers", subscribers, output)
    save_results("deadlines", deadline_report, output)
    print(f"results under 'subscribers' and 'deadlines' in {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ingest throughput benchmark: ``make bench-ingest`` (``python -m bench.ingest_bench``).

Four measurements, all in one run on this machine, each against a fresh PostgreSQL database:

(a) durable ticks/s through ``IngestService.StreamTicks`` (the ``TickStreamer`` client, batched),
    straight to the ingest service and through the Envoy gateway;
(b) the raw binary COPY rate of the same rows into a freshly migrated ``ingest_ticks`` table, with the
    same batch size and one transaction per batch (the limit on this machine), plus one single COPY
    of every row for reference;
(c) REST ``POST /ingest_batch`` through Envoy at 1 and at 100 candles per request, 50 concurrent
    clients (wrk when installed, otherwise an aiohttp client in its own process): req/s, p50, p99;
    plus, for reference, ``GET /health`` (a unary call with no database work: the ceiling of one
    request through Envoy into the ingest process);
(d) the seed's way (``bench/seed_baseline.py``: FastAPI, one INSERT ... ON CONFLICT per row, one commit
    per request) fed the same tick rows in the same batch size: ticks/s.

While (a) and (c) run, the ingest process's VmRSS is sampled; the CPU time of ingest, Envoy, PostgreSQL
and the load client is recorded too, to show where the two cores went, and so is whatever else ran on
the (shared) machine meanwhile: a scenario disturbed by other processes is run again. Results go to
``bench/results/ingest.json`` and a table is printed. Ratios use the figures of this same run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import multiprocessing
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import psycopg
from google.protobuf import timestamp_pb2
from mt5.market.v1 import market_pb2

from bench.common import (
    NOISE_LIMIT_CORES,
    CpuMeter,
    RssSampler,
    ScenarioFailed,
    machine_info,
    migrate_database,
    plain_url,
    postgres_pids,
    publish,
    row_count,
    scratch_folder,
    step,
    truncate_tables,
)
from services.ingest.client import TickStreamer
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "bench" / "results" / "ingest.json"
QUICK_OUTPUT = pathlib.Path(tempfile.gettempdir()) / "ingest-bench-quick.json"
SOURCE_ID = "bench"
SYMBOLS = ("EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCHF", "USDCAD", "NZDUSD", "EURJPY")
TICK_EPOCH = dt.datetime(2025, 10, 20, tzinfo=dt.UTC)
CANDLE_EPOCH_SECONDS = 946_684_800  # 2000-01-01T00:00:00Z: room for millions of distinct M1 bars

TARGETS = {
    "stream_vs_copy_ratio": ("(a) / (b) batched COPY", ">=", 0.40),
    "stream_vs_baseline_ratio": ("(a) / (d) seed baseline", ">=", 100.0),
    "rest_1_candle_rps": ("(c) req/s at 1 candle", ">=", 1500.0),
    "rest_1_candle_p99_ms": ("(c) p99 ms at 1 candle", "<=", 20.0),
    "ingest_peak_rss_mb": ("ingest peak RSS MB", "<=", 250.0),
}

TickRow = tuple[str, dt.datetime, float, float, float]


@dataclasses.dataclass(frozen=True)
class Params:
    """What one run measures; see ``parse_args``."""

    ticks: int
    baseline_ticks: int
    batch_size: int
    duration: float
    warmup: float
    wait_quiet: float
    noisy_retries: int
    connections: int
    window: int
    client: str
    quick: bool
    output: pathlib.Path


# --- rows ------------------------------------------------------------------------------------------


def make_ticks(
    count: int, symbols: Sequence[str] = SYMBOLS, start: dt.datetime = TICK_EPOCH
) -> list[TickRow]:
    """Distinct, valid ticks one millisecond apart, cycling through ``symbols``."""
    rows: list[TickRow] = []
    for i in range(count):
        bid = round(1.05 + (i % 997) * 1e-5, 5)
        rows.append((symbols[i % len(symbols)], start + dt.timedelta(milliseconds=i), bid, bid + 0.0002, 1.0))
    return rows


def batched(rows: Sequence[TickRow], size: int) -> list[Sequence[TickRow]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def tick_pb(row: TickRow) -> market_pb2.Tick:
    symbol, ts, bid, ask, volume = row
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(ts)
    return market_pb2.Tick(symbol=symbol, ts=stamp, bid=bid, ask=ask, volume=volume)


def tick_json(row: TickRow) -> dict[str, Any]:
    symbol, ts, bid, ask, volume = row
    return {
        "symbol": symbol,
        "ts": ts.isoformat().replace("+00:00", "Z"),
        "bid": bid,
        "ask": ask,
        "volume": volume,
    }


def candle_json(symbol: str, minute: int) -> dict[str, Any]:
    ts = dt.datetime.fromtimestamp(CANDLE_EPOCH_SECONDS + 60 * minute, dt.UTC)
    return helpers.SEED_CANDLE | {"symbol": symbol, "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ")}


# --- the mesh --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Mesh:
    """The services of one scenario and, when asked for, Envoy in front of them."""

    services: dict[str, helpers.ServiceProcess]
    envoy: helpers.EnvoyProcess | None

    @property
    def ingest(self) -> helpers.ServiceProcess:
        return self.services["ingest"]

    @property
    def ingest_pid(self) -> int:
        assert self.ingest.proc is not None
        return self.ingest.proc.pid

    def check_alive(self) -> None:
        """Raise when ingest exited: a measurement across its death means nothing."""
        assert self.ingest.proc is not None
        code = self.ingest.proc.poll()
        if code is not None:
            tail = self.ingest.log_path.read_text(errors="replace")[-2000:]
            raise ScenarioFailed(f"ingest exited with code {code} during the scenario: {tail}")


@contextlib.contextmanager
def running_mesh(url: str, workdir: pathlib.Path, *, gateway: bool) -> Iterator[Mesh]:
    """Ingest alone, or every service behind Envoy (its config has a cluster for each).

    The benchmark measures ingest: the other services only give Envoy its clusters. The aggregator
    is pointed at a closed port so that it does not subscribe to this ingest's feeds (it retries with
    backoff, idle); their CPU is reported apart anyway. Only ingest has to be SERVING.
    """
    names = helpers.SERVICES if gateway else ("ingest",)
    extra = {
        # The production readiness probe interval, not the tests' 0.2 s.
        "MT5MESH_HEALTH_PROBE_SECONDS": "2",
        "AGGREGATOR_INGEST_ADDRESS": f"127.0.0.1:{helpers.free_port()}",
    }
    services = {name: helpers.make_service(name, url, workdir, extra) for name in names}
    envoy: helpers.EnvoyProcess | None = None
    try:
        for service in services.values():
            service.start(wait_serving=False)
        services["ingest"].wait_serving()
        if gateway:
            envoy = helpers.start_envoy({n: s.port for n, s in services.items()}, workdir)
            _wait_routed(envoy.url)
        yield Mesh(services, envoy)
    finally:
        if envoy is not None:
            envoy.stop()
        for service in services.values():
            with contextlib.suppress(Exception):
                service.terminate(timeout=10)
            service.kill()


def _wait_routed(url: str, timeout: float = 60.0) -> None:
    """Until Envoy routes a real POST to a healthy ingest (its health checks start every 5 s)."""
    body = json.dumps([candle_json("READY", 0)]).encode()
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        request = urllib.request.Request(  # noqa: S310 - loopback URL built here
            url + "/ingest_batch",
            data=body,
            headers={"Content-Type": "application/json", "X-API-Key": helpers.API_KEY},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310
                if reply.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise ScenarioFailed(f"gateway did not route POST /ingest_batch within {timeout}s: {last}")


def _settled_count(url: str, table: str, timeout: float = 60.0) -> int:
    """The table's row count once it stops changing: requests a load client abandoned at its deadline
    are still committed by the server, and must not spill into the next measurement."""
    deadline = time.monotonic() + timeout
    last = row_count(url, table)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = row_count(url, table)
        if now == last:
            return now
        last = now
    return last


# --- (a) StreamTicks -------------------------------------------------------------------------------


def bench_stream(
    rows: Sequence[TickRow], params: Params, workdir: pathlib.Path, *, via_envoy: bool
) -> dict[str, Any]:
    """Stream every row in batches over one StreamTicks call; the clock stops at the last ack."""
    batches = [[tick_pb(r) for r in batch] for batch in batched(rows, params.batch_size)]
    warm_rows = make_ticks(min(len(rows), 20 * params.batch_size), ("WARMUP",))
    warm = [[tick_pb(r) for r in batch] for batch in batched(warm_rows, params.batch_size)]
    with helpers.postgres_database() as url, running_mesh(url, workdir, gateway=via_envoy) as mesh:
        target = mesh.envoy.url.removeprefix("http://") if mesh.envoy else mesh.ingest.address
        asyncio.run(TickStreamer(target, helpers.API_KEY, "bench-warmup", window=params.window).send(warm))
        truncate_tables(url, "ingest_ticks", "ingest_source_batches", "ingest_candles", "ingest_candle_log")
        streamer = TickStreamer(target, helpers.API_KEY, SOURCE_ID, window=params.window)
        meter = _meter(mesh)
        with RssSampler(mesh.ingest_pid) as rss:
            meter.start()
            started = time.perf_counter()
            report = asyncio.run(streamer.send(batches))
            elapsed = time.perf_counter() - started
            cpu = meter.stop()
        mesh.check_alive()
        stored = row_count(url, "ingest_ticks")
    if report.ticks_stored != len(rows) or stored != len(rows):
        raise ScenarioFailed(f"stream stored {report.ticks_stored} (table: {stored}) of {len(rows)} ticks")
    return {
        "path": "client -> Envoy -> ingest" if via_envoy else "client -> ingest",
        "ticks": len(rows),
        "batch_size": params.batch_size,
        "window": params.window,
        "seconds": round(elapsed, 3),
        "ticks_per_s": round(len(rows) / elapsed),
        "rows_in_table": stored,
        "reconnects": report.reconnects,
        "ingest_rss": rss.report(),
        "cpu_cores": cpu,
    }


def _meter(mesh: Mesh) -> CpuMeter:
    others = [s.proc.pid for n, s in mesh.services.items() if n != "ingest" and s.proc is not None]
    groups: dict[str, Callable[[], list[int]]] = {
        "ingest": lambda: [mesh.ingest_pid],
        "postgres": postgres_pids,
        "other_services": lambda: others,
    }
    if mesh.envoy is not None:
        envoy_pid = mesh.envoy.proc.pid
        groups["envoy"] = lambda: [envoy_pid]
    return CpuMeter(groups)


# --- (b) raw COPY ----------------------------------------------------------------------------------

COPY_SQL = "COPY ingest_ticks (symbol, ts, bid, ask, volume, source_id) FROM STDIN (FORMAT BINARY)"
COPY_TYPES = ["text", "timestamptz", "float8", "float8", "float8", "text"]


def _copy(conn: psycopg.Connection[Any], rows: Sequence[TickRow]) -> None:
    with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_SQL) as copy:
        copy.set_types(COPY_TYPES)
        for symbol, ts, bid, ask, volume in rows:
            copy.write_row((symbol, ts, bid, ask, volume, SOURCE_ID))


def bench_copy(rows: Sequence[TickRow], batch_size: int) -> dict[str, Any]:
    """Binary COPY of the rows into a freshly migrated ingest_ticks, one transaction per batch."""
    batches = batched(rows, batch_size)
    with helpers.postgres_database() as url:
        migrate_database(url)
        with psycopg.connect(plain_url(url)) as conn:
            _copy(conn, make_ticks(batch_size, ("WARMUP",)))
            conn.execute("TRUNCATE ingest_ticks")
            conn.commit()
            meter = CpuMeter({"postgres": postgres_pids})
            meter.start()
            started = time.perf_counter()
            for batch in batches:
                _copy(conn, batch)
            elapsed = time.perf_counter() - started
            cpu = meter.stop()
        stored = row_count(url, "ingest_ticks")
    if stored != len(rows):
        raise ScenarioFailed(f"COPY stored {stored} of {len(rows)} rows")
    return {
        "ticks": len(rows),
        "batch_size": batch_size,
        "transactions": len(batches),
        "seconds": round(elapsed, 3),
        "ticks_per_s": round(len(rows) / elapsed),
        "cpu_cores": cpu,
    }


def bench_copy_single(rows: Sequence[TickRow]) -> dict[str, Any]:
    """All rows in one COPY and one transaction: the reference ceiling."""
    with helpers.postgres_database() as url:
        migrate_database(url)
        with psycopg.connect(plain_url(url)) as conn:
            meter = CpuMeter({"postgres": postgres_pids})
            meter.start()
            started = time.perf_counter()
            _copy(conn, rows)
            elapsed = time.perf_counter() - started
            cpu = meter.stop()
        stored = row_count(url, "ingest_ticks")
    if stored != len(rows):
        raise ScenarioFailed(f"COPY stored {stored} of {len(rows)} rows")
    return {
        "ticks": len(rows),
        "seconds": round(elapsed, 3),
        "ticks_per_s": round(len(rows) / elapsed),
        "cpu_cores": cpu,
    }


# --- (c) REST through Envoy ------------------------------------------------------------------------

WRK_SCRIPT = r"""
-- Every request carries candles no other request carries: symbol <prefix><thread>, consecutive minutes.
-- With 0 candles per request it asks GET /health instead (CheckHealth: no database, the RPC ceiling).
local thread_count = 0
function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  prefix = args[1]
  per_request = tonumber(args[2])
  epoch = tonumber(args[3])
  counter = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  if per_request == 0 then
    return wrk.format("GET", "/health")
  end
  local symbol = prefix .. tid
  local parts = {}
  for i = 1, per_request do
    local ts = os.date("!%Y-%m-%dT%H:%M:%SZ", epoch + 60 * counter)
    counter = counter + 1
    parts[i] = '{"symbol":"' .. symbol .. '","timeframe":"M1","ts":"' .. ts ..
      '","open":1.0855,"high":1.0857,"low":1.0854,"close":1.0856,"volume":150,"spread":2}'
  end
  return wrk.format(nil, "/ingest_batch", nil, "[" .. table.concat(parts, ",") .. "]")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
"""


def _wrk_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" [")[0] if first else "wrk"


def run_wrk(
    binary: str,
    url: str,
    workdir: pathlib.Path,
    prefix: str,
    per_request: int,
    duration: float,
    connections: int,
) -> dict[str, Any]:
    script = workdir / "ingest_batch.lua"
    script.write_text(WRK_SCRIPT)
    command = [
        binary,
        f"-t{min(2, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "-H",
        f"X-API-Key: {helpers.API_KEY}",
        "-s",
        str(script),
        url,
        "--",
        prefix,
        str(per_request),
        str(CANDLE_EPOCH_SECONDS),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise ScenarioFailed(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    seconds = raw["duration_us"] / 1e6
    errors = sum(
        raw[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return {
        "requests": raw["requests"],
        "ok_requests": raw["requests"] - raw["status_errors"],
        "errors": errors,
        "error_detail": {k: raw[k] for k in raw if k.endswith(("errors", "timeouts"))},
        "seconds": round(seconds, 3),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "client_cpu_seconds": 0.0,  # wrk is a waited-for child: RUSAGE_CHILDREN counts it
    }


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def aiohttp_load(
    url: str, api_key: str, prefix: str, per_request: int, duration: float, connections: int
) -> dict[str, Any]:
    """The fallback load client, run in its own process: ``connections`` workers, one connection each."""
    import aiohttp  # only the fallback client needs it

    async def run() -> tuple[list[float], int, int, float]:
        latencies: list[float] = []
        errors = 0
        requests = 0
        connector = aiohttp.TCPConnector(limit=connections)
        headers = {"X-API-Key": api_key, "Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            started = time.perf_counter()
            deadline = started + duration

            async def worker(index: int) -> None:
                nonlocal errors, requests
                minute = 0
                symbol = f"{prefix}{index}"
                while time.perf_counter() < deadline:
                    body = json.dumps([candle_json(symbol, minute + i) for i in range(per_request)])
                    minute += per_request
                    sent = time.perf_counter()
                    try:
                        if per_request == 0:
                            call = session.get(url + "/health")
                        else:
                            call = session.post(url + "/ingest_batch", data=body)
                        async with call as reply:
                            await reply.read()
                            ok = reply.status == 200
                    except aiohttp.ClientError:
                        ok = False
                    latencies.append(time.perf_counter() - sent)
                    requests += 1
                    errors += not ok

            await asyncio.gather(*(worker(i) for i in range(connections)))
            return latencies, requests, errors, time.perf_counter() - started

    latencies, requests, errors, seconds = asyncio.run(run())
    latencies.sort()
    own = os.times()
    return {
        "requests": requests,
        "ok_requests": requests - errors,
        "errors": errors,
        "seconds": round(seconds, 3),
        "p50_ms": round(_percentile(latencies, 50) * 1000, 3),
        "p90_ms": round(_percentile(latencies, 90) * 1000, 3),
        "p99_ms": round(_percentile(latencies, 99) * 1000, 3),
        "p999_ms": round(_percentile(latencies, 99.9) * 1000, 3),
        "max_ms": round((latencies[-1] if latencies else 0.0) * 1000, 3),
        "mean_ms": round(sum(latencies) / max(len(latencies), 1) * 1000, 3),
        "client_cpu_seconds": own.user + own.system,
    }


def _load(
    client: str,
    url: str,
    workdir: pathlib.Path,
    prefix: str,
    per_request: int,
    duration: float,
    connections: int,
) -> dict[str, Any]:
    if client != "aiohttp":
        return run_wrk(client, url, workdir, prefix, per_request, duration, connections)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        future = pool.submit(aiohttp_load, url, helpers.API_KEY, prefix, per_request, duration, connections)
        result: dict[str, Any] = future.result(timeout=duration + 120)
    return result


def bench_rest(per_request: int, params: Params, workdir: pathlib.Path, client: str) -> dict[str, Any]:
    """POST /ingest_batch through Envoy with ``params.connections`` concurrent clients.

    ``per_request`` 0 asks ``GET /health`` instead: a unary call that does no database work, the
    ceiling of one request through Envoy into the ingest process on this machine.
    """
    with helpers.postgres_database() as url, running_mesh(url, workdir, gateway=True) as mesh:
        assert mesh.envoy is not None
        with RssSampler(mesh.ingest_pid) as rss:
            if params.warmup > 0:
                _load(client, mesh.envoy.url, workdir, "WU", per_request, params.warmup, params.connections)
                _settled_count(url, "ingest_candle_log")
            truncate_tables(url, "ingest_candles", "ingest_candle_log")
            meter = _meter(mesh)
            meter.start()
            load = _load(
                client, mesh.envoy.url, workdir, "BM", per_request, params.duration, params.connections
            )
            cpu = meter.stop(extra_client_seconds=load.pop("client_cpu_seconds"))
        mesh.check_alive()
        stored = _settled_count(url, "ingest_candles")
    if load["errors"] > 0.01 * load["requests"]:
        raise ScenarioFailed(f"{load['errors']} of {load['requests']} requests failed: {load}")
    seconds = load["seconds"]
    return {
        "request": "GET /health" if per_request == 0 else "POST /ingest_batch",
        "candles_per_request": per_request,
        "connections": params.connections,
        **load,
        "req_per_s": round(load["ok_requests"] / seconds, 1),
        "candles_per_s": round(load["ok_requests"] * per_request / seconds),
        "candles_in_table": stored,
        "ingest_rss": rss.report(),
        "cpu_cores": cpu,
    }


# --- (d) the seed's row-by-row baseline ------------------------------------------------------------


@contextlib.contextmanager
def running_baseline(url: str, workdir: pathlib.Path) -> Iterator[tuple[str, int]]:
    port = helpers.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MT5MESH_", "OTEL_", "INGEST_"))}
    env.update({"DATABASE_URL": url, "BASELINE_API_KEY": helpers.API_KEY})
    log = (workdir / "baseline.log").open("ab")
    command = [sys.executable, "-m", "uvicorn", "--factory", "bench.seed_baseline:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning"]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if proc.poll() is not None:
                raise ScenarioFailed("baseline exited: " + (workdir / "baseline.log").read_text()[-2000:])
            try:
                return httpx.get(base + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        helpers.wait_until(up, 30, what="baseline /health")
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def bench_baseline(rows: Sequence[TickRow], params: Params, workdir: pathlib.Path) -> dict[str, Any]:
    """The same rows posted as {"ticks": [...]} in the same batch size, one request at a time."""
    bodies = [
        json.dumps({"ticks": [tick_json(r) for r in b]}).encode() for b in batched(rows, params.batch_size)
    ]
    warm = json.dumps({"ticks": [tick_json(r) for r in make_ticks(params.batch_size, ("WARMUP",))]}).encode()
    headers = {"X-API-Key": helpers.API_KEY, "Content-Type": "application/json"}
    with helpers.postgres_database() as url:
        migrate_database(url)
        with running_baseline(url, workdir) as (base, pid), httpx.Client(base_url=base, timeout=600) as http:
            http.post("/ingest/tick", content=warm, headers=headers).raise_for_status()
            truncate_tables(url, "ingest_ticks")
            meter = CpuMeter({"baseline_app": lambda: [pid], "postgres": postgres_pids})
            meter.start()
            started = time.perf_counter()
            for body in bodies:
                http.post("/ingest/tick", content=body, headers=headers).raise_for_status()
            elapsed = time.perf_counter() - started
            cpu = meter.stop()
        stored = row_count(url, "ingest_ticks")
    if stored != len(rows):
        raise ScenarioFailed(f"baseline stored {stored} of {len(rows)} rows")
    return {
        "ticks": len(rows),
        "batch_size": params.batch_size,
        "requests": len(bodies),
        "seconds": round(elapsed, 3),
        "ticks_per_s": round(len(rows) / elapsed, 1),
        "cpu_cores": cpu,
    }


# --- report ----------------------------------------------------------------------------------------


def evaluate(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    stream = results["a_stream_ticks"]["via_envoy"]["ticks_per_s"]
    figures = {
        "stream_vs_copy_ratio": round(stream / results["b_copy"]["batched"]["ticks_per_s"], 3),
        "stream_vs_single_copy_ratio": round(stream / results["b_copy"]["single"]["ticks_per_s"], 3),
        "stream_vs_baseline_ratio": round(stream / results["d_seed_baseline"]["ticks_per_s"], 1),
        "direct_stream_vs_copy_ratio": round(
            results["a_stream_ticks"]["direct"]["ticks_per_s"] / results["b_copy"]["batched"]["ticks_per_s"],
            3,
        ),
        "copy_vs_baseline_ratio": round(
            results["b_copy"]["batched"]["ticks_per_s"] / results["d_seed_baseline"]["ticks_per_s"], 1
        ),
        "rest_100_candles_per_s": results["c_rest_ingest_batch"]["candles_100"]["candles_per_s"],
        "rest_1_candle_rps": results["c_rest_ingest_batch"]["candles_1"]["req_per_s"],
        "rest_1_candle_p99_ms": results["c_rest_ingest_batch"]["candles_1"]["p99_ms"],
        "ingest_peak_rss_mb": max(
            max(s["ingest_rss"]["peak_sampled_mb"], s["ingest_rss"]["vm_hwm_mb"])
            for s in (
                results["a_stream_ticks"]["direct"],
                results["a_stream_ticks"]["via_envoy"],
                *results["c_rest_ingest_batch"].values(),
            )
        ),
    }
    targets = {}
    for key, (label, op, bound) in TARGETS.items():
        value = figures[key]
        met = value >= bound if op == ">=" else value <= bound
        targets[key] = {"what": label, "value": value, "target": f"{op} {bound:g}", "met": met}
    return figures, targets


def print_table(report: dict[str, Any]) -> None:
    r = report["results"]
    a, b, c, d = r["a_stream_ticks"], r["b_copy"], r["c_rest_ingest_batch"], r["d_seed_baseline"]
    m, p = report["machine"], report["parameters"]
    print()
    print(f"ingest benchmark  {report['timestamp']}  {m['nproc']} cores  {m['cpu_model']}")
    print(f"PostgreSQL {m['postgres_settings']['server_version']}, Envoy {m['envoy']}, Python {m['python']}")
    print(f"load client for (c): {report['client']}")
    print()
    row = "{:<50} {:>15} {:>8} {:>8}  {}"
    print(row.format("scenario", "rate", "p50 ms", "p99 ms", "CPU cores: ingest/envoy/pg/client/other"))
    print("-" * 122)

    def cores(s: dict[str, Any], first: str = "ingest") -> str:
        cpu = s.get("cpu_cores", {})
        keys = (first, "envoy", "postgres", "bench_client", "other")
        return "/".join(f"{cpu[k]:.2f}" if k in cpu else "-" for k in keys)

    batch = p["batch_size"]
    for name, s in (("direct", a["direct"]), ("via Envoy", a["via_envoy"])):
        label = f"(a) StreamTicks {name}, {p['ticks']:,} in {batch}s"
        print(row.format(label, f"{s['ticks_per_s']:,} t/s", "", "", cores(s)))
    copy = b["batched"]
    print(
        row.format(f"(b) COPY, {batch} rows/transaction", f"{copy['ticks_per_s']:,} t/s", "", "", cores(copy))
    )
    single = f"{b['single']['ticks_per_s']:,} t/s"
    print(row.format("(b) COPY, all rows in one transaction (reference)", single, "", "", cores(b["single"])))
    for key in ("candles_1", "candles_100", "health_ceiling"):
        s = c[key]
        what = (
            f"POST /ingest_batch, {s['candles_per_request']} candle(s)"
            if key != "health_ceiling"
            else "GET /health (no DB, ceiling)"
        )
        label = f"(c) {what}, {s['connections']} conn"
        rate = f"{s['req_per_s']:,.0f} req/s"
        print(row.format(label, rate, f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}", cores(s)))
    label = f"(d) seed baseline, {p['baseline_ticks']:,} in {batch}s"
    print(row.format(label, f"{d['ticks_per_s']:,.0f} t/s", "", "", cores(d, "baseline_app") + " (app)"))
    print()
    print("{:<30} {:>12} {:>10}  {}".format("target", "reached", "target", "met"))
    print("-" * 62)
    for t in report["targets"].values():
        print(
            "{:<30} {:>12g} {:>10}  {}".format(
                t["what"], t["value"], t["target"], "met" if t["met"] else "MISSED"
            )
        )
    f = report["figures"]
    print()
    print(
        f"also: (a) direct / (b) = {f['direct_stream_vs_copy_ratio']:.3f}, "
        f"(a) / single COPY = {f['stream_vs_single_copy_ratio']:.3f}, "
        f"(b) / (d) = {f['copy_vs_baseline_ratio']:.1f}, "
        f"REST 100 candles = {f['rest_100_candles_per_s']:,} candles/s"
    )
    print(f"results: {report['output']}")


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Params:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ticks", type=int, help="ticks streamed in (a) and copied in (b) (default 300000)")
    parser.add_argument(
        "--baseline-ticks", type=int, help="ticks posted to the seed baseline (d) (default 20000)"
    )
    parser.add_argument("--batch-size", type=int, help="ticks per batch in (a), (b) and (d) (default 1000)")
    parser.add_argument("--duration", type=float, help="seconds measured per REST scenario (default 10)")
    parser.add_argument(
        "--warmup", type=float, help="seconds of warm-up before each REST scenario (default 3)"
    )
    parser.add_argument("--connections", type=int, default=50, help="concurrent REST clients (default 50)")
    parser.add_argument("--window", type=int, default=8, help="StreamTicks batches in flight (default 8)")
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="REST load client (default: wrk if present)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        help="before each scenario, wait up to this many seconds for other load on the machine to stop "
        "(default 60; 0 with --quick)",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        help="run a scenario again, at most this many times, when other processes loaded the machine "
        f"by more than {NOISE_LIMIT_CORES} cores during it (default 2; 0 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run for smoke testing (seconds)")
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        help=f"results JSON path (default {DEFAULT_OUTPUT.relative_to(REPO)}; with --quick "
        f"{QUICK_OUTPUT}, so a smoke test never replaces the real results)",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    defaults = (
        (6_000, 1_000, 500, 2.0, 0.5, 0.0, 0) if quick else (300_000, 20_000, 1_000, 10.0, 3.0, 60.0, 2)
    )
    given = (
        args.ticks,
        args.baseline_ticks,
        args.batch_size,
        args.duration,
        args.warmup,
        args.wait_quiet,
        args.noisy_retries,
    )
    ticks, baseline_ticks, batch_size, duration, warmup, wait_quiet, noisy_retries = (
        value if value is not None else default for value, default in zip(given, defaults, strict=True)
    )
    if min(ticks, baseline_ticks, batch_size, args.connections, args.window) < 1 or duration <= 0:
        parser.error("counts must be at least 1 and --duration above 0")
    if warmup < 0 or wait_quiet < 0 or noisy_retries < 0:
        parser.error("--warmup, --wait-quiet and --noisy-retries must not be negative")
    return Params(
        ticks=int(ticks),
        baseline_ticks=int(baseline_ticks),
        batch_size=int(batch_size),
        duration=float(duration),
        warmup=float(warmup),
        wait_quiet=float(wait_quiet),
        noisy_retries=int(noisy_retries),
        connections=int(args.connections),
        window=int(args.window),
        client=str(args.client),
        quick=quick,
        output=args.output or (QUICK_OUTPUT if quick else DEFAULT_OUTPUT),
    )


def pick_client(choice: str) -> tuple[str, str]:
    """(what _load runs, its description): the wrk binary path, or "aiohttp"."""
    found = shutil.which("wrk")
    if choice == "wrk" and not found:
        raise SystemExit("--client wrk: wrk is not installed")
    if choice in ("auto", "wrk") and found:
        return found, f"{_wrk_version(found)} at {found} (2 threads, Lua-generated distinct bodies)"
    return "aiohttp", "aiohttp (separate process, one connection per concurrent client)"


def run_all(params: Params, client: str, workdir: pathlib.Path) -> dict[str, Any]:
    rows = make_ticks(params.ticks)
    baseline_rows = (
        rows[: params.baseline_ticks]
        if params.baseline_ticks <= len(rows)
        else make_ticks(params.baseline_ticks)
    )
    # (b) first: the machine's limit, measured with nothing else of ours running.
    copy = {
        "batched": step(
            "(b) binary COPY, one transaction per batch", params, lambda: bench_copy(rows, params.batch_size)
        ),
        "single": step("(b) binary COPY, one transaction", params, lambda: bench_copy_single(rows)),
    }
    stream = {
        "direct": step(
            "(a) StreamTicks straight to ingest",
            params,
            lambda: bench_stream(rows, params, workdir, via_envoy=False),
        ),
        "via_envoy": step(
            "(a) StreamTicks through Envoy",
            params,
            lambda: bench_stream(rows, params, workdir, via_envoy=True),
        ),
    }
    rest = {
        name: step(title, params, functools.partial(bench_rest, n, params, workdir, client))
        for name, n, title in (
            ("candles_1", 1, "(c) POST /ingest_batch, 1 candle per request"),
            ("candles_100", 100, "(c) POST /ingest_batch, 100 candles per request"),
            ("health_ceiling", 0, "(c) reference: GET /health, no database work"),
        )
    }
    baseline = step(
        "(d) seed baseline (FastAPI, row by row)",
        params,
        lambda: bench_baseline(baseline_rows, params, workdir),
    )
    return {
        "a_stream_ticks": stream,
        "b_copy": copy,
        "c_rest_ingest_batch": rest,
        "d_seed_baseline": baseline,
    }


def main(argv: Sequence[str] | None = None) -> int:
    params = parse_args(argv)
    client, client_description = pick_client(params.client)
    machine = machine_info()
    started = dt.datetime.now(dt.UTC)
    with scratch_folder("ingest-bench-") as workdir:
        results = run_all(params, client, workdir)
        figures, targets = evaluate(results)
        parts = {
            "machine": machine,
            "parameters": dataclasses.asdict(params),
            "client": client_description,
            "results": results,
            "figures": figures,
            "targets": targets,
        }
        publish("ingest", started, params.output, parts, print_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

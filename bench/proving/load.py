"""Proving ground, full form: sustained mixed load, rate limit and overload, rolling restarts.

``python -m bench.proving.load`` (``--quick`` for a smoke run, ``--duration`` seconds of mixed load).
One mesh on a fresh PostgreSQL database, default settings, probed services behind the real Envoy.

(a) mixed load for ``--duration`` seconds, everything through the gateway:
    - REST candles at the seed EA's rate x100: ``--symbols`` symbols (default 100), the EA posting one
      M1 candle per symbol per minute, so 100 x 100 / 60 = 167 ``POST /ingest`` a second, scheduled
      open-loop (a late answer does not slow the schedule);
    - gRPC tick streams asking for ``--tick-rate`` ticks/s (default 100,000) from two sender processes
      (``StreamTicks``, batches of 1,000, 16 in flight each; one stamps ticks with the wall clock, the
      other with a market clock 20 ms a tick from 2025-10-20, so that bars close, indicator values and
      signals flow within the run): what is sustained is measured;
    - reads: ``GET /v1/candles``, ``GET /v1/indicators``, ``GET /signals`` at 5 a second each;
    - a subscriber on every stage (ingest ticks, aggregator candles, indicator values, signals) and the
      end-to-end latency probe (tick posted -> forming bar received).
    Per route: calls, errors, p50/p99; RSS and asyncio tasks of every process every 10 s, with the
    slope of each series (no growth trend = slope near 0).
(b) rollout: with the load still running, each service in turn gets SIGTERM and is started again;
    its health is watched every 10 ms, REST clients retry (every 0.5 s, up to 30 s), subscribers resume
    from their cursors. Per service: health seen after SIGTERM, exit code, seconds to exit and back to
    SERVING, the longest time a REST call needed to succeed, calls failed after retries, subscriber
    breaks and duplicates.
(c) rate limit: wrk (or aiohttp) as fast as it can on a path Envoy answers itself (404), so that the
    gateway's own limit (10,000 requests/s, bursts of 20,000) is the only one reached: 429s vs rate.
(d) overload: 400 connections posting 100 candles per request for 15 s: answers by status, and
    whether every process is still alive afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import multiprocessing
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_grpc
from mt5.indicators.v1 import indicators_service_pb2 as ind_pb
from mt5.indicators.v1 import indicators_service_pb2_grpc as ind_grpc
from mt5.inference.v1 import inference_service_pb2 as inf_pb
from mt5.inference.v1 import inference_service_pb2_grpc as inf_grpc
from mt5.ingest.v1 import ingest_service_pb2 as ingest_pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc

from bench.common import machine_info, stats_ms
from bench.proving import RESULTS, save_results
from bench.proving.traffic import (
    METADATA,
    QUICK_RESULTS,
    Follower,
    LatencyProbe,
    ProcessSampler,
    ProvingMesh,
    RestClient,
    TickMaker,
    TickPump,
    metric_sum,
    proving_mesh,
    trend,
    watch_health,
)
from tests import helpers
from tests.inference_models import save_model

EA_EPOCH = 946_684_800  # 2000-01-01T00:00:00Z: room for a distinct M1 candle per post


@dataclasses.dataclass(frozen=True)
class Params:
    duration: float
    symbols: int
    ea_multiplier: float
    tick_rate: float
    tick_senders: int
    roll: tuple[str, ...]
    ratelimit_seconds: float
    overload_seconds: float
    quick: bool


# --- load generators -------------------------------------------------------------------------------


def _pump_process(
    target: str, symbols: list[str], rate: float, seconds: float, source: str, api_key: str, market: bool
) -> dict[str, Any]:
    """A tick sender in its own process, so that generating ticks does not steal this loop's time.

    ``market``: ticks on a market clock 20 ms apart from 2025-10-20 (bars close within seconds, so
    indicator values and signals flow during the run); otherwise stamped with the wall clock.
    """

    async def run() -> dict[str, Any]:
        stop = asyncio.Event()
        start = int(dt.datetime(2025, 10, 20, tzinfo=dt.UTC).timestamp() * 1e6) if market else None
        maker = TickMaker(symbols, market_start_us=start, market_step_us=20_000)
        pump = TickPump(
            target, symbols, rate, batch_size=1_000, source_id=source, window=16, api_key=api_key, maker=maker
        )
        task = asyncio.create_task(pump.run(stop))
        await asyncio.sleep(seconds)
        stop.set()
        return (await task).as_dict()

    return asyncio.run(run())


@dataclasses.dataclass
class RouteStats:
    """Latencies and answers of one route."""

    latencies: list[float] = dataclasses.field(default_factory=list)
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, seconds: float, status: str) -> None:
        self.latencies.append(seconds)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def report(self, seconds: float) -> dict[str, Any]:
        calls = len(self.latencies)
        errors = sum(n for s, n in self.statuses.items() if s not in {"200", "not_sent_backlog"})
        return {
            "calls": calls,
            "per_s": round(calls / seconds, 1) if seconds else 0,
            "statuses": dict(self.statuses),
            "error_rate": round(errors / calls, 5) if calls else None,
            "latency_ms": stats_ms(self.latencies),
        }


async def _open_loop(
    session: aiohttp.ClientSession,
    rate: float,
    stop: asyncio.Event,
    stats: RouteStats,
    request: Callable[[int], tuple[str, str, dict[str, Any] | None]],
    max_in_flight: int = 400,
) -> None:
    """Requests at ``rate``/s on a fixed schedule, each in its own task (open loop).

    When ``max_in_flight`` requests are waiting, a due request is not sent and counted as
    ``not_sent_backlog``: the client stays bounded when the mesh is slower than the schedule.
    """
    pending: set[asyncio.Task[None]] = set()

    async def one(n: int) -> None:
        method, path, body = request(n)
        started = time.perf_counter()
        try:
            async with session.request(method, path, json=body) as reply:
                await reply.read()
                status = str(reply.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = type(exc).__name__
        stats.add(time.perf_counter() - started, status)

    n = 0
    due = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if due > now:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), due - now)
            continue
        n += 1
        due += 1 / rate
        if len(pending) >= max_in_flight:
            stats.statuses["not_sent_backlog"] = stats.statuses.get("not_sent_backlog", 0) + 1
            await asyncio.sleep(0)
            continue
        task = asyncio.create_task(one(n))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)


def _ea_candle(symbols: int) -> Callable[[int], tuple[str, str, dict[str, Any] | None]]:
    def request(n: int) -> tuple[str, str, dict[str, Any] | None]:
        symbol, minute = f"EA{n % symbols:03d}", n // symbols
        ts = dt.datetime.fromtimestamp(EA_EPOCH + 60 * minute, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return "POST", "/ingest", helpers.SEED_CANDLE | {"symbol": symbol, "ts": ts}

    return request


def _get(path: str) -> Callable[[int], tuple[str, str, dict[str, Any] | None]]:
    return lambda _n: ("GET", path, None)


def _followers(mesh: ProvingMesh) -> dict[str, Follower]:
    return {
        "ingest.SubscribeTicks": Follower(
            lambda ch, c: ingest_grpc.IngestServiceStub(ch).SubscribeTicks(
                ingest_pb.SubscribeTicksRequest(from_cursor=c), metadata=METADATA
            ),
            mesh.gateway,
        ),
        "aggregator.SubscribeCandles": Follower(
            lambda ch, c: agg_grpc.AggregatorServiceStub(ch).SubscribeCandles(
                agg_pb.SubscribeCandlesRequest(from_cursor=c), metadata=METADATA
            ),
            mesh.gateway,
        ),
        "indicators.SubscribeIndicators": Follower(
            lambda ch, c: ind_grpc.IndicatorsServiceStub(ch).SubscribeIndicators(
                ind_pb.SubscribeIndicatorsRequest(from_cursor=c), metadata=METADATA
            ),
            mesh.gateway,
        ),
        "inference.SubscribeSignals": Follower(
            lambda ch, c: inf_grpc.InferenceServiceStub(ch).SubscribeSignals(
                inf_pb.SubscribeSignalsRequest(from_cursor=c), metadata=METADATA
            ),
            mesh.gateway,
        ),
    }


def _follower_report(f: Follower) -> dict[str, Any]:
    cursors = [c for _, c in f.cursors]
    backwards = [(a, b) for a, b in itertools.pairwise(cursors) if b <= a]
    return {
        "not_increasing_examples": backwards[:5],
        "messages": len(cursors),
        "breaks": len(f.breaks),
        "break_codes": sorted({code for _, code in f.breaks}),
        "duplicates_or_reordered": len(cursors) - len(set(cursors)) + len(backwards),
    }


# --- (b) rollout -----------------------------------------------------------------------------------


def _roll_one(mesh: ProvingMesh, name: str) -> dict[str, Any]:
    service = mesh.services[name]
    assert service.proc is not None
    health: list[tuple[float, int | None]] = []
    watching = threading.Event()
    watcher = threading.Thread(target=watch_health, args=(service.address, watching, health))
    sigterm = time.monotonic()
    service.proc.terminate()
    watcher.start()
    code = service.proc.wait(60)
    exited = time.monotonic() - sigterm
    watching.set()
    watcher.join()
    service.start(wait_serving=True)
    serving = time.monotonic() - sigterm
    names = {None: "no answer", 1: "SERVING", 2: "NOT_SERVING"}
    seen: list[str] = []
    for _, status in health:
        label = names.get(status, str(status))
        if not seen or seen[-1] != label:
            seen.append(label)
    return {
        "exit_code": code,
        "seconds_to_exit": round(exited, 2),
        "seconds_to_serving_again": round(serving, 2),
        "health_sequence_after_sigterm": seen,
        "health_probes_answered_not_serving": sum(s == 2 for _, s in health),
        "health_probes": len(health),
    }


# --- (c) and (d): wrk ------------------------------------------------------------------------------

WRK_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  mode = args[1]
  c200, c404, c429, c503, c504, cother = 0, 0, 0, 0, 0, 0
  n = 0
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  if mode == "404" then return wrk.format("GET", "/no/such/path") end
  n = n + 1
  local parts = {}
  for i = 1, 100 do
    local ts = os.date("!%Y-%m-%dT%H:%M:%SZ", 1000000000 + 60 * (n * 100 + i))
    parts[i] = '{"symbol":"OVER' .. math.random(1, 1000000) .. '","timeframe":"M1","ts":"' .. ts ..
      '","open":1.0855,"high":1.0857,"low":1.0854,"close":1.0856,"volume":150,"spread":2}'
  end
  return wrk.format("POST", "/ingest_batch", nil, "[" .. table.concat(parts, ",") .. "]")
end
function response(status, headers, body)
  if status == 200 then c200 = c200 + 1 elseif status == 404 then c404 = c404 + 1
  elseif status == 429 then c429 = c429 + 1 elseif status == 503 then c503 = c503 + 1
  elseif status == 504 then c504 = c504 + 1 else cother = cother + 1 end
end
function done(summary, latency, requests)
  local t = {c200 = 0, c404 = 0, c429 = 0, c503 = 0, c504 = 0, cother = 0}
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + thread:get(k) end
  end
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"timeouts":%d,"socket_errors":%d,' ..
    '"s200":%d,"s404":%d,"s429":%d,"s503":%d,"s504":%d,"other":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.errors.timeout,
    summary.errors.connect + summary.errors.read + summary.errors.write,
    t.c200, t.c404, t.c429, t.c503, t.c504, t.cother, latency:percentile(50), latency:percentile(99)))
end
"""


def _wrk(
    mesh: ProvingMesh, mode: str, connections: int, seconds: float, workdir: pathlib.Path
) -> dict[str, Any]:
    binary = shutil.which("wrk")
    if binary is None:
        return {"skipped": "wrk is not installed (apt-get install wrk)"}
    script = workdir / "proving_load.lua"
    script.write_text(WRK_SCRIPT)
    command = [
        binary, "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
        "-H", f"X-API-Key: {helpers.API_KEY}", "-s", str(script), mesh.url, "--", mode,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        return {"failed": (out.stdout + out.stderr)[-1000:]}
    raw = json.loads(line.removeprefix("WRKJSON "))
    secs = raw.pop("duration_us") / 1e6
    return {
        "connections": connections,
        "seconds": round(secs, 1),
        "req_per_s": round(raw["requests"] / secs),
        "rate_limited_429_per_s": round(raw["s429"] / secs),
        "answered_per_s": round((raw["requests"] - raw["s429"]) / secs),
        **raw,
    }


# --- main ------------------------------------------------------------------------------------------


async def mixed_load(mesh: ProvingMesh, params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
    stop = asyncio.Event()
    routes = {
        "POST /ingest (EA candles)": RouteStats(),
        "GET /v1/candles/{symbol}/M1": RouteStats(),
        "GET /v1/indicators/{symbol}/M1": RouteStats(),
        "GET /signals?timeframe=M1": RouteStats(),
    }
    ea_rate = params.symbols * params.ea_multiplier / 60
    followers = _followers(mesh)
    probe = LatencyProbe(mesh.gateway)
    sampler = ProcessSampler(mesh, 10.0)
    envoy_before = mesh.envoy_stats(("http.gateway.", "gateway_rate_limit"))
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ProcessPoolExecutor(
        params.tick_senders, mp_context=multiprocessing.get_context("spawn")
    )
    total = params.duration + (30.0 * len(params.roll) + 10 if params.roll else 0)
    senders = [
        loop.run_in_executor(
            pool,
            _pump_process,
            mesh.gateway,
            [f"TK{k}{i}" for i in range(8)],
            params.tick_rate / params.tick_senders,
            total,
            f"load-{k}",
            helpers.API_KEY,  # a spawned process would draw another test key
            k == 1,
        )
        for k in range(params.tick_senders)
    ]
    async with aiohttp.ClientSession(
        base_url=mesh.url,
        headers={"X-API-Key": helpers.API_KEY},
        timeout=aiohttp.ClientTimeout(total=30),
        connector=aiohttp.TCPConnector(limit=200),
    ) as client:
        reads = {
            "GET /v1/candles/{symbol}/M1": "/v1/candles/TK10/M1",
            "GET /v1/indicators/{symbol}/M1": "/v1/indicators/TK10/M1",
            "GET /signals?timeframe=M1": "/signals?timeframe=M1",
        }
        workers = [
            _open_loop(client, ea_rate, stop, routes["POST /ingest (EA candles)"], _ea_candle(params.symbols))
        ]
        for route, path in reads.items():
            workers.append(_open_loop(client, 5, stop, routes[route], _get(path)))
        tasks = [asyncio.create_task(w) for w in workers]
        tasks += [asyncio.create_task(f.run(stop)) for f in followers.values()]
        tasks += [asyncio.create_task(probe.run(stop)), asyncio.create_task(sampler.run(stop))]
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < params.duration:
            await asyncio.sleep(min(30.0, params.duration - elapsed))
            calls = {name.split()[1]: len(r.latencies) for name, r in routes.items()}
            print(
                f"    {time.monotonic() - started:.0f}s calls {calls} probe {len(probe.samples)}", flush=True
            )
        load_seconds = time.monotonic() - started
        load_routes = {name: r.report(load_seconds) for name, r in routes.items()}
        rss_rows = list(sampler.rows)
        envoy_after = mesh.envoy_stats(("http.gateway.", "gateway_rate_limit"))
        probe_ms = stats_ms(probe.latencies())
        follow_load = {name: _follower_report(f) for name, f in followers.items()}
        # (b) rollout, the load still running; REST clients that retry, one per service's route.
        rollout: dict[str, Any] = {}
        if params.roll:
            retrying = {
                "ingest": RestClient(mesh.url, "POST", "/ingest", helpers.SEED_CANDLE | {"symbol": "ROLLEA"}),
                "aggregator": RestClient(mesh.url, "GET", "/v1/candles/TK10/M1", None),
                "indicators": RestClient(mesh.url, "GET", "/v1/indicators/TK10/M1", None),
                "inference": RestClient(mesh.url, "GET", "/signals?timeframe=M1", None),
            }
            rest_stop = asyncio.Event()
            rest_tasks = [asyncio.create_task(c.run(rest_stop)) for c in retrying.values()]
            breaks_before = {n: len(f.breaks) for n, f in followers.items()}
            for name in params.roll:
                print(f"    SIGTERM {name}", flush=True)
                rollout[name] = await asyncio.to_thread(_roll_one, mesh, name)
                await asyncio.sleep(10)
            rest_stop.set()
            await asyncio.gather(*rest_tasks)
            rollout["rest_clients_retrying"] = {
                name: {
                    "calls": c.calls,
                    "retries": c.retries,
                    "failed_after_30s_of_retries": len(c.failed),
                    "longest_call_s": round(c.longest, 2),
                    "failures": c.failed[:3],
                }
                for name, c in retrying.items()
            }
            rollout["subscribers"] = {
                name: {
                    "breaks_during_rollout": len(f.breaks) - breaks_before[name],
                    "resumed_and_received_after_last_restart": bool(f.cursors)
                    and f.cursors[-1][0] > time.monotonic() - 15,
                    **_follower_report(f),
                }
                for name, f in followers.items()
            }
            rollout["load_errors_during_rollout"] = {
                name: {k: v for k, v in r.report(1).items() if k == "statuses"} for name, r in routes.items()
            }
        stop.set()
        await asyncio.gather(*tasks)
    pumps = await asyncio.gather(*senders)
    pool.shutdown()
    acked = sum(p["acked_ticks"] for p in pumps)
    pumped = sum(p["seconds"] for p in pumps) / len(pumps)
    keys = [f"{n}_rss_mb" for n in (*helpers.SERVICES, "envoy")] + [f"{n}_tasks" for n in helpers.SERVICES]
    envoy_delta = {
        k: envoy_after.get(k, 0) - envoy_before.get(k, 0) for k in envoy_after if "rq_" in k or "rate" in k
    }
    load = {
        "duration_s": round(load_seconds, 1),
        "ea": {
            "symbols": params.symbols,
            "seed_rate": "one M1 candle per symbol per minute",
            "multiplier": params.ea_multiplier,
            "posts_per_s": round(ea_rate, 1),
        },
        "routes": load_routes,
        "ticks": {
            "asked_per_s": params.tick_rate,
            "sustained_acked_per_s": round(acked / pumped) if pumped else 0,
            "note": "over the load and rollout phases together; per sender below",
            "senders": pumps,
        },
        "subscribers": follow_load,
        "probe_latency_ms": probe_ms,
        "probe_errors": {"send": probe.send_errors, "subscriber": probe.subscriber_errors[:10]},
        "rss_and_tasks_trend": {k: trend(rss_rows, k) for k in keys},
        "rss_samples": rss_rows,
        "envoy_counters_delta": {k: v for k, v in envoy_delta.items() if v},
        "aggregator_slow_subscribers_total": metric_sum(
            mesh.metrics("aggregator"), "mt5_feed_slow_subscribers_total"
        ),
    }
    return load, rollout


def envoy_answers(log: pathlib.Path) -> dict[str, int]:
    """Envoy's access log: answers of 429 and 5xx by code, response flags and details."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            code = str(entry.get("response_code"))
            if code == "429" or code.startswith("5"):
                flags, details = entry.get("response_flags"), entry.get("response_code_details")
                key = f"{code} {flags} {details} {entry.get('rpc')}"
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:20])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 s of load, one restart, short phases")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of mixed load (default 600)")
    parser.add_argument("--symbols", type=int, default=100, help="EA symbols (default 100)")
    parser.add_argument("--tick-rate", type=float, default=100_000.0, help="ticks/s asked (default 100,000)")
    parser.add_argument("--keep", action="store_true", help="keep the logs folder")
    args = parser.parse_args(argv)
    params = Params(
        duration=30.0 if args.quick else args.duration,
        symbols=args.symbols,
        ea_multiplier=100.0,
        tick_rate=args.tick_rate,
        tick_senders=2,
        roll=("aggregator",) if args.quick else helpers.SERVICES,
        ratelimit_seconds=5 if args.quick else 10,
        overload_seconds=5 if args.quick else 15,
        quick=args.quick,
    )
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="proving-load-"))
    save_model(workdir / "models")
    started = time.monotonic()
    try:
        # The production readiness-probe interval and drain, not the tests' 0.2 s and 0 s: under
        # load on two shared cores a 0.4 s probe deadline makes health flap and Envoy stop routing,
        # and the rollout measures the drain (NOT_SERVING while still serving) before each stop.
        extra = {
            name: {"MT5MESH_HEALTH_PROBE_SECONDS": "2", "MT5MESH_DRAIN_SECONDS": "5"}
            for name in helpers.SERVICES
        }
        with helpers.postgres_database() as url, proving_mesh(url, workdir, extra) as mesh:
            print(f"... (a) mixed load for {params.duration:.0f} s, then (b) rollout", flush=True)
            load, rollout = asyncio.run(mixed_load(mesh, params))
            print("... (c) rate limit", flush=True)
            load["rate_limit"] = _wrk(mesh, "404", 100, params.ratelimit_seconds, workdir)
            print("... (d) overload", flush=True)
            load["overload"] = _wrk(mesh, "batch", 400, params.overload_seconds, workdir)
            time.sleep(2)
            load["alive_after_overload"] = mesh.alive()
            load["serving_after_overload"] = {
                n: helpers.grpc_status(s.address, timeout=5) == 1 for n, s in mesh.services.items()
            }
            load["envoy_429_and_5xx_answers_whole_run"] = envoy_answers(workdir / "envoy.log")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    stamp = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": params.quick,
        "parameters": dataclasses.asdict(params),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    output = QUICK_RESULTS if params.quick else RESULTS
    save_results("load", {**stamp, "machine": machine_info(), **load}, output)
    save_results("rollout", {**stamp, **rollout}, output)
    print(f"results under 'load' and 'rollout' in {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

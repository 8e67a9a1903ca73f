"""What the proving-ground benchmarks and tests share: a probed mesh, paced tick feeds, latency probes,
process samples and the shared results file.

The mesh is the real one (four service processes on loopback ports behind the real Envoy, as
``tests.helpers.running_mesh`` starts it), except that every service runs under
``tests.probed_service``, which adds gauges of its asyncio tasks and threads to its metrics port, and
every service has a metrics port.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import httpx
from google.protobuf import timestamp_pb2
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_grpc
from mt5.ingest.v1 import ingest_service_pb2 as ingest_pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from mt5.market.v1 import market_pb2

from bench.common import scrape, status_kb
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[2]
QUICK_RESULTS = pathlib.Path(tempfile.gettempdir()) / "proving-ground-quick.json"
METADATA = (("x-api-key", helpers.API_KEY),)
MIB = 1024 * 1024


# --- the mesh --------------------------------------------------------------------------------------


class ProbedProcess(helpers.ServiceProcess):
    """A service process started through ``tests.probed_service`` (same service, two more gauges)."""

    def start(self, *, wait_serving: bool = True) -> ProbedProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.probed_service", self.name],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=helpers.REPO,
        )
        if wait_serving:
            self.wait_serving()
        return self


@dataclasses.dataclass
class ProvingMesh:
    """The running mesh, where to reach each part, and how to read its processes."""

    services: dict[str, ProbedProcess]
    envoy: helpers.EnvoyProcess
    metrics_ports: dict[str, int]
    database_url: str
    workdir: pathlib.Path

    @property
    def gateway(self) -> str:
        """The gateway as a gRPC target."""
        return f"127.0.0.1:{self.envoy.port}"

    @property
    def url(self) -> str:
        return self.envoy.url

    def pid(self, name: str) -> int:
        proc = self.envoy.proc if name == "envoy" else self.services[name].proc
        assert proc is not None
        return proc.pid

    def rss_mb(self, name: str) -> float:
        return round(status_kb(self.pid(name), "VmRSS") / 1024, 1)

    def metrics(self, name: str, prefixes: Sequence[str] = ("mt5_",)) -> dict[str, float]:
        """The service's Prometheus samples whose names start with one of ``prefixes``."""
        return scrape(self.metrics_ports[name], prefixes)

    def envoy_stats(self, prefixes: Sequence[str]) -> dict[str, float]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.envoy.admin_port}/stats?format=json", timeout=5
        ) as reply:
            stats = json.loads(reply.read())["stats"]
        return {
            s["name"]: float(s["value"])
            for s in stats
            if "value" in s and s["name"].startswith(tuple(prefixes))
        }

    def alive(self) -> dict[str, bool]:
        out = {n: s.proc is not None and s.proc.poll() is None for n, s in self.services.items()}
        out["envoy"] = self.envoy.proc.poll() is None
        return out


def metric_sum(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


@contextlib.contextmanager
def proving_mesh(
    database_url: str, workdir: pathlib.Path, extra: Mapping[str, Mapping[str, str]] | None = None
) -> Iterator[ProvingMesh]:
    """Start the four services (probed, each with a metrics port) and Envoy; kill them all on exit."""
    ports = {name: helpers.free_port() for name in helpers.SERVICES}
    metrics_ports = {name: helpers.free_port() for name in helpers.SERVICES}
    env: dict[str, dict[str, str]] = {
        "aggregator": {"AGGREGATOR_INGEST_ADDRESS": f"127.0.0.1:{ports['ingest']}"},
        "indicators": {"INDICATORS_AGGREGATOR_ADDRESS": f"127.0.0.1:{ports['aggregator']}"},
        "inference": {
            "INFERENCE_INDICATORS_ADDRESS": f"127.0.0.1:{ports['indicators']}",
            "INFERENCE_MODELS_DIR": str(workdir / "models"),
            "INFERENCE_RELOAD_SECONDS": "0.2",
            "INFERENCE_FEED_POLL_SECONDS": "0.1",
        },
        "ingest": {
            "INGEST_MESH_PEERS": ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items() if n != "ingest")
        },
    }
    for name in helpers.SERVICES:
        env[name][f"{name.upper()}_METRICS_PORT"] = str(metrics_ports[name])
    for name, values in (extra or {}).items():
        env.setdefault(name, {}).update(values)
    services = {
        name: ProbedProcess(
            name,
            helpers.service_env(name, ports[name], database_url, env[name]),
            workdir / f"{name}.log",
            ports[name],
        )
        for name in helpers.SERVICES
    }
    envoy = None
    try:
        for service in services.values():
            service.start(wait_serving=False)
        for service in services.values():
            service.wait_serving()
        envoy = helpers.start_envoy(ports, workdir)
        mesh = ProvingMesh(services, envoy, metrics_ports, database_url, workdir)
        helpers.wait_until(lambda: gateway_routes(mesh), 30, what="gateway routes to every service")
        yield mesh
    finally:
        if envoy is not None:
            envoy.stop()
        for service in services.values():
            service.kill()


def gateway_routes(mesh: ProvingMesh) -> bool:
    """Envoy's health checks see every upstream healthy (GET /health answers 200)."""
    try:
        with urllib.request.urlopen(mesh.url + "/health", timeout=5) as reply:  # noqa: S310
            return bool(reply.status == 200)
    except OSError:
        return False


# --- ticks -----------------------------------------------------------------------------------------


class TickMaker:
    """Distinct, valid ticks cycling through symbols.

    Stamped with the wall clock, or, with ``market_start_us``, with a market clock that starts there and
    moves ``market_step_us`` per tick: a fast-forwarded market whose bars close within seconds.
    """

    def __init__(
        self,
        symbols: Sequence[str],
        price: float = 1.1,
        *,
        market_start_us: int | None = None,
        market_step_us: int = 1000,
    ) -> None:
        self._symbols = tuple(symbols)
        self._last_us = dict.fromkeys(self._symbols, 0)
        self._price = price
        self._count = 0
        self._market_us = market_start_us
        self._step_us = market_step_us

    def _now_us(self, n: int) -> int:
        if self._market_us is None:
            return time.time_ns() // 1000
        now, self._market_us = self._market_us, self._market_us + n * self._step_us
        return now

    def fill(self, request: ingest_pb.StreamTicksRequest | ingest_pb.IngestTicksRequest, n: int) -> None:
        now_us = self._now_us(n)
        add = request.ticks.add
        step = self._step_us if self._market_us is not None else 0
        for i in range(n):
            symbol = self._symbols[self._count % len(self._symbols)]
            ts_us = max(now_us + i * step, self._last_us[symbol] + 1)
            self._last_us[symbol] = ts_us
            bid = round(self._price + (self._count * 7919 % 2000) * 1e-5, 5)
            tick = add(symbol=symbol, bid=bid, ask=round(bid + 2e-4, 5))
            tick.ts.seconds, tick.ts.nanos = divmod(ts_us, 1_000_000)
            tick.ts.nanos *= 1000
            self._count += 1


@dataclasses.dataclass
class PumpReport:
    """What a paced tick stream achieved."""

    rate_asked: float
    sent: int = 0
    acked_ticks: int = 0
    stored: int = 0
    duplicates: int = 0
    reconnects: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    behind_schedule_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["acked_ticks_per_s"] = round(self.acked_ticks / self.seconds) if self.seconds else 0
        out["errors"] = self.errors[:20]
        return out


class TickPump:
    """A StreamTicks client that sends ``rate`` ticks/s until stopped, then drains its acks.

    Like ``services.ingest.client.TickStreamer`` it re-sends unacknowledged batches after a broken
    stream (the server deduplicates them); unlike it, it paces itself to the wall clock. When the
    server is slower than the rate, the schedule is allowed to fall at most one second behind.
    """

    def __init__(
        self,
        target: str,
        symbols: Sequence[str],
        rate: float,
        *,
        batch_size: int = 500,
        source_id: str = "proving",
        window: int = 16,
        max_reconnects: int = 50,
        maker: TickMaker | None = None,
        api_key: str = helpers.API_KEY,
    ) -> None:
        self._target = target
        self._metadata = (("x-api-key", api_key),)
        self._maker = maker or TickMaker(symbols)
        self._rate = rate
        self._batch = batch_size
        self._source = source_id
        self._window = window
        self._max_reconnects = max_reconnects

    async def run(self, stop: asyncio.Event) -> PumpReport:
        report = PumpReport(self._rate)
        unacked: collections.OrderedDict[int, ingest_pb.StreamTicksRequest] = collections.OrderedDict()
        acked = asyncio.Event()
        started = time.monotonic()
        due = started
        sequence = 1

        async def requests() -> Any:
            nonlocal due, sequence
            for request in list(unacked.values()):
                yield request
            while not stop.is_set():
                while len(unacked) >= self._window and not stop.is_set():
                    acked.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(acked.wait(), 0.5)
                now = time.monotonic()
                if now - due > 1.0:
                    report.behind_schedule_s += now - due - 1.0
                    due = now - 1.0
                if due > now:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), due - now)
                    continue
                request = ingest_pb.StreamTicksRequest(source_id=self._source, sequence=sequence)
                self._maker.fill(request, self._batch)
                unacked[sequence] = request
                sequence += 1
                due += self._batch / self._rate
                report.sent += self._batch
                yield request

        while True:
            try:
                async with grpc.aio.insecure_channel(self._target) as channel:
                    call = ingest_grpc.IngestServiceStub(channel).StreamTicks(
                        requests(), metadata=self._metadata
                    )
                    async for ack in call:
                        request = unacked.pop(ack.sequence, None)
                        if request is not None:
                            report.acked_ticks += len(request.ticks)
                        report.stored += ack.stored
                        report.duplicates += ack.duplicates
                        acked.set()
                if stop.is_set() and not unacked:
                    break
            except grpc.aio.AioRpcError as exc:
                report.errors.append(f"{time.monotonic() - started:.1f}s {exc.code().name}: {exc.details()}")
                if report.reconnects >= self._max_reconnects:
                    break
                report.reconnects += 1
                await asyncio.sleep(min(0.1 * 2 ** min(report.reconnects, 5), 2.0))
        report.seconds = round(time.monotonic() - started, 3)
        return report


# --- latency ---------------------------------------------------------------------------------------


class LatencyProbe:
    """End-to-end latency of live data: a tick posted to ingest until its forming bar arrives.

    Every ``interval`` one tick of ``symbol`` with a price no recent tick had is sent with
    ``IngestTicks`` through the gateway; a subscriber of the aggregator's ``SubscribeCandles``
    (``include_forming``, M1, through the gateway) sees the forming bar whose close is that tick's mid
    price. The latency is the time between the two. It crosses Envoy twice, ingest's group commit,
    the aggregator's tick feed, its core and its live fan-out.
    """

    def __init__(self, target: str, symbol: str = "PROBE", interval: float = 0.05) -> None:
        self._target = target
        self._symbol = symbol
        self._interval = interval
        self._sent: dict[float, float] = {}
        self.samples: list[tuple[float, float]] = []  # (monotonic time sent, latency s)
        self.send_errors = 0
        self.subscriber_errors: list[str] = []

    def latencies(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [lat for sent, lat in self.samples if since <= sent < until]

    async def run(self, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self._target) as channel:
            ready = asyncio.Event()
            listener = asyncio.create_task(self._listen(channel, stop, ready))
            try:
                await asyncio.wait_for(ready.wait(), 30)
                await self._send(channel, stop)
            finally:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _send(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        stub = ingest_grpc.IngestServiceStub(channel)
        k = 0
        last_us = 0
        while not stop.is_set():
            k += 1
            bid = round(1.3 + (k % 20_000) * 1e-5, 5)
            ask = round(bid + 2e-4, 5)
            now_us = max(time.time_ns() // 1000, last_us + 1)
            last_us = now_us
            tick = market_pb2.Tick(symbol=self._symbol, bid=bid, ask=ask)
            tick.ts.seconds, nanos = divmod(now_us, 1_000_000)
            tick.ts.nanos = nanos * 1000
            self._sent[(bid + ask) / 2] = time.monotonic()
            try:
                await stub.IngestTicks(
                    ingest_pb.IngestTicksRequest(ticks=[tick]), metadata=METADATA, timeout=5
                )
            except grpc.aio.AioRpcError:
                self.send_errors += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

    async def _listen(self, channel: grpc.aio.Channel, stop: asyncio.Event, ready: asyncio.Event) -> None:
        stub = agg_grpc.AggregatorServiceStub(channel)
        cursor = 0
        while not stop.is_set():
            request = agg_pb.SubscribeCandlesRequest(
                symbols=[self._symbol],
                timeframes=[market_pb2.M1],
                from_cursor=cursor,
                include_forming=True,
            )
            call = stub.SubscribeCandles(request, metadata=METADATA)
            try:
                # The server sends nothing (not even headers) before the first bar: give the call a
                # moment to reach it before the first probe tick.
                await asyncio.sleep(0.3)
                ready.set()
                async for item in call:
                    cursor = max(cursor, item.cursor)
                    sent = self._sent.pop(item.bar.candle.close, None)
                    if sent is not None:
                        now = time.monotonic()
                        self.samples.append((sent, now - sent))
            except grpc.aio.AioRpcError as exc:
                self.subscriber_errors.append(exc.code().name)
                await asyncio.sleep(0.2)


@dataclasses.dataclass
class RestClient:
    """Calls one route over and over; a failed call is retried every 0.5 s for up to 30 s.

    A single instance of each service runs here, so a restart is an outage of the route (the
    process's start, plus up to one Envoy health-check interval, 5 s, before Envoy routes to it
    again): the longest time one call needed to succeed is recorded.
    """

    url: str
    method: str
    path: str
    body: dict[str, Any] | None
    calls: int = 0
    retries: int = 0
    longest: float = 0.0
    failed: list[str] = dataclasses.field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        headers = {"X-API-Key": helpers.API_KEY}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10) as client:
            while not stop.is_set():
                self.calls += 1
                started = time.monotonic()
                last = ""
                while time.monotonic() - started < 30:
                    try:
                        reply = await client.request(self.method, self.path, json=self.body)
                    except httpx.HTTPError as exc:
                        last = type(exc).__name__
                    else:
                        if reply.status_code == 200:
                            break
                        last = f"{reply.status_code} {reply.text[:200]}"
                    self.retries += 1
                    await asyncio.sleep(0.5)
                else:
                    self.failed.append(last)
                self.longest = max(self.longest, time.monotonic() - started)
                await asyncio.sleep(0.05)


@dataclasses.dataclass
class Follower:
    """Follows a feed through the gateway from its last cursor, reconnecting whenever it breaks."""

    follow: Callable[[grpc.aio.Channel, int], grpc.aio.UnaryStreamCall]
    target: str
    cursors: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    breaks: list[tuple[float, str]] = dataclasses.field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        cursor = 0
        stopping = asyncio.ensure_future(stop.wait())
        async with grpc.aio.insecure_channel(self.target) as channel:
            while not stop.is_set():
                call = self.follow(channel, cursor)
                try:
                    while True:
                        reading = asyncio.ensure_future(call.read())
                        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                        if not reading.done():
                            reading.cancel()
                            break
                        item = reading.result()
                        if item is grpc.aio.EOF:
                            break
                        if hasattr(item, "ticks") and not item.ticks:
                            continue  # ingest's at_head marker: no data, the cursor repeated by design
                        cursor = item.cursor
                        self.cursors.append((time.monotonic(), cursor))
                except grpc.aio.AioRpcError as exc:
                    self.breaks.append((time.monotonic(), exc.code().name))
                    await asyncio.sleep(0.2)
                finally:
                    call.cancel()


def watch_health(address: str, stop: threading.Event, out: list[tuple[float, int | None]]) -> None:
    """Health of a server every 10 ms until ``stop``: (monotonic time, status or None if no answer)."""
    while not stop.is_set():
        out.append((time.monotonic(), helpers.grpc_status(address, timeout=0.5)))
        time.sleep(0.01)


# --- samples and results ---------------------------------------------------------------------------


@dataclasses.dataclass
class ProcessSampler:
    """RSS per process (and asyncio tasks per service) every ``interval`` seconds, in a task."""

    mesh: ProvingMesh
    interval: float = 5.0
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        while True:
            self.rows.append(await asyncio.to_thread(self.sample, time.monotonic() - started))
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    def sample(self, at: float) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(at, 1)}
        for name in (*helpers.SERVICES, "envoy"):
            row[f"{name}_rss_mb"] = self.mesh.rss_mb(name)
        for name in helpers.SERVICES:
            with contextlib.suppress(OSError):
                samples = self.mesh.metrics(name, ("mt5_probe_",))
                row[f"{name}_tasks"] = int(samples.get("mt5_probe_asyncio_tasks", -1))
        return row


def trend(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, float]:
    """First, last, peak and least-squares slope (per minute) of one sampled series."""
    points = [(float(r["t"]), float(r[key])) for r in rows if key in r]
    if len(points) < 2:
        return {}
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points) or 1e-9
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var
    return {
        "first": points[0][1],
        "last": points[-1][1],
        "peak": max(v for _, v in points),
        "slope_per_min": round(slope * 60, 3),
    }


def candle_request(symbol: str) -> ingest_pb.IngestCandlesRequest:
    """An ``IngestCandles`` request of one valid M1 candle (2025-10-20 03:00 UTC) of ``symbol``."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt.datetime(2025, 10, 20, 3, 0, tzinfo=dt.UTC))
    candle = market_pb2.Candle(
        symbol=symbol,
        timeframe=market_pb2.M1,
        ts=ts,
        open=1.0855,
        high=1.0857,
        low=1.0854,
        close=1.0856,
        volume=150,
        spread=2,
    )
    return ingest_pb.IngestCandlesRequest(items=[candle])

"""Proving ground, crash and resume: a Jepsen-style lost-write check of the whole mesh.

A client streams ticks of several symbols, interleaved in time order, with source sequence numbers
through the Envoy gateway (``StreamTicks``, native gRPC on the gateway port, ``TickStreamer``) into
the four real services, while

- (A) ``service_kills``: a chaos driver SIGKILLs a random process — ingest, aggregator, indicators,
  inference or Envoy — at random moments of the stream and restarts it each time (the local
  PostgreSQL server, a fresh database);
- (B) ``postgres_restart``: PostgreSQL itself — a throwaway cluster made with ``initdb`` — is
  restarted with ``pg_ctl restart -m immediate`` mid-stream, while every service's gRPC health and
  the gateway's ``/health`` are polled every 50 ms.

Afterwards the stored data are checked against independent offline code, once the pipeline has
settled: every acknowledged tick stored exactly once (the stored ticks against the sent ones: no
gap, no duplicate, no altered price), final candles of every timeframe against the pandas reference
of the sent ticks, indicator values against batch TA-Lib over the stored final candles, one signal
per final M1 candle whose feature row is complete (no missing, no extra), scored as the offline
rows score with the same model version, and no version logged twice by any stage.

Kill moments are fractions of the stream drawn from ``--seed``; restarts run concurrently (a target
killed again first waits for its previous restart), and a process that exits while starting is
started again after a second, as a supervisor would, and counted. Per kill the report gives the
time until the restarted process is SERVING (Envoy: ``/ready``) and until its stage made progress
again (ingest and Envoy: stored ticks; aggregator, indicators, inference: their input cursor).

``python -m bench.proving.chaos`` runs both (``--help``); the results go under
``crash_and_resume`` in ``bench/results/proving_ground.json``. ``tests/e2e/test_proving_chaos.py``
runs short forms of both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import glob
import logging
import os
import pathlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import psycopg
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mt5.market.v1 import market_pb2

from bench.common import machine_info, plain_url
from bench.proving import RESULTS, save_results
from services.common.market import Timeframe
from services.ingest.client import StreamReport, TickStreamer
from tests import helpers
from tests.inference_models import save_model
from tests.market_data import Ticks, make_ticks, reference
from tests.pipeline_checks import (
    Mismatches,
    candle_log_duplicates,
    candle_mismatches,
    expected_signal_rows,
    final_candles,
    indicator_mismatches,
    indicator_repeated_versions,
    indicators_expected_and_stored,
    signal_repeated_versions,
    signal_revision_mismatches,
    signal_score_mismatches,
    stored_signals,
)

logger = logging.getLogger(__name__)

KEY = "crash_and_resume"
TARGETS = ("ingest", "aggregator", "indicators", "inference", "envoy")
SYMBOLS = ("EURUSD", "GBPUSD", "USDJPY", "AUDUSD")
WINDOW = 3  # the served model's window (tests.inference_models.save_model)
MODEL_VERSION = "v0001"
SOURCE_PREFIX = "proving-"
INFERENCE_SERVICE = "mt5.inference.v1.InferenceService"
# Bounded, but far above what the planned kills need: a client that gives up is a failed run.
CLIENT_MAX_RECONNECTS = 200
CLIENT_BACKOFF_SECONDS = 0.02
SERVING = "SERVING"
MAX_START_CRASHES = 30
# Nothing stored anywhere for this long, every tick read by the aggregator: the pipeline has settled.
QUIET_SECONDS = 15.0


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What one run does."""

    ticks: int = 1_000_000
    kills: int = 10
    seed: int = 1
    symbols: tuple[str, ...] = SYMBOLS
    batch_size: int = 1_000
    # Mean market time between two ticks of one symbol (sets the span of the data).
    tick_seconds: float = 1.0
    # Ticks per second the client sends; None: as fast as ingest acknowledges.
    rate: float | None = None
    targets: tuple[str, ...] = TARGETS
    postgres_restarts: int = 1
    # Longest wait, after the last acknowledgement, for every stage to have caught up and settled.
    settle_timeout: float = 900.0

    def parameters(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the feed --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Feed:
    """Ticks of several symbols interleaved in time order, as one feed sends them."""

    symbols: tuple[str, ...]
    per_symbol: dict[str, Ticks]
    sym: npt.NDArray[np.int64]
    ts: npt.NDArray[np.int64]
    bid: npt.NDArray[np.float64]
    ask: npt.NDArray[np.float64]

    @classmethod
    def make(cls, plan: Plan) -> Feed:
        count = len(plan.symbols)
        per_symbol: dict[str, Ticks] = {}
        for k, symbol in enumerate(plan.symbols):
            n = plan.ticks // count + (1 if k < plan.ticks % count else 0)
            per_symbol[symbol] = make_ticks(
                n, seed=plan.seed * 100 + k, span_hours=max(n * plan.tick_seconds / 3600, 0.1)
            )
        sym = np.concatenate([np.full(len(t), k, dtype=np.int64) for k, t in enumerate(per_symbol.values())])
        ts = np.concatenate([t.ts for t in per_symbol.values()])
        order = np.argsort(ts, kind="stable")
        return cls(
            plan.symbols,
            per_symbol,
            sym[order],
            ts[order],
            np.concatenate([t.bid for t in per_symbol.values()])[order],
            np.concatenate([t.ask for t in per_symbol.values()])[order],
        )

    def __len__(self) -> int:
        return len(self.ts)

    def batch_count(self, size: int) -> int:
        return -(-len(self) // size)

    def batches(self, size: int, first: int, end: int) -> Iterator[list[market_pb2.Tick]]:
        """Batches ``first`` to ``end`` (exclusive) as protobuf ticks, built when pulled."""
        names = self.symbols
        for b in range(first, end):
            a, z = b * size, min((b + 1) * size, len(self))
            yield [
                market_pb2.Tick(
                    symbol=names[s],
                    ts=timestamp_pb2.Timestamp(seconds=t // 1_000_000, nanos=(t % 1_000_000) * 1000),
                    bid=bid,
                    ask=ask,
                )
                for s, t, bid, ask in zip(
                    self.sym[a:z].tolist(),
                    self.ts[a:z].tolist(),
                    self.bid[a:z].tolist(),
                    self.ask[a:z].tolist(),
                    strict=True,
                )
            ]

    def keys(self) -> npt.NDArray[np.int64]:
        """One integer per tick: the symbol's index and the tick's time (unique within a symbol)."""
        return encode_keys(self.sym, self.ts, int(self.ts.min()))

    def reference(self) -> dict[str, dict[tuple[Timeframe, dt.datetime], tuple[float, ...]]]:
        return {symbol: reference(ticks) for symbol, ticks in self.per_symbol.items()}


_TS_BITS = 44  # 2**44 µs is 203 days: far more than any span this runs


def encode_keys(sym: npt.NDArray[np.int64], ts: npt.NDArray[np.int64], base: int) -> npt.NDArray[np.int64]:
    offset = ts - base
    if len(offset) and (offset.min() < 0 or offset.max() >= 2**_TS_BITS):
        raise ValueError("tick times outside the encodable span")
    return (sym << _TS_BITS) | offset


class Progress:
    """How much of the feed the client has taken (a batch is taken when the ack window has room).

    The client counts from its own thread; the chaos driver waits in the main event loop.
    """

    def __init__(self, total: int, loop: asyncio.AbstractEventLoop) -> None:
        self.total = max(total, 1)
        self.taken = 0
        self.done = False
        self._loop = loop
        self._moved = asyncio.Event()

    @property
    def fraction(self) -> float:
        return 1.0 if self.done else self.taken / self.total

    def count(self, batches: Iterator[list[market_pb2.Tick]]) -> Iterator[list[market_pb2.Tick]]:
        for batch in batches:
            self.taken += 1
            self._loop.call_soon_threadsafe(self._moved.set)
            yield batch

    def finish(self) -> None:
        self.done = True
        self._loop.call_soon_threadsafe(self._moved.set)

    async def reach(self, fraction: float) -> None:
        """Return once the client has taken ``fraction`` of the feed (or stopped)."""
        while self.fraction < fraction:
            self._moved.clear()
            await self._moved.wait()


@dataclasses.dataclass
class StreamOutcome:
    """What the client achieved: the acknowledgements it got, and why it stopped early if it did."""

    report: StreamReport
    seconds: float
    error: str | None = None


def paced(
    batches: Iterator[list[market_pb2.Tick]], rate: float | None, batch_size: int
) -> Iterator[list[market_pb2.Tick]]:
    """The batches, each released no earlier than its time at ``rate`` ticks/s (None: at once).

    Waiting blocks the client's own event loop, in its own thread, and nothing else runs there:
    the stream stays one StreamTicks call, as a live feed's does.
    """
    started = time.monotonic()
    for i, batch in enumerate(batches):
        if rate is not None:
            delay = started + i * batch_size / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield batch


async def stream_feed(
    target: str, feed: Feed, plan: Plan, progress: Progress, source_id: str
) -> StreamOutcome:
    """Send the whole feed over one StreamTicks call (re-opened after failures) from a thread."""

    def run() -> StreamOutcome:
        streamer = TickStreamer(
            target,
            helpers.API_KEY,
            source_id,
            max_reconnects=CLIENT_MAX_RECONNECTS,
            backoff_seconds=CLIENT_BACKOFF_SECONDS,
        )
        batches = feed.batches(plan.batch_size, 0, feed.batch_count(plan.batch_size))
        started = time.monotonic()
        try:
            report = asyncio.run(streamer.send(progress.count(paced(batches, plan.rate, plan.batch_size))))
        except grpc.aio.AioRpcError as exc:
            error = f"client gave up: {exc.code().name} {exc.details()}"
            logger.error("%s", error)
            return StreamOutcome(StreamReport(), time.monotonic() - started, error)
        finally:
            progress.finish()
        return StreamOutcome(report, time.monotonic() - started)

    return await asyncio.to_thread(run)


# --- observing the mesh ----------------------------------------------------------------------------

_PROGRESS_QUERY = """
SELECT (SELECT coalesce(max(id), 0) FROM ingest_ticks),
       (SELECT coalesce(max("cursor"), 0) FROM agg_cursors WHERE feed = 'ticks'),
       (SELECT coalesce(max("cursor"), 0) FROM ind_cursors),
       (SELECT coalesce(max("cursor"), 0) FROM inf_cursors)
"""
# Which progress column shows that a killed process's stage works again.
_STAGE_COLUMN = {"ingest": 0, "envoy": 0, "aggregator": 1, "indicators": 2, "inference": 3}


class ProgressSampler:
    """Every stage's committed progress, sampled every ``interval`` s in a thread."""

    def __init__(self, url: str, interval: float = 0.1) -> None:
        self._url = plain_url(url)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-sampler", daemon=True)
        self.samples: list[tuple[float, tuple[int, int, int, int]]] = []

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self._url, autocommit=True, connect_timeout=2)
                row = conn.execute(_PROGRESS_QUERY).fetchone()
                if row is not None:
                    self.samples.append(
                        (time.monotonic(), (int(row[0]), int(row[1]), int(row[2]), int(row[3])))
                    )
            except psycopg.Error:  # the database is away (run B): sample again later
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self._interval)
        if conn is not None:
            conn.close()

    def __enter__(self) -> ProgressSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def resumed_after(self, stage: str, ready_at: float) -> float | None:
        """When the stage's progress first moved after ``ready_at``, or None (it had nothing to do)."""
        column = _STAGE_COLUMN[stage]
        base: int | None = None
        for t, values in self.samples:
            if t < ready_at:
                continue
            if base is None:
                base = values[column]
            elif values[column] > base:
                return t
        return None


class HealthWatch:
    """Every service's gRPC health ("") and the gateway's /health, polled in a thread; keeps changes."""

    def __init__(self, addresses: Mapping[str, str], gateway_url: str, interval: float = 0.05) -> None:
        self._addresses = dict(addresses)
        self._gateway = gateway_url
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)
        self.changes: dict[str, list[tuple[float, str]]] = {name: [] for name in [*addresses, "gateway"]}

    def _run(self) -> None:
        channels = {name: grpc.insecure_channel(address) for name, address in self._addresses.items()}
        stubs = {name: health_pb2_grpc.HealthStub(channel) for name, channel in channels.items()}
        polls = 0
        try:
            while not self._stop.is_set():
                for name, stub in stubs.items():
                    try:
                        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    except grpc.RpcError as exc:
                        status = f"UNREACHABLE ({exc.code().name})"
                    self._record(name, status)
                # The gateway's /health asks every service in turn: polled less often.
                if polls % 4 == 0:
                    self._record("gateway", self._gateway_status())
                polls += 1
                self._stop.wait(self._interval)
        finally:
            for channel in channels.values():
                channel.close()

    def _gateway_status(self) -> str:
        try:
            with urllib.request.urlopen(self._gateway + "/health", timeout=1) as reply:  # noqa: S310 - loopback
                return SERVING if reply.status == 200 else f"HTTP {reply.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except OSError:
            return "UNREACHABLE"

    def _record(self, name: str, status: str) -> None:
        changes = self.changes[name]
        if not changes or changes[-1][1] != status:
            changes.append((time.monotonic(), status))

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def during(self, name: str, begin: float, end: float, settle: float = 30.0) -> dict[str, Any]:
        """What ``name`` reported from ``begin`` until it was SERVING again after ``end``."""
        changes = self.changes[name]
        before = [status for t, status in changes if t < begin]
        window = [(t, status) for t, status in changes if begin <= t <= end + settle]
        statuses = ([before[-1]] if before else []) + [status for _, status in window]
        not_serving = [s for s in statuses if s != SERVING]
        back = next((t for t, status in reversed(window) if status == SERVING), None)
        last = statuses[-1] if statuses else None
        return {
            "reported": sorted(set(not_serving)),
            "not_serving_seen": any(s == "NOT_SERVING" or s.startswith("HTTP 5") for s in not_serving),
            "serving_again_after_s": (
                round(back - begin, 2) if back is not None and last == SERVING and not_serving else None
            ),
            "serving_at_end": last == SERVING,
        }


# --- disturbing the mesh ---------------------------------------------------------------------------


@dataclasses.dataclass
class Kill:
    """One SIGKILL and restart; times are ``time.monotonic()`` values."""

    target: str
    stream_fraction: float
    started: float  # the stream's start
    killed_at: float
    ready_at: float
    crashed_on_start: int = 0  # the restarted process exited while starting (restarted again)
    resumed_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "crashed_on_start": self.crashed_on_start,
            "stream_fraction": round(self.stream_fraction, 3),
            "at_s": round(self.killed_at - self.started, 2),
            "ready_after_s": round(self.ready_at - self.killed_at, 2),
            "resumed_after_s": None
            if self.resumed_at is None
            else round(self.resumed_at - self.killed_at, 2),
        }


class ChaosDriver:
    """SIGKILLs processes of a running mesh and restarts them, one at a time."""

    def __init__(self, mesh: helpers.RunningMesh, workdir: pathlib.Path) -> None:
        self._mesh = mesh
        self._workdir = workdir

    def kill_and_restart(self, target: str) -> tuple[float, float, int]:
        """SIGKILL ``target`` and start it again, as a supervisor would.

        Returns (killed at, SERVING again at) in monotonic seconds, and how many times the new
        process exited while starting (a supervisor restarts it after a second, up to 30 times).
        """
        if target == "envoy":
            return (*self._restart_envoy(), 0)
        service = self._mesh.services[target]
        killed = time.monotonic()
        service.kill()
        crashes = 0
        while True:
            service.start(wait_serving=False)
            try:
                service.wait_serving(timeout=120)
                return killed, time.monotonic(), crashes
            except AssertionError:
                if service.proc is None or service.proc.poll() is None or crashes >= MAX_START_CRASHES:
                    raise
            crashes += 1
            logger.warning("%s exited while starting (%d); starting it again in 1 s", target, crashes)
            time.sleep(1.0)

    def _restart_envoy(self) -> tuple[float, float]:
        envoy = self._mesh.envoy
        killed = time.monotonic()
        envoy.proc.kill()
        envoy.proc.wait()
        # The same configuration file: the same listener and admin ports.
        with (self._workdir / "envoy.log").open("ab") as log:
            envoy.proc = subprocess.Popen(
                [
                    helpers.envoy_binary(),
                    "-c",
                    str(self._workdir / "envoy.yaml"),
                    "--use-dynamic-base-id",
                    "--disable-hot-restart",
                    "--log-level",
                    "warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            try:
                url = f"http://127.0.0.1:{envoy.admin_port}/ready"
                with urllib.request.urlopen(url, timeout=1) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        helpers.wait_until(ready, 60, interval=0.02, what="envoy ready after restart")
        return killed, time.monotonic()


def kill_schedule(plan: Plan, rng: random.Random) -> list[tuple[float, str]]:
    """(stream fraction, target) of every kill: each target at least once when there are enough kills."""
    targets = rng.sample(list(plan.targets), len(plan.targets))[: plan.kills]
    targets += [rng.choice(plan.targets) for _ in range(plan.kills - len(targets))]
    rng.shuffle(targets)
    fractions = sorted(rng.uniform(0.03, 0.95) for _ in range(plan.kills))
    return list(zip(fractions, targets, strict=True))


async def kill_services(driver: ChaosDriver, plan: Plan, progress: Progress, started: float) -> list[Kill]:
    """Kill at the planned moments; each restart runs on its own, so kills of others do not wait for it.

    A target killed again waits for its previous restart first.
    """

    async def kill(fraction: float, target: str) -> Kill:
        killed, ready, crashes = await asyncio.to_thread(driver.kill_and_restart, target)
        logger.info(
            "killed %s at %.0f%% of the stream; SERVING again after %.2fs",
            target,
            fraction * 100,
            ready - killed,
        )
        return Kill(target, fraction, started, killed, ready, crashes)

    pending: dict[str, asyncio.Task[Kill]] = {}
    done: list[asyncio.Task[Kill]] = []
    for fraction, target in kill_schedule(plan, random.Random(plan.seed)):
        await progress.reach(fraction)
        previous = pending.get(target)
        if previous is not None:
            await previous
        pending[target] = task = asyncio.create_task(kill(progress.fraction, target))
        done.append(task)
    return sorted([await task for task in done], key=lambda k: k.killed_at)


# --- a throwaway PostgreSQL cluster ----------------------------------------------------------------


def _postgres_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def postgres_tools_missing() -> str | None:
    """Why a throwaway cluster cannot be made here, or None when it can."""
    for name in ("initdb", "pg_ctl"):
        if _postgres_binary(name) is None:
            return f"{name} not found (PATH or /usr/lib/postgresql/*/bin)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root, and runuser (needed to run initdb as postgres) is not found"
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no postgres user to run initdb as"
    return None


class Cluster:
    """A PostgreSQL cluster of our own on a loopback port, restarted at will."""

    def __init__(self, directory: pathlib.Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self._as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        binary = _postgres_binary(tool)
        assert binary is not None, f"{tool} not found"
        done = subprocess.run([*self._as_owner, binary, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stdout}{done.stderr}")

    def _pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-o", options, *args)

    def create(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.directory / "data"),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        self._pg_ctl("-l", str(self.directory / "postgres.log"), "-w", "-t", "120", "start")

    def restart_immediate(self) -> None:
        """``pg_ctl restart -m immediate``: a crash (no checkpoint) and crash recovery on start."""
        self._pg_ctl(
            "-l", str(self.directory / "postgres.log"), "-m", "immediate", "-w", "-t", "120", "restart"
        )

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._pg_ctl("-m", "immediate", "-w", "stop")


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """initdb into a new folder, start on a free port; stopped and deleted afterwards."""
    # Not under pytest's tmp_path: the postgres user must be able to reach the folder.
    directory = pathlib.Path(tempfile.mkdtemp(prefix="mt5mesh-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    cluster = Cluster(directory, helpers.free_port())
    try:
        cluster.create()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


@dataclasses.dataclass
class Restart:
    """One ``pg_ctl restart -m immediate`` and what the mesh reported meanwhile (monotonic times)."""

    stream_fraction: float
    started: float  # the stream's start
    began_at: float
    ended_at: float  # pg_ctl returned: the server accepts connections again
    health: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream_fraction": round(self.stream_fraction, 3),
            "at_s": round(self.began_at - self.started, 2),
            "pg_ctl_restart_s": round(self.ended_at - self.began_at, 2),
            "health": self.health,
        }


async def restart_postgres(cluster: Cluster, plan: Plan, progress: Progress, started: float) -> list[Restart]:
    rng = random.Random(plan.seed + 1)
    restarts = []
    for fraction in sorted(rng.uniform(0.25, 0.75) for _ in range(plan.postgres_restarts)):
        await progress.reach(fraction)
        at = progress.fraction
        begin = time.monotonic()
        await asyncio.to_thread(cluster.restart_immediate)
        end = time.monotonic()
        logger.info(
            "PostgreSQL restarted (-m immediate) at %.0f%% of the stream in %.2fs", at * 100, end - begin
        )
        restarts.append(Restart(at, started, begin, end))
    return restarts


# --- checking what was stored ----------------------------------------------------------------------


@dataclasses.dataclass
class Checks:
    """Everything stored, against what offline code says should be stored."""

    ticks_stored: int
    ticks_missing: int  # sent (and acknowledged) but not stored: gaps
    ticks_duplicated: int
    ticks_extra: int  # stored but never sent
    ticks_altered: int  # stored with other prices than sent
    source_batches: int
    source_batch_ticks: int
    # Diagnostics, not failures: ticks stored after ticks of a later batch (the feed then carries
    # late ticks, which revise final bars), and the bar revisions the aggregator published.
    ticks_out_of_order: int
    batches_out_of_order: int
    candle_revisions: int
    candles_expected: int
    candles: Mismatches
    candle_log_duplicates: int
    indicator_values_expected: int
    indicators: Mismatches
    indicator_repeated_versions: int
    signals_expected: int
    signals_missing: int
    signals_extra: int
    signal_score_mismatches: int
    signal_revision_mismatches: int
    signal_repeated_versions: int
    repeated_examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.ticks_missing == self.ticks_duplicated == self.ticks_extra == self.ticks_altered == 0
            and self.candles.total == self.indicators.total == 0
            and self.signals_missing == self.signals_extra == 0
            and self.signal_score_mismatches == self.signal_revision_mismatches == 0
            and self.candle_log_duplicates == 0
            and self.indicator_repeated_versions == self.signal_repeated_versions == 0
        )

    def failures(self) -> list[str]:
        """What failed, in words (empty when everything passed)."""
        figures = {
            "ticks missing": self.ticks_missing,
            "ticks duplicated": self.ticks_duplicated,
            "ticks extra": self.ticks_extra,
            "ticks altered": self.ticks_altered,
            "candle mismatches": self.candles.total,
            "indicator mismatches": self.indicators.total,
            "signals missing": self.signals_missing,
            "signals extra": self.signals_extra,
            "signal score mismatches": self.signal_score_mismatches,
            "signals of an older candle revision": self.signal_revision_mismatches,
            "candle versions logged twice": self.candle_log_duplicates,
            "indicator versions logged twice": self.indicator_repeated_versions,
            "signal versions logged twice": self.signal_repeated_versions,
        }
        out = [f"{name}: {value}" for name, value in figures.items() if value]
        out += [f"candle {e}" for e in self.candles.examples]
        out += [f"indicator {e}" for e in self.indicators.examples]
        out += [f"logged twice: {e}" for e in self.repeated_examples]
        return out


def check_ticks(url: str, feed: Feed, batch_size: int) -> dict[str, int]:
    """Stored ticks against the sent ones, and the order they were committed in."""
    names = {symbol: k for k, symbol in enumerate(feed.symbols)}
    with psycopg.connect(plain_url(url)) as conn:
        rows = conn.execute(
            "SELECT symbol, (extract(epoch FROM ts) * 1000000)::bigint, bid, ask"
            " FROM ingest_ticks ORDER BY id"
        ).fetchall()
        batches = conn.execute(
            "SELECT count(*), coalesce(sum(ticks), 0) FROM ingest_source_batches WHERE source_id LIKE %s",
            (f"{SOURCE_PREFIX}%",),
        ).fetchone()
    known = [r for r in rows if r[0] in names]
    sym = np.array([names[r[0]] for r in known], dtype=np.int64)
    ts = np.array([r[1] for r in known], dtype=np.int64)
    prices = np.array([(r[2], r[3]) for r in known], dtype=np.float64).reshape(-1, 2)
    base = int(feed.ts.min())
    inside = (ts >= base) & (ts - base < 2**_TS_BITS)
    stored_keys = encode_keys(sym[inside], ts[inside], base)  # in commit (id) order
    prices = prices[inside]
    unique, counts = np.unique(stored_keys, return_counts=True)
    sent_keys = feed.keys()  # in feed order
    sent_order = np.argsort(sent_keys)
    sorted_sent = sent_keys[sent_order]
    at = np.minimum(np.searchsorted(sorted_sent, stored_keys), len(sorted_sent) - 1)
    matched = sorted_sent[at] == stored_keys
    feed_index = sent_order[at[matched]]  # each matched stored tick's position in the feed
    sent_prices = np.stack([feed.bid, feed.ask], axis=1)[feed_index]
    batch = feed_index // batch_size
    behind = batch < np.maximum.accumulate(batch) if len(batch) else np.zeros(0, dtype=bool)
    return {
        "ticks_stored": len(rows),
        "ticks_missing": int(np.setdiff1d(sent_keys, unique).size),
        "ticks_duplicated": int((counts - 1).sum()),
        "ticks_extra": len(rows) - len(known) + int((~inside).sum()) + int((~matched).sum()),
        "ticks_altered": int(np.count_nonzero((prices[matched] != sent_prices).any(axis=1))),
        "source_batches": int(batches[0]) if batches else 0,
        "source_batch_ticks": int(batches[1]) if batches else 0,
        "ticks_out_of_order": int(behind.sum()),
        "batches_out_of_order": len(np.unique(batch[behind])),
    }


def check_pipeline(url: str, feed: Feed, batch_size: int, models: pathlib.Path) -> Checks:
    """Every check of a settled run."""
    ticks = check_ticks(url, feed, batch_size)
    refs = feed.reference()
    candles = [candle_mismatches(final_candles(url, s), refs[s], f"{s} ") for s in feed.symbols]
    indicators = [
        indicator_mismatches(*indicators_expected_and_stored(url, s), f"{s} ") for s in feed.symbols
    ]
    expected_values = sum(len(ref) for ref in refs.values())
    expected = expected_signal_rows(url, WINDOW)
    stored = stored_signals(url)
    repeated: list[str] = []
    return Checks(
        **ticks,
        candle_revisions=_fetch(url, "SELECT count(*) FROM agg_candle_log WHERE revision > 0")[0],
        candles_expected=expected_values,
        candles=_sum(candles),
        candle_log_duplicates=candle_log_duplicates(url),
        indicator_values_expected=expected_values,
        indicators=_sum(indicators),
        indicator_repeated_versions=indicator_repeated_versions(url, repeated),
        signals_expected=len(expected),
        signals_missing=len(expected.keys() - stored.keys()),
        signals_extra=len(stored.keys() - expected.keys()),
        signal_score_mismatches=signal_score_mismatches(models, expected, stored, MODEL_VERSION),
        signal_revision_mismatches=signal_revision_mismatches(url),
        signal_repeated_versions=signal_repeated_versions(url, repeated),
        repeated_examples=repeated,
    )


def _sum(parts: Sequence[Mismatches]) -> Mismatches:
    return Mismatches(
        sum(p.missing for p in parts),
        sum(p.extra for p in parts),
        sum(p.different for p in parts),
        tuple(e for p in parts for e in p.examples)[:9],
    )


_SETTLE_QUERY = """
SELECT (SELECT coalesce(max(id), 0) FROM ingest_ticks),
       (SELECT coalesce(max("cursor"), 0) FROM agg_cursors WHERE feed = 'ticks'),
       (SELECT count(*) FROM agg_candles WHERE final),
       (SELECT count(*) FROM ind_values),
       (SELECT count(*) FROM inf_signals),
       (SELECT coalesce(max(id), 0) FROM agg_candle_log),
       (SELECT coalesce(max(id), 0) FROM ind_log),
       (SELECT coalesce(max(id), 0) FROM inf_signal_log)
"""


async def settle_and_check(
    url: str, feed: Feed, batch_size: int, models: pathlib.Path, within: float
) -> tuple[Checks, bool]:
    """Wait until the pipeline has settled, then check; (checks, settled within ``within`` s).

    Settled: the checks pass once every stage has caught up, or nothing has moved for
    ``QUIET_SECONDS`` (wrong results do not get better by waiting). The checks are repeated
    while things move: they are the only proof that the last signals are in.
    """
    deadline = time.monotonic() + within
    bars = sum(len(ref) for ref in feed.reference().values())
    previous: tuple[int, ...] | None = None
    moved_at = time.monotonic()
    while True:
        state = await asyncio.to_thread(_fetch, url, _SETTLE_QUERY)
        now = time.monotonic()
        if state != previous:
            moved_at = now
        fed = state[0] == state[1]  # the aggregator has read every stored tick
        if fed and state[2] >= bars and state[3] >= state[2] and state == previous:
            checks = await asyncio.to_thread(check_pipeline, url, feed, batch_size, models)
            if checks.ok:
                return checks, True
        if fed and now - moved_at > QUIET_SECONDS:
            return await asyncio.to_thread(check_pipeline, url, feed, batch_size, models), True
        if now > deadline:
            return await asyncio.to_thread(check_pipeline, url, feed, batch_size, models), False
        previous = state
        await asyncio.sleep(1.0)


def _fetch(url: str, query: str) -> tuple[int, ...]:
    with psycopg.connect(plain_url(url)) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return tuple(int(v) for v in row)


# --- one run ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunReport:
    """Figures of one run (JSON-ready through ``as_dict``)."""

    name: str
    database: str
    ticks_sent: int
    ticks_acked: int
    batches_sent: int
    batches_acked: int
    batches_replayed: int
    reconnects: int
    client_error: str | None
    checks: Checks
    settled: bool
    processes_alive: dict[str, bool]
    kills: list[Kill]
    restarts: list[Restart]
    stream_seconds: float
    settle_seconds: float
    wall_seconds: float

    @property
    def kills_per_service(self) -> dict[str, int]:
        counts = dict.fromkeys(TARGETS, 0)
        for kill in self.kills:
            counts[kill.target] += 1
        return counts

    @property
    def ok(self) -> bool:
        return (
            self.client_error is None
            and self.ticks_acked == self.ticks_sent
            and self.checks.ok
            and self.settled
            and all(self.processes_alive.values())
            and not any(k.crashed_on_start for k in self.kills)
        )

    def describe(self) -> str:
        """The run's figures in a few lines (what the log and a failing test show)."""
        return "\n".join(summary({"runs": {self.name: self.as_dict()}}))

    def as_dict(self) -> dict[str, Any]:
        checks = dataclasses.asdict(self.checks)
        for name in ("candles", "indicators"):
            checks[name] = {**checks[name], "total": getattr(self.checks, name).total}
        ready = [k.ready_at - k.killed_at for k in self.kills]
        resumed = [k.resumed_at - k.killed_at for k in self.kills if k.resumed_at is not None]
        return {
            "ok": self.ok,
            "database": self.database,
            "ticks": {
                "sent": self.ticks_sent,
                "acked": self.ticks_acked,
                "stored": self.checks.ticks_stored,
                "gaps": self.checks.ticks_missing,
                "duplicates": self.checks.ticks_duplicated,
                "extra": self.checks.ticks_extra,
                "altered": self.checks.ticks_altered,
            },
            "client": {
                "batches_sent": self.batches_sent,
                "batches_acked": self.batches_acked,
                "batches_replayed": self.batches_replayed,
                "reconnects": self.reconnects,
                "error": self.client_error,
            },
            "kills_per_service": self.kills_per_service,
            "crashed_on_start": {
                t: sum(k.crashed_on_start for k in self.kills if k.target == t) for t in TARGETS
            },
            "kills": [kill.as_dict() for kill in self.kills],
            "recovery": {
                "ready_after_s": _spread(ready),
                "resumed_after_s": _spread(resumed),
            },
            "postgres_restarts": [restart.as_dict() for restart in self.restarts],
            "failures": self.checks.failures(),
            "checks": checks,
            "settled": self.settled,
            "processes_alive": self.processes_alive,
            "stream_seconds": round(self.stream_seconds, 1),
            "settle_seconds": round(self.settle_seconds, 1),
            "wall_seconds": round(self.wall_seconds, 1),
        }


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


Disturb = Callable[
    [helpers.RunningMesh, Progress, float], Coroutine[Any, Any, tuple[list[Kill], list[Restart]]]
]


async def run_scenario(
    name: str, plan: Plan, url: str, workdir: pathlib.Path, disturb: Disturb, *, watch: bool = False
) -> RunReport:
    """Start the mesh on ``url``, stream the feed through the gateway while ``disturb`` runs, check."""
    began = time.monotonic()
    feed = Feed.make(plan)
    source_id = f"{SOURCE_PREFIX}{name}-{plan.seed}"
    save_model(workdir / "models", window=WINDOW)
    with helpers.running_mesh(url, workdir) as mesh:
        inference = mesh.services["inference"].address
        helpers.wait_until(
            lambda: (
                helpers.grpc_status(inference, service=INFERENCE_SERVICE)
                == health_pb2.HealthCheckResponse.SERVING
            ),
            60,
            what="inference serving the model",
        )
        addresses = {n: s.address for n, s in mesh.services.items()}
        progress = Progress(feed.batch_count(plan.batch_size), asyncio.get_running_loop())
        health = HealthWatch(addresses, mesh.url)
        with ProgressSampler(url) as sampler, health if watch else contextlib.nullcontext():
            started = time.monotonic()
            target = f"127.0.0.1:{mesh.envoy.port}"
            stream = asyncio.create_task(stream_feed(target, feed, plan, progress, source_id))
            chaos = asyncio.create_task(disturb(mesh, progress, started))
            outcome = await stream
            kills, restarts = await chaos
            streamed = time.monotonic()
            logger.info(
                "%s: stream done in %.1fs (%d reconnects); waiting for the pipeline to settle",
                name,
                outcome.seconds,
                outcome.report.reconnects,
            )
            checks, settled = await settle_and_check(
                url, feed, plan.batch_size, mesh.models_dir, plan.settle_timeout
            )
            settle_seconds = time.monotonic() - streamed
        alive = {n: s.proc is not None and s.proc.poll() is None for n, s in mesh.services.items()}
        alive["envoy"] = mesh.envoy.proc.poll() is None
    for kill in kills:
        kill.resumed_at = sampler.resumed_after(kill.target, kill.ready_at)
    for restart in restarts:
        restart.health = {n: health.during(n, restart.began_at, restart.ended_at) for n in health.changes}
    report = outcome.report
    return RunReport(
        name=name,
        database="",
        ticks_sent=len(feed),
        ticks_acked=report.ticks_stored + report.ticks_duplicate,
        batches_sent=feed.batch_count(plan.batch_size),
        batches_acked=report.batches_acked,
        batches_replayed=report.batches_replayed,
        reconnects=report.reconnects,
        client_error=outcome.error,
        checks=checks,
        settled=settled,
        processes_alive=alive,
        kills=kills,
        restarts=restarts,
        stream_seconds=outcome.seconds,
        settle_seconds=settle_seconds,
        wall_seconds=time.monotonic() - began,
    )


async def service_kill_run(plan: Plan, url: str, workdir: pathlib.Path) -> RunReport:
    """(A): SIGKILL and restart random processes of the mesh mid-stream."""

    async def disturb(
        mesh: helpers.RunningMesh, progress: Progress, started: float
    ) -> tuple[list[Kill], list[Restart]]:
        return await kill_services(ChaosDriver(mesh, workdir), plan, progress, started), []

    run = await run_scenario("service_kills", plan, url, workdir, disturb)
    run.database = "local PostgreSQL (fresh database)"
    return run


async def postgres_restart_run(plan: Plan, workdir: pathlib.Path) -> RunReport:
    """(B): restart a throwaway PostgreSQL cluster with ``pg_ctl restart -m immediate`` mid-stream."""
    with throwaway_cluster() as cluster:

        async def disturb(
            mesh: helpers.RunningMesh, progress: Progress, started: float
        ) -> tuple[list[Kill], list[Restart]]:
            return [], await restart_postgres(cluster, plan, progress, started)

        run = await run_scenario("postgres_restart", plan, cluster.url, workdir, disturb, watch=True)
    run.database = "throwaway PostgreSQL cluster (initdb), restarted with pg_ctl restart -m immediate"
    return run


# --- the command -----------------------------------------------------------------------------------

QUICK = {"ticks": 30_000, "kills": 5, "symbols": "EURUSD,GBPUSD,USDJPY", "batch_size": 250, "rate": 3_000.0}
QUICK_OUTPUT = pathlib.Path(tempfile.gettempdir()) / "proving-ground-quick.json"
RUNS = ("service_kills", "postgres_restart")


async def run_all(
    plan: Plan, runs: Sequence[str], restart_plan: Plan, workdir: pathlib.Path
) -> dict[str, Any]:
    """Both runs (or those named); the section of the results file."""
    began = time.monotonic()
    section: dict[str, Any] = {
        "benchmark": KEY,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "parameters": {"service_kills": plan.parameters(), "postgres_restart": restart_plan.parameters()},
        "runs": {},
    }
    if "service_kills" in runs:
        logger.info("(A) service kills: %d ticks, %d kills, seed %d", plan.ticks, plan.kills, plan.seed)
        with helpers.postgres_database() as url:
            run = await service_kill_run(plan, url, _fresh(workdir / "service_kills"))
        section["runs"]["service_kills"] = run.as_dict()
    if "postgres_restart" in runs:
        reason = postgres_tools_missing()
        if reason is not None:
            logger.warning("(B) skipped: %s", reason)
            section["runs"]["postgres_restart"] = {"ok": None, "skipped": reason}
        else:
            logger.info(
                "(B) PostgreSQL restarts: %d ticks, %d restarts",
                restart_plan.ticks,
                restart_plan.postgres_restarts,
            )
            run = await postgres_restart_run(restart_plan, _fresh(workdir / "postgres_restart"))
            section["runs"]["postgres_restart"] = run.as_dict()
    section["ok"] = all(r["ok"] is not False for r in section["runs"].values())
    section["wall_seconds"] = round(time.monotonic() - began, 1)
    return section


def _fresh(directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def summary(section: Mapping[str, Any]) -> list[str]:
    """A few lines per run, for the log."""
    lines = []
    for name, run in section["runs"].items():
        if "skipped" in run:
            lines.append(f"{name}: skipped ({run['skipped']})")
            continue
        t, c, client = run["ticks"], run["checks"], run["client"]
        lines += [
            f"{name}: {'OK' if run['ok'] else 'FAILED'} in {run['wall_seconds']}s ({run['database']})",
            f"  ticks sent {t['sent']:,} acked {t['acked']:,} stored {t['stored']:,}: gaps {t['gaps']},"
            f" duplicates {t['duplicates']}, extra {t['extra']}, altered {t['altered']};"
            f" stored out of order {c['ticks_out_of_order']:,} ({c['batches_out_of_order']} batches)",
            f"  client: {client['reconnects']} reconnects, {client['batches_replayed']} batches"
            f" acknowledged as replayed; error: {client['error']}",
            f"  kills {run['kills_per_service']}; exited while restarting {run['crashed_on_start']};"
            f" recovery {run['recovery']}",
            f"  candles {c['candles_expected']:,} expected ({c['candle_revisions']:,} revisions logged),"
            f" mismatches {c['candles']['total']:,}; indicator mismatches {c['indicators']['total']:,};"
            f" signals {c['signals_expected']:,} expected, missing {c['signals_missing']},"
            f" extra {c['signals_extra']}, score mismatches {c['signal_score_mismatches']}",
            f"  settled {run['settled']} after {run['settle_seconds']}s; alive {run['processes_alive']}",
            *(f"  failed: {failure}" for failure in run["failures"]),
        ]
        for restart in run["postgres_restarts"]:
            seen = {n: h["not_serving_seen"] for n, h in restart["health"].items()}
            back = {n: h["serving_again_after_s"] for n, h in restart["health"].items()}
            lines.append(
                f"  PostgreSQL restart at {restart['at_s']}s took {restart['pg_ctl_restart_s']}s;"
                f" NOT_SERVING seen {seen}; SERVING again after {back}"
            )
    return lines


DEFAULT = Plan()


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proving.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ticks", type=int, default=DEFAULT.ticks, help="ticks streamed in run (A)")
    parser.add_argument("--restart-ticks", type=int, help="ticks streamed in run (B) (default: --ticks)")
    parser.add_argument("--kills", type=int, default=DEFAULT.kills, help="SIGKILLs in run (A)")
    parser.add_argument(
        "--postgres-restarts", type=int, default=DEFAULT.postgres_restarts, help="restarts in (B)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT.seed)
    parser.add_argument("--symbols", default=",".join(SYMBOLS), help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=DEFAULT.batch_size)
    parser.add_argument(
        "--tick-seconds", type=float, default=DEFAULT.tick_seconds, help="market time between ticks"
    )
    parser.add_argument(
        "--rate", type=float, help="ticks/s the client sends (default: as fast as acknowledged)"
    )
    parser.add_argument("--settle-timeout", type=float, default=DEFAULT.settle_timeout)
    parser.add_argument("--only", choices=RUNS, help="run only (A) or (B)")
    parser.add_argument("--output", type=pathlib.Path, help=f"results file (default {RESULTS})")
    parser.add_argument("--quick", action="store_true", help=f"a short form: {QUICK}, to {QUICK_OUTPUT}")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run (A) and (B), write the ``crash_and_resume`` section; 0 when every check passed."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    plan = Plan(
        ticks=args.ticks,
        kills=args.kills,
        seed=args.seed,
        symbols=tuple(s for s in args.symbols.split(",") if s),
        batch_size=args.batch_size,
        tick_seconds=args.tick_seconds,
        rate=args.rate,
        postgres_restarts=args.postgres_restarts,
        settle_timeout=args.settle_timeout,
    )
    restart_plan = dataclasses.replace(plan, ticks=args.restart_ticks or plan.ticks, kills=0)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="mt5mesh-chaos-"))
    section = asyncio.run(run_all(plan, [args.only] if args.only else RUNS, restart_plan, workdir))
    output = args.output or (QUICK_OUTPUT if args.quick else RESULTS)
    save_results(KEY, section, output)
    for line in summary(section):
        logger.info("%s", line)
    logger.info("results under %r in %s", KEY, output)
    if section["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    logger.error("a check failed; the service logs are kept in %s", workdir)
    return 1


if __name__ == "__main__":
    sys.exit(main())

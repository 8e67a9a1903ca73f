"""`mt5mesh up` runs the whole mesh in the foreground, says `ready`, and stops cleanly."""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mt5.market.v1 import market_pb2

from services.common.protoconv import timestamp
from services.ingest.client import TickStreamer
from tests.helpers import REPO, SEED_CANDLE, free_port, free_port_block, wait_until


class MeshUp:
    """A running `mt5mesh up` and the lines it printed."""

    def __init__(self, data_dir: pathlib.Path, shards: int = 1) -> None:
        self.gateway_port = free_port()
        self.data_dir = data_dir
        self.shards = shards
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MT5MESH_", "DATABASE_URL", "OTEL_"))}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.mesh",
                "up",
                "--data-dir",
                str(data_dir),
                "--database-url",
                f"sqlite:///{data_dir / 'mesh.db'}",
                "--gateway-port",
                str(self.gateway_port),
                "--admin-port",
                str(free_port()),
                "--base-port",
                str(free_port_block(range(1, 5 + 10 * shards))),
                "--metrics-base-port",
                "0",
                "--log-level",
                "WARNING",
                "--shards",
                str(shards),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def api_key(self) -> str:
        return (self.data_dir / "api_key").read_text().strip()


@pytest.fixture(params=[1, 2], ids=["one-shard", "two-shards"])
def mesh_up(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[MeshUp]:
    up = MeshUp(tmp_path / "data", shards=request.param)
    yield up
    if up.proc.poll() is None:
        os.killpg(up.proc.pid, signal.SIGKILL)
        up.proc.wait()


def test_mesh_up_prints_ready_serves_seed_routes_and_grpc_then_stops_on_sigterm(mesh_up: MeshUp) -> None:
    wait_until(
        lambda: any("mt5-mesh ready" in line for line in mesh_up.lines) or mesh_up.proc.poll() is not None,
        120,
        what="a line containing ready",
    )
    assert mesh_up.proc.poll() is None, "".join(mesh_up.lines)
    assert any("API key (generated" in line for line in mesh_up.lines)
    assert (mesh_up.data_dir / "api_key").stat().st_mode & 0o077 == 0
    health = httpx.get(mesh_up.url + "/health", timeout=10)
    assert health.status_code == 200, health.text + "".join(mesh_up.lines)
    assert health.json()["status"] == "healthy"
    candle = SEED_CANDLE | {"symbol": "UP1"}
    posted = httpx.post(
        mesh_up.url + "/ingest_batch", json=[candle], headers={"X-API-Key": mesh_up.api_key()}
    )
    assert posted.json()["inserted"] == 1
    # Native gRPC streaming through the same gateway port.
    start = dt.datetime(2025, 10, 20, 3, tzinfo=dt.UTC)
    batches = [
        [
            market_pb2.Tick(
                symbol="UP1", ts=timestamp(start + dt.timedelta(seconds=b * 10 + i)), bid=1.1, ask=1.1002
            )
            for i in range(10)
        ]
        for b in range(5)
    ]
    import asyncio

    report = asyncio.run(
        TickStreamer(f"127.0.0.1:{mesh_up.gateway_port}", mesh_up.api_key(), "up-test").send(batches)
    )
    assert (report.batches_acked, report.ticks_stored) == (5, 50)
    # The streaming example client sees the M1 bars those ticks made (final once the market is quiet).
    bar = _first_line(
        [
            sys.executable,
            "-m",
            "services.mesh",
            "watch-candles",
            "--target",
            f"127.0.0.1:{mesh_up.gateway_port}",
            "--api-key",
            mesh_up.api_key(),
            "--symbol",
            "UP1",
            "--timeframe",
            "M1",
        ],
        within=30,
    )
    assert bar["bar"]["candle"]["symbol"] == "UP1"
    assert bar["bar"]["candle"]["timeframe"] == "M1"
    assert bar["bar"]["final"] is True
    children = _children(mesh_up.proc.pid)
    # Four services and Envoy; with two shards, a second aggregator and a second indicators process.
    assert len(children) == 5 + 2 * (mesh_up.shards - 1)
    mesh_up.proc.send_signal(signal.SIGTERM)
    assert mesh_up.proc.wait(60) == 0
    wait_until(lambda: not any(_alive(pid) for pid in children), 10, what="children stopped")


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _first_line(argv: list[str], within: float) -> dict[str, Any]:
    """Run a streaming command until it prints one line; return that line as JSON."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
        timer = threading.Timer(within, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
        finally:
            timer.cancel()
            proc.kill()
            proc.wait()
        stderr.seek(0)
        assert line, f"no output within {within}s (exit code {proc.returncode}): {stderr.read()[-2000:]}"
    parsed: dict[str, Any] = json.loads(line)
    return parsed

"""`mt5mesh up --otlp-endpoint` sends the gateway's and the services' spans to the given collector.

The collector is the in-process OTLP receiver (what a Jaeger on the user's machine would be); the
mesh is the real command with every service and Envoy. One EA ``POST /ingest`` must arrive as one
trace with Envoy's span as the parent of ingest's.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import REPO, SEED_CANDLE, free_port, free_port_block, wait_until
from tests.otlp_receiver import CollectedSpan, OtlpReceiver, find

pytestmark = pytest.mark.envoy


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def test_mesh_up_otlp_endpoint_traces_gateway_and_ingest_in_one_trace(
    receiver: OtlpReceiver, tmp_path: pathlib.Path
) -> None:
    gateway_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MT5MESH_", "DATABASE_URL", "OTEL_"))}
    env["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # the services send spans every 100 ms, not every 5 s
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
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
            str(gateway_port),
            "--admin-port",
            str(free_port()),
            "--base-port",
            str(free_port_block(range(1, 5))),
            "--metrics-base-port",
            "0",
            "--log-level",
            "WARNING",
            "--otlp-endpoint",
            receiver.endpoint,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(proc.stdout)

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_until(lambda: any("ready" in line for line in lines), 120, 0.2, "mt5mesh up to say ready")
        key = (data_dir / "api_key").read_text().strip()
        response = httpx.post(
            f"http://127.0.0.1:{gateway_port}/ingest",
            json=SEED_CANDLE | {"symbol": "UPTRACE"},
            headers={"X-API-Key": key},
            timeout=10,
        )
        assert response.status_code == 200, response.text

        def traced(spans: list[CollectedSpan]) -> tuple[CollectedSpan, CollectedSpan] | None:
            for server in find(spans, service="ingest", name="/mt5.ingest.v1.IngestService/IngestCandles"):
                gateway = find(spans, service="gateway", trace_id=server.trace_id)
                if any(g.span_id == server.parent_span_id for g in gateway):
                    return server, next(g for g in gateway if g.is_root)
            return None

        # Envoy sends its spans every 5 s (its default flush interval).
        server, root = receiver.wait_for(traced, timeout=30)
        assert root.kind == "SERVER"
        assert server.trace_id == root.trace_id
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

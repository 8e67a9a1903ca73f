"""One trace from the EA through the real Envoy into the real ingest service, collected over OTLP.

The gateway is rendered from envoy/envoy.yaml with its tracer pointed at an in-process OTLP receiver
(tests/otlp_receiver.py), and ingest runs as its own process exporting to the same receiver, as both
would export to Jaeger. The tests follow an EA's ``POST /ingest`` from the gateway's span to ingest's
server span, its group commit and its SQL statements; check that a caller's ``traceparent`` (sampled
or not) is honoured end to end; that ingest's JSON log line and Envoy's access log line carry the
trace id; and that Envoy's metrics listener serves Prometheus text.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.mesh.gateway import GatewaySettings, load_base_config, render_config, write_config
from tests.helpers import (
    API_KEY,
    DESCRIPTOR,
    SEED_CANDLE,
    ServiceProcess,
    envoy_binary,
    free_port,
    make_service,
    wait_until,
)
from tests.otlp_receiver import CollectedSpan, OtlpReceiver, ancestors, describe, find

pytestmark = pytest.mark.envoy

INGEST_CANDLES = "/mt5.ingest.v1.IngestService/IngestCandles"


@dataclasses.dataclass
class TracedMesh:
    """Envoy and ingest, both exporting spans to ``receiver``."""

    receiver: OtlpReceiver
    ingest: ServiceProcess
    envoy: subprocess.Popen[bytes]
    url: str
    metrics_url: str
    access_log: pathlib.Path


def _envoy_config(settings: GatewaySettings) -> dict[str, Any]:
    config = render_config(load_base_config(), settings)
    # Flush spans every 100 ms instead of every 5 s, so the test does not wait.
    config["layered_runtime"] = {
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
    return config


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedMesh]:
    workdir = tmp_path_factory.mktemp("traced")
    with OtlpReceiver() as receiver:
        ingest = make_service(
            "ingest",
            f"sqlite:///{workdir / 'mt5mesh.db'}",
            workdir,
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "LOG_LEVEL": "DEBUG",
            },
        ).start()
        settings = GatewaySettings(
            listen_port=free_port(),
            admin_port=free_port(),
            descriptor_path=DESCRIPTOR,
            upstreams={
                "ingest": ("127.0.0.1", ingest.port),
                "aggregator": ("127.0.0.1", free_port()),
                "indicators": ("127.0.0.1", free_port()),
                "inference": ("127.0.0.1", free_port()),
            },
            listen_address="127.0.0.1",
            otlp_endpoint=receiver.endpoint,
            metrics_port=free_port(),
        )
        config = write_config(_envoy_config(settings), workdir / "envoy.yaml")
        access_log = workdir / "access.log"
        with access_log.open("wb") as stdout, (workdir / "envoy.err").open("wb") as stderr:
            envoy = subprocess.Popen(
                [
                    envoy_binary(),
                    "-c",
                    str(config),
                    "--use-dynamic-base-id",
                    "--disable-hot-restart",
                    "--log-level",
                    "warn",
                    "--file-flush-interval-msec",
                    "100",
                ],
                stdout=stdout,
                stderr=stderr,
            )
        url = f"http://127.0.0.1:{settings.listen_port}"
        try:

            def routed() -> bool:
                assert envoy.poll() is None, (workdir / "envoy.err").read_text()
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1) as reply:  # noqa: S310
                        return bool(reply.status == 200)
                except OSError:
                    return False

            wait_until(routed, 30, 0.1, "Envoy routing to a healthy ingest")
            yield TracedMesh(
                receiver,
                ingest,
                envoy,
                url,
                f"http://127.0.0.1:{settings.metrics_port}/stats/prometheus",
                access_log,
            )
        finally:
            envoy.terminate()
            envoy.wait(10)
            ingest.kill()


def _post_candle(mesh: TracedMesh, symbol: str, headers: dict[str, str] | None = None) -> httpx.Response:
    response = httpx.post(
        mesh.url + "/ingest",
        json=SEED_CANDLE | {"symbol": symbol},
        headers={"X-API-Key": API_KEY} | (headers or {}),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response


def _access_log_entry(mesh: TracedMesh, request_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def logged() -> bool:
        for line in mesh.access_log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry.get("x_request_id") == request_id:
                found.update(entry)
                return True
        return False

    wait_until(logged, 10, 0.1, f"the access log line of {request_id}")
    return found


@dataclasses.dataclass
class RequestTrace:
    """The spans of one EA request, by role."""

    gateway: CollectedSpan
    gateway_upstream: CollectedSpan
    ingest: CollectedSpan
    commit: CollectedSpan
    statements: list[CollectedSpan]


def _request_trace(mesh: TracedMesh, trace_id: str) -> RequestTrace:
    def complete(spans: list[CollectedSpan]) -> RequestTrace | None:
        spans = find(spans, trace_id=trace_id)
        server = find(spans, service="ingest", name=INGEST_CANDLES, kind="SERVER")
        commit = find(spans, service="ingest", name="ingest.commit")
        gateway = find(spans, service="gateway", kind="SERVER")
        upstream = find(spans, service="gateway", kind="CLIENT")
        statements = find(spans, service="ingest", parent=commit[0]) if commit else []
        if not (server and commit and gateway and upstream and statements):
            return None
        return RequestTrace(gateway[0], upstream[0], server[0], commit[0], statements)

    return mesh.receiver.wait_for(complete, timeout=20)


def test_ea_post_through_envoy_one_trace_gateway_parent_of_ingest_server_span(mesh: TracedMesh) -> None:
    response = _post_candle(mesh, "TRACEA")
    entry = _access_log_entry(mesh, response.headers["x-request-id"])
    trace_id = entry["trace_id"]
    assert isinstance(trace_id, str)
    assert len(trace_id) == 32
    # The EA sent no traceparent: Envoy started the trace and sent its own context upstream.
    assert entry["traceparent"].startswith(f"00-{trace_id}-")

    spans = _request_trace(mesh, trace_id)
    every = find(mesh.receiver.spans(), trace_id=trace_id)
    summary = "\n".join(describe(s) for s in every)
    # Envoy's server span is the root; its client span for the upstream call is the parent of
    # ingest's server span (Envoy sent its id in traceparent); the commit and its SQL follow.
    assert spans.gateway.is_root, summary
    assert spans.gateway_upstream.parent_span_id == spans.gateway.span_id, summary
    assert spans.ingest.parent_span_id == spans.gateway_upstream.span_id, summary
    assert spans.commit.parent_span_id == spans.ingest.span_id, summary
    assert [a.span_id for a in ancestors(spans.statements[0], every)] == [
        spans.commit.span_id,
        spans.ingest.span_id,
        spans.gateway_upstream.span_id,
        spans.gateway.span_id,
    ]
    assert {s.kind for s in spans.statements} == {"CLIENT"}
    assert any(s.name.startswith("INSERT ingest_candle") for s in spans.statements), summary
    assert all(s.attributes["db.system.name"] == "sqlite" for s in spans.statements)
    assert spans.commit.attributes["mt5.requests"] >= 1
    # Nested in time as in structure.
    assert spans.gateway.start_ns <= spans.ingest.start_ns <= spans.ingest.end_ns <= spans.gateway.end_ns


def test_ea_post_ingest_log_line_carries_trace_and_span_of_commit(mesh: TracedMesh) -> None:
    response = _post_candle(mesh, "TRACEB")
    trace_id = _access_log_entry(mesh, response.headers["x-request-id"])["trace_id"]
    commit = _request_trace(mesh, trace_id).commit
    lines: list[dict[str, Any]] = []

    def logged() -> bool:
        lines[:] = [
            entry
            for entry in map(json.loads, mesh.ingest.log_path.read_text(encoding="utf-8").splitlines())
            if entry.get("trace_id") == trace_id
        ]
        return bool(lines)

    wait_until(logged, 10, 0.1, "an ingest log line with the request's trace id")
    line = lines[0]
    assert line["message"].startswith("committed ")
    assert line["span_id"] == commit.span_id
    assert line["service"] == "ingest"
    assert {"time", "level", "service", "message", "trace_id", "span_id"} <= set(line)


def test_caller_traceparent_sampled_is_continued_by_gateway_and_ingest(mesh: TracedMesh) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    response = _post_candle(mesh, "TRACEC", {"traceparent": f"00-{trace_id}-{parent}-01"})
    assert _access_log_entry(mesh, response.headers["x-request-id"])["trace_id"] == trace_id
    spans = _request_trace(mesh, trace_id)
    assert spans.gateway.parent_span_id == parent
    assert spans.ingest.parent_span_id == spans.gateway_upstream.span_id


def test_caller_traceparent_not_sampled_no_span_exported_anywhere(mesh: TracedMesh) -> None:
    unsampled = secrets.token_hex(16)
    _post_candle(mesh, "TRACED", {"traceparent": f"00-{unsampled}-{secrets.token_hex(8)}-00"})
    # A sampled request sent afterwards shows that both exporters have flushed meanwhile.
    response = _post_candle(mesh, "TRACEE")
    _request_trace(mesh, _access_log_entry(mesh, response.headers["x-request-id"])["trace_id"])
    time.sleep(0.3)
    assert find(mesh.receiver.spans(), trace_id=unsampled) == []


def test_health_checks_not_traced(mesh: TracedMesh) -> None:
    # Envoy health-checks ingest every 5 s; none of them may become a trace.
    spans = mesh.receiver.spans()
    assert find(spans, service="ingest", name="/grpc.health.v1.Health/Check") == []
    assert find(spans, service="ingest", kind="SERVER")  # ingest's other calls are traced


def test_envoy_metrics_listener_serves_prometheus_text_with_moving_counters(mesh: TracedMesh) -> None:
    def requests_total() -> float:
        text = httpx.get(mesh.metrics_url, timeout=5).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        family = families["envoy_cluster_upstream_rq"]
        return sum(s.value for s in family.samples if s.labels.get("envoy_cluster_name") == "ingest")

    before = requests_total()
    _post_candle(mesh, "TRACEF")
    wait_until(lambda: requests_total() > before, 10, 0.1, "envoy_cluster_upstream_rq for ingest to grow")
    # The listener serves nothing but the metrics.
    assert (
        httpx.get(mesh.metrics_url.replace("/stats/prometheus", "/quitquitquit"), timeout=5).status_code
        == 404
    )
    assert httpx.post(mesh.metrics_url, timeout=5).status_code == 404


def test_dashboard_and_alerts_name_only_envoy_series_envoy_exports(mesh: TracedMesh) -> None:
    monitoring = pytest.importorskip("tests.unit.test_monitoring_files", reason="needs promql-parser")
    wanted = {name for name in monitoring.referenced() if name.startswith("envoy_")}
    assert wanted, "the dashboard and the alerts watch the gateway"
    # Envoy exposes a histogram only once it has observations: send a request first.
    _post_candle(mesh, "TRACEG")
    exported: set[str] = set()

    def everything_exported() -> bool:
        # Names as Envoy writes them: prometheus_client's parser would add _total to its counters.
        text = httpx.get(mesh.metrics_url, timeout=5).text
        exported.update(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, flags=re.MULTILINE))
        return wanted <= exported

    try:
        wait_until(everything_exported, 15, 0.5, "Envoy to export every series named")
    except AssertionError:
        pytest.fail(f"Envoy does not export {sorted(wanted - exported)}")


@pytest.mark.parametrize("endpoint", ["http://jaeger:4317", "127.0.0.1:4317"])
def test_rendered_config_with_tracer_and_metrics_listener_passes_envoy_validate(
    endpoint: str, tmp_path: pathlib.Path
) -> None:
    settings = GatewaySettings(
        listen_port=8080,
        admin_port=9901,
        descriptor_path=DESCRIPTOR,
        upstreams={name: (name, 50051 + i) for i, name in enumerate(("ingest", "aggregator", "indicators"))}
        | {"inference": ("inference", 50054)},
        otlp_endpoint=endpoint,
        trace_sampling_percent=0.5,
        metrics_port=9902,
    )
    path = write_config(render_config(load_base_config(), settings), tmp_path / "envoy.yaml")
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Deprecated field" not in result.stdout + result.stderr

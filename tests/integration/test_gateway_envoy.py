"""The rendered gateway config running in a real Envoy in front of a real grpc.aio server.

The upstream is a minimal IngestService written for these tests (the real service is tested on its
own): it records what reached it, so the tests can check what the transcoder made of each REST call,
and fails on demand the way the real service does (INVALID_ARGUMENT with google.rpc.BadRequest,
UNAUTHENTICATED without an API key).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from mt5.ingest.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from mt5.market.v1 import market_pb2

from services.mesh.gateway import GatewaySettings, load_base_config, render_config, write_config
from tests.helpers import DESCRIPTOR, SEED_CANDLE, envoy_binary, free_port

pytestmark = pytest.mark.envoy

# The gateway fixtures live for the whole module (one Envoy start); tests sharing them must run on
# the module's event loop, where the upstream grpc.aio server runs.
module_loop = pytest.mark.asyncio(loop_scope="module")

API_KEY = "integration-test-key"
CANDLE = SEED_CANDLE
STARTUP_TIMEOUT_S = 15.0
# A candle with this symbol makes the fake service answer after SLOW_CALL_S.
SLOW_SYMBOL = "SLOW"
SLOW_CALL_S = 1.0


def _settings(ingest_port: int) -> GatewaySettings:
    # The other services are not running: their clusters point at closed ports and stay unhealthy.
    return GatewaySettings(
        listen_port=free_port(),
        admin_port=free_port(),
        descriptor_path=DESCRIPTOR,
        upstreams={
            "ingest": ("127.0.0.1", ingest_port),
            "aggregator": ("127.0.0.1", free_port()),
            "indicators": ("127.0.0.1", free_port()),
            "inference": ("127.0.0.1", free_port()),
        },
        listen_address="127.0.0.1",
    )


@dataclass
class _Call:
    request: ingest_service_pb2.IngestCandlesRequest
    metadata: dict[str, str]


@dataclass
# The generated base class is Any to mypy (mt5.* is not followed, see pyproject.toml).
class FakeIngest(ingest_service_pb2_grpc.IngestServiceServicer):  # type: ignore[misc,unused-ignore]
    """IngestService that records IngestCandles calls and rejects a candle whose high is below its low."""

    calls: list[_Call] = field(default_factory=list)

    # Method names are fixed by the generated gRPC base class.
    async def CheckHealth(  # noqa: N802
        self, request: ingest_service_pb2.CheckHealthRequest, context: grpc.aio.ServicerContext
    ) -> ingest_service_pb2.CheckHealthResponse:
        return ingest_service_pb2.CheckHealthResponse(
            status="healthy", timestamp=timestamp_pb2.Timestamp(seconds=1)
        )

    async def IngestCandles(  # noqa: N802
        self, request: ingest_service_pb2.IngestCandlesRequest, context: grpc.aio.ServicerContext
    ) -> ingest_service_pb2.IngestCandlesResponse:
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        self.calls.append(_Call(request=request, metadata=metadata))
        if metadata.get("x-api-key") != API_KEY:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong x-api-key")
        candles = list(request.items) or [_single_candle(request)]
        if candles[0].symbol == SLOW_SYMBOL:
            await asyncio.sleep(SLOW_CALL_S)
        for index, candle in enumerate(candles):
            if candle.high < candle.low:
                await _abort_bad_request(context, f"items[{index}].high", "high is below low")
        return ingest_service_pb2.IngestCandlesResponse(
            ok=True,
            received=len(candles),
            inserted=len(candles),
            details=[
                ingest_service_pb2.CandleDetail(
                    symbol=candle.symbol,
                    timeframe=candle.timeframe,
                    ts_original=candle.ts,
                    ts_bucket=candle.ts,
                    status="inserted",
                )
                for candle in candles
            ],
        )


def _single_candle(request: ingest_service_pb2.IngestCandlesRequest) -> market_pb2.Candle:
    return market_pb2.Candle(
        symbol=request.symbol,
        timeframe=request.timeframe,
        ts=request.ts,
        open=request.open,
        high=request.high,
        low=request.low,
        close=request.close,
        volume=request.volume,
        spread=request.spread,
    )


async def _abort_bad_request(context: grpc.aio.ServicerContext, field_path: str, description: str) -> None:
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field_path, description=description)
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="invalid candles", details=[detail])
    )
    await context.abort(status.code, status.details, status.trailing_metadata)


@dataclass(frozen=True)
class Upstream:
    port: int
    servicer: FakeIngest


@dataclass(frozen=True)
class Gateway:
    url: str
    port: int
    admin_url: str
    access_log: pathlib.Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream() -> AsyncIterator[Upstream]:
    server = grpc.aio.server()
    servicer = FakeIngest()
    ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Upstream(port=port, servicer=servicer)
    await server.stop(grace=None)


@contextlib.asynccontextmanager
async def _running_envoy(
    config: dict[str, Any], settings: GatewaySettings, workdir: pathlib.Path
) -> AsyncIterator[Gateway]:
    """Run Envoy with ``config`` until the ingest cluster is healthy; stop it on exit."""
    config_path = write_config(config, workdir / "envoy.yaml")
    access_log = workdir / "access.log"
    stderr_log = workdir / "envoy.err"
    with access_log.open("wb") as stdout, stderr_log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            envoy_binary(),
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--use-dynamic-base-id",
            "--concurrency",
            "2",
            "--log-level",
            "warn",
            # Access log lines reach the file within 0.1 s instead of the default 10 s.
            "--file-flush-interval-msec",
            "100",
            stdout=stdout,
            stderr=stderr,
        )
    gateway = Gateway(
        url=f"http://127.0.0.1:{settings.listen_port}",
        port=settings.listen_port,
        admin_url=f"http://127.0.0.1:{settings.admin_port}",
        access_log=access_log,
    )
    try:
        host_port = settings.upstreams["ingest"]
        assert isinstance(host_port[1], int)
        await _wait_until_serving(process, gateway, stderr_log, host_port[1])
        yield gateway
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _wait_until_serving(
    process: asyncio.subprocess.Process, gateway: Gateway, stderr_log: pathlib.Path, ingest_port: int
) -> None:
    # /ready says the listeners are up; the gateway can only answer once the first health check
    # has marked the ingest host healthy (panic routing is off), so wait for that as well.
    healthy_flag = f"ingest::127.0.0.1:{ingest_port}::health_flags::healthy"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(base_url=gateway.admin_url, timeout=1.0) as admin:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                errors = await asyncio.to_thread(stderr_log.read_text)
                pytest.fail(f"envoy exited with {process.returncode}: {errors}")
            with contextlib.suppress(httpx.TransportError):
                ready = await admin.get("/ready")
                clusters = await admin.get("/clusters")
                if ready.status_code == 200 and healthy_flag in clusters.text:
                    return
            await asyncio.sleep(0.05)
    errors = await asyncio.to_thread(stderr_log.read_text)
    pytest.fail(f"envoy not serving after {STARTUP_TIMEOUT_S}s: {errors}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    settings = _settings(upstream.port)
    config = render_config(load_base_config(), settings)
    async with _running_envoy(config, settings, tmp_path_factory.mktemp("envoy")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10.0) as http:
        yield http


@pytest.fixture
def calls(upstream: Upstream) -> list[_Call]:
    upstream.servicer.calls.clear()
    return upstream.servicer.calls


def _headers(**extra: str) -> dict[str, str]:
    return {"X-API-Key": API_KEY, "Content-Type": "application/json"} | extra


def _production_settings() -> GatewaySettings:
    # The values envoy/envoy.yaml already has, except the descriptor, which only exists in the pod.
    return GatewaySettings(
        listen_port=8080,
        admin_port=9901,
        descriptor_path=DESCRIPTOR,
        upstreams={"ingest": ("ingest", 50051), "aggregator": ("aggregator", 50052)}
        | {"indicators": ("indicators", 50053), "inference": ("inference", 50054)},
    )


@pytest.mark.parametrize(
    "make_settings",
    [pytest.param(_production_settings, id="production"), pytest.param(lambda: _settings(50051), id="local")],
)
def test_render_config_rendered_config_passes_envoy_validate(
    make_settings: Callable[[], GatewaySettings], tmp_path: pathlib.Path
) -> None:
    config_path = write_config(render_config(load_base_config(), make_settings()), tmp_path / "envoy.yaml")
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config_path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    # A deprecated field still validates; it only warns. Keep the config free of them.
    assert "Deprecated field" not in result.stdout + result.stderr


@module_loop
async def test_gateway_get_health_returns_healthy_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "healthy", "timestamp": "1970-01-01T00:00:01Z"}


@module_loop
async def test_gateway_post_ingest_single_candle_arrives_as_top_level_fields(
    client: httpx.AsyncClient, calls: list[_Call]
) -> None:
    response = await client.post("/ingest", json=CANDLE, headers=_headers())
    assert response.status_code == 200, response.text
    (call,) = calls
    assert not call.request.items
    assert call.request.symbol == "EURUSD"
    assert call.request.timeframe == market_pb2.M1
    assert call.request.ts.ToJsonString() == "2025-10-20T03:00:00Z"
    assert (call.request.open, call.request.high, call.request.low, call.request.close) == (
        1.0855,
        1.0857,
        1.0854,
        1.0856,
    )
    assert (call.request.volume, call.request.spread) == (150, 2)


@module_loop
async def test_gateway_post_ingest_items_object_arrives_as_items(
    client: httpx.AsyncClient, calls: list[_Call]
) -> None:
    second = CANDLE | {"ts": "2025-10-20T03:01:00Z"}
    response = await client.post("/ingest", json={"items": [CANDLE, second]}, headers=_headers())
    assert response.status_code == 200, response.text
    (call,) = calls
    assert [item.ts.ToJsonString() for item in call.request.items] == [CANDLE["ts"], second["ts"]]
    assert call.request.symbol == ""
    assert response.json()["received"] == 2


@module_loop
async def test_gateway_post_ingest_batch_bare_array_arrives_as_items(
    client: httpx.AsyncClient, calls: list[_Call]
) -> None:
    response = await client.post("/ingest_batch", json=[CANDLE, CANDLE, CANDLE], headers=_headers())
    assert response.status_code == 200, response.text
    (call,) = calls
    assert len(call.request.items) == 3
    assert call.request.items[0].symbol == "EURUSD"
    assert call.request.items[0].timeframe == market_pb2.M1
    assert response.json()["received"] == 3


@module_loop
async def test_gateway_api_key_header_arrives_as_metadata(
    client: httpx.AsyncClient, calls: list[_Call]
) -> None:
    await client.post("/ingest", json=CANDLE, headers=_headers())
    (call,) = calls
    assert call.metadata["x-api-key"] == API_KEY
    # The REST path the EA used travels along, which the services' logs can show.
    assert call.metadata["x-envoy-original-path"] == "/ingest"


@module_loop
async def test_gateway_response_json_snake_case_zero_values_enum_names(client: httpx.AsyncClient) -> None:
    response = await client.post("/ingest", json=CANDLE, headers=_headers())
    body = response.json()
    assert body == {
        "ok": True,
        "received": 1,
        "inserted": 1,
        "duplicates": 0,
        "updated": 0,
        "details": [
            {
                "symbol": "EURUSD",
                "timeframe": "M1",
                "ts_original": "2025-10-20T03:00:00Z",
                "ts_bucket": "2025-10-20T03:00:00Z",
                "status": "inserted",
            }
        ],
    }


@module_loop
async def test_gateway_invalid_argument_returns_400_with_field_violation(client: httpx.AsyncClient) -> None:
    bad = CANDLE | {"high": 1.0, "low": 2.0}
    response = await client.post("/ingest", json={"items": [bad]}, headers=_headers())
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == code_pb2.INVALID_ARGUMENT
    assert body["message"] == "invalid candles"
    (detail,) = body["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert detail["field_violations"][0]["field"] == "items[0].high"
    assert detail["field_violations"][0]["description"] == "high is below low"


@module_loop
async def test_gateway_missing_api_key_returns_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/ingest", json=CANDLE)
    assert response.status_code == 401
    assert response.json() == {
        "code": code_pb2.UNAUTHENTICATED,
        "message": "missing or wrong x-api-key",
        "details": [],
    }


@module_loop
async def test_gateway_body_over_4_mib_returns_413_without_reaching_upstream(
    client: httpx.AsyncClient, calls: list[_Call]
) -> None:
    padding = "x" * (5 * 1024 * 1024)
    response = await client.post(
        "/ingest", content=json.dumps(CANDLE | {"symbol": padding}), headers=_headers()
    )
    assert response.status_code == 413
    assert response.json()["error"] == "Payload Too Large"
    assert calls == []


@module_loop
async def test_gateway_body_under_4_mib_batch_is_accepted(
    client: httpx.AsyncClient, calls: list[_Call]
) -> None:
    batch = [CANDLE] * 20_000  # about 3.3 MB of JSON
    response = await client.post("/ingest_batch", json=batch, headers=_headers())
    assert response.status_code == 200, response.text
    assert len(calls[0].request.items) == 20_000


@module_loop
async def test_gateway_unknown_timeframe_returns_400_naming_field(
    client: httpx.AsyncClient, calls: list[_Call]
) -> None:
    response = await client.post("/ingest", json=CANDLE | {"timeframe": "M2"}, headers=_headers())
    assert response.status_code == 400
    body = response.json()
    assert body["status"] == 400
    assert body["error"].startswith('timeframe: invalid value "M2"')
    assert calls == []


@module_loop
async def test_gateway_lowercase_timeframe_is_accepted(client: httpx.AsyncClient, calls: list[_Call]) -> None:
    response = await client.post("/ingest", json=CANDLE | {"timeframe": "m1"}, headers=_headers())
    assert response.status_code == 200, response.text
    assert calls[0].request.timeframe == market_pb2.M1


@module_loop
async def test_gateway_malformed_json_returns_400_json_error(
    client: httpx.AsyncClient, calls: list[_Call]
) -> None:
    response = await client.post("/ingest", content=b'{"symbol": "EURUSD", ', headers=_headers())
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["status"] == 400
    assert calls == []


@module_loop
async def test_gateway_unknown_query_parameter_returns_400_naming_it(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", params={"simbol": "EURUSD"})
    assert response.status_code == 400
    assert '"simbol"' in response.json()["error"]


@module_loop
async def test_gateway_unknown_path_returns_404_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/no/such/path")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "no route for this path"


@module_loop
async def test_gateway_json_posted_to_grpc_path_returns_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/mt5.ingest.v1.IngestService/CheckHealth", json={})
    assert response.status_code == 404


@module_loop
async def test_gateway_header_with_underscore_is_rejected(
    client: httpx.AsyncClient, calls: list[_Call]
) -> None:
    response = await client.post("/ingest", json=CANDLE, headers=_headers(x_api_key=API_KEY))
    assert response.status_code == 400
    assert calls == []


@module_loop
async def test_gateway_unhealthy_service_returns_503_json(client: httpx.AsyncClient) -> None:
    # The aggregator cluster points at a closed port, so it has no healthy host.
    response = await client.get("/v1/candles/EURUSD/M1")
    assert response.status_code == 503
    assert response.json()["error"] == "no healthy upstream"


@module_loop
async def test_gateway_native_grpc_check_health_works_on_same_port(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
        response = await stub.CheckHealth(ingest_service_pb2.CheckHealthRequest(), timeout=5)
    assert response.status == "healthy"


@module_loop
async def test_gateway_native_grpc_error_keeps_status_details(gateway: Gateway) -> None:
    bad = market_pb2.Candle(symbol="EURUSD", timeframe=market_pb2.M1, high=1.0, low=2.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.IngestCandles(
                ingest_service_pb2.IngestCandlesRequest(items=[bad]),
                metadata=[("x-api-key", API_KEY)],
                timeout=5,
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details_bin = dict(raised.value.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details_bin)
    bad_request = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "items[0].high"


@module_loop
async def test_gateway_native_grpc_unhealthy_service_returns_plain_unavailable(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = channel.unary_unary("/mt5.aggregator.v1.AggregatorService/GetCandles")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(b"", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # Envoy's own replies to gRPC clients stay plain text, not the REST JSON error body.
    assert raised.value.details() == "no healthy upstream"


@module_loop
async def test_gateway_access_log_is_json_with_request_id(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    response = await client.get("/health", headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})
    request_id = response.headers["x-request-id"]
    entry = await _access_log_entry(gateway.access_log, request_id)
    assert entry["method"] == "GET"
    assert entry["path"] == "/health"
    assert entry["rpc"] == "/mt5.ingest.v1.IngestService/CheckHealth"
    assert entry["response_code"] == 200
    assert entry["grpc_status"] == "OK"
    assert entry["traceparent"].startswith("00-" + "a" * 32)
    assert isinstance(entry["duration_ms"], int)


async def _access_log_entry(path: pathlib.Path, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        for line in text.splitlines():
            entry: dict[str, Any] = json.loads(line)
            if entry.get("x_request_id") == request_id:
                return entry
        await asyncio.sleep(0.1)
    pytest.fail(f"no access log line for x-request-id {request_id}")


@module_loop
async def test_gateway_rate_limit_exceeded_returns_429(upstream: Upstream, tmp_path: pathlib.Path) -> None:
    settings = _settings(upstream.port)
    config = render_config(load_base_config(), settings)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (rate_limit,) = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.local_ratelimit"]
    rate_limit["typed_config"]["token_bucket"] = {
        "max_tokens": 2,
        "tokens_per_fill": 1,
        "fill_interval": "3600s",
    }
    async with (
        _running_envoy(config, settings, tmp_path) as limited,
        httpx.AsyncClient(base_url=limited.url, timeout=10.0) as http,
    ):
        statuses = [(await http.get("/health")).status_code for _ in range(3)]
        limited_response = await http.get("/health")
    assert statuses == [200, 200, 429]
    assert limited_response.status_code == 429
    assert limited_response.json()["error"] == "local_rate_limited"


@module_loop
async def test_gateway_rest_call_times_out_but_native_grpc_call_does_not(
    upstream: Upstream, tmp_path: pathlib.Path
) -> None:
    settings = _settings(upstream.port)
    config = render_config(load_base_config(), settings)
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]["routes"]
    (rest_route, native_route) = [
        r for r in routes if r["match"].get("prefix") == "/mt5.ingest.v1.IngestService/"
    ]
    assert "headers" in rest_route["match"]
    rest_route["route"]["timeout"] = "0.3s"
    slow = CANDLE | {"symbol": SLOW_SYMBOL}
    async with (
        _running_envoy(config, settings, tmp_path) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10.0) as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        rest = await http.post("/ingest", json=slow, headers=_headers())
        # No deadline at all: only the route could cut this call, and the native route has no timeout.
        native = await ingest_service_pb2_grpc.IngestServiceStub(channel).IngestCandles(
            ingest_service_pb2.IngestCandlesRequest(symbol=SLOW_SYMBOL, high=1.0, low=1.0),
            metadata=[("x-api-key", API_KEY)],
        )
    assert rest.status_code == 504
    assert rest.json()["error"] == "upstream request timeout"
    assert native.ok
    assert native_route["route"]["timeout"] == "0s"

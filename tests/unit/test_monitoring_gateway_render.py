"""Rendering the gateway's tracer and metrics listener (services.mesh.gateway)."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from services.mesh.gateway import (
    ADMIN_CLUSTER,
    COLLECTOR_CLUSTER,
    GatewaySettings,
    load_base_config,
    otlp_host_port,
    render_config,
)

SERVICES = ("ingest", "aggregator", "indicators", "inference")


def _settings(**overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "listen_port": 18080,
        "admin_port": 19901,
        "descriptor_path": pathlib.Path("/srv/mt5mesh.binpb"),
        "upstreams": {name: ("127.0.0.1", 50051 + i) for i, name in enumerate(SERVICES)},
        "listen_address": "127.0.0.1",
    }
    return GatewaySettings(**(values | overrides))


def _manager(config: dict[str, Any], listener: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = config["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"][
        0
    ]["typed_config"]
    return found


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _address(cluster: dict[str, Any]) -> tuple[str, int]:
    socket = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    return socket["address"], socket["port_value"]


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return load_base_config()


def test_base_config_traces_every_request_to_collector_cluster_with_parent_based_sampler(
    base: dict[str, Any],
) -> None:
    tracing = _manager(base)["tracing"]
    provider = tracing["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    config = provider["typed_config"]
    assert config["grpc_service"]["envoy_grpc"]["cluster_name"] == COLLECTOR_CLUSTER
    assert config["service_name"] == "gateway"
    assert config["sampler"]["name"] == "envoy.tracers.opentelemetry.samplers.parent_based"
    ratio = config["sampler"]["typed_config"]["wrapped_sampler"]["typed_config"]["sampling_percentage"]
    assert ratio == {"numerator": 100, "denominator": "HUNDRED"}
    assert _address(_clusters(base)[COLLECTOR_CLUSTER]) == ("jaeger", 4317)


def test_base_config_access_log_carries_trace_id(base: dict[str, Any]) -> None:
    (log,) = _manager(base)["access_log"]
    assert log["typed_config"]["log_format"]["json_format"]["trace_id"] == "%TRACE_ID%"


def test_render_without_otlp_endpoint_drops_tracer_and_collector(base: dict[str, Any]) -> None:
    config = render_config(base, _settings())
    assert "tracing" not in _manager(config)
    assert set(_clusters(config)) == set(SERVICES)
    # The access log stays; its trace_id is then empty.
    assert _manager(config)["access_log"]


@pytest.mark.parametrize(
    ("endpoint", "address", "kind"),
    [
        ("http://127.0.0.1:4317", ("127.0.0.1", 4317), "STATIC"),
        ("127.0.0.1:14317", ("127.0.0.1", 14317), "STATIC"),
        ("localhost", ("localhost", 4317), "STRICT_DNS"),
        ("http://otel-collector.monitoring:4317/", ("otel-collector.monitoring", 4317), "STRICT_DNS"),
    ],
)
def test_render_with_otlp_endpoint_points_collector_there(
    base: dict[str, Any], endpoint: str, address: tuple[str, int], kind: str
) -> None:
    config = render_config(base, _settings(otlp_endpoint=endpoint))
    collector = _clusters(config)[COLLECTOR_CLUSTER]
    assert _address(collector) == address
    assert collector["type"] == kind
    assert "http2_protocol_options" in str(collector["typed_extension_protocol_options"])
    assert _manager(config)["tracing"]["provider"]["typed_config"]["service_name"] == "gateway"


def test_render_sampling_percent_in_millionths(base: dict[str, Any]) -> None:
    config = render_config(base, _settings(otlp_endpoint="127.0.0.1:4317", trace_sampling_percent=0.5))
    sampler = _manager(config)["tracing"]["provider"]["typed_config"]["sampler"]
    ratio = sampler["typed_config"]["wrapped_sampler"]["typed_config"]["sampling_percentage"]
    assert ratio == {"numerator": 5000, "denominator": "MILLION"}


@pytest.mark.parametrize("percent", [-1.0, 100.5])
def test_render_sampling_percent_out_of_range_raises(base: dict[str, Any], percent: float) -> None:
    with pytest.raises(ValueError, match="trace_sampling_percent"):
        render_config(base, _settings(otlp_endpoint="127.0.0.1:4317", trace_sampling_percent=percent))


@pytest.mark.parametrize("endpoint", ["https://collector.example.com:4317", "grpc://x:1", "http://:4317"])
def test_otlp_host_port_not_plain_http_raises(endpoint: str) -> None:
    with pytest.raises(ValueError, match="OTLP endpoint"):
        otlp_host_port(endpoint)


def test_render_upstream_naming_internal_cluster_raises(base: dict[str, Any]) -> None:
    upstreams = {name: ("127.0.0.1", 50051) for name in SERVICES} | {COLLECTOR_CLUSTER: ("127.0.0.1", 4317)}
    with pytest.raises(ValueError, match=COLLECTOR_CLUSTER):
        render_config(base, _settings(upstreams=upstreams))


def test_render_without_metrics_port_drops_metrics_listener_and_admin_cluster(base: dict[str, Any]) -> None:
    config = render_config(base, _settings())
    assert [listener["name"] for listener in config["static_resources"]["listeners"]] == ["gateway"]
    assert ADMIN_CLUSTER not in _clusters(config)


def test_render_with_metrics_port_serves_stats_from_loopback_admin(base: dict[str, Any]) -> None:
    config = render_config(base, _settings(metrics_port=19902, admin_port=29901))
    listeners = {listener["name"]: listener for listener in config["static_resources"]["listeners"]}
    assert listeners["metrics"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19902}
    admin = _clusters(config)[ADMIN_CLUSTER]
    assert _address(admin) == ("127.0.0.1", 29901)
    routes = _manager(config, 1)["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["match"]["path"] == "/stats/prometheus"
    assert routes[0]["route"]["cluster"] == ADMIN_CLUSTER
    assert routes[-1]["direct_response"]["status"] == 404


@pytest.mark.parametrize("port", [18080, 19901])
def test_render_metrics_port_clashing_with_another_raises(base: dict[str, Any], port: int) -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        render_config(base, _settings(metrics_port=port))


def test_render_production_values_keep_base_tracer_and_metrics(base: dict[str, Any]) -> None:
    settings = _settings(
        listen_port=8080,
        admin_port=9901,
        listen_address="0.0.0.0",  # noqa: S104 - compared, not bound
        upstreams={name: (name, 50051 + i) for i, name in enumerate(SERVICES)},
        otlp_endpoint="http://jaeger:4317",
        metrics_port=9902,
    )
    config = render_config(base, settings)
    assert _manager(config)["tracing"] == _manager(base)["tracing"]
    assert _clusters(config)[COLLECTOR_CLUSTER] == _clusters(base)[COLLECTOR_CLUSTER]
    assert config["static_resources"]["listeners"][1] == base["static_resources"]["listeners"][1]

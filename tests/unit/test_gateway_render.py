"""Unit tests of services.mesh.gateway: rendering the Envoy config for an environment."""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import pytest
import yaml

from services.common.config import MAX_STREAMS
from services.mesh.gateway import GatewaySettings, load_base_config, render_config, write_config

CLUSTERS = ("ingest", "aggregator", "indicators", "inference")
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - the production listener address under test, nothing binds here


def _settings(**overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "listen_port": 18080,
        "admin_port": 19901,
        "descriptor_path": pathlib.Path("/srv/mesh/mt5mesh.binpb"),
        "upstreams": {name: ("127.0.0.1", 50051 + i) for i, name in enumerate(CLUSTERS)},
        "listen_address": "127.0.0.1",
    }
    values.update(overrides)
    return GatewaySettings(**values)


def _http_connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    manager: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def _transcoder(config: dict[str, Any]) -> dict[str, Any]:
    filters = _http_connection_manager(config)["http_filters"]
    (transcoder,) = [f["typed_config"] for f in filters if f["name"] == TRANSCODER]
    return transcoder  # type: ignore[no-any-return]


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return cluster  # type: ignore[no-any-return]


def _endpoint_address(cluster: dict[str, Any]) -> dict[str, Any]:
    endpoints = cluster["load_assignment"]["endpoints"]
    address: dict[str, Any] = endpoints[0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    return address


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return load_base_config()


def test_load_base_config_repository_file_has_production_values(base: dict[str, Any]) -> None:
    listener = base["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": ALL_INTERFACES, "port_value": 8080}
    assert base["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    assert _transcoder(base)["proto_descriptor"] == "/etc/envoy/mt5mesh.binpb"
    # The services, then the internal clusters (admin behind the metrics listener, the OTLP collector).
    names = [c["name"] for c in base["static_resources"]["clusters"]]
    assert names == [*CLUSTERS, "envoy_admin", "opentelemetry_collector"]
    for i, name in enumerate(CLUSTERS):
        cluster = _cluster(base, name)
        assert cluster["type"] == "STRICT_DNS"
        assert _endpoint_address(cluster) == {"address": name, "port_value": 50051 + i}


def test_load_base_config_non_mapping_file_raises(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mapping"):
        load_base_config(path)


def test_render_config_listener_uses_settings_address_and_port(base: dict[str, Any]) -> None:
    config = render_config(base, _settings(listen_port=28080, listen_address="127.0.0.2"))
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"] == {"socket_address": {"address": "127.0.0.2", "port_value": 28080}}


def test_render_config_default_listen_address_is_all_interfaces(base: dict[str, Any]) -> None:
    settings = GatewaySettings(
        listen_port=8080,
        admin_port=9901,
        descriptor_path=pathlib.Path("/d.binpb"),
        upstreams={name: (name, 50051) for name in CLUSTERS},
    )
    config = render_config(base, settings)
    address = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert address["address"] == ALL_INTERFACES


def test_render_config_admin_stays_on_loopback_with_settings_port(base: dict[str, Any]) -> None:
    config = render_config(base, _settings(admin_port=29901, listen_address=ALL_INTERFACES))
    assert config["admin"]["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 29901}}


def test_render_config_transcoder_uses_settings_descriptor_path(base: dict[str, Any]) -> None:
    descriptor = pathlib.Path("/srv/mesh/gen/mt5mesh.binpb")
    config = render_config(base, _settings(descriptor_path=descriptor))
    assert _transcoder(config)["proto_descriptor"] == str(descriptor)


def test_render_config_ip_upstreams_become_static_clusters(base: dict[str, Any]) -> None:
    upstreams = {name: ("127.0.0.1", 40000 + i) for i, name in enumerate(CLUSTERS)}
    config = render_config(base, _settings(upstreams=upstreams))
    for i, name in enumerate(CLUSTERS):
        cluster = _cluster(config, name)
        assert cluster["type"] == "STATIC"
        assert "dns_lookup_family" not in cluster
        assert cluster["load_assignment"]["cluster_name"] == name
        assert _endpoint_address(cluster) == {"address": "127.0.0.1", "port_value": 40000 + i}


def test_render_config_hostname_upstream_stays_dns_resolved(base: dict[str, Any]) -> None:
    upstreams = {name: ("127.0.0.1", 50051) for name in CLUSTERS} | {"ingest": ("localhost", 50051)}
    config = render_config(base, _settings(upstreams=upstreams))
    assert _cluster(config, "ingest")["type"] == "STRICT_DNS"
    assert _endpoint_address(_cluster(config, "ingest")) == {"address": "localhost", "port_value": 50051}
    assert _cluster(config, "aggregator")["type"] == "STATIC"


def test_render_config_keeps_shared_cluster_settings(base: dict[str, Any]) -> None:
    config = render_config(base, _settings())
    for name in CLUSTERS:
        cluster = _cluster(config, name)
        assert cluster["health_checks"][0]["grpc_health_check"] == {}
        assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])


def test_render_config_clusters_do_not_share_objects(base: dict[str, Any]) -> None:
    config = render_config(base, _settings())
    ingest, aggregator = _cluster(config, "ingest"), _cluster(config, "aggregator")
    before = aggregator["health_checks"][0]["interval"]
    ingest["health_checks"][0]["interval"] = "17s"
    assert aggregator["health_checks"][0]["interval"] == before


def test_base_config_cluster_stream_limit_is_the_services_limit(base: dict[str, Any]) -> None:
    # Above the services' limit Envoy would send streams they refuse (503); below, it opens more
    # connections than needed.
    for name in CLUSTERS:
        options = _cluster(base, name)["typed_extension_protocol_options"]
        (http,) = options.values()
        streams = http["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"]
        assert streams == MAX_STREAMS, name


def test_base_config_refused_streams_and_failed_connections_retried(base: dict[str, Any]) -> None:
    (listener,) = [entry for entry in base["static_resources"]["listeners"] if entry["name"] == "gateway"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = manager["route_config"]["virtual_hosts"]
    assert set(host["retry_policy"]["retry_on"].split(",")) == {"refused-stream", "connect-failure"}


def test_render_config_missing_upstream_raises_naming_cluster(base: dict[str, Any]) -> None:
    upstreams = {name: ("127.0.0.1", 50051) for name in CLUSTERS if name != "indicators"}
    with pytest.raises(ValueError, match="indicators"):
        render_config(base, _settings(upstreams=upstreams))


def test_render_config_unknown_upstream_raises_naming_it(base: dict[str, Any]) -> None:
    upstreams = {name: ("127.0.0.1", 50051) for name in CLUSTERS} | {"billing": ("127.0.0.1", 50099)}
    with pytest.raises(ValueError, match="billing"):
        render_config(base, _settings(upstreams=upstreams))


@pytest.mark.parametrize("port", [0, -1, 65536, True])
def test_render_config_invalid_listen_port_raises(base: dict[str, Any], port: int) -> None:
    with pytest.raises(ValueError, match="listen_port"):
        render_config(base, _settings(listen_port=port))


def test_render_config_invalid_upstream_port_raises_naming_cluster(base: dict[str, Any]) -> None:
    upstreams = {name: ("127.0.0.1", 50051) for name in CLUSTERS} | {"inference": ("127.0.0.1", 70000)}
    with pytest.raises(ValueError, match="inference"):
        render_config(base, _settings(upstreams=upstreams))


def test_render_config_same_listen_and_admin_port_raises(base: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="admin_port"):
        render_config(base, _settings(listen_port=18080, admin_port=18080))


def test_render_config_base_without_transcoder_raises(base: dict[str, Any]) -> None:
    broken = copy.deepcopy(base)
    manager = _http_connection_manager(broken)
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != TRANSCODER]
    with pytest.raises(ValueError, match=TRANSCODER):
        render_config(broken, _settings())


def test_render_config_base_is_not_mutated(base: dict[str, Any]) -> None:
    before = copy.deepcopy(base)
    render_config(base, _settings())
    assert base == before


def test_write_config_yaml_round_trips(base: dict[str, Any], tmp_path: pathlib.Path) -> None:
    config = render_config(base, _settings())
    path = write_config(config, tmp_path / "nested" / "envoy.yaml")
    assert path == tmp_path / "nested" / "envoy.yaml"
    text = path.read_text(encoding="utf-8")
    # Shared YAML anchors of the base file must not come back as &id001 aliases.
    assert "&id" not in text
    assert yaml.safe_load(text) == config
    assert list(path.parent.iterdir()) == [path]


def test_write_config_json_suffix_writes_json(base: dict[str, Any], tmp_path: pathlib.Path) -> None:
    config = render_config(base, _settings())
    path = write_config(config, tmp_path / "envoy.json")
    assert json.loads(path.read_text(encoding="utf-8")) == config


def test_render_several_endpoints_for_one_cluster_lists_them_all() -> None:
    base = load_base_config()
    upstreams: dict[str, Any] = {name: ("127.0.0.1", 50051) for name in CLUSTERS}
    upstreams["aggregator"] = [("127.0.0.1", 50052), ("127.0.0.1", 50062)]
    settings = GatewaySettings(
        listen_port=8080, admin_port=9901, descriptor_path=pathlib.Path("/d.binpb"), upstreams=upstreams
    )
    rendered = render_config(base, settings)
    (cluster,) = [c for c in rendered["static_resources"]["clusters"] if c["name"] == "aggregator"]
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [50052, 50062]
    assert cluster["type"] == "STATIC"

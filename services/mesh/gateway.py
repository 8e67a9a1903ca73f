"""Render the Envoy gateway configuration for an environment.

``envoy/envoy.yaml`` is the production configuration (Kubernetes: service DNS names, port 8080, the
descriptor mounted under /etc/envoy, traces to Jaeger, Envoy's metrics on port 9902). Running the mesh
anywhere else needs the same gateway with other ports, loopback addresses and a local descriptor path.
Rather than keep a second config or a template, this module loads the production file and edits the
parsed structure, so there is exactly one source of routes, filters and limits, and a renamed or
missing section fails loudly here instead of rendering a config that silently differs.

Two parts are optional in a rendering: the tracer (kept, with its collector cluster pointed at
``otlp_endpoint``, only when one is given) and the metrics listener (kept only with a
``metrics_port``; locally Prometheus can scrape ``/stats/prometheus`` on the loopback admin port).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import pathlib
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

logger = logging.getLogger(__name__)

Endpoint = tuple[str, int]

DEFAULT_CONFIG_PATH = pathlib.Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml"
"""The repository's production gateway configuration."""

_TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
_HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
_ADMIN_ADDRESS = "127.0.0.1"
_METRICS_LISTENER = "metrics"
# Clusters that are not mesh services: the admin interface behind the metrics listener, and the OTLP
# collector the tracer exports to.
ADMIN_CLUSTER = "envoy_admin"
COLLECTOR_CLUSTER = "opentelemetry_collector"
_INTERNAL_CLUSTERS = (ADMIN_CLUSTER, COLLECTOR_CLUSTER)
_OTLP_DEFAULT_PORT = 4317
# Fields that only mean something for DNS-resolved clusters; dropped when a cluster becomes STATIC.
_DNS_ONLY_FIELDS = ("dns_refresh_rate", "dns_failure_refresh_rate", "dns_lookup_family", "respect_dns_ttl")


@dataclass(frozen=True)
class GatewaySettings:
    """Where the rendered gateway listens and where it finds its upstreams.

    ``upstreams`` maps every service cluster of the base configuration to ``(host, port)``, or to a
    list of them (replicas or shards of one service). IP addresses make the cluster STATIC; host
    names keep it DNS-resolved (STRICT_DNS).

    ``otlp_endpoint`` is the OTLP/gRPC collector of Envoy's tracer (``http://host:4317`` or
    ``host:4317``; plain HTTP/2, no TLS); empty renders no tracer. ``trace_sampling_percent`` is the
    share of new traces sampled (a request carrying a ``traceparent`` keeps its caller's decision).
    ``metrics_port`` serves Envoy's ``/stats/prometheus`` on ``listen_address``; None renders no
    metrics listener.
    """

    listen_port: int
    admin_port: int
    descriptor_path: pathlib.Path
    upstreams: Mapping[str, Endpoint | Sequence[Endpoint]]
    listen_address: str = "0.0.0.0"  # noqa: S104 - the gateway serves other hosts by design
    otlp_endpoint: str = ""
    trace_sampling_percent: float = 100.0
    metrics_port: int | None = None


def load_base_config(path: pathlib.Path | None = None) -> dict[str, Any]:
    """Load the gateway configuration (by default the repository's ``envoy/envoy.yaml``).

    Raises:
        ValueError: the file does not hold a YAML mapping.

    """
    config_path = path if path is not None else DEFAULT_CONFIG_PATH
    with config_path.open(encoding="utf-8") as stream:
        loaded = yaml.safe_load(stream)
    if not isinstance(loaded, dict):
        raise ValueError(f"{config_path}: expected a YAML mapping at the top level")
    return loaded


def render_config(base: Mapping[str, Any], settings: GatewaySettings) -> dict[str, Any]:
    """Return a copy of ``base`` set up for ``settings``; ``base`` itself is left untouched.

    Sets the listener address and port, binds the admin interface to 127.0.0.1 on
    ``settings.admin_port``, points the gRPC-JSON transcoder at ``settings.descriptor_path``, gives
    each service cluster its address from ``settings.upstreams``, and keeps or drops the tracer and
    the metrics listener (see GatewaySettings).

    Raises:
        ValueError: ``settings`` is inconsistent (a port out of range, two listeners or the admin on
            the same port, a cluster without an upstream or an upstream naming no cluster, an OTLP
            endpoint that is not plain http://host:port), or ``base`` lacks a section this function
            edits.

    """
    _check_port("listen_port", settings.listen_port)
    _check_port("admin_port", settings.admin_port)
    ports = {"listen_port": settings.listen_port, "admin_port": settings.admin_port}
    if settings.metrics_port is not None:
        _check_port("metrics_port", settings.metrics_port)
        ports["metrics_port"] = settings.metrics_port
    if len(set(ports.values())) < len(ports):
        raise ValueError(f"listen_port, admin_port and metrics_port must differ: {ports}")

    # A plain recursive copy rather than copy.deepcopy: the YAML anchors of the base file (shared
    # health checks, circuit breakers...) load as shared objects, and deepcopy would keep them shared,
    # so editing one cluster could edit all of them and the dump would be full of &id001 aliases.
    config: dict[str, Any] = _copy_tree(base)

    listeners = _get_list(config, "static_resources", "listeners")
    names = [listener.get("name") for listener in listeners]
    if names[:1] == [_METRICS_LISTENER] or len(listeners) - names.count(_METRICS_LISTENER) != 1:
        raise ValueError(f"expected the gateway listener first, then at most a metrics listener: {names}")
    gateway = listeners[0]
    _set_socket_address(gateway, settings.listen_address, settings.listen_port)
    _set_socket_address(_get_dict(config, "admin"), _ADMIN_ADDRESS, settings.admin_port)

    transcoder = _find_transcoder(gateway)
    transcoder["proto_descriptor"] = str(settings.descriptor_path)

    clusters = _get_list(config, "static_resources", "clusters")
    internal = {_cluster_name(c): c for c in clusters if _cluster_name(c) in _INTERNAL_CLUSTERS}
    services = [c for c in clusters if _cluster_name(c) not in _INTERNAL_CLUSTERS]
    _render_clusters(services, settings.upstreams)
    keep = [
        _render_tracing(_connection_manager(gateway), internal.get(COLLECTOR_CLUSTER), settings),
        _render_metrics(listeners, internal.get(ADMIN_CLUSTER), settings),
    ]
    clusters[:] = [*services, *(cluster for cluster in keep if cluster is not None)]
    logger.debug(
        "rendered gateway config",
        extra={"listen_port": settings.listen_port, "admin_port": settings.admin_port},
    )
    return config


def write_config(config: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Write ``config`` to ``path`` for ``envoy -c`` and return the path.

    Envoy picks the parser from the extension, so a ``.json`` path gets JSON and anything else YAML.
    The file is replaced atomically: an Envoy (re)starting at the same moment never reads half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        text = json.dumps(config, indent=2)
    else:
        text = yaml.safe_dump(_copy_tree(config), sort_keys=False, default_flow_style=False)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote gateway config", extra={"path": str(path)})
    return path


def _render_tracing(
    manager: dict[str, Any], collector: dict[str, Any] | None, settings: GatewaySettings
) -> dict[str, Any] | None:
    """Point the tracer at ``settings.otlp_endpoint``, or drop it; the collector cluster to keep."""
    if not settings.otlp_endpoint:
        manager.pop("tracing", None)
        return None
    tracing = _as_dict(manager.get("tracing"), "gateway http_connection_manager tracing")
    provider = _as_dict(_as_dict(tracing.get("provider"), "tracing provider").get("typed_config"), "tracer")
    grpc_service = _as_dict(provider.get("grpc_service"), "tracer grpc_service")
    cluster_name = _as_dict(grpc_service.get("envoy_grpc"), "tracer envoy_grpc").get("cluster_name")
    if cluster_name != COLLECTOR_CLUSTER or collector is None:
        raise ValueError(f"base config: the tracer must export to a cluster named {COLLECTOR_CLUSTER}")
    if not 0 <= settings.trace_sampling_percent <= 100:
        raise ValueError(f"trace_sampling_percent must be in 0..100, got {settings.trace_sampling_percent}")
    ratio = _as_dict(
        _as_dict(
            _as_dict(provider.get("sampler"), "tracer sampler").get("typed_config"), "sampler config"
        ).get("wrapped_sampler"),
        "parent-based sampler's wrapped_sampler",
    )
    percent = settings.trace_sampling_percent
    _as_dict(ratio.get("typed_config"), "trace_id_ratio_based sampler")["sampling_percentage"] = (
        {"numerator": int(percent), "denominator": "HUNDRED"}
        if percent == int(percent)
        # Millionths: 0.5 % is 5000 / MILLION.
        else {"numerator": round(percent * 10_000), "denominator": "MILLION"}
    )
    _render_clusters([collector], {COLLECTOR_CLUSTER: otlp_host_port(settings.otlp_endpoint)})
    return collector


def otlp_host_port(endpoint: str) -> Endpoint:
    """``http://host:port`` or ``host:port`` (port 4317 when absent) as ``(host, port)``.

    Raises:
        ValueError: not plain HTTP (Envoy's tracer is rendered without TLS), or no host.

    """
    parsed = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parsed.scheme != "http" or not parsed.hostname or parsed.path not in ("", "/"):
        raise ValueError(
            f"OTLP endpoint {endpoint!r}: Envoy's tracer needs a plain OTLP/gRPC address, "
            "http://host:port or host:port (a local collector such as Jaeger; no TLS)"
        )
    return parsed.hostname, parsed.port or _OTLP_DEFAULT_PORT


def _render_metrics(
    listeners: list[Any], admin: dict[str, Any] | None, settings: GatewaySettings
) -> dict[str, Any] | None:
    """Serve /stats/prometheus on ``settings.metrics_port``, or drop that listener; the cluster to keep."""
    metrics = [listener for listener in listeners if listener.get("name") == _METRICS_LISTENER]
    if settings.metrics_port is None:
        listeners[:] = [listener for listener in listeners if listener.get("name") != _METRICS_LISTENER]
        return None
    if not metrics or admin is None:
        raise ValueError(
            f"base config: metrics_port needs a {_METRICS_LISTENER} listener and {ADMIN_CLUSTER}"
        )
    _set_socket_address(metrics[0], settings.listen_address, settings.metrics_port)
    _render_clusters([admin], {ADMIN_CLUSTER: (_ADMIN_ADDRESS, settings.admin_port)})
    return admin


def _render_clusters(clusters: list[Any], upstreams: Mapping[str, Endpoint | Sequence[Endpoint]]) -> None:
    names = [_cluster_name(cluster) for cluster in clusters]
    unknown = sorted(set(upstreams) - set(names))
    if unknown:
        raise ValueError(
            f"upstreams name unknown cluster(s): {', '.join(unknown)} (known: {', '.join(names)})"
        )
    missing = [name for name in names if name not in upstreams]
    if missing:
        raise ValueError(f"upstreams lack an address for cluster(s): {', '.join(missing)}")

    for cluster, name in zip(clusters, names, strict=True):
        endpoints = _endpoints(upstreams[name])
        for host, port in endpoints:
            _check_port(f"upstream port of cluster {name}", port)
            if not host:
                raise ValueError(f"upstream host of cluster {name} is empty")
        if all(_is_ip_address(host) for host, _ in endpoints):
            # STATIC needs IP literals and skips DNS entirely, which is what a local run wants.
            # cluster_type (an extension cluster such as envoy.cluster.dns) excludes `type`.
            cluster.pop("cluster_type", None)
            cluster["type"] = "STATIC"
            for field in _DNS_ONLY_FIELDS:
                cluster.pop(field, None)
        elif "cluster_type" not in cluster:
            cluster["type"] = "STRICT_DNS"
        cluster["load_assignment"] = {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                        for host, port in endpoints
                    ]
                }
            ],
        }


def _endpoints(value: Endpoint | Sequence[Endpoint]) -> list[Endpoint]:
    """One ``(host, port)`` or several (a sharded or replicated service locally)."""
    if len(value) == 2 and isinstance(value[0], str):
        return [value]  # type: ignore[list-item]
    return list(value)  # type: ignore[arg-type]


def _cluster_name(cluster: Any) -> str:
    if not isinstance(cluster, dict) or not isinstance(cluster.get("name"), str):
        raise ValueError(f"cluster without a name in the base config: {cluster!r}")
    name: str = cluster["name"]
    return name


def _connection_manager(listener: Mapping[str, Any]) -> dict[str, Any]:
    for chain in _as_list(listener.get("filter_chains"), "listener filter_chains"):
        for network_filter in _as_list(chain.get("filters"), "filter_chain filters"):
            if network_filter.get("name") == _HTTP_CONNECTION_MANAGER:
                return _as_dict(network_filter.get("typed_config"), "http_connection_manager typed_config")
    raise ValueError(f"no {_HTTP_CONNECTION_MANAGER} in the base config's gateway listener")


def _find_transcoder(listener: Mapping[str, Any]) -> dict[str, Any]:
    manager = _connection_manager(listener)
    for http_filter in _as_list(manager.get("http_filters"), "http_filters"):
        if http_filter.get("name") == _TRANSCODER_FILTER:
            return _as_dict(http_filter.get("typed_config"), f"{_TRANSCODER_FILTER} typed_config")
    raise ValueError(f"no {_TRANSCODER_FILTER} filter in the base config's listener")


def _set_socket_address(holder: dict[str, Any], address: str, port: int) -> None:
    # Replace the whole address: a base file with a pipe or extra fields must not leak through.
    holder["address"] = {"socket_address": {"address": address, "port_value": port}}


def _check_port(what: str, port: int) -> None:
    # bool is an int subclass; True would otherwise be accepted as port 1.
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{what} must be an integer in 1..65535, got {port!r}")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _get_dict(config: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    node: Any = config
    for key in keys:
        node = _as_dict(node, ".".join(keys)).get(key)
    return _as_dict(node, ".".join(keys))


def _get_list(config: Mapping[str, Any], *keys: str) -> list[Any]:
    parent = _get_dict(config, *keys[:-1])
    return _as_list(parent.get(keys[-1]), ".".join(keys))


def _as_dict(node: Any, what: str) -> dict[str, Any]:
    if not isinstance(node, dict):
        raise ValueError(f"base config: {what} is missing or not a mapping")
    return node


def _as_list(node: Any, what: str) -> list[Any]:
    if not isinstance(node, list):
        raise ValueError(f"base config: {what} is missing or not a list")
    return node


def _copy_tree(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {key: _copy_tree(value) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [_copy_tree(item) for item in node]
    return node

"""Settings every service shares, read from the environment once at start."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from services.common import env as envreader

DEFAULT_DATABASE_URL = "sqlite:///data/mt5mesh.db"
# Concurrent streams a service accepts per HTTP/2 connection (MT5MESH_MAX_STREAMS).
MAX_STREAMS = 100


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """The part of each service's configuration that the shared runtime needs."""

    service_name: str
    listen_address: str
    metrics_port: int
    database_url: str
    api_keys: tuple[str, ...]
    log_level: str
    shutdown_grace_seconds: float
    drain_seconds: float
    max_message_bytes: int
    max_concurrent_streams: int
    health_probe_seconds: float
    otlp_endpoint: str

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], *, service_name: str, default_port: int, default_metrics_port: int
    ) -> RuntimeConfig:
        """Read the shared settings; ``MT5MESH_API_KEY`` (or ``_FILE``) is required."""
        keys = envreader.get_secret_list(env, "MT5MESH_API_KEY")
        if not keys:
            raise envreader.ConfigError(
                "MT5MESH_API_KEY or MT5MESH_API_KEY_FILE must name at least one API key; "
                "there is no default key"
            )
        if any(len(k) < 16 for k in keys):
            raise envreader.ConfigError("every API key in MT5MESH_API_KEY must be at least 16 characters")
        prefix = service_name.upper()
        return cls(
            service_name=service_name,
            listen_address=envreader.get_str(env, f"{prefix}_LISTEN", f"127.0.0.1:{default_port}"),
            metrics_port=envreader.get_int(env, f"{prefix}_METRICS_PORT", default_metrics_port),
            database_url=envreader.get_str(env, "DATABASE_URL", DEFAULT_DATABASE_URL),
            api_keys=keys,
            log_level=envreader.get_str(env, "LOG_LEVEL", "INFO").upper(),
            shutdown_grace_seconds=envreader.get_float(env, "MT5MESH_SHUTDOWN_GRACE_SECONDS", 10.0),
            # After SIGTERM: seconds of NOT_SERVING while still serving, so that load balancers
            # (Envoy checks health every 2 s, two misses) stop sending calls before the server stops.
            drain_seconds=envreader.get_float(env, "MT5MESH_DRAIN_SECONDS", 5.0),
            max_message_bytes=envreader.get_int(
                env, "MT5MESH_MAX_MESSAGE_BYTES", 8 * 1024 * 1024, minimum=1024
            ),
            # Streams per HTTP/2 connection; Envoy's clusters use the same number (envoy/envoy.yaml), so
            # that past it Envoy opens another connection instead of having streams refused.
            max_concurrent_streams=envreader.get_int(env, "MT5MESH_MAX_STREAMS", MAX_STREAMS, minimum=1),
            health_probe_seconds=envreader.get_float(env, "MT5MESH_HEALTH_PROBE_SECONDS", 2.0, minimum=0.05),
            otlp_endpoint=envreader.get_str(env, "OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        )

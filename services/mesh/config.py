"""Settings of the ``mt5mesh`` command, read from the environment (flags override them)."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping

from services.common import env as envreader
from services.common.config import DEFAULT_DATABASE_URL


@dataclasses.dataclass(frozen=True, slots=True)
class MeshConfig:
    """Defaults for ``mt5mesh up`` and its helpers."""

    database_url: str
    gateway_port: int
    api_key: str
    data_dir: pathlib.Path
    otlp_endpoint: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MeshConfig:
        """Read ``DATABASE_URL``, ``MT5MESH_GATEWAY_PORT``, ``MT5MESH_API_KEY`` and friends."""
        keys = envreader.get_secret_list(env, "MT5MESH_API_KEY")
        return cls(
            database_url=envreader.get_str(env, "DATABASE_URL", DEFAULT_DATABASE_URL),
            gateway_port=envreader.get_int(env, "MT5MESH_GATEWAY_PORT", 8080, minimum=1),
            api_key=keys[0] if keys else "",
            data_dir=pathlib.Path(envreader.get_str(env, "MT5MESH_DATA_DIR", "data")),
            otlp_endpoint=envreader.get_str(env, "OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        )

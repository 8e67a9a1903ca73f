"""Typed readers for configuration values taken from an environment mapping.

Only each service's ``config.py`` calls these, with ``os.environ`` passed in, so that no other
module reads the process environment and tests can build configs from plain dictionaries.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def get_str(env: Mapping[str, str], name: str, default: str) -> str:
    """Return the variable's value, or the default when it is unset or empty."""
    value = env.get(name, "").strip()
    return value or default


def get_int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    """Return the variable as an integer not below ``minimum``."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def get_float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    """Return the variable as a finite float not below ``minimum``."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum or value == float("inf"):
        raise ConfigError(f"{name} must be a finite number of at least {minimum}, got {raw}")
    return value


def get_address_map(env: Mapping[str, str], name: str) -> dict[str, str]:
    """Parse ``name=host:port,name=host:port`` into a dictionary."""
    raw = env.get(name, "").strip()
    result: dict[str, str] = {}
    if not raw:
        return result
    for part in raw.split(","):
        key, sep, address = part.strip().partition("=")
        if not sep or not key or ":" not in address:
            raise ConfigError(f"{name} must look like 'name=host:port,...', got {part!r}")
        result[key.strip()] = address.strip()
    return result


def get_secret_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Read comma-separated secrets from ``NAME`` or from the file named by ``NAME_FILE``.

    The file form serves mounted Kubernetes secrets. Both may be given (key rotation); blank
    entries are ignored. An empty result is allowed here; callers decide whether it is fatal.
    """
    values: list[str] = []
    raw = env.get(name, "")
    values.extend(raw.split(","))
    file_name = env.get(f"{name}_FILE", "").strip()
    if file_name:
        path = pathlib.Path(file_name)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={file_name} cannot be read: {exc.strerror}") from None
        values.extend(text.replace("\n", ",").split(","))
    return tuple(v.strip() for v in values if v.strip())


def get_shard_index(env: Mapping[str, str], name: str, count: int) -> int:
    """A shard number below ``count``, given as a number or a StatefulSet pod name ending in ``-<n>``."""
    raw = get_str(env, name, "0")
    ordinal = raw.rsplit("-", 1)[-1]
    if not ordinal.isdigit() or int(ordinal) >= count:
        raise ConfigError(
            f"{name} must be a shard number below the shard count ({count}) "
            f"or a pod name ending in one, got {raw!r}"
        )
    return int(ordinal)

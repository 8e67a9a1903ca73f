"""API keys compare in constant time and have no default; config errors name the variable."""

from __future__ import annotations

import pathlib
import zlib

import pytest

from services.aggregator.config import AggregatorConfig
from services.common.auth import key_matches
from services.common.env import ConfigError, get_address_map, get_int, get_secret_list
from services.common.market import shard_of
from services.indicators.config import IndicatorsConfig
from services.ingest.config import IngestConfig

KEY = "k" * 32


def test_key_matches_any_configured_key_is_accepted() -> None:
    assert key_matches(KEY, [b"x" * 32, KEY.encode()])


@pytest.mark.parametrize("provided", [None, "", "k" * 31, "K" * 32, "k" * 33])
def test_key_matches_missing_or_wrong_key_is_refused(provided: str | None) -> None:
    assert not key_matches(provided, [KEY.encode()])


def test_ingest_config_without_api_key_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="MT5MESH_API_KEY"):
        IngestConfig.from_env({})


def test_ingest_config_short_api_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="16 characters"):
        IngestConfig.from_env({"MT5MESH_API_KEY": "short"})


def test_secret_list_file_and_value_are_both_read(tmp_path: pathlib.Path) -> None:
    secret = tmp_path / "keys"
    secret.write_text("second-key-0123456789\n")
    assert get_secret_list({"K": "first-key-0123456789", "K_FILE": str(secret)}, "K") == (
        "first-key-0123456789",
        "second-key-0123456789",
    )


def test_secret_list_unreadable_file_names_the_variable(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="K_FILE"):
        get_secret_list({"K_FILE": str(tmp_path / "missing")}, "K")


def test_get_int_malformed_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="INGEST_MAX_GROUP_ROWS"):
        get_int({"INGEST_MAX_GROUP_ROWS": "lots"}, "INGEST_MAX_GROUP_ROWS", 1)


def test_address_map_parses_names_and_addresses() -> None:
    assert get_address_map({"P": "a=h:1, b=h:2"}, "P") == {"a": "h:1", "b": "h:2"}
    with pytest.raises(ConfigError, match="P"):
        get_address_map({"P": "nonsense"}, "P")


def test_ingest_config_reads_every_setting_from_env() -> None:
    config = IngestConfig.from_env(
        {
            "MT5MESH_API_KEY": KEY,
            "INGEST_LISTEN": "0.0.0.0:6000",
            "INGEST_MESH_PEERS": "aggregator=h:1",
            "DATABASE_URL": "sqlite:///x.db",
        }
    )
    assert config.runtime.listen_address == "0.0.0.0:6000"
    assert config.runtime.api_keys == (KEY,)
    assert config.mesh_peers == {"aggregator": "h:1"}
    assert config.runtime.database_url == "sqlite:///x.db"


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("aggregator-2", 2), ("mt5-aggregator-0", 0)])
def test_aggregator_config_shard_index_from_number_or_pod_name(value: str, expected: int) -> None:
    config = AggregatorConfig.from_env(
        {"MT5MESH_API_KEY": KEY, "AGGREGATOR_SHARD_COUNT": "3", "AGGREGATOR_SHARD_INDEX": value}
    )
    assert (config.shard_count, config.shard_index) == (3, expected)


@pytest.mark.parametrize("value", ["3", "aggregator-7", "nope"])
def test_aggregator_config_shard_index_out_of_range_names_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="AGGREGATOR_SHARD_INDEX"):
        AggregatorConfig.from_env(
            {"MT5MESH_API_KEY": KEY, "AGGREGATOR_SHARD_COUNT": "3", "AGGREGATOR_SHARD_INDEX": value}
        )


def test_shard_of_is_stable_and_spreads_symbols() -> None:
    assert shard_of("EURUSD", 4) == zlib.crc32(b"EURUSD") % 4
    assert {shard_of(f"SYM{i}", 4) for i in range(100)} == {0, 1, 2, 3}
    assert shard_of("EURUSD", 1) == 0


def test_indicators_config_shard_placeholder_in_aggregator_address_is_filled() -> None:
    config = IndicatorsConfig.from_env(
        {
            "MT5MESH_API_KEY": KEY,
            "INDICATORS_SHARD_COUNT": "3",
            "INDICATORS_SHARD_INDEX": "indicators-2",
            "INDICATORS_AGGREGATOR_ADDRESS": "aggregator-{shard}.aggregator:50052",
        }
    )
    assert config.aggregator_address == "aggregator-2.aggregator:50052"

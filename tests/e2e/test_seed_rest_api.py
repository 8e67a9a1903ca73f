"""The seed's REST API through the real Envoy gateway, verbatim: same requests, same answers."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Mesh
from tests.helpers import API_KEY, SEED_CANDLE, wait_until

# The seed's own test script (seed 001, "Script de Teste Automatizado"), verbatim but for the
# `| jq` pipes and the docker step; API_KEY and BASE_URL are given by the test.
SEED_CURL_BATCH = """curl -X POST "$BASE_URL/ingest_batch" \\
  -H "X-API-Key: $API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '[{
    "symbol":"EURUSD",
    "timeframe":"M1",
    "ts":"2025-10-20T03:00:00Z",
    "open":1.0855,
    "high":1.0857,
    "low":1.0854,
    "close":1.0856,
    "volume":150,
    "spread":2
  }]'"""
SEED_CURL_TICKS = """curl -X POST "$BASE_URL/ingest/tick" \\
  -H "X-API-Key: $API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '{
    "ticks":[
      {"symbol":"EURUSD","ts":"2025-10-20T03:01:10.123Z","bid":1.0855,"ask":1.0857},
      {"symbol":"EURUSD","ts":"2025-10-20T03:01:15.456Z","bid":1.0856,"ask":1.0858}
    ]
  }'"""
SEED_CURL_HEALTH = 'curl "$BASE_URL/health"'

# The seed's documented answers.
SEED_CANDLE_DETAIL = {
    "symbol": "EURUSD",
    "timeframe": "M1",
    "ts_original": "2025-10-20T03:00:00+00:00",
    "ts_bucket": "2025-10-20T03:00:00+00:00",
    "status": "inserted",
}
SEED_CANDLE_ANSWER: dict[str, Any] = {
    "ok": True,
    "received": 1,
    "inserted": 1,
    "duplicates": 0,
    "details": [
        {
            "symbol": "EURUSD",
            "timeframe": "M1",
            "ts_original": "2025-10-20T03:00:00+00:00",
            "ts_bucket": "2025-10-20T03:00:00+00:00",
            "status": "inserted",
        }
    ],
}
SEED_TICK_ANSWER = {
    "ok": True,
    "received": 2,
    "details": [
        {
            "symbol": "EURUSD",
            "ts_original": "2025-10-20T03:01:10.123Z",
            "ts_bucket": "2025-10-20T03:01:00+00:00",
            "status": "received",
        },
        {
            "symbol": "EURUSD",
            "ts_original": "2025-10-20T03:01:15.456Z",
            "ts_bucket": "2025-10-20T03:01:00+00:00",
            "status": "received",
        },
    ],
}
TIMESTAMP_KEYS = {"ts_original", "ts_bucket", "timestamp", "ts"}


def matches_seed(actual: Any, seed: Any) -> bool:
    """Every key the seed shows is there with the same value; timestamps compare as instants
    (we print RFC 3339 with "Z", the seed printed Python's "+00:00"); extra keys are allowed."""
    if isinstance(seed, dict):
        return isinstance(actual, dict) and all(
            k in actual
            and (_same_instant(actual[k], v) if k in TIMESTAMP_KEYS else matches_seed(actual[k], v))
            for k, v in seed.items()
        )
    if isinstance(seed, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(seed)
            and all(matches_seed(a, s) for a, s in zip(actual, seed, strict=True))
        )
    return bool(actual == seed)


def _same_instant(a: str, b: str) -> bool:
    return dt.datetime.fromisoformat(a) == dt.datetime.fromisoformat(b)


def curl(mesh: Mesh, command: str) -> Any:
    result = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"PATH": "/usr/bin:/bin", "API_KEY": API_KEY, "BASE_URL": mesh.url},
    )
    return json.loads(result.stdout)


def post(mesh: Mesh, path: str, body: Any, key: str | None = API_KEY, **kwargs: Any) -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"X-API-Key": key} if key is not None else {})
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(mesh.url + path, content=content, headers=headers, timeout=30, **kwargs)


def candle(symbol: str, **changes: Any) -> dict[str, Any]:
    return SEED_CANDLE | {"symbol": symbol} | changes


def violations(response: httpx.Response) -> set[str]:
    body = response.json()
    return {v["field"] for d in body.get("details", []) for v in d.get("field_violations", [])}


def test_seed_curl_examples_verbatim_get_seed_answers(mesh: Mesh) -> None:
    assert matches_seed(curl(mesh, SEED_CURL_BATCH), SEED_CANDLE_ANSWER)
    assert matches_seed(curl(mesh, SEED_CURL_TICKS), SEED_TICK_ANSWER)
    health = curl(mesh, SEED_CURL_HEALTH)
    assert health["status"] == "healthy"
    assert dt.datetime.fromisoformat(health["timestamp"])


def test_ingest_envelope_single_and_batch_forms_all_store(mesh: Mesh) -> None:
    envelope = post(mesh, "/ingest", {"items": [candle("ENV1")]})
    single = post(mesh, "/ingest", candle("SGL1"))
    batch = post(mesh, "/ingest_batch", [candle("BAT1"), candle("BAT2")])
    for response in (envelope, single, batch):
        assert response.status_code == 200, response.text
        assert response.json()["ok"] is True
    assert matches_seed(
        single.json(),
        SEED_CANDLE_ANSWER | {"details": [SEED_CANDLE_DETAIL | {"symbol": "SGL1"}]},
    )
    assert batch.json()["inserted"] == 2
    assert [mesh.count_candles(s) for s in ("ENV1", "SGL1", "BAT1", "BAT2")] == [1, 1, 1, 1]


def test_ingest_json_prints_zero_values_and_timeframe_names(mesh: Mesh) -> None:
    body = post(mesh, "/ingest_batch", [candle("ZERO1", timeframe="H4", ts="2025-10-20T07:30:00Z")]).json()
    assert body["duplicates"] == 0
    assert body["updated"] == 0
    assert body["details"][0]["timeframe"] == "H4"
    assert body["details"][0]["ts_bucket"] == "2025-10-20T04:00:00Z"


def test_ingest_replayed_request_changes_no_rows(mesh: Mesh) -> None:
    payload = [candle("RPL1"), candle("RPL2")]
    first = post(mesh, "/ingest_batch", payload).json()
    again = post(mesh, "/ingest_batch", payload).json()
    assert (first["inserted"], again["inserted"], again["duplicates"]) == (2, 0, 2)
    assert [d["status"] for d in again["details"]] == ["duplicate", "duplicate"]
    assert mesh.count_candles("RPL1") == 1


def test_ingest_changed_candle_is_updated_in_place(mesh: Mesh) -> None:
    post(mesh, "/ingest_batch", [candle("UPD1")])
    changed = post(mesh, "/ingest_batch", [candle("UPD1", close=1.0857)]).json()
    assert changed["updated"] == 1
    assert changed["details"][0]["status"] == "updated"
    assert mesh.count_candles("UPD1") == 1


def test_ingest_ticks_replayed_are_duplicates_and_rows_unchanged(mesh: Mesh) -> None:
    ticks = {"ticks": [{"symbol": "TCK1", "ts": "2025-10-20T03:01:10.123Z", "bid": 1.0855, "ask": 1.0857}]}
    assert post(mesh, "/ingest/tick", ticks).json()["details"][0]["status"] == "received"
    again = post(mesh, "/ingest/tick", ticks).json()
    assert again["details"][0]["status"] == "duplicate"
    assert mesh.count_ticks("TCK1") == 1


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"symbol": ""}, "items[1].symbol"),
        ({"symbol": "EURUSD'; DROP TABLE ingest_candles;--"}, "items[1].symbol"),
        ({"open": "NaN"}, "items[1].open"),
        ({"close": "Infinity"}, "items[1].close"),
        ({"low": "-Infinity"}, "items[1].low"),
        ({"open": 0}, "items[1].open"),
        ({"high": 1.0850}, "items[1].high"),
        ({"low": 1.0858}, "items[1].low"),
        ({"volume": -1}, "items[1].volume"),
        ({"spread": -2}, "items[1].spread"),
        ({"ts": "1989-12-31T23:59:59Z"}, "items[1].ts"),
        ({"ts": "2999-01-01T00:00:00Z"}, "items[1].ts"),
    ],
)
def test_ingest_batch_one_bad_item_400_names_index_and_field_stores_nothing(
    mesh: Mesh, item: dict[str, Any], field: str
) -> None:
    symbol = f"BAD{abs(hash(field + json.dumps(item))) % 10**6}"
    good = candle(symbol)
    bad = candle(symbol, ts="2025-10-20T03:01:00Z") | item
    response = post(mesh, "/ingest_batch", [good, bad])
    assert response.status_code == 400, response.text
    assert field in violations(response)
    assert mesh.count_candles(symbol) == 0


def test_ingest_tick_ask_below_bid_400_names_field(mesh: Mesh) -> None:
    response = post(
        mesh,
        "/ingest/tick",
        {"ticks": [{"symbol": "TBAD", "ts": "2025-10-20T03:01:10Z", "bid": 1.1, "ask": 1.0}]},
    )
    assert response.status_code == 400
    assert violations(response) == {"ticks[0].ask"}
    assert mesh.count_ticks("TBAD") == 0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([candle("ENUM1", timeframe="M2")], "timeframe"),
        ('[{"symbol": "EURUSD", ', ""),
        ([candle("TYPE1", open="abc")], "open"),
        ([], "items"),
        ({"items": [candle("MIX1")], "symbol": "MIX1"}, "items"),
    ],
)
def test_ingest_malformed_or_mistyped_body_400_with_clear_answer(
    mesh: Mesh, body: Any, fragment: str
) -> None:
    path = "/ingest" if isinstance(body, dict) else "/ingest_batch"
    response = post(mesh, path, body)
    assert response.status_code == 400, response.text
    assert fragment in response.text


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef"])
def test_ingest_missing_or_wrong_key_401(mesh: Mesh, key: str | None) -> None:
    response = post(mesh, "/ingest_batch", [candle("AUTH1")], key=key)
    assert response.status_code == 401
    assert mesh.count_candles("AUTH1") == 0


def test_ingest_oversize_body_413(mesh: Mesh) -> None:
    body = "[" + ",".join([json.dumps(candle("BIG1"))] * 40_000) + "]"
    assert len(body) > 4 * 1024 * 1024
    response = post(mesh, "/ingest_batch", body)
    assert response.status_code == 413
    assert mesh.count_candles("BIG1") == 0


def test_ingest_too_many_items_400_names_items(mesh: Mesh) -> None:
    response = post(mesh, "/ingest_batch", [candle("MANY1")] * 10_001)
    assert response.status_code == 400
    assert "items" in violations(response)


@pytest.mark.parametrize(
    "path",
    [
        "/signals?timeframe=M1",
        "/signals/latest?timeframe=M1",
        "/signals/history?symbol=EURUSD&timeframe=M1",
        "/v1/signals?timeframe=M1",
        "/model",
    ],
)
def test_signal_routes_without_a_trained_model_answer_503_not_a_fake_value(mesh: Mesh, path: str) -> None:
    response = httpx.get(mesh.url + path, headers={"X-API-Key": API_KEY})
    assert response.status_code == 503
    assert "no model: run mt5mesh train" in response.text


def test_health_one_service_down_503_names_it(mesh: Mesh) -> None:
    aggregator = mesh.services["aggregator"]
    aggregator.kill()
    try:
        response = httpx.get(mesh.url + "/health", timeout=10)
        assert response.status_code == 503
        assert "aggregator" in response.text
    finally:
        aggregator.start()
    wait_until(
        lambda: httpx.get(mesh.url + "/health", timeout=10).status_code == 200, 15, what="healthy again"
    )

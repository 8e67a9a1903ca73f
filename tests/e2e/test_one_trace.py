"""One EA POST that closes a bar: one trace from Envoy through every stage to the signal."""

from __future__ import annotations

import dataclasses
import datetime as dt
import pathlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.test_signals import _candles
from tests.helpers import API_KEY, RunningMesh, running_mesh, sqlite_url, wait_until
from tests.inference_models import save_model
from tests.otlp_receiver import CollectedSpan, OtlpReceiver, find

pytestmark = pytest.mark.envoy

HEADERS = {"X-API-Key": API_KEY}
HISTORY = 120  # candles before the traced one: enough for every indicator and a window of 3
START = dt.datetime(2025, 6, 2, tzinfo=dt.UTC)


@dataclasses.dataclass
class Traced:
    mesh: RunningMesh
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    workdir: pathlib.Path = tmp_path_factory.mktemp("one-trace")
    with (
        OtlpReceiver() as receiver,
        running_mesh(sqlite_url(workdir), workdir, otlp_endpoint=receiver.endpoint) as mesh,
    ):
        save_model(mesh.models_dir, window=3)
        yield Traced(mesh, receiver)


def _signal_at(mesh: RunningMesh, ts: dt.datetime) -> bool:
    response = httpx.get(mesh.url + "/signals", params={"timeframe": "M1"}, headers=HEADERS, timeout=10)
    if response.status_code != 200:
        return False
    wanted = ts.isoformat().replace("+00:00", "Z")
    return any(s["symbol"] == "SIGUSD" and s["ts"] == wanted for s in response.json())


def _only(spans: list[CollectedSpan], what: str) -> CollectedSpan:
    assert len(spans) == 1, f"expected one {what}, got {len(spans)}"
    return spans[0]


def test_ea_post_closing_a_bar_one_trace_envoy_to_signal(traced: Traced) -> None:
    mesh, receiver = traced.mesh, traced.receiver
    history = _candles(0, HISTORY)
    for a in range(0, HISTORY, 60):
        reply = httpx.post(mesh.url + "/ingest_batch", json=history[a : a + 60], headers=HEADERS, timeout=30)
        assert reply.status_code == 200, reply.text
    wait_until(
        lambda: _signal_at(mesh, START + dt.timedelta(minutes=HISTORY - 1)), 60, what="history signals"
    )
    receiver.clear()

    # The EA posts the next M1 candle: final as posted, it closes its bar.
    (candle,) = _candles(HISTORY, 1)
    reply = httpx.post(mesh.url + "/ingest", json=candle, headers=HEADERS, timeout=10)
    assert reply.status_code == 200, reply.text

    def chain(spans: list[CollectedSpan]) -> dict[str, Any] | None:
        # The history went to /ingest_batch; the one POST to /ingest is the traced candle.
        gateways = [
            s
            for s in find(spans, service="gateway", kind="SERVER")
            if any(str(v).endswith("/ingest") for v in s.attributes.values())
        ]
        if len(gateways) != 1:
            return None
        trace = find(spans, trace_id=gateways[0].trace_id)
        names = {
            role: find(trace, service=service, name=name)
            for role, service, name in (
                ("ingest", "ingest", "/mt5.ingest.v1.IngestService/IngestCandles"),
                ("ingest_commit", "ingest", "ingest.commit"),
                ("aggregator_apply", "aggregator", "aggregator.apply_candle"),
                ("aggregator_commit", "aggregator", "aggregator.commit"),
                ("indicators_apply", "indicators", "indicators.apply"),
                ("indicators_commit", "indicators", "indicators.commit"),
                ("inference_apply", "inference", "inference.apply"),
                ("inference_commit", "inference", "inference.commit"),
            )
        }
        if not all(names.values()):
            return None
        return {"gateway": gateways[0], "trace": trace, **names}

    found = receiver.wait_for(chain, timeout=30)
    by_id = {s.span_id: s for s in found["trace"]}
    assert len({s.trace_id for s in found["trace"]}) == 1
    assert {s.service for s in found["trace"]} >= {
        "gateway",
        "ingest",
        "aggregator",
        "indicators",
        "inference",
    }

    # Each stage's span for the row is a child of the commit that wrote the row upstream, and each
    # commit a child of a span that applied one of its inputs.
    ingest_commit = _only(found["ingest_commit"], "ingest commit")
    aggregator_apply = _only(found["aggregator_apply"], "aggregator apply")
    assert aggregator_apply.parent_span_id == ingest_commit.span_id
    aggregator_commit = _only(found["aggregator_commit"], "aggregator commit")
    assert aggregator_commit.parent_span_id == aggregator_apply.span_id
    assert all(s.parent_span_id == aggregator_commit.span_id for s in found["indicators_apply"])
    # The bar closes M1 and may close higher timeframes: several values, perhaps several commits.
    applied = {s.span_id for s in found["indicators_apply"]}
    assert all(s.parent_span_id in applied for s in found["indicators_commit"])
    inference_apply = _only(found["inference_apply"], "inference apply")  # the model reads M1 only
    assert inference_apply.parent_span_id in {s.span_id for s in found["indicators_commit"]}
    assert inference_apply.attributes["mt5.symbol"] == "SIGUSD"
    inference_commit = _only(found["inference_commit"], "inference commit")
    assert inference_commit.parent_span_id == inference_apply.span_id

    # Walking up from the signal's commit reaches the gateway's span of the EA request.
    span, path = inference_commit, []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        path.append(span.service)
    assert span.span_id == found["gateway"].span_id
    assert path[-1] == "gateway"

    # And the signal of the candle the EA posted is there.
    wait_until(lambda: _signal_at(mesh, START + dt.timedelta(minutes=HISTORY)), 30, what="the signal")


def test_ea_tick_post_trace_continues_into_the_aggregator(traced: Traced) -> None:
    mesh, receiver = traced.mesh, traced.receiver
    receiver.clear()
    ts = (START + dt.timedelta(days=1, seconds=5)).isoformat().replace("+00:00", "Z")
    tick = {"symbol": "TICKTR", "ts": ts, "bid": 1.1, "ask": 1.1002}
    reply = httpx.post(mesh.url + "/ingest/tick", json={"ticks": [tick]}, headers=HEADERS, timeout=10)
    assert reply.status_code == 200, reply.text

    def chain(spans: list[CollectedSpan]) -> tuple[CollectedSpan, CollectedSpan, CollectedSpan] | None:
        commits = find(spans, service="ingest", name="ingest.commit")
        for commit in commits:
            applied = find(spans, service="aggregator", name="aggregator.apply_ticks", parent=commit)
            for apply in applied:
                committed = find(spans, service="aggregator", name="aggregator.commit", parent=apply)
                if committed:
                    return commit, apply, committed[0]
        return None

    commit, apply, aggregated = receiver.wait_for(chain, timeout=30)
    assert commit.trace_id == apply.trace_id == aggregated.trace_id
    gateway = find(receiver.spans(), service="gateway", kind="SERVER", trace_id=commit.trace_id)
    assert len(gateway) == 1  # the EA's request started the trace

"""Each stage's /metrics, scraped while ticks flow through ingest, the aggregator and indicators.

Real service processes on one SQLite database; every metrics endpoint is parsed with
prometheus_client's own parser, and the series the dashboard and alerts use must be there and move
as data goes through: requests and rejects by reason, items and duplicates, commit and statement
latency, per-symbol data age at every stage, each subscriber's feed lag, bar-close latency and
indicator update time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from mt5.ingest.v1 import ingest_service_pb2 as pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from mt5.market.v1 import market_pb2
from prometheus_client.parser import text_string_to_metric_families

from services.common.channels import open_channel
from services.common.protoconv import timestamp
from services.ingest.client import TickStreamer
from tests.helpers import API_KEY, ServiceProcess, free_port, make_service

SYMBOL = "OBSUSD"
Labels = tuple[tuple[str, str], ...]


@dataclasses.dataclass
class Stage:
    process: ServiceProcess
    metrics_port: int

    def scrape(self) -> dict[tuple[str, Labels], float]:
        """Every sample of the endpoint, by name and sorted labels."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@dataclasses.dataclass
class Pipeline:
    ingest: Stage
    aggregator: Stage
    indicators: Stage


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    workdir = tmp_path_factory.mktemp("metrics")
    url = f"sqlite:///{workdir / 'mt5mesh.db'}"
    stages: list[Stage] = []
    try:
        port = free_port()
        ingest = make_service("ingest", url, workdir, {"INGEST_METRICS_PORT": str(port)}).start()
        stages.append(Stage(ingest, port))
        port = free_port()
        aggregator = make_service(
            "aggregator",
            url,
            workdir,
            {
                "AGGREGATOR_INGEST_ADDRESS": ingest.address,
                "AGGREGATOR_METRICS_PORT": str(port),
                "AGGREGATOR_CLOCK_SECONDS": "0.05",
                "AGGREGATOR_FEED_POLL_SECONDS": "0.1",
            },
        ).start()
        stages.append(Stage(aggregator, port))
        port = free_port()
        indicators = make_service(
            "indicators",
            url,
            workdir,
            {
                "INDICATORS_AGGREGATOR_ADDRESS": aggregator.address,
                "INDICATORS_METRICS_PORT": str(port),
                "INDICATORS_FEED_POLL_SECONDS": "0.1",
            },
        ).start()
        stages.append(Stage(indicators, port))
        yield Pipeline(*stages)
    finally:
        for stage in reversed(stages):
            stage.process.kill()


def ticks(start: dt.datetime, count: int, step_seconds: float) -> list[list[market_pb2.Tick]]:
    """A random-walk-free, valid tick every ``step_seconds`` from ``start``, in batches of 100."""
    out = []
    for i in range(count):
        bid = round(1.08 + (i % 37) * 1e-5, 6)
        out.append(
            market_pb2.Tick(
                symbol=SYMBOL,
                ts=timestamp(start + dt.timedelta(seconds=i * step_seconds)),
                bid=bid,
                ask=round(bid + 2e-5, 6),
            )
        )
    return [out[i : i + 100] for i in range(0, len(out), 100)]


def value(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def labelled(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> list[dict[str, str]]:
    """The label sets of the samples of ``name`` that include ``labels``."""
    return [
        dict(ls)
        for (n, ls) in samples
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    ]


Samples = dict[tuple[str, Labels], float]


async def eventually(check: Callable[[Samples], object], stage: Stage, within: float = 30.0) -> Samples:
    """Scrape until ``check(samples)`` holds; return those samples."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        samples = await asyncio.to_thread(stage.scrape)
        if check(samples):
            return samples
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s on {stage.process.name}")
        await asyncio.sleep(0.2)


async def test_pipeline_metrics_present_and_moving_as_ticks_flow(pipeline: Pipeline) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    # 40 minutes of ticks ending a minute ago: the aggregator closes M1 bars, indicators update.
    first = ticks(now - dt.timedelta(minutes=41), 1200, 2.0)
    target = pipeline.ingest.process.address
    await TickStreamer(target, API_KEY, "metrics-a").send(first)

    ingest = await eventually(
        lambda s: (
            value(s, "mt5_ingest_items_total", kind="ticks", status="received") >= 1200
            and value(s, "mt5_feed_subscribers", feed="ingest.ticks") >= 1
            and labelled(s, "mt5_feed_lag_cursors", feed="ingest.ticks")
        ),
        pipeline.ingest,
    )
    aggregator = await eventually(
        lambda s: (
            value(s, "mt5_aggregator_ticks_total") >= 1200
            and value(s, "mt5_aggregator_bar_close_seconds_count", timeframe="M1") >= 30
            and value(s, "mt5_feed_subscribers", feed="aggregator.candles") >= 1
        ),
        pipeline.aggregator,
    )
    indicators = await eventually(
        lambda s: (
            value(s, "mt5_indicators_update_seconds_count") >= 30
            and value(s, "mt5_data_age_seconds", stage="indicators", symbol=SYMBOL) > 0
        ),
        pipeline.indicators,
    )

    # Requests by method and code; the stream and the aggregator's subscription are counted once each.
    assert value(ingest, "mt5_grpc_server_handled_total", grpc_method="StreamTicks", grpc_code="OK") == 1
    assert value(ingest, "mt5_grpc_server_started_total", grpc_method="SubscribeTicks") >= 1
    assert value(ingest, "mt5_ingest_commit_seconds_count") >= 1
    assert value(ingest, "mt5_db_query_seconds_count", operation="insert") >= 1
    # Data age per stage: the newest tick is a minute old.
    age = value(ingest, "mt5_data_age_seconds", stage="ingest", symbol=SYMBOL)
    assert 55 < age < 600
    assert 55 < value(aggregator, "mt5_data_age_seconds", stage="aggregator", symbol=SYMBOL) < 600
    # Each subscriber's lag: the aggregator on ingest's ticks, indicators on the aggregator's bars.
    (lag,) = labelled(ingest, "mt5_feed_lag_seconds", feed="ingest.ticks")
    assert lag["subscriber"].startswith("127.0.0.1:")
    assert value(aggregator, "mt5_feed_lag_seconds", feed="aggregator.candles") >= 0
    # Bar close latency: the bars closed minutes after their end (they were sent late).
    assert value(aggregator, "mt5_aggregator_bar_close_seconds_sum", timeframe="M1") > 0
    assert value(indicators, "mt5_indicators_commit_seconds_count") >= 1

    # More data: counters move, ages fall, lag returns to zero once the subscriber caught up.
    await asyncio.sleep(1.1)
    later = await asyncio.to_thread(pipeline.ingest.scrape)
    assert value(later, "mt5_data_age_seconds", stage="ingest", symbol=SYMBOL) > age  # nothing new yet
    await TickStreamer(target, API_KEY, "metrics-b").send(ticks(now - dt.timedelta(seconds=50), 20, 2.0))
    ingest2 = await eventually(
        lambda s: (
            value(s, "mt5_ingest_items_total", kind="ticks", status="received") >= 1220
            and value(s, "mt5_feed_lag_cursors", feed="ingest.ticks") == 0
        ),
        pipeline.ingest,
    )
    assert value(ingest2, "mt5_data_age_seconds", stage="ingest", symbol=SYMBOL) < age
    assert value(ingest2, "mt5_grpc_server_handled_total", grpc_method="StreamTicks", grpc_code="OK") == 2
    aggregator2 = await eventually(
        lambda s: value(s, "mt5_aggregator_ticks_total") >= 1220, pipeline.aggregator
    )
    assert value(aggregator2, "mt5_aggregator_input_cursor") > value(
        aggregator, "mt5_aggregator_input_cursor"
    )


async def test_rejects_counted_by_reason_and_code(pipeline: Pipeline) -> None:
    bad = market_pb2.Tick(
        symbol=SYMBOL, ts=timestamp(dt.datetime.now(dt.UTC)), bid=1.1, ask=1.0
    )  # ask below bid
    before = await asyncio.to_thread(pipeline.ingest.scrape)
    async with open_channel(pipeline.ingest.process.address, API_KEY) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await pb_grpc.IngestServiceStub(channel).IngestTicks(pb.IngestTicksRequest(ticks=[bad]))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with grpc.aio.insecure_channel(pipeline.ingest.process.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.IngestServiceStub(channel).IngestTicks(
                pb.IngestTicksRequest(ticks=[bad]), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = await asyncio.to_thread(pipeline.ingest.scrape)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mt5_ingest_rejected_requests_total", kind="ticks", reason="ask") == 1
    handled = "mt5_grpc_server_handled_total"
    assert moved(handled, grpc_method="IngestTicks", grpc_code="INVALID_ARGUMENT") == 1
    assert moved(handled, grpc_method="IngestTicks", grpc_code="UNAUTHENTICATED") == 1
    assert moved("mt5_grpc_server_handling_seconds_count", grpc_method="IngestTicks") == 2

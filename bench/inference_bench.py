"""Inference benchmark: ``make bench-inference`` (``python -m bench.inference_bench``).

All in one run on this machine, with a model of the training defaults' shape (window 10, hidden layers
(64, 32): a seeded ``SignalNet`` saved through ``ModelRegistry`` and loaded with ``ModelHolder``, as the
service loads it):

(a), (b) the serving path in-process, 500 symbols: a real ``InferenceStage`` (its ``_apply``, ``_bursts``
    and ``_collect``; the commit to the database replaced by a stand-in that only takes the signals) and
    a real ``MicroBatcher``: (a) dynamic batching with the service's defaults (max batch 512, max wait
    2 ms), (b) max batch 1 (``INFERENCE_MAX_BATCH=1``: every candle's feature row is built and scored
    alone). Every simulated minute, the final indicator values of all 500 symbols arrive together as
    ``SubscribeIndicatorsResponse`` messages; each one updates its series' history and joins the open
    burst; a burst's rows are built in one vectorised step and scored; the results are taken back in
    feed order. The stage gets one event-loop turn per message (a gRPC stream read gives one).
    Signals/s over 20 minutes, best of 3 runs; the signals are checked against the offline path
    (``feature_rows`` over the whole series, one forward pass). Also, to show where the time goes: the
    stage's work per candle without the queues and the forward pass, and ``Scorer.probabilities``
    alone at batch sizes 1 to 512;
(t) the network's execution: eager (as served; also with one intra-op thread), ``torch.jit.trace``
    (also frozen with ``torch.jit.optimize_for_inference``) and ``torch.compile`` (inductor), each
    through the same steps as ``Scorer.probabilities``, at batch 1 and 512; outputs checked against
    eager (``torch.jit.script`` cannot compile ``SignalNet``: its annotations are strings);
(c) end to end on PostgreSQL: real ingest, aggregator, indicators and inference processes on loopback,
    the model in ``INFERENCE_MODELS_DIR``. N symbols, one minute at a time: with ``ticks`` (default),
    one ``IngestTicks`` request per minute holding a few ticks of every symbol, whose first tick makes
    every symbol's previous M1 bar final at once; with ``ea``, one ``IngestCandles`` request per minute
    holding every symbol's EA candle (final as posted). 75 minutes of history first, then each live
    minute once every signal of the previous one has arrived and a short pause has passed. This process
    subscribes at once to the aggregator's ``SubscribeCandles`` (final M1), the indicators'
    ``SubscribeIndicators`` (M1) and inference's ``SubscribeSignals`` (M1). Latency of a candle =
    arrival of its signal minus arrival of its final bar (the same ``time.monotonic()`` clock), split
    at the arrival of its indicator values; run with ticks for 10 and for 500 symbols and with EA
    candles for 10. The inference process's VmRSS is sampled throughout (and its VmHWM read); the
    signals received are checked against offline scoring of the indicator values received.

Results go to ``bench/results/inference.json`` and a table is printed; targets are judged in the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import math
import pathlib
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import sqlalchemy
import torch
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2
from mt5.aggregator.v1 import aggregator_service_pb2 as agg_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as agg_grpc
from mt5.indicators.v1 import indicators_service_pb2 as ind_pb
from mt5.indicators.v1 import indicators_service_pb2_grpc as ind_grpc
from mt5.inference.v1 import inference_service_pb2 as inf_pb
from mt5.inference.v1 import inference_service_pb2_grpc as inf_grpc
from mt5.ingest.v1 import ingest_service_pb2 as ingest_pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from mt5.market.v1 import market_pb2
from prometheus_client import REGISTRY

from bench.common import (
    MIB,
    CpuMeter,
    RssSampler,
    ScenarioFailed,
    machine_info,
    metric_delta,
    postgres_pids,
    publish,
    scrape,
    scratch_folder,
    stats_ms,
    status_kb,
    step,
    wait_for_quiet,
)
from services.aggregator.bars import AggregationSettings
from services.common.channels import api_key_metadata
from services.common.market import Timeframe, to_us
from services.common.protoconv import timestamp, to_datetime
from services.inference.config import SERVICE_NAME, InferenceConfig
from services.inference.convert import inputs_from_pb
from services.inference.domain import Inputs, SeriesHistory
from services.inference.features import (
    FEATURES,
    INPUTS,
    complete,
    feature_rows,
    history_needed,
    last_rows,
)
from services.inference.model import SignalNet
from services.inference.registry import Manifest, ModelRegistry
from services.inference.serving import MicroBatcher, ModelHolder
from services.inference.stage import REVISION_SLACK, InferenceStage
from services.inference.store import SignalStore, SignalWork
from services.inference.training import TrainingSettings
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "bench" / "results" / "inference.json"
QUICK_OUTPUT = pathlib.Path(tempfile.gettempdir()) / "inference-bench-quick.json"
MODEL_NAME = "signals"
TRAINING = TrainingSettings()  # the model's shape: the training defaults (window 10, hidden (64, 32))
WINDOW = TRAINING.window
NEEDED = history_needed(WINDOW)  # candles a feature row reads (69)
SIM_START = dt.datetime(2025, 11, 3, tzinfo=dt.UTC)  # the in-process series' first minute
UNUSED_ADDRESS = "127.0.0.1:9"  # the in-process stage's indicators channel: never called
FORWARD_BATCHES = (1, 8, 32, 128, 512)
MAX_ITEMS_PER_REQUEST = 10_000  # IngestCandles' and IngestTicks' limit
HISTORY_CHUNK = 2_000  # (c) candles of history posted at once (see ``Feed``)
# Scales of the synthetic market per feature (close, volume, spread, rsi, macd, macd_signal, macd_hist,
# atr, ma60, ret_1), so that the seeded network's probabilities spread out.
FEATURE_MEAN = np.array([1.08, 100.0, 2.0, 50.0, 0.0, 0.0, 0.0, 3e-4, 1.08, 0.0])
FEATURE_SCALE = np.array([0.01, 30.0, 1.0, 15.0, 3e-4, 3e-4, 1e-4, 1e-4, 0.01, 3e-4])

TARGETS: dict[str, tuple[str, str, float]] = {
    "ab_ratio": ("(a) / (b): signals/s, dynamic batching vs batch 1", ">=", 20.0),
    "inference_rss_mb": ("inference RSS (VmHWM), MB", "<=", 700.0),
}
P99_TARGET_MS = 10.0  # (c), for every number of symbols run
MIN_E2E_CANDLES = 200  # the latency target is stated over at least this many candles

Array = npt.NDArray[np.float64]
Key = tuple[str, int]  # symbol, candle start in µs


@dataclasses.dataclass(frozen=True)
class Params:
    """What one run measures; see ``parse_args``."""

    symbols: int
    minutes: int
    warmup_minutes: int
    repeats: int
    forward_calls: int
    variant_calls: int
    compile: bool
    e2e_runs: tuple[tuple[str, int], ...]  # (input, symbols)
    ticks_per_minute: int
    e2e_candles: int
    e2e_min_minutes: int
    e2e_warmup_minutes: int
    backfill_minutes: int
    gap_seconds: float
    minute_timeout: float
    backfill_timeout: float
    service_env: dict[str, str]
    wait_quiet: float
    noisy_retries: int
    quick: bool
    output: pathlib.Path

    @property
    def lateness_seconds(self) -> float:
        """The aggregator's allowed lateness, as the services run with it."""
        default = AggregationSettings().lateness.total_seconds()
        return float(self.service_env.get("AGGREGATOR_LATENESS_SECONDS", default))

    def live_minutes(self, symbols: int) -> int:
        """Live minutes of an end-to-end run (warm-up included)."""
        return self.e2e_warmup_minutes + max(self.e2e_min_minutes, math.ceil(self.e2e_candles / symbols))


# --- the model ------------------------------------------------------------------------------------


def save_model(root: pathlib.Path, seed: int = 0) -> Manifest:
    """A ``SignalNet`` of the training defaults' shape with seeded weights, standardized for the synthetic
    market, saved through the registry as a new version of ``signals``."""
    torch.manual_seed(seed)
    net = SignalNet(WINDOW * len(FEATURES), TRAINING.hidden, TRAINING.dropout)
    net.set_standardization(np.tile(FEATURE_MEAN, WINDOW), np.tile(FEATURE_SCALE, WINDOW))
    manifest = Manifest(
        name=MODEL_NAME,
        version="",
        created="",
        timeframe="M1",
        symbols=(),
        data_from="2025-01-01T00:00:00+00:00",
        data_to="2025-01-02T00:00:00+00:00",
        features=FEATURES,
        window=WINDOW,
        horizon=TRAINING.horizon,
        threshold=0.5,
        hidden=TRAINING.hidden,
        seed=seed,
        metrics={"model": {"accuracy": 0.5, "f1": 0.5, "log_loss": 0.69}},
        weights_file="",
        weights_sha256="",
        torch_version="",
    )
    return ModelRegistry(root).save(net, manifest)


def load_holder(root: pathlib.Path) -> ModelHolder:
    """The served model as the service loads it: verified, warmed up, installed."""
    holder = ModelHolder(ModelRegistry(root), MODEL_NAME)
    model = holder.find()
    if model is None:
        raise ScenarioFailed(f"the saved model was refused: {holder.refused}")
    holder.install(model)
    return holder


# --- the synthetic market -------------------------------------------------------------------------


def synthetic_inputs(symbols: int, minutes: int, seed: int) -> Array:
    """``(symbols, minutes, len(INPUTS))`` candle values of a random-walk market; every value finite."""
    rng = np.random.default_rng(seed)
    shape = (symbols, minutes)
    close = 1.08 + np.cumsum(rng.normal(0.0, 3e-4, shape), axis=1)
    macd = rng.normal(0.0, 3e-4, shape)
    signal = rng.normal(0.0, 3e-4, shape)
    columns = {
        "close": close,
        "volume": rng.integers(50, 150, shape).astype(np.float64),
        "spread": rng.integers(1, 4, shape).astype(np.float64),
        "rsi": np.clip(rng.normal(50.0, 15.0, shape), 1.0, 99.0),
        "macd": macd,
        "macd_signal": signal,
        "macd_hist": macd - signal,
        "atr": np.abs(rng.normal(3e-4, 1e-4, shape)) + 1e-5,
    }
    return np.stack([columns[name] for name in INPUTS], axis=2)


def symbol_names(count: int) -> list[str]:
    return [f"S{k:03d}" for k in range(count)]


def values_message(symbol: str, ts: dt.datetime, inputs: Sequence[float], cursor: int) -> Any:
    """A final candle's values as the indicators' feed delivers them to the inference stage."""
    named = dict(zip(INPUTS, (float(x) for x in inputs), strict=True))
    return ind_pb.SubscribeIndicatorsResponse(
        cursor=cursor,
        values=market_pb2.IndicatorValues(
            symbol=symbol, timeframe=market_pb2.M1, ts=timestamp(ts), revision=0, final=True, **named
        ),
    )


@dataclasses.dataclass(frozen=True)
class Market:
    """The in-process runs' input: history held before the first minute, then one burst per minute."""

    names: list[str]
    inputs: Array  # (symbols, history + minutes, len(INPUTS))
    history: int  # candles per series held before the first burst
    bursts: list[list[Any]]  # per minute, one values message per symbol

    def ts(self, index: int) -> dt.datetime:
        return SIM_START + dt.timedelta(minutes=index)

    def histories(self) -> dict[tuple[str, Timeframe], SeriesHistory]:
        """Each series as the stage holds it in steady state: the last candles it needs and its slack."""
        return {
            (name, Timeframe.M1): SeriesHistory(
                NEEDED + REVISION_SLACK,
                [(self.ts(j), tuple(self.inputs[i, j].tolist())) for j in range(self.history)],
                from_start=False,
            )
            for i, name in enumerate(self.names)
        }


def make_market(symbols: int, minutes: int) -> Market:
    history = NEEDED + REVISION_SLACK
    inputs = synthetic_inputs(symbols, history + minutes, seed=5)
    names = symbol_names(symbols)
    cursor = 0
    bursts = []
    for m in range(minutes):
        burst = []
        for i, name in enumerate(names):
            cursor += 1
            burst.append(
                values_message(
                    name, SIM_START + dt.timedelta(minutes=history + m), inputs[i, history + m], cursor
                )
            )
        bursts.append(burst)
    return Market(names, inputs, history, bursts)


# --- (a), (b): the serving path in-process --------------------------------------------------------


def batch_metrics() -> dict[str, float]:
    """The batcher's histograms in this process (the service's own metric objects)."""
    names = (
        "mt5_inference_batch_size_count",
        "mt5_inference_batch_size_sum",
        "mt5_inference_score_seconds_sum",
        "mt5_inference_queue_seconds_count",
        "mt5_inference_queue_seconds_sum",
    )
    return {name: REGISTRY.get_sample_value(name) or 0.0 for name in names}


def service_config() -> InferenceConfig:
    return InferenceConfig.from_env({"MT5MESH_API_KEY": helpers.API_KEY, "DATABASE_URL": "sqlite://"})


async def serve_minutes(
    holder: ModelHolder, market: Market, max_batch: int, max_wait: float, warmup: int
) -> dict[str, Any]:
    """Feed every burst through a real stage and batcher; the figures of the minutes after ``warmup``."""
    config = service_config()
    batcher = MicroBatcher(holder, max_batch, max_wait, config.max_queue)
    engine = sqlalchemy.create_engine("sqlite://")  # the store is never used: nothing is committed
    channel = grpc.aio.insecure_channel(UNUSED_ADDRESS)  # histories are held: the stage never calls it
    stage = InferenceStage(config, SignalStore(engine), channel, holder, batcher)
    stage._shape = (Timeframe.M1, WINDOW)
    stage._series = market.histories()
    signals: dict[Key, float] = {}
    target = 0
    taken = 0
    minute_done = asyncio.Event()

    async def take() -> None:
        """``InferenceStage._committer`` without the database: takes each unit of work's signals."""
        nonlocal taken
        while True:
            await stage._work_ready.wait()
            stage._work_ready.clear()
            work, stage._pending = stage._pending, SignalWork()
            for s in work.signals:
                signals[(s.symbol, int(s.ts.timestamp() * 1_000_000))] = s.prob_up
            taken += len(work.signals)
            if taken >= target:
                minute_done.set()

    tasks = [asyncio.create_task(t) for t in (batcher.run(), stage._bursts(), stage._collect(), take())]
    minute_wall: list[float] = []
    wall0 = cpu0 = 0.0
    before: dict[str, float] = {}
    try:
        for m, burst in enumerate(market.bursts):
            if m == warmup:
                before = batch_metrics()
                wall0, cpu0 = time.perf_counter(), time.process_time()
            minute_done.clear()
            target += len(burst)
            t0 = time.perf_counter()
            for item in burst:
                await stage._apply(item, Timeframe.M1, WINDOW)
                await asyncio.sleep(0)  # a stream read's turn of the event loop
            await asyncio.wait_for(minute_done.wait(), 60)
            minute_wall.append(time.perf_counter() - t0)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        after = batch_metrics()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()
        engine.dispose()
    measured = sum(len(b) for b in market.bursts[warmup:])
    batches = metric_delta(before, after, "mt5_inference_batch_size_count")
    rows = metric_delta(before, after, "mt5_inference_batch_size_sum")
    return {
        "wall": wall,
        "cpu": cpu,
        "signals": measured,
        "minute_ms": [round(x * 1000, 3) for x in minute_wall[warmup:]],
        "forward_passes": int(batches),
        "mean_rows_per_forward_pass": round(rows / batches, 1) if batches else None,
        "forward_seconds": metric_delta(before, after, "mt5_inference_score_seconds_sum"),
        "mean_queue_ms": round(
            metric_delta(before, after, "mt5_inference_queue_seconds_sum")
            / max(1.0, metric_delta(before, after, "mt5_inference_queue_seconds_count"))
            * 1000,
            3,
        ),
        "probabilities": signals,
    }


def offline_probabilities(holder: ModelHolder, market: Market) -> dict[Key, float]:
    """Every burst's candle scored the offline way: ``feature_rows`` over the whole series, one pass."""
    scorer = holder.require().scorer
    first = market.history
    out: dict[Key, float] = {}
    for i, name in enumerate(market.names):
        rows = feature_rows(market.inputs[i], WINDOW)[first:]
        for k, p in enumerate(scorer.probabilities(rows).tolist()):
            out[(name, int(market.ts(first + k).timestamp() * 1_000_000))] = p
    return out


def compare(got: dict[Key, float], expected: dict[Key, float]) -> dict[str, Any]:
    common = sorted(set(got) & set(expected))
    diff = max((abs(got[k] - expected[k]) for k in common), default=math.nan)
    return {
        "signals": len(got),
        "missing": len(set(expected) - set(got)),
        "extra": len(set(got) - set(expected)),
        "max_abs_diff": diff,
        "ok": set(got) == set(expected) and diff <= 1e-6,
    }


def serving_config(
    holder: ModelHolder,
    market: Market,
    params: Params,
    max_batch: int,
    max_wait: float,
    offline: dict[Key, float],
) -> dict[str, Any]:
    """Best of ``repeats`` runs (least wall time) of one batcher configuration."""
    runs = [
        asyncio.run(serve_minutes(holder, market, max_batch, max_wait, params.warmup_minutes))
        for _ in range(params.repeats)
    ]
    best = min(runs, key=lambda r: r["wall"])
    minute = np.array(best["minute_ms"]) / 1000
    # The warm-up minutes are scored too; the check covers the measured ones.
    measured_keys = {
        (name, int(market.ts(market.history + m).timestamp() * 1_000_000))
        for m in range(params.warmup_minutes, len(market.bursts))
        for name in market.names
    }
    got = {k: v for k, v in best["probabilities"].items() if k in measured_keys}
    return {
        "max_batch": max_batch,
        "max_wait_ms": max_wait * 1000,
        "symbols": len(market.names),
        "minutes_measured": len(market.bursts) - params.warmup_minutes,
        "signals_measured": best["signals"],
        "signals_per_s": round(best["signals"] / best["wall"]),
        "us_per_signal_wall": round(best["wall"] / best["signals"] * 1e6, 2),
        "us_per_signal_cpu": round(best["cpu"] / best["signals"] * 1e6, 2),
        "cores": round(best["cpu"] / best["wall"], 2),
        "signals_per_s_by_run": [round(r["signals"] / r["wall"]) for r in runs],
        "burst_ms": stats_ms(minute),
        "forward_passes": best["forward_passes"],
        "mean_rows_per_forward_pass": best["mean_rows_per_forward_pass"],
        "forward_us_per_signal": round(best["forward_seconds"] / best["signals"] * 1e6, 2),
        "mean_queue_ms": best["mean_queue_ms"],
        "vs_offline": compare(got, {k: v for k, v in offline.items() if k in measured_keys}),
    }


def row_costs(holder: ModelHolder, market: Market, repeats: int) -> dict[str, Any]:
    """The stage's work per candle besides its queues and the forward pass, best of ``repeats``: taking a
    message into a burst (its values, the history update, the copy of the candles its row needs), then
    per burst its rows in one step (``last_rows``) and their checks."""
    bursts = market.bursts
    scorer = holder.require().scorer

    def intake(series: dict[tuple[str, Timeframe], SeriesHistory]) -> list[Array]:
        out = []
        for burst in bursts:
            windows = np.empty((len(burst), NEEDED, len(INPUTS)))
            for k, item in enumerate(burst):
                values = item.values
                symbol, ts = values.symbol, to_datetime(values.ts)
                history = series[(symbol, Timeframe.M1)]
                history.covers(ts)
                history.put(ts, inputs_from_pb(values))
                history.window(ts, NEEDED, windows[k])
            out.append(windows)
        return out

    def message_only(_: None) -> None:
        for burst in bursts:
            for item in burst:
                values = item.values
                (values.symbol, to_datetime(values.ts), inputs_from_pb(values))

    windows = intake(market.histories())

    def rows_and_checks(_: None) -> None:
        for w in windows:
            rows = last_rows(w, WINDOW)
            fit = np.flatnonzero(~np.isnan(rows).any(axis=1))
            scorer.out_of_range(rows[fit]).any(axis=1)

    count = sum(len(b) for b in bursts)

    def best_us(run: Callable[[Any], object], setup: Callable[[], Any] = lambda: None) -> float:
        times = []
        for _ in range(repeats):
            state = setup()  # before the clock starts
            t0 = time.perf_counter()
            run(state)
            times.append(time.perf_counter() - t0)
        return round(min(times) / count * 1e6, 2)

    taken = best_us(intake, market.histories)  # fresh histories each time
    message = best_us(message_only)
    rows = best_us(rows_and_checks)
    return {
        "candles": count,
        "candles_per_burst": len(bursts[0]),
        "us_per_candle": round(taken + rows, 2),
        "of_which_message_to_values_us": message,
        "of_which_history_and_window_us": round(taken - message, 2),
        "of_which_rows_and_checks_us": rows,
    }


def time_calls(run: Callable[[], object], calls: int, repeats: int) -> dict[str, float]:
    """µs per call: the wall time of the best of ``5 * repeats`` loops of ``calls / 5`` calls (short loops,
    so that one of them runs undisturbed on this shared machine), and that loop's process CPU time (all
    threads: torch's intra-op threads included)."""
    run()
    best = (math.inf, 0.0)
    calls = max(1, calls // 5)
    for _ in range(5 * repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            run()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if wall < best[0]:
            best = (wall, cpu)
    return {"us_wall": round(best[0] / calls * 1e6, 2), "us_cpu": round(best[1] / calls * 1e6, 2)}


def forward_costs(holder: ModelHolder, params: Params) -> dict[str, Any]:
    """``Scorer.probabilities`` + ``labels`` (what ``MicroBatcher._score`` calls) per batch size."""
    scorer = holder.require().scorer
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {}
    for batch in FORWARD_BATCHES:
        rows = np.tile(FEATURE_MEAN, WINDOW) + rng.normal(
            0.0, 1.0, (batch, WINDOW * len(FEATURES))
        ) * np.tile(FEATURE_SCALE, WINDOW)
        calls = max(20, params.forward_calls // batch)

        def score(rows: Array = rows) -> object:
            return scorer.labels(scorer.probabilities(rows))

        t = time_calls(score, calls, params.repeats)
        out[str(batch)] = t | {
            "us_wall_per_row": round(t["us_wall"] / batch, 3),
            "us_cpu_per_row": round(t["us_cpu"] / batch, 3),
        }
    return out


def bench_serving(params: Params, models: pathlib.Path) -> dict[str, Any]:
    print(
        f"... (a), (b) the serving path in-process: {params.symbols} symbols, {params.minutes} minutes "
        f"(+{params.warmup_minutes} warm-up), best of {params.repeats}",
        flush=True,
    )
    holder = load_holder(models)
    defaults = service_config()
    market = make_market(params.symbols, params.warmup_minutes + params.minutes)
    offline = offline_probabilities(holder, market)
    configs = {"a_dynamic": defaults.max_batch, "b_batch_1": 1}
    result: dict[str, Any] = {}
    for name, max_batch in configs.items():
        result[name] = serving_config(holder, market, params, max_batch, defaults.max_wait_seconds, offline)
        r = result[name]
        print(
            f"    {name}: {r['signals_per_s']:,} signals/s ({r['us_per_signal_wall']} µs each, "
            f"{r['mean_rows_per_forward_pass']} rows per forward pass); burst p50 {r['burst_ms']['p50']} ms; "
            f"vs offline {'ok' if r['vs_offline']['ok'] else 'DIFFERS'}",
            flush=True,
        )
    result["row_costs"] = row_costs(holder, market, params.repeats)
    result["forward"] = forward_costs(holder, params)
    result["torch_threads"] = torch.get_num_threads()
    f = result["forward"]
    print(
        f"    per candle before the batcher {result['row_costs']['us_per_candle']} µs; forward "
        + ", ".join(f"batch {b} {f[str(b)]['us_wall_per_row']} µs/row" for b in FORWARD_BATCHES),
        flush=True,
    )
    return result


# --- (t) the network's execution: eager, TorchScript, compile --------------------------------------


def probabilities_with(module: Callable[[torch.Tensor], torch.Tensor], rows: Array) -> Array:
    """``Scorer.probabilities`` with ``module`` in place of the network: the same steps."""
    with torch.inference_mode():
        logits = module(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
        result: Array = torch.sigmoid(logits).to(torch.float64).numpy()
        return result


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def bench_variants(params: Params, models: pathlib.Path) -> dict[str, Any]:
    print("... (t) eager vs TorchScript vs torch.compile, batch 1 and 512", flush=True)
    holder = load_holder(models)
    scorer = holder.require().scorer
    net: SignalNet = scorer._net  # the served network, in eval mode
    rng = np.random.default_rng(2)
    inputs = {
        b: np.tile(FEATURE_MEAN, WINDOW)
        + rng.normal(0.0, 1.0, (b, WINDOW * len(FEATURES))) * np.tile(FEATURE_SCALE, WINDOW)
        for b in (1, 7, 512)
    }
    reference = {b: scorer.probabilities(rows) for b, rows in inputs.items()}
    example = torch.from_numpy(inputs[7].astype(np.float32))

    def trace() -> Callable[[torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            traced: Callable[[torch.Tensor], torch.Tensor] = torch.jit.trace(  # type: ignore[no-untyped-call]
                net, example
            )
        return traced

    def trace_optimized() -> Callable[[torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            traced = torch.jit.trace(net, example)  # type: ignore[no-untyped-call]
            optimized: Callable[[torch.Tensor], torch.Tensor] = torch.jit.optimize_for_inference(traced)
        return optimized

    def compiled() -> Callable[[torch.Tensor], torch.Tensor]:
        module: Callable[[torch.Tensor], torch.Tensor] = torch.compile(net)
        # Compiled for a first shape, then again with a dynamic batch size at the next one (the
        # batcher's sizes vary from 1 to 512); both before timing.
        for b in (1, 512, 7):
            probabilities_with(module, inputs[b])
        return module

    builders: dict[str, tuple[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]]] = {
        "eager": ("as served: Scorer.probabilities, default intra-op threads", lambda: net),
        "jit_trace": ("torch.jit.trace(SignalNet, a batch of 7)", trace),
        "jit_trace_optimize_for_inference": (
            "torch.jit.optimize_for_inference(trace): frozen",
            trace_optimized,
        ),
        "eager_1_thread": ("eager with torch.set_num_threads(1)", lambda: net),
    }
    if params.compile:
        builders["compile"] = ("torch.compile(SignalNet), inductor, default mode", compiled)
    builders["eager_1_thread"] = builders.pop("eager_1_thread")  # last: it changes the thread pool
    threads = torch.get_num_threads()
    out: dict[str, Any] = {"torch": torch.__version__, "intra_op_threads": threads}
    for name, (what, build) in builders.items():
        entry: dict[str, Any] = {"what": what}
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                module = build()
                entry["setup_s"] = round(time.perf_counter() - t0, 2)
                for b in (1, 7, 512):  # each shape once before timing (and a check it works)
                    probabilities_with(module, inputs[b])
            except Exception as exc:
                entry["error"] = first_line(exc)
                out[name] = entry | {"warnings": sorted({str(w.message)[:200] for w in caught})}
                print(f"    {name}: failed: {entry['error']}", flush=True)
                continue
        entry["warnings"] = sorted({str(w.message)[:200] for w in caught})
        entry["max_abs_diff_vs_eager"] = max(
            float(np.max(np.abs(probabilities_with(module, rows) - reference[b])))
            for b, rows in inputs.items()
        )
        if name == "eager_1_thread":
            torch.set_num_threads(1)
        try:
            for b in (1, 512):
                calls = params.variant_calls if b == 1 else max(50, params.variant_calls // 20)

                def score(
                    module: Callable[[torch.Tensor], torch.Tensor] = module, rows: Array = inputs[b]
                ) -> object:
                    return probabilities_with(module, rows)

                entry[f"batch_{b}"] = time_calls(score, calls, params.repeats)
        finally:
            torch.set_num_threads(threads)
        out[name] = entry
        b1, b512 = entry["batch_1"]["us_wall"], entry["batch_512"]["us_wall"]
        print(
            f"    {name}: batch 1 {b1} µs, batch 512 {b512} µs (setup {entry['setup_s']} s)",
            flush=True,
        )
    eager = out["eager"]
    for entry in out.values():
        if isinstance(entry, dict) and "batch_1" in entry:
            for b in (1, 512):
                entry[f"batch_{b}"]["speedup_vs_eager"] = round(
                    eager[f"batch_{b}"]["us_wall"] / entry[f"batch_{b}"]["us_wall"], 2
                )
    return out


# --- (c) end to end ------------------------------------------------------------------------------


@dataclasses.dataclass
class Chain:
    """Ingest, the aggregator, the indicators and inference, each following the one before."""

    ingest: helpers.ServiceProcess
    aggregator: helpers.ServiceProcess
    indicators: helpers.ServiceProcess
    inference: helpers.ServiceProcess
    inference_metrics: int

    def services(self) -> tuple[helpers.ServiceProcess, ...]:
        return (self.ingest, self.aggregator, self.indicators, self.inference)

    def pid(self, service: helpers.ServiceProcess) -> int:
        assert service.proc is not None
        return service.proc.pid

    def check_alive(self) -> None:
        for service in self.services():
            assert service.proc is not None
            code = service.proc.poll()
            if code is not None:
                tail = service.log_path.read_text(errors="replace")[-2000:]
                raise ScenarioFailed(f"{service.name} exited with code {code} during the scenario: {tail}")


@contextlib.contextmanager
def running_chain(url: str, workdir: pathlib.Path, models: pathlib.Path, params: Params) -> Iterator[Chain]:
    """The four services as real processes (inference's metrics served); stopped afterwards, also on
    failure."""
    common = {"MT5MESH_HEALTH_PROBE_SECONDS": "2"} | params.service_env
    ingest = helpers.make_service("ingest", url, workdir, common)
    aggregator = helpers.make_service(
        "aggregator", url, workdir, common | {"AGGREGATOR_INGEST_ADDRESS": ingest.address}
    )
    indicators = helpers.make_service(
        "indicators", url, workdir, common | {"INDICATORS_AGGREGATOR_ADDRESS": aggregator.address}
    )
    metrics_port = helpers.free_port()
    inference = helpers.make_service(
        "inference",
        url,
        workdir,
        common
        | {
            "INFERENCE_INDICATORS_ADDRESS": indicators.address,
            "INFERENCE_MODELS_DIR": str(models),
            "INFERENCE_METRICS_PORT": str(metrics_port),
        },
    )
    chain = Chain(ingest, aggregator, indicators, inference, metrics_port)
    try:
        for service in chain.services():  # ingest first: serving means migrated
            service.start()
        helpers.wait_until(
            lambda: (
                helpers.grpc_status(inference.address, 2, SERVICE_NAME)
                == health_pb2.HealthCheckResponse.SERVING
            ),
            60,
            what="inference serving its model",
        )
        yield chain
    finally:
        for service in reversed(chain.services()):
            if service.proc is not None:
                with contextlib.suppress(Exception):
                    service.terminate(timeout=10)
                service.kill()


def _us(stamp: timestamp_pb2.Timestamp) -> int:
    return int(stamp.seconds) * 1_000_000 + int(stamp.nanos) // 1000


@dataclasses.dataclass
class Received:
    """What the subscriber saw: first arrival (time.monotonic()) per candle, and what came with it."""

    candles: dict[Key, tuple[float, int]] = dataclasses.field(default_factory=dict)  # t, revision
    values: dict[Key, tuple[float, int, Inputs]] = dataclasses.field(default_factory=dict)
    signals: dict[Key, tuple[float, int, float, int, str]] = dataclasses.field(default_factory=dict)
    duplicates: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"candles": 0, "values": 0, "signals": 0}
    )
    errors: list[str] = dataclasses.field(default_factory=list)
    awaited: set[Key] = dataclasses.field(default_factory=set)  # still expected for this minute
    awaiting: str = "signals"  # what ``awaited`` waits for: "values" or "signals"
    minute_done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def arrived(self, kind: str, key: Key) -> None:
        if kind == self.awaiting:
            self.awaited.discard(key)
            if not self.awaited:
                self.minute_done.set()


@dataclasses.dataclass(frozen=True)
class Feed:
    """What an end-to-end run posts to ingest: the history, then one request per live minute.

    With ``ticks``, the ticks of minute k (every symbol's, in one ``IngestTicks`` request) make the M1
    bars of minute k - 1 final: their first tick is past the previous bar's end plus the allowed
    lateness. With ``ea``, minute k's EA candles (one ``IngestCandles`` request) are final as posted.
    Either way, live request k makes the bars of candle minute ``backfill + k`` final.

    The history goes in chunks of at most ``HISTORY_CHUNK`` candles, each posted once the indicator
    values of the one before have arrived: the indicators service commits what arrived while its
    previous commit ran, and a commit of ~10,000 values fails in PostgreSQL ("stack depth limit
    exceeded" on the ``(symbol, timeframe, ts) IN (...)`` lookup) and is retried forever.
    """

    kind: str
    names: list[str]
    start: dt.datetime  # candle minute 0
    backfill: int  # candle minutes the history makes final (0 .. backfill - 1)
    history: list[tuple[list[Any], int]]  # chunks: requests, and the last candle minute they make final
    live: list[Any]

    def keys(self, minute: int) -> list[Key]:
        ts = to_us(self.start + dt.timedelta(minutes=minute))
        return [(name, ts) for name in self.names]

    def items(self, request: Any) -> int:
        return len(request.ticks) if self.kind == "ticks" else len(request.items)


def walk(symbols: int, points: int, seed: int) -> Array:
    """``(symbols, points)`` mid prices: random walks near 1.08."""
    rng = np.random.default_rng(seed)
    return 1.08 + np.cumsum(rng.normal(0.0, 1e-4, (symbols, points)), axis=1)


def make_feed(kind: str, symbols: int, backfill: int, live: int, start: dt.datetime, params: Params) -> Feed:
    names = symbol_names(symbols)
    rng = np.random.default_rng(symbols)
    if kind == "ea":
        minutes = backfill + live
        close = walk(symbols, minutes, seed=symbols)
        opens = np.concatenate([close[:, :1], close[:, :-1]], axis=1)
        high = np.maximum(opens, close) + np.abs(rng.normal(0.0, 1e-4, close.shape))
        low = np.minimum(opens, close) - np.abs(rng.normal(0.0, 1e-4, close.shape))
        per_minute = [
            [
                market_pb2.Candle(
                    symbol=name,
                    timeframe=market_pb2.M1,
                    ts=timestamp(start + dt.timedelta(minutes=m)),
                    open=round(float(opens[i, m]), 5),
                    high=round(float(high[i, m]), 5),
                    low=round(float(low[i, m]), 5),
                    close=round(float(close[i, m]), 5),
                    volume=float(rng.integers(50, 150)),
                    spread=float(rng.integers(1, 4)),
                )
                for i, name in enumerate(names)
            ]
            for m in range(minutes)
        ]
        chunks = history_chunks(per_minute[:backfill], symbols, 0, ingest_pb.IngestCandlesRequest, "items")
        return Feed(
            kind,
            names,
            start,
            backfill,
            chunks,
            [ingest_pb.IngestCandlesRequest(items=m) for m in per_minute[backfill:]],
        )
    # Ticks: minute k's ticks close minute k - 1, so one minute more than the candles made final.
    minutes = backfill + live + 1
    per = params.ticks_per_minute
    first = params.lateness_seconds + 1.0  # the first tick of a minute closes the previous bar
    offsets = first + np.arange(per) * (59.0 - first) / per
    mid = walk(symbols, minutes * per, seed=symbols)
    spread = rng.integers(1, 30, mid.shape) * 1e-5
    per_minute_ticks = []
    for m in range(minutes):
        base = start + dt.timedelta(minutes=m)
        stamps = [timestamp(base + dt.timedelta(seconds=float(o))) for o in offsets]
        per_minute_ticks.append(
            [
                market_pb2.Tick(
                    symbol=name,
                    ts=stamps[j],
                    bid=round(float(mid[i, m * per + j] - spread[i, m * per + j] / 2), 6),
                    ask=round(float(mid[i, m * per + j] + spread[i, m * per + j] / 2), 6),
                )
                for j in range(per)  # in time order; every symbol at the same moments
                for i, name in enumerate(names)
            ]
        )
    chunks = history_chunks(
        per_minute_ticks[: backfill + 1], symbols, 1, ingest_pb.IngestTicksRequest, "ticks"
    )
    live_requests = [ingest_pb.IngestTicksRequest(ticks=m) for m in per_minute_ticks[backfill + 1 :]]
    return Feed(kind, names, start, backfill, chunks, live_requests)


def history_chunks(
    per_minute: Sequence[Sequence[Any]], symbols: int, lag: int, request: Callable[..., Any], field: str
) -> list[tuple[list[Any], int]]:
    """The history's minutes in chunks of at most ``HISTORY_CHUNK`` candles, each as requests of at most
    10,000 items and the last candle minute it makes final (a minute's items make minute - ``lag``
    final)."""
    per_chunk = max(1, HISTORY_CHUNK // symbols)
    out: list[tuple[list[Any], int]] = []
    for first in range(0, len(per_minute), per_chunk):
        last = min(first + per_chunk, len(per_minute))
        items = [x for m in per_minute[first:last] for x in m]
        requests = [
            request(**{field: items[k : k + MAX_ITEMS_PER_REQUEST]})
            for k in range(0, len(items), MAX_ITEMS_PER_REQUEST)
        ]
        out.append((requests, last - 1 - lag))
    return out


async def _read(call: Any, record: Callable[[Any, float], None], what: str, errors: list[str]) -> None:
    try:
        async for item in call:
            record(item, time.monotonic())
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            errors.append(f"{what}: {exc.code().name} {exc.details()}")


async def drive(
    chain: Chain, params: Params, feed: Feed, meter: CpuMeter, scraped: dict[str, Any]
) -> tuple[Received, list[tuple[float, float]]]:
    """Subscribe, post the history, then each live minute once the previous one's signals are all in;
    returns what arrived and, per live minute, when its request was sent and acknowledged."""
    got = Received()
    metadata = api_key_metadata(helpers.API_KEY)
    options = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]

    def on_candle(item: Any, now: float) -> None:
        c = item.bar.candle
        key = (c.symbol, _us(c.ts))
        if not item.bar.final:
            got.errors.append(f"a forming candle arrived: {key}")
        if key in got.candles:
            got.duplicates["candles"] += 1
        else:
            got.candles[key] = (now, item.bar.revision)

    def on_values(item: Any, now: float) -> None:
        v = item.values
        key = (v.symbol, _us(v.ts))
        if key in got.values:
            got.duplicates["values"] += 1
        else:
            got.values[key] = (now, v.revision, inputs_from_pb(v))
            got.arrived("values", key)

    def on_signal(item: Any, now: float) -> None:
        s = item.signal
        key = (s.symbol, _us(s.ts))
        if key in got.signals:
            got.duplicates["signals"] += 1
            return
        got.signals[key] = (now, s.candle_revision, s.prob_up, s.label, s.model_version)
        got.arrived("signals", key)

    async def post(request: Any) -> None:
        if feed.kind == "ticks":
            reply = await ingest.IngestTicks(request, metadata=metadata)
            stored = reply.stored
        else:
            reply = await ingest.IngestCandles(request, metadata=metadata)
            stored = reply.inserted
        if not reply.ok or stored != feed.items(request):
            raise ScenarioFailed(f"ingest stored {stored} of {feed.items(request)}")

    async def all_of(what: str, minute: int, limit: float) -> None:
        got.awaiting = what
        got.awaited = set(feed.keys(minute)) - set(got.values if what == "values" else got.signals)
        got.minute_done.clear()
        if not got.awaited:
            return
        try:
            await asyncio.wait_for(got.minute_done.wait(), limit)
        except TimeoutError as exc:
            chain.check_alive()
            raise ScenarioFailed(
                f"candle minute {minute}: {len(got.awaited)} of {len(feed.names)} {what} missing after "
                f"{limit:g} s ({len(got.candles)} candles, {len(got.values)} values, {len(got.signals)} "
                "signals so far)"
            ) from exc

    sent: list[tuple[float, float]] = []
    async with (
        grpc.aio.insecure_channel(chain.ingest.address, options=options) as ingest_channel,
        grpc.aio.insecure_channel(chain.aggregator.address, options=options) as agg_channel,
        grpc.aio.insecure_channel(chain.indicators.address, options=options) as ind_channel,
        grpc.aio.insecure_channel(chain.inference.address, options=options) as inf_channel,
    ):
        ingest = ingest_grpc.IngestServiceStub(ingest_channel)
        calls = [
            agg_grpc.AggregatorServiceStub(agg_channel).SubscribeCandles(
                agg_pb.SubscribeCandlesRequest(timeframes=[market_pb2.M1]), metadata=metadata
            ),
            ind_grpc.IndicatorsServiceStub(ind_channel).SubscribeIndicators(
                ind_pb.SubscribeIndicatorsRequest(timeframes=[market_pb2.M1]), metadata=metadata
            ),
            inf_grpc.InferenceServiceStub(inf_channel).SubscribeSignals(
                inf_pb.SubscribeSignalsRequest(timeframes=[market_pb2.M1]), metadata=metadata
            ),
        ]
        readers = [
            asyncio.create_task(_read(call, record, what, got.errors))
            for call, record, what in zip(
                calls,
                (on_candle, on_values, on_signal),
                ("SubscribeCandles", "SubscribeIndicators", "SubscribeSignals"),
                strict=True,
            )
        ]
        try:
            started = time.monotonic()
            for requests, last in feed.history:
                for request in requests:
                    await post(request)
                if last >= 0:
                    await all_of("values", last, params.backfill_timeout)
            await all_of("signals", feed.backfill - 1, params.backfill_timeout)
            scraped["backfill_seconds"] = round(time.monotonic() - started, 1)
            await asyncio.sleep(max(params.gap_seconds, 1.0))  # the history's tail settles
            scraped["before"] = scrape(chain.inference_metrics, ("mt5_inference_",))
            meter.start()
            for k, request in enumerate(feed.live):
                t0 = time.monotonic()
                await post(request)
                sent.append((t0, time.monotonic()))
                await all_of("signals", feed.backfill + k, params.minute_timeout)
                await asyncio.sleep(params.gap_seconds)
            scraped["cpu"] = meter.stop()
            scraped["after"] = scrape(chain.inference_metrics, ("mt5_inference_",))
            await asyncio.sleep(0.5)  # anything arriving now would be a duplicate or a revision
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    return got, sent


def offline_check(models: pathlib.Path, got: Received, names: Sequence[str]) -> dict[str, Any]:
    """Every candle whose row (from the values received) is complete has a signal equal to the offline
    score of that row, and no other candle has one."""
    scorer = ModelRegistry(models).load(MODEL_NAME, "v0001").scorer
    expected_keys: list[Key] = []
    rows: list[Array] = []
    for name in names:
        keys = sorted(k for k in got.values if k[0] == name)
        inputs = np.array([got.values[k][2] for k in keys], dtype=np.float64).reshape(len(keys), len(INPUTS))
        features = feature_rows(inputs, WINDOW)
        ok = complete(features)
        expected_keys.extend(k for k, good in zip(keys, ok.tolist(), strict=True) if good)
        rows.append(features[ok])
    probabilities = scorer.probabilities(np.concatenate(rows)).tolist() if rows else []
    diffs = [
        abs(got.signals[k][2] - p)
        for k, p in zip(expected_keys, probabilities, strict=True)
        if k in got.signals
    ]
    return {
        "signals_expected": len(expected_keys),
        "signals_received": len(got.signals),
        "missing": len(set(expected_keys) - set(got.signals)),
        "extra": len(set(got.signals) - set(expected_keys)),
        "compared": len(diffs),
        "max_abs_diff": max(diffs, default=math.nan),
        "versions": sorted({s[4] for s in got.signals.values()}),
    }


def analyse(
    params: Params, feed: Feed, got: Received, sent: list[tuple[float, float]], models: pathlib.Path
) -> dict[str, Any]:
    rows = []  # posted, acked, final candle, values, signal (monotonic), live minute
    measured: list[Key] = []
    for k, (sent_at, acked_at) in enumerate(sent):
        if k < params.e2e_warmup_minutes:
            continue
        for key in feed.keys(feed.backfill + k):
            measured.append(key)
            if key in got.candles and key in got.values and key in got.signals:
                rows.append(
                    (sent_at, acked_at, got.candles[key][0], got.values[key][0], got.signals[key][0], k)
                )
    a = np.array(rows, dtype=np.float64).reshape(len(rows), 6)
    posted, candle, values, signal, minute = a[:, 0], a[:, 2], a[:, 3], a[:, 4], a[:, 5]
    e2e = signal - candle
    bursts = [
        float(signal[minute == m].max() - candle[minute == m].min()) for m in np.unique(minute).tolist()
    ]
    offline = offline_check(models, got, feed.names)
    checks = {
        "candles_measured": len(measured),
        "measured_without_candle": sum(1 for k in measured if k not in got.candles),
        "measured_without_values": sum(1 for k in measured if k not in got.values),
        "measured_without_signal": sum(1 for k in measured if k not in got.signals),
        "duplicates": got.duplicates,
        "revised": sum(1 for v in got.candles.values() if v[1])
        + sum(1 for v in got.values.values() if v[1])
        + sum(1 for v in got.signals.values() if v[1]),
        "signal_before_final_candle": int((e2e < 0).sum()),
        # Not an error: the indicators' own subscription may get a bar before this client's.
        "values_before_final_candle": int((values - candle < 0).sum()),
        "client_errors": list(got.errors),
        "vs_offline": offline,
    }
    checks["ok"] = (
        not got.errors
        and checks["measured_without_signal"] == 0
        and checks["measured_without_values"] == 0
        and not any(got.duplicates.values())
        and checks["revised"] == 0
        and checks["signal_before_final_candle"] == 0
        and offline["missing"] == 0
        and offline["extra"] == 0
        and offline["max_abs_diff"] <= 1e-6
        and offline["versions"] == ["v0001"]
    )
    by_minute = [
        [k, round(float(candle[minute == k].min() - posted[minute == k][0]) * 1000, 2)]
        + [round(float(x) * 1000, 2) for x in (np.median(e2e[minute == k]), e2e[minute == k].max())]
        for k in np.unique(minute).astype(int).tolist()
    ]
    return {
        "input": feed.kind,
        "symbols": len(feed.names),
        "backfill_minutes": feed.backfill,
        "live_minutes": len(feed.live),
        "warmup_minutes": params.e2e_warmup_minutes,
        "gap_seconds": params.gap_seconds,
        "candles_measured": len(rows),
        "latency_final_candle_to_signal_ms": stats_ms(e2e),
        "latency_final_candle_to_values_ms": stats_ms(values - candle),
        "latency_values_to_signal_ms": stats_ms(signal - values),
        "latency_request_sent_to_final_candle_ms": stats_ms(candle - posted),
        "latency_request_sent_to_signal_ms": stats_ms(signal - posted),
        "ingest_ack_ms": stats_ms(np.array([b - s for s, b in sent])),
        "burst_first_final_candle_to_last_signal_ms": stats_ms(np.array(bursts)),
        "by_minute_columns": [
            "live minute",
            "request sent -> first final candle ms",
            "final candle -> signal p50 ms",
            "max ms",
        ],
        "by_minute": by_minute,
        "checks": checks,
    }


def bench_end_to_end(
    params: Params, workdir: pathlib.Path, models: pathlib.Path, kind: str, symbols: int
) -> dict[str, Any]:
    """One end-to-end run on a fresh PostgreSQL database (dropped afterwards)."""
    # Minutes from now on (in the future, within ingest's day): the wall clock never finalizes a bar
    # before its own ticks do, whatever the pauses between minutes.
    start = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(minutes=2)
    feed = make_feed(kind, symbols, params.backfill_minutes, params.live_minutes(symbols), start, params)
    with helpers.postgres_database() as url, running_chain(url, workdir, models, params) as chain:
        pids = {s.name: chain.pid(s) for s in chain.services()}
        idle_kb = status_kb(pids["inference"], "VmRSS")
        meter = CpuMeter(
            {
                "ingest": lambda: [pids["ingest"]],
                "aggregator": lambda: [pids["aggregator"]],
                "indicators": lambda: [pids["indicators"]],
                "inference": lambda: [pids["inference"]],
                "postgres": postgres_pids,
            }
        )
        scraped: dict[str, Any] = {}
        limit = params.backfill_timeout + len(feed.live) * (params.minute_timeout + params.gap_seconds) + 60
        with RssSampler(pids["inference"]) as rss:
            try:
                got, sent = asyncio.run(asyncio.wait_for(drive(chain, params, feed, meter, scraped), limit))
            except TimeoutError as exc:
                raise ScenarioFailed(f"the run took more than {limit:g} s") from exc
        chain.check_alive()
        hwm = {name: round(status_kb(pid, "VmHWM") / 1024, 1) for name, pid in pids.items()}
    result = analyse(params, feed, got, sent, models)
    before, after = scraped["before"], scraped["after"]
    passes = metric_delta(before, after, "mt5_inference_batch_size_count")
    queued = metric_delta(before, after, "mt5_inference_queue_seconds_count")

    def mean(name: str, count: float, scale: float) -> float | None:
        return round(metric_delta(before, after, name) / count * scale, 3) if count else None

    result["backfill_seconds"] = scraped["backfill_seconds"]
    result["cpu_cores"] = scraped["cpu"]
    result["inference_service"] = {
        "signals_committed": int(metric_delta(before, after, "mt5_inference_signals_total")),
        "forward_passes": int(passes),
        "mean_rows_per_forward_pass": mean("mt5_inference_batch_size_sum", passes, 1.0),
        "mean_forward_ms": mean("mt5_inference_score_seconds_sum", passes, 1000.0),
        "mean_queue_ms": mean("mt5_inference_queue_seconds_sum", queued, 1000.0),
    }
    result["inference_rss_mb"] = {"after_start_model_loaded": round(idle_kb / 1024, 1), **rss.report()}
    result["vm_hwm_mb_by_service"] = hwm
    return result


# --- report ----------------------------------------------------------------------------------------


def evaluate(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    s = results["serving"]
    a, b = s["a_dynamic"], s["b_batch_1"]
    forward = s["forward"]
    e2e = results["e2e"]
    figures: dict[str, Any] = {
        "a_signals_per_s": a["signals_per_s"],
        "b_signals_per_s": b["signals_per_s"],
        "ab_ratio": round(a["signals_per_s"] / b["signals_per_s"], 2),
        "a_mean_rows_per_forward_pass": a["mean_rows_per_forward_pass"],
        "us_per_candle_before_batcher": s["row_costs"]["us_per_candle"],
        "forward_us_per_row_batch_1": forward["1"]["us_wall_per_row"],
        "forward_us_per_row_batch_512": forward["512"]["us_wall_per_row"],
        "forward_per_row_ratio_1_vs_512": round(
            forward["1"]["us_wall_per_row"] / forward["512"]["us_wall_per_row"], 1
        ),
        "inference_rss_mb": max((r["inference_rss_mb"]["vm_hwm_mb"] for r in e2e.values()), default=None),
        "all_checks_ok": all(s[k]["vs_offline"]["ok"] for k in ("a_dynamic", "b_batch_1"))
        and all(r["checks"]["ok"] for r in e2e.values()),
    }
    for run, r in e2e.items():
        lat, part = r["latency_final_candle_to_signal_ms"], r["latency_values_to_signal_ms"]
        figures[f"c_{run}_p50_ms"] = lat.get("p50")
        figures[f"c_{run}_p99_ms"] = lat.get("p99")
        figures[f"c_{run}_inference_part_p50_ms"] = part.get("p50")
        figures[f"c_{run}_inference_part_p99_ms"] = part.get("p99")
    t = results.get("variants", {})
    for name in ("jit_trace", "jit_trace_optimize_for_inference", "compile", "eager_1_thread"):
        entry = t.get(name, {})
        if "batch_1" in entry:
            figures[f"t_{name}_speedup_batch_1"] = entry["batch_1"]["speedup_vs_eager"]
            figures[f"t_{name}_speedup_batch_512"] = entry["batch_512"]["speedup_vs_eager"]
    targets: dict[str, Any] = {}
    for key, (label, op, bound) in TARGETS.items():
        value = figures[key]
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        targets[key] = {"what": label, "value": value, "target": f"{op} {bound:g}", "met": met}
    for run, r in e2e.items():
        key = f"c_{run}_p99_ms"
        value = figures[key]
        targets[key] = {
            "what": f"(c) final candle -> signal, p99 ms, {r['symbols']} symbols, {r['input']}",
            "value": value,
            "target": f"<= {P99_TARGET_MS:g}",
            "met": value is not None and value <= P99_TARGET_MS,
        }
        if r["candles_measured"] < MIN_E2E_CANDLES:
            targets[key]["met"] = False
            targets[key]["note"] = f"measured over fewer than {MIN_E2E_CANDLES} candles"
    return figures, targets


def print_table(report: dict[str, Any]) -> None:
    r, m, f = report["results"], report["machine"], report["figures"]
    s = r["serving"]
    print()
    print(f"inference benchmark  {report['timestamp']}  {m['nproc']} cores  {m['cpu_model']}")
    print(
        f"PostgreSQL {m['postgres_settings']['server_version']}, Python {m['python']}, "
        f"torch {torch.__version__} ({s['torch_threads']} intra-op threads), model window {WINDOW}, "
        f"hidden {TRAINING.hidden}"
    )
    print()
    row = "{:<58} {:>12} {:>12} {:>12} {:>10}"
    print(
        row.format(
            f"serving path in-process, {s['a_dynamic']['symbols']} symbols",
            "signals/s",
            "µs/signal",
            "rows/pass",
            "burst p50",
        )
    )
    print("-" * 108)
    for key, label in (
        ("a_dynamic", "(a) dynamic batching (512, 2 ms)"),
        ("b_batch_1", "(b) batch size 1"),
    ):
        x = s[key]
        print(
            row.format(
                label,
                f"{x['signals_per_s']:,}",
                f"{x['us_per_signal_wall']:.1f}",
                f"{x['mean_rows_per_forward_pass']}",
                f"{x['burst_ms']['p50']:.1f} ms",
            )
        )
    rc = s["row_costs"]
    print(
        f"    per candle besides queues and forward pass: {rc['us_per_candle']} µs (message "
        f"{rc['of_which_message_to_values_us']}, history and window {rc['of_which_history_and_window_us']}, "
        f"rows and checks {rc['of_which_rows_and_checks_us']} in bursts of {rc['candles_per_burst']})"
    )
    fw = s["forward"]
    print(
        "    Scorer.probabilities + labels, µs per row (per call): "
        + ", ".join(
            f"batch {b} {fw[str(b)]['us_wall_per_row']} ({fw[str(b)]['us_wall']})" for b in FORWARD_BATCHES
        )
    )
    t = r.get("variants", {})
    if t:
        print()
        row3 = "{:<40} {:>14} {:>14} {:>10}  {}"
        print(row3.format("network execution (Scorer path)", "batch 1 µs", "batch 512 µs", "setup s", "note"))
        print("-" * 108)
        for name, entry in t.items():
            if not isinstance(entry, dict):
                continue
            if "batch_1" in entry:
                b1, b512 = entry["batch_1"], entry["batch_512"]
                print(
                    row3.format(
                        name,
                        f"{b1['us_wall']:.1f} ({b1['speedup_vs_eager']}x)",
                        f"{b512['us_wall']:.1f} ({b512['speedup_vs_eager']}x)",
                        f"{entry['setup_s']}",
                        "deprecated" if any("deprecated" in w for w in entry["warnings"]) else "",
                    )
                )
            else:
                print(row3.format(name, "-", "-", "-", entry.get("error", "")[:60]))
    print()
    row2 = "{:<58} {:>9} {:>9} {:>9} {:>9}"
    for e in r["e2e"].values():
        print(
            f"(c) end to end on PostgreSQL, {e['symbols']} symbols, {e['input']}: {e['candles_measured']} "
            "candles measured over "
            f"{e['live_minutes'] - e['warmup_minutes']} minutes (history posted in {e['backfill_seconds']} s)"
        )
        print(row2.format("latency, ms", "p50", "p90", "p99", "max"))
        print("-" * 98)
        for label, key in (
            ("final candle at subscriber -> its signal at subscriber", "latency_final_candle_to_signal_ms"),
            ("  of which: final candle -> indicator values", "latency_final_candle_to_values_ms"),
            ("  of which: indicator values -> signal (inference)", "latency_values_to_signal_ms"),
            ("request sent -> final candle (context)", "latency_request_sent_to_final_candle_ms"),
            (
                "burst: first final candle -> last signal of the minute",
                "burst_first_final_candle_to_last_signal_ms",
            ),
        ):
            st = e[key]
            print(
                row2.format(label, *(f"{st.get(q, float('nan')):.2f}" for q in ("p50", "p90", "p99", "max")))
            )
        svc, rss, cpu, ch = e["inference_service"], e["inference_rss_mb"], e["cpu_cores"], e["checks"]
        print(
            f"    inference: {svc['mean_rows_per_forward_pass']} rows per forward pass, forward "
            f"{svc['mean_forward_ms']} ms, "
            f"queue {svc['mean_queue_ms']} ms (means); RSS {rss['after_start_model_loaded']} MB after start, "
            f"peak {rss['peak_sampled_mb']} MB, VmHWM {rss['vm_hwm_mb']} MB"
        )
        print(
            "    CPU cores: "
            + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k != "machine_busy")
            + f" (machine {cpu['machine_busy']:.2f})"
        )
        off = ch["vs_offline"]
        print(
            f"    checks: {off['signals_received']:,} signals, {off['missing']} missing, "
            f"{off['extra']} extra, "
            f"max |p - offline| {off['max_abs_diff']:.2g}, duplicates {sum(ch['duplicates'].values())}, "
            f"revised {ch['revised']} -> {'ok' if ch['ok'] else 'FAILED'}"
        )
        print()
    print("{:<56} {:>10} {:>10}  {}".format("target", "reached", "target", "met"))
    print("-" * 88)
    for t2 in report["targets"].values():
        value = t2["value"]
        shown = "n/a" if value is None else f"{value:,.2f}"
        print(
            "{:<56} {:>10} {:>10}  {}".format(
                t2["what"], shown, t2["target"], "met" if t2["met"] else "MISSED"
            )
        )
    print(f"forward pass alone, per row: batch 1 / batch 512 = {f['forward_per_row_ratio_1_vs_512']}x")
    print(f"results: {report['output']}")


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Params:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inference_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--symbols", type=int, help="(a), (b) symbols per burst (default 500)")
    parser.add_argument("--minutes", type=int, help="(a), (b) minutes measured (default 20)")
    parser.add_argument("--warmup-minutes", type=int, default=2, help="(a), (b) minutes before (default 2)")
    parser.add_argument(
        "--repeats", type=int, help="runs of each in-process measurement, best kept (default 3)"
    )
    parser.add_argument("--forward-calls", type=int, default=20_000, help="rows scored per forward-cost loop")
    parser.add_argument("--variant-calls", type=int, default=4_000, help="(t) calls per batch-1 loop")
    parser.add_argument("--no-compile", action="store_true", help="(t) leave torch.compile out (~15 s)")
    parser.add_argument(
        "--e2e-runs",
        help="(c) comma-separated runs INPUT:SYMBOLS, INPUT ticks or ea (default ticks:10,ticks:500,ea:10)",
    )
    parser.add_argument(
        "--ticks-per-minute", type=int, default=4, help="(c) ticks per symbol and minute (default 4)"
    )
    parser.add_argument("--e2e-candles", type=int, help="(c) candles measured per run at least (default 400)")
    parser.add_argument("--e2e-min-minutes", type=int, help="(c) live minutes measured at least (default 8)")
    parser.add_argument("--e2e-warmup-minutes", type=int, default=2, help="(c) live minutes not measured")
    parser.add_argument(
        "--backfill-minutes",
        type=int,
        default=75,
        help=f"(c) minutes posted before the live ones (default 75; a row needs {NEEDED})",
    )
    parser.add_argument(
        "--gap-seconds", type=float, default=0.3, help="(c) pause after each minute's signals"
    )
    parser.add_argument(
        "--minute-timeout", type=float, default=30.0, help="(c) seconds for a minute's signals"
    )
    parser.add_argument("--backfill-timeout", type=float, default=240.0, help="(c) seconds for the history")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the four services, for experiments (repeatable)",
    )
    parser.add_argument(
        "--wait-quiet", type=float, help="wait up to this many seconds for an idle machine (default 60)"
    )
    parser.add_argument(
        "--noisy-retries", type=int, help="re-run a disturbed (c) at most this often (default 1)"
    )
    parser.add_argument("--quick", action="store_true", help="a small run for smoke testing (about 1 minute)")
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        help=f"results JSON path (default {DEFAULT_OUTPUT.relative_to(REPO)}; with --quick {QUICK_OUTPUT})",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    defaults: dict[str, Any] = (
        {
            "symbols": 100,
            "minutes": 5,
            "repeats": 1,
            "e2e_runs": "ticks:4,ticks:50,ea:4",
            "e2e_candles": 40,
            "e2e_min_minutes": 3,
            "wait_quiet": 0.0,
            "noisy_retries": 0,
        }
        if quick
        else {
            "symbols": 500,
            "minutes": 20,
            "repeats": 3,
            "e2e_runs": "ticks:10,ticks:500,ea:10",
            "e2e_candles": 400,
            "e2e_min_minutes": 8,
            "wait_quiet": 60.0,
            "noisy_retries": 1,
        }
    )
    values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    runs: list[tuple[str, int]] = []
    for part in str(values["e2e_runs"]).split(","):
        kind, _, count = part.strip().partition(":")
        if kind not in ("ticks", "ea") or not count.isdigit():
            parser.error(f"--e2e-runs: {part!r} is not INPUT:SYMBOLS (ticks:500, ea:10)")
        runs.append((kind, int(count)))
    env: dict[str, str] = {}
    for item in args.service_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--service-env {item!r}: expected NAME=VALUE")
        env[name] = value
    counts = [values["symbols"], values["minutes"], values["repeats"], args.forward_calls, args.variant_calls]
    counts += [values["e2e_candles"], values["e2e_min_minutes"], args.ticks_per_minute, *(n for _, n in runs)]
    if min(counts) < 1 or args.warmup_minutes < 0 or args.e2e_warmup_minutes < 0:
        parser.error("counts must be at least 1 (warm-up minutes at least 0)")
    if args.backfill_minutes < NEEDED + 1:
        parser.error(f"--backfill-minutes must be above {NEEDED}: the history must give signals")
    return Params(
        symbols=int(values["symbols"]),
        minutes=int(values["minutes"]),
        warmup_minutes=int(args.warmup_minutes),
        repeats=int(values["repeats"]),
        forward_calls=int(args.forward_calls),
        variant_calls=int(args.variant_calls),
        compile=not (args.no_compile or quick),
        e2e_runs=tuple(runs),
        ticks_per_minute=int(args.ticks_per_minute),
        e2e_candles=int(values["e2e_candles"]),
        e2e_min_minutes=int(values["e2e_min_minutes"]),
        e2e_warmup_minutes=int(args.e2e_warmup_minutes),
        backfill_minutes=int(args.backfill_minutes),
        gap_seconds=float(args.gap_seconds),
        minute_timeout=float(args.minute_timeout),
        backfill_timeout=float(args.backfill_timeout),
        service_env=env,
        wait_quiet=float(values["wait_quiet"]),
        noisy_retries=int(values["noisy_retries"]),
        quick=quick,
        output=args.output or (QUICK_OUTPUT if quick else DEFAULT_OUTPUT),
    )


def run_all(params: Params, workdir: pathlib.Path) -> dict[str, Any]:
    models = workdir / "models"
    manifest = save_model(models)
    if params.wait_quiet > 0:
        print("... waiting for a quiet machine", flush=True)
        background = wait_for_quiet(params.wait_quiet)
    else:
        background = None
    serving = bench_serving(params, models)
    serving["background_cores_before"] = None if background is None else round(background, 2)
    e2e: dict[str, Any] = {}
    for kind, n in params.e2e_runs:

        def run(kind: str = kind, n: int = n) -> dict[str, Any]:
            return bench_end_to_end(params, workdir, models, kind, n)

        e2e[f"{kind}_{n}"] = step(
            f"(c) end to end: {n} symbols, {kind}, {params.live_minutes(n)} live minutes, PostgreSQL",
            params,
            run,
        )
    # Last: torch.compile leaves its compiler state (and maybe worker processes) in this process.
    if params.wait_quiet > 0:
        wait_for_quiet(params.wait_quiet)
    variants = bench_variants(params, models)
    return {
        "model": {
            "window": manifest.window,
            "hidden": list(manifest.hidden),
            "n_inputs": manifest.n_inputs,
            "parameters": sum(p.numel() for p in SignalNet(manifest.n_inputs, manifest.hidden).parameters()),
            "version": manifest.version,
        },
        "serving": serving,
        "e2e": e2e,
        "variants": variants,
    }


def main(argv: Sequence[str] | None = None) -> int:
    params = parse_args(argv)
    machine = machine_info() | {"torch": torch.__version__, "numpy": np.__version__}
    started = dt.datetime.now(dt.UTC)
    with scratch_folder("inference-bench-") as workdir:
        results = run_all(params, workdir)
        figures, targets = evaluate(results)
        parts = {
            "machine": machine,
            "parameters": dataclasses.asdict(params),
            "results": results,
            "figures": figures,
            "targets": targets,
        }
        publish("inference", started, params.output, parts, print_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

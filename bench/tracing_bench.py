"""What tracing costs ingest: ``make bench-tracing`` (``python -m bench.tracing_bench``).

Durable ticks/s through ``IngestService.StreamTicks`` straight to ingest (the ``TickStreamer`` client,
batches of 1,000, window 8: scenario (a) of ``bench.ingest_bench``), with ingest's tracing

- ``off``: no ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the metrics interceptor still runs, as in production);
- ``sampled_100``: spans exported over OTLP/gRPC with ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``
  and ``OTEL_TRACES_SAMPLER_ARG=1.0``: every batch is a trace (batch span, group commit, SQL statements);
- ``sampled_1``: the same at ``OTEL_TRACES_SAMPLER_ARG=0.01``.

The spans go to an in-process OTLP receiver (``tests/otlp_receiver.py``, counting only) in this
process, which also runs the client: its CPU shows up as ``bench_client``. The three variants run in
rounds (off, 100 %, 1 %, off, ...) so that a slow minute of the shared machine does not land on one
variant only; each run gets a fresh PostgreSQL database and a fresh ingest process, and the median of
the rounds is compared. Cost = 1 - (ticks/s with tracing) / (ticks/s without); ingest's CPU per
tick is reported as well. Results go to ``bench/results/tracing.json`` and a table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import pathlib
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from bench.common import (
    NOISE_LIMIT_CORES,
    CpuMeter,
    ScenarioFailed,
    machine_info,
    postgres_pids,
    publish,
    row_count,
    scratch_folder,
    step,
    truncate_tables,
)
from bench.ingest_bench import batched, make_ticks, tick_pb
from services.ingest.client import TickStreamer
from tests import helpers
from tests.otlp_receiver import OtlpReceiver

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "bench" / "results" / "tracing.json"
QUICK_OUTPUT = pathlib.Path(tempfile.gettempdir()) / "tracing-bench-quick.json"

# name -> (what it is, ingest's extra environment; {endpoint} is the receiver's).
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "off": ("tracing off", {}),
    "sampled_100": (
        "tracing on, 100 % sampled",
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "{endpoint}",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "1.0",
        },
    ),
    "sampled_1": (
        "tracing on, 1 % sampled",
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "{endpoint}",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
        },
    ),
}
# The cost each traced variant may have, as a share of the untraced throughput.
TARGETS = {"sampled_100": 0.15, "sampled_1": 0.03}


@dataclasses.dataclass(frozen=True)
class Params:
    """What one run measures; see ``parse_args``."""

    ticks: int
    batch_size: int
    window: int
    rounds: int
    wait_quiet: float
    noisy_retries: int
    quick: bool
    output: pathlib.Path


@contextlib.contextmanager
def running_ingest(url: str, workdir: pathlib.Path, env: dict[str, str]) -> Iterator[helpers.ServiceProcess]:
    """One ingest process on ``url`` with the variant's environment; stopped on exit."""
    extra = {"MT5MESH_HEALTH_PROBE_SECONDS": "2", "LOG_LEVEL": "WARNING", **env}
    service = helpers.make_service("ingest", url, workdir, extra)
    try:
        service.start()
        yield service
    finally:
        with contextlib.suppress(Exception):
            service.terminate(timeout=15)
        service.kill()


def run_once(
    variant: str, rows: Sequence[Any], params: Params, workdir: pathlib.Path, receiver: OtlpReceiver
) -> dict[str, Any]:
    """Stream every row over one StreamTicks call; the clock stops at the last ack."""
    env = {k: v.format(endpoint=receiver.endpoint) for k, v in VARIANTS[variant][1].items()}
    batches = [[tick_pb(r) for r in batch] for batch in batched(rows, params.batch_size)]
    warm_rows = make_ticks(min(len(rows), 20 * params.batch_size), ("WARMUP",))
    warm = [[tick_pb(r) for r in batch] for batch in batched(warm_rows, params.batch_size)]
    with helpers.postgres_database() as url, running_ingest(url, workdir, env) as ingest:
        spans_before = receiver.span_count
        asyncio.run(TickStreamer(ingest.address, helpers.API_KEY, "warmup", window=params.window).send(warm))
        truncate_tables(url, "ingest_ticks", "ingest_source_batches", "ingest_candles", "ingest_candle_log")
        assert ingest.proc is not None
        pid = ingest.proc.pid
        meter = CpuMeter({"ingest": lambda: [pid], "postgres": postgres_pids})
        streamer = TickStreamer(ingest.address, helpers.API_KEY, "bench", window=params.window)
        meter.start()
        started = time.perf_counter()
        report = asyncio.run(streamer.send(batches))
        elapsed = time.perf_counter() - started
        cpu = meter.stop()
        if ingest.proc.poll() is not None:
            raise ScenarioFailed(f"ingest exited: {ingest.log_path.read_text(errors='replace')[-2000:]}")
        stored = row_count(url, "ingest_ticks")
        # Ingest's batch processor sends every 5 s and flushes on exit: stop it to count every span
        # (warm-up included; it runs the same code, so spans per batch are the same).
        ingest.terminate(timeout=15)
        spans = receiver.span_count - spans_before
    if report.ticks_stored != len(rows) or stored != len(rows):
        raise ScenarioFailed(f"stored {report.ticks_stored} (table: {stored}) of {len(rows)} ticks")
    return {
        "variant": variant,
        "ticks": len(rows),
        "batches": len(batches),
        "seconds": round(elapsed, 3),
        "ticks_per_s": round(len(rows) / elapsed),
        "ingest_cpu_us_per_tick": round(cpu["ingest"] * elapsed / len(rows) * 1e6, 3),
        "spans_exported_with_warmup": spans,
        "spans_per_batch": round(spans / (len(batches) + len(warm)), 2),
        "cpu_cores": cpu,
    }


def summarize(runs: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Median throughput and CPU per variant, the cost of each traced variant, and the targets."""
    medians = {
        name: {
            "ticks_per_s": round(statistics.median(r["ticks_per_s"] for r in rs)),
            "ingest_cpu_us_per_tick": round(statistics.median(r["ingest_cpu_us_per_tick"] for r in rs), 3),
            "spans_per_batch": round(statistics.median(r["spans_per_batch"] for r in rs), 2),
            "ticks_per_s_by_round": [r["ticks_per_s"] for r in rs],
        }
        for name, rs in runs.items()
    }
    off = medians["off"]
    figures: dict[str, Any] = {"medians": medians}
    targets = {}
    for name, limit in TARGETS.items():
        cost = 1 - medians[name]["ticks_per_s"] / off["ticks_per_s"]
        cpu_cost = medians[name]["ingest_cpu_us_per_tick"] / off["ingest_cpu_us_per_tick"] - 1
        figures[f"{name}_throughput_cost"] = round(cost, 4)
        figures[f"{name}_ingest_cpu_cost"] = round(cpu_cost, 4)
        targets[f"{name}_throughput_cost"] = {
            "what": f"throughput cost, {VARIANTS[name][0]}",
            "value": round(cost, 4),
            "target": f"<= {limit:g}",
            "met": cost <= limit,
        }
    return figures, targets


def print_table(report: dict[str, Any]) -> None:
    m, p, f = report["machine"], report["parameters"], report["figures"]
    print()
    print(f"tracing benchmark  {report['timestamp']}  {m['nproc']} cores  {m['cpu_model']}")
    print(
        f"{p['ticks']:,} ticks in batches of {p['batch_size']:,} over StreamTicks (window {p['window']}), "
        f"{p['rounds']} rounds, median shown"
    )
    print()
    row = "{:<28} {:>12} {:>16} {:>14} {:>10}  {}"
    print(row.format("variant", "ticks/s", "ingest µs/tick", "spans/batch", "cost", "ticks/s by round"))
    print("-" * 110)
    for name, values in f["medians"].items():
        cost = f.get(f"{name}_throughput_cost")
        print(
            row.format(
                VARIANTS[name][0],
                f"{values['ticks_per_s']:,}",
                f"{values['ingest_cpu_us_per_tick']:.2f}",
                f"{values['spans_per_batch']:.2f}",
                "" if cost is None else f"{cost:.1%}",
                ", ".join(f"{v:,}" for v in values["ticks_per_s_by_round"]),
            )
        )
    print()
    for t in report["targets"].values():
        print(
            f"{t['what']:<44} {t['value']:>8.1%}  target {t['target']:<8} {'met' if t['met'] else 'MISSED'}"
        )
    print(f"results: {report['output']}")


def parse_args(argv: Sequence[str] | None) -> Params:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tracing_bench", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--ticks", type=int, help="ticks streamed per run (default 300000)")
    parser.add_argument("--batch-size", type=int, default=1000, help="ticks per batch (default 1000)")
    parser.add_argument("--window", type=int, default=8, help="StreamTicks batches in flight (default 8)")
    parser.add_argument("--rounds", type=int, help="runs of each variant, interleaved (default 3)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        help="wait up to this long for a quiet machine before each run (default 60)",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        help=f"re-run a run disturbed by more than {NOISE_LIMIT_CORES} cores of other load (default 1)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run for smoke testing")
    parser.add_argument("--output", type=pathlib.Path, help=f"results JSON (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    ticks, rounds, wait_quiet, retries = (20_000, 1, 0.0, 0) if quick else (300_000, 3, 60.0, 1)
    params = Params(
        ticks=args.ticks or ticks,
        batch_size=args.batch_size,
        window=args.window,
        rounds=args.rounds or rounds,
        wait_quiet=wait_quiet if args.wait_quiet is None else args.wait_quiet,
        noisy_retries=retries if args.noisy_retries is None else args.noisy_retries,
        quick=quick,
        output=args.output or (QUICK_OUTPUT if quick else DEFAULT_OUTPUT),
    )
    if min(params.ticks, params.batch_size, params.window, params.rounds) < 1:
        parser.error("counts must be at least 1")
    return params


def run_all(params: Params, workdir: pathlib.Path) -> dict[str, list[dict[str, Any]]]:
    rows = make_ticks(params.ticks)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with OtlpReceiver(keep_spans=False) as receiver:
        for round_ in range(params.rounds):
            for name in VARIANTS:
                run = functools.partial(run_once, name, rows, params, workdir, receiver)
                runs[name].append(step(f"round {round_ + 1}: {VARIANTS[name][0]}", params, run))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    params = parse_args(argv)
    machine = machine_info()
    started = dt.datetime.now(dt.UTC)
    with scratch_folder("tracing-bench-") as workdir:
        runs = run_all(params, workdir)
    figures, targets = summarize(runs)
    parts = {
        "machine": machine,
        "parameters": dataclasses.asdict(params),
        "variants": {name: {"what": what, "ingest_env": env} for name, (what, env) in VARIANTS.items()},
        "runs": runs,
        "figures": figures,
        "targets": targets,
    }
    publish("tracing", started, params.output, parts, print_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

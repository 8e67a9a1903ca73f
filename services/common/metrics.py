"""Prometheus metrics every service shares: gRPC calls, database latency, data age and feed lag.

Each service's own ``metrics.py`` holds what only it measures; this module holds what the shared
runtime measures for all of them. Naming: every name starts with ``mt5_``, durations are in seconds
(``_seconds``), counters end in ``_total``. Labels are bounded: gRPC method names, status codes,
feed names and statement kinds. Only ``mt5_data_age_seconds`` has a ``symbol`` label (bounded by the
symbols the mesh handles), and feed lag has a ``subscriber`` label (the peer of each subscription
that is open right now, at most the service's subscriber limit).

Hot paths stay cheap: nothing here is called per tick; gRPC metrics are recorded once per call
(once per stream, not per message), data age once per batch and symbol, feed lag once per page, and
the expensive parts (ages, lags, feed heads) are computed when Prometheus scrapes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as dt
import inspect
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

logger = logging.getLogger(__name__)

# Latency buckets for calls and statements: 0.5 ms to 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# --- gRPC server calls -------------------------------------------------------------------------------

GRPC_STARTED = Counter(
    "mt5_grpc_server_started_total",
    "RPCs started on this server (a stream counts once), by service, method and type.",
    ["grpc_service", "grpc_method", "grpc_type"],
)
GRPC_HANDLED = Counter(
    "mt5_grpc_server_handled_total",
    "RPCs finished on this server, by service, method and gRPC status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SECONDS = Histogram(
    "mt5_grpc_server_handling_seconds",
    "Time to answer a unary RPC, from its arrival to its answer.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)

# The peer of the RPC being served (``ipv4:10.0.3.7:51234``): feeds take their subscriber from it.
_PEER: contextvars.ContextVar[str] = contextvars.ContextVar("mt5_rpc_peer", default="")


class GrpcServerMetrics(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every call by method and status code, and times unary calls.

    It wraps the handler that the interceptors after it return, so a call the API-key check refuses
    is counted as UNAUTHENTICATED like any other answer.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the method's handler; unknown methods pass through untouched."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = split_method(handler_call_details.method)
        return _wrapped(handler, service, method)


def split_method(full_method: str | bytes) -> tuple[str, str]:
    """``/pkg.Service/Method`` as (``pkg.Service``, ``Method``)."""
    text = full_method.decode() if isinstance(full_method, bytes) else full_method
    service, _, method = text.lstrip("/").partition("/")
    return service, method


def _code_name(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):  # set by the servicer as a plain number
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if failed is None:
        return "OK"
    return "CANCELLED" if type(failed).__name__ == "CancelledError" else "UNKNOWN"


Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


def _unary(behavior: Behavior, service: str, method: str, kind: str) -> Behavior:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        GRPC_STARTED.labels(service, method, kind).inc()
        peer = _PEER.set(context.peer() or "")
        started = time.perf_counter()
        failed: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            GRPC_SECONDS.labels(service, method).observe(time.perf_counter() - started)
            GRPC_HANDLED.labels(service, method, _code_name(context, failed)).inc()
            _PEER.reset(peer)

    return handle


def _streaming(behavior: Behavior, service: str, method: str, kind: str) -> Behavior:
    # An async generator function: grpc.aio tells streaming handlers apart by that.
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        GRPC_STARTED.labels(service, method, kind).inc()
        # Not reset: the generator's steps may run in other contexts; the call's task ends with it.
        _PEER.set(context.peer() or "")
        failed: BaseException | None = None
        try:
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:  # a handler that writes with context.write() and returns
                await result
        except BaseException as exc:
            failed = exc
            raise
        finally:
            GRPC_HANDLED.labels(service, method, _code_name(context, failed)).inc()

    return handle


def _wrapped(handler: grpc.RpcMethodHandler, service: str, method: str) -> grpc.RpcMethodHandler:
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, service, method, "unary"), **codecs
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _unary(handler.stream_unary, service, method, "client_stream"), **codecs
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, service, method, "server_stream"), **codecs
        )
    return grpc.stream_stream_rpc_method_handler(
        _streaming(handler.stream_stream, service, method, "bidi_stream"), **codecs
    )


# --- database ------------------------------------------------------------------------------------------

DB_SECONDS = Histogram(
    "mt5_db_query_seconds",
    "Time to execute one SQL statement through SQLAlchemy, by kind of statement.",
    ["operation"],
    buckets=LATENCY_BUCKETS,
)
DB_ERRORS = Counter(
    "mt5_db_errors_total", "SQL statements the database refused or failed, by kind.", ["operation"]
)
_OPERATIONS = frozenset({"select", "insert", "update", "delete", "copy", "create", "begin"})


def statement_operation(statement: str) -> str:
    """The kind of a SQL statement as a bounded label: its first keyword, or ``other``."""
    word = statement.lstrip(" \n\t(").split(None, 1)[0].lower() if statement.strip() else ""
    return word if word in _OPERATIONS else "other"


# --- data age ------------------------------------------------------------------------------------------


class DataAge(Collector):
    """``mt5_data_age_seconds{stage, symbol}``: how old the newest data of each symbol is.

    A stage records the market time of the newest item it has committed per symbol (once per batch);
    the age, now minus that time, is computed when Prometheus scrapes, so it keeps growing while a
    symbol receives nothing: a stale symbol shows as a rising line, not a frozen one.
    """

    def __init__(self) -> None:
        self._newest: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def observe(self, stage: str, newest: Mapping[str, dt.datetime | float]) -> None:
        """Record the newest market time (datetime or epoch seconds) of each symbol in a batch."""
        with self._lock:
            for symbol, when in newest.items():
                seconds = when.timestamp() if isinstance(when, dt.datetime) else float(when)
                key = (stage, symbol)
                if seconds > self._newest.get(key, float("-inf")):
                    self._newest[key] = seconds

    def forget(self) -> None:
        """Drop every recorded symbol (tests)."""
        with self._lock:
            self._newest.clear()

    def describe(self) -> Iterable[GaugeMetricFamily]:
        """The family without samples, so registering does not collect."""
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """Ages as of now."""
        family = self._family()
        now = time.time()
        with self._lock:
            items = list(self._newest.items())
        for (stage, symbol), newest in items:
            family.add_metric([stage, symbol], max(0.0, now - newest))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "mt5_data_age_seconds",
            "Seconds since the market time of the newest data a stage committed for a symbol.",
            labels=["stage", "symbol"],
        )


DATA_AGE = DataAge()
REGISTRY.register(DATA_AGE)


# --- feed lag -------------------------------------------------------------------------------------------

FEED_SLOW_SUBSCRIBERS = Counter(
    "mt5_feed_slow_subscribers_total",
    "Subscribers cut off with RESOURCE_EXHAUSTED because they fell behind on live updates.",
    ["feed"],
)


@dataclasses.dataclass(eq=False, slots=True)
class FeedPosition:
    """Where one subscription to a feed stands; the feed loop updates it once per page."""

    feed: str
    subscriber: str
    cursor: int
    # Monotonic time up to which the subscriber has received everything committed (see follow()).
    caught_up_at: float = dataclasses.field(default_factory=time.monotonic)
    waiting: bool = False

    def lag_seconds(self, now: float) -> float:
        """0 while it waits for new data; otherwise how long ago it last had everything."""
        return 0.0 if self.waiting else max(0.0, now - self.caught_up_at)


class _Head:
    """The newest cursor of a feed, read in a background thread so that a scrape never waits on SQL."""

    def __init__(self, read: Callable[[], int], max_age: float) -> None:
        self._read = read
        self._max_age = max_age
        self._value: int | None = None
        self._read_at = float("-inf")
        self._refreshing = False
        self._lock = threading.Lock()

    def value(self) -> int | None:
        """The last value read (None before the first read ends); starts a refresh when stale."""
        with self._lock:
            if not self._refreshing and time.monotonic() - self._read_at > self._max_age:
                self._refreshing = True
                threading.Thread(target=self._refresh, name="feed-head", daemon=True).start()
            return self._value

    def _refresh(self) -> None:
        value: int | None
        try:
            value = self._read()
        except Exception:  # a database that is away leaves the last value and tries again later
            logger.debug("reading a feed head failed", exc_info=True)
            value = None
        with self._lock:
            if value is not None:
                self._value = value
            self._read_at = time.monotonic()
            self._refreshing = False


class FeedLag(Collector):
    """Lag of every open subscription to this process's feeds, computed when Prometheus scrapes.

    ``mt5_feed_lag_seconds{feed, subscriber}``: 0 while the subscriber waits for new data; otherwise
    the time since it last had everything that was committed (an upper bound on the age of the oldest
    item it has not received yet). ``mt5_feed_lag_cursors{feed, subscriber}``: the feed's newest
    cursor minus the subscriber's (for feeds whose head is known). A subscription that filters by
    symbol counts other symbols' items in its cursor distance too. ``mt5_feed_subscribers{feed}``:
    open subscriptions.
    """

    def __init__(self, head_max_age: float = 2.0) -> None:
        self._positions: set[FeedPosition] = set()
        self._heads: dict[str, _Head] = {}
        self._head_max_age = head_max_age
        self._lock = threading.Lock()

    def set_head(self, feed: str, read: Callable[[], int]) -> None:
        """Tell how to read a feed's newest cursor (blocking; it runs in a background thread)."""
        with self._lock:
            self._heads[feed] = _Head(read, self._head_max_age)

    @contextlib.contextmanager
    def track(self, feed: str, cursor: int) -> Iterator[FeedPosition]:
        """Report one subscription while the block runs; the subscriber is the RPC's peer."""
        position = FeedPosition(feed, peer_address(_PEER.get()), cursor)
        with self._lock:
            self._positions.add(position)
        try:
            yield position
        finally:
            with self._lock:
                self._positions.discard(position)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        """The families without samples, so registering does not collect."""
        return list(self._families())

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """Every open subscription's lag as of now."""
        seconds, cursors, subscribers = self._families()
        now = time.monotonic()
        with self._lock:
            positions = list(self._positions)
            heads = dict(self._heads)
        counts: dict[str, int] = {}
        worst: dict[tuple[str, str], tuple[float, int | None]] = {}
        wanted = {p.feed for p in positions}
        head_values = {feed: head.value() for feed, head in heads.items() if feed in wanted}
        for p in positions:
            counts[p.feed] = counts.get(p.feed, 0) + 1
            head = head_values.get(p.feed)
            lag, distance = p.lag_seconds(now), None if head is None else max(0, head - p.cursor)
            # Two streams of one connection on one feed (rare) are reported as the worse one.
            before_lag, before_distance = worst.get((p.feed, p.subscriber), (0.0, None))
            if before_distance is not None:
                distance = max(distance or 0, before_distance)
            worst[(p.feed, p.subscriber)] = (max(lag, before_lag), distance)
        for (feed, subscriber), (lag, distance) in worst.items():
            seconds.add_metric([feed, subscriber], lag)
            if distance is not None:
                cursors.add_metric([feed, subscriber], distance)
        for feed, count in counts.items():
            subscribers.add_metric([feed], count)
        return [seconds, cursors, subscribers]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "mt5_feed_lag_seconds",
                "Seconds since a subscriber last had everything committed to the feed (0 while it waits).",
                labels=["feed", "subscriber"],
            ),
            GaugeMetricFamily(
                "mt5_feed_lag_cursors",
                "The feed's newest cursor minus the subscriber's cursor.",
                labels=["feed", "subscriber"],
            ),
            GaugeMetricFamily(
                "mt5_feed_subscribers", "Subscriptions to the feed open right now.", labels=["feed"]
            ),
        )


def peer_address(peer: str) -> str:
    """A gRPC peer (``ipv4:10.0.3.7:51234``, ``ipv6:[::1]:5000``) as ``host:port``; ``unknown`` if none."""
    if not peer:
        return "unknown"
    return re.sub(r"^(ipv4|ipv6|unix):", "", peer)


FEED_LAG = FeedLag()
REGISTRY.register(FEED_LAG)

"""Sends generated hostile input to the real mesh and judges every answer.

Shared by the short form (``tests/e2e/test_proving_hostile_input.py``) and the full form
(``bench/proving/fuzz.py``). REST requests go through the real Envoy with aiohttp, sent byte for
byte as generated (no re-encoding of the path, no automatic content type); gRPC calls go straight
to each service with ``grpc.aio``, as serialized bytes, so that damaged messages reach the server too.

An answer is a failure when it is a 5xx, an INTERNAL / UNKNOWN / UNAVAILABLE / DATA_LOSS /
UNIMPLEMENTED status, error trailers too large to deliver, a REST body that is not JSON, a success
without the right API key on a protected method, or a score that is not a probability. Accepted
ingest answers are added up (inserted candles, stored and updated candles, stored ticks) so that
the caller can compare them with the rows in the ingest tables: a row no accepted answer accounts
for came from a rejected request. Streamed ticks carry their ``source_id`` in the table and are
checked per source against the batches committed (``ingest_source_batches``), not against acks.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import json
import math
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import aiohttp
import grpc
import yarl
from inference import grpc_predict_v2_pb2
from mt5.inference.v1 import inference_service_pb2
from mt5.ingest.v1 import ingest_service_pb2
from mt5.market.v1 import market_pb2
from sqlalchemy import Engine, func, select

from services.common.schema import ingest_candle_log, ingest_candles, ingest_source_batches, ingest_ticks
from tests.fuzz_strategies import GrpcInput, RestRequest

# Answers that are a deliberate refusal. 409: ABORTED (the model changed during a call); 413: body
# over 4 MiB; 429: rate limit or RESOURCE_EXHAUSTED; 431: headers over 32 KiB.
ALLOWED_HTTP = frozenset({200, 400, 401, 404, 409, 413, 429, 431})
ALLOWED_GRPC = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
# grpc-status numbers Envoy may put in a Trailers-Only answer to a gRPC content type on a REST path.
ALLOWED_GRPC_NUMBERS = frozenset(code.value[0] for code in ALLOWED_GRPC) | {
    12
}  # 12: UNIMPLEMENTED (no route)
# Methods anyone may call without a key.
CHECK_HEALTH = "/mt5.ingest.v1.IngestService/CheckHealth"
OPEN_RPCS = frozenset({CHECK_HEALTH})
INGEST_CANDLES = "/mt5.ingest.v1.IngestService/IngestCandles"
INGEST_TICKS = "/mt5.ingest.v1.IngestService/IngestTicks"
STREAM_TICKS = "/mt5.ingest.v1.IngestService/StreamTicks"
PREDICT = "/mt5.inference.v1.InferenceService/Predict"
PREDICT_STREAM = "/mt5.inference.v1.InferenceService/PredictStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
UNARY_TIMEOUT = 60.0
STREAM_PEEK_SECONDS = 0.3  # how long a subscription is read before the client hangs up
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
# The client could not take the answer's trailers (a google.rpc.Status too large for HTTP/2 headers).
# Without "Stream removed" the same words mean the server refused the request's own oversized metadata.
_TRAILER_OVERFLOW = re.compile(r"Stream removed \(received metadata size exceeds", re.IGNORECASE)


CandleKey = tuple[str, str, str]  # symbol, timeframe name, bucket start (RFC 3339)


@dataclasses.dataclass(frozen=True)
class KnownBug:
    """A bug found by this fuzz and pinned by an xfail(strict=True) test; its failures are recognised."""

    name: str
    summary: str
    test: str  # the test that pins it, in tests/e2e/test_proving_hostile_input.py
    matches: Callable[[Outcome], bool]


# None is open. The last one, a gRPC content type without a message over HTTP/1.1 answered grpc-status
# 14 (grpc.aio drops such a call without a status), is refused by the gateway now (envoy.yaml, Lua).
KNOWN_BUGS: tuple[KnownBug, ...] = ()


def known_bug(outcome: Outcome) -> str | None:
    """The name of the known bug a failed outcome shows, if any."""
    return next((bug.name for bug in KNOWN_BUGS if bug.matches(outcome)), None)


def overload(outcome: Outcome) -> bool:
    """Whether a failure is the machine running out of CPU rather than an answer to the input.

    On a saturated host (the shared 2 cores here ran at a load average of 10-40) three things happen
    whatever the input: Envoy's active health check (2 s timeout, 2 misses) ejects a service that is
    alive and SERVING but slow, so Envoy answers 503 "no healthy upstream" (grpc-status 14 to a gRPC
    content type); calls outlast the client's deadline; and a connection at the services'
    max_concurrent_streams refuses a new stream (RST_STREAM 7, REFUSED_STREAM). They are counted
    apart, not hidden; a crash still shows as a process that exited or stopped SERVING.
    """
    return (
        ("no healthy upstream" in outcome.detail and outcome.answer == "503")
        or (outcome.answer.endswith("grpc-status 14") and "no healthy upstream" in outcome.detail)
        or outcome.answer == "no answer"
        or outcome.failure == "no answer within the deadline"
        or "RST_STREAM with error code 7" in outcome.detail
    )


@dataclasses.dataclass
class Outcome:
    """What happened to one input."""

    transport: str  # "rest" or "grpc"
    route: str  # the REST route or RPC name
    answer: str  # "200", "413", "OK", "INVALID_ARGUMENT", "stream open", "no answer"
    failure: str | None = None  # why the answer is not acceptable
    detail: str = ""  # the answer's first bytes, for the report
    candles_inserted: int = 0
    candle_changes: int = 0  # inserted + updated: rows added to the candle log
    ticks_stored: int = 0  # by IngestTicks (REST or gRPC); streamed batches are checked in the tables
    stream_ticks_acked: int = 0  # new ticks StreamTicks acknowledged (for the report)
    inserted_keys: tuple[CandleKey, ...] = ()  # (symbol, timeframe, bucket) of candles it inserted
    # An ingest call whose outcome the client never learned (no answer in time): the most rows it
    # could have added to (ingest_candles, ingest_candle_log, ingest_ticks); None when the outcome is known.
    unknown_rows: tuple[int, int, int] | None = None
    bug: str | None = None  # the known bug this failure shows (None: not a known one)


@dataclasses.dataclass
class Tally:
    """Counts by route and answer, failures with examples, and the ingest accounting."""

    answers: dict[str, collections.Counter[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    failures: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    known_bugs: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    inputs: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    candles_inserted: int = 0
    candle_changes: int = 0
    ticks_stored: int = 0
    stream_ticks_acked: int = 0
    inserted_keys: set[CandleKey] = dataclasses.field(default_factory=set)
    ingest_unknown: int = 0
    unknown_rows: list[int] = dataclasses.field(default_factory=lambda: [0, 0, 0])
    overload: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    max_examples: int = 5

    def add(self, outcome: Outcome, description: str) -> None:
        """Count one outcome (``description`` says what was sent, for failure examples)."""
        self.inputs[outcome.transport] += 1
        self.answers[f"{outcome.transport} {outcome.route}"][outcome.answer] += 1
        if outcome.failure is not None:
            outcome.bug = known_bug(outcome)
            overloaded = outcome.bug is None and overload(outcome)
            if overloaded:
                self.overload[f"{outcome.transport} {outcome.route}: {outcome.failure}"] += 1
            tag = f" [known bug {outcome.bug}]" if outcome.bug else (" [overload]" if overloaded else "")
            key = f"{outcome.transport} {outcome.route}: {outcome.failure}{tag}"
            self.failures[key] += 1
            if outcome.bug:
                self.known_bugs[outcome.bug] += 1
            shown = self.examples.setdefault(key, [])
            if len(shown) < self.max_examples:
                shown.append(f"{description[:300]} -> {outcome.answer} {outcome.detail[:300]}")
        self.candles_inserted += outcome.candles_inserted
        self.candle_changes += outcome.candle_changes
        self.ticks_stored += outcome.ticks_stored
        self.stream_ticks_acked += outcome.stream_ticks_acked
        self.inserted_keys.update(outcome.inserted_keys)
        if outcome.unknown_rows is not None:
            self.ingest_unknown += 1
            self.unknown_rows = [a + b for a, b in zip(self.unknown_rows, outcome.unknown_rows, strict=True)]

    def merge(self, other: Tally) -> None:
        """Add another tally's counts to this one."""
        for route, counter in other.answers.items():
            self.answers[route].update(counter)
        self.failures.update(other.failures)
        self.known_bugs.update(other.known_bugs)
        for key, shown in other.examples.items():
            mine = self.examples.setdefault(key, [])
            mine.extend(shown[: max(0, self.max_examples - len(mine))])
        self.inputs.update(other.inputs)
        self.candles_inserted += other.candles_inserted
        self.candle_changes += other.candle_changes
        self.ticks_stored += other.ticks_stored
        self.stream_ticks_acked += other.stream_ticks_acked
        self.inserted_keys |= other.inserted_keys
        self.ingest_unknown += other.ingest_unknown
        self.unknown_rows = [a + b for a, b in zip(self.unknown_rows, other.unknown_rows, strict=True)]
        self.overload.update(other.overload)

    @property
    def unexplained(self) -> dict[str, int]:
        """Failures that neither a known bug nor overload explains: what a fuzz run must not have."""
        return {
            k: n
            for k, n in self.failures.items()
            if " [known bug " not in k and not k.endswith(" [overload]")
        }

    @property
    def total(self) -> int:
        """Inputs sent."""
        return sum(self.inputs.values())

    def to_json(self) -> dict[str, Any]:
        """The tally as plain data (to pass between processes, or to report)."""
        return {
            "answers": {route: dict(counter) for route, counter in self.answers.items()},
            "failures": dict(self.failures),
            "known_bugs": dict(self.known_bugs),
            "examples": self.examples,
            "inputs": dict(self.inputs),
            "candles_inserted": self.candles_inserted,
            "candle_changes": self.candle_changes,
            "ticks_stored": self.ticks_stored,
            "stream_ticks_acked": self.stream_ticks_acked,
            "inserted_keys": sorted(self.inserted_keys),
            "ingest_unknown": self.ingest_unknown,
            "unknown_rows": self.unknown_rows,
            "overload": dict(self.overload),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tally:
        """A tally from ``to_json``'s data."""
        tally = cls()
        for route, counts in data["answers"].items():
            tally.answers[route].update(counts)
        tally.failures.update(data["failures"])
        tally.known_bugs.update(data["known_bugs"])
        tally.examples = {k: list(v) for k, v in data["examples"].items()}
        tally.inputs.update(data["inputs"])
        tally.candles_inserted = int(data["candles_inserted"])
        tally.candle_changes = int(data["candle_changes"])
        tally.ticks_stored = int(data["ticks_stored"])
        tally.stream_ticks_acked = int(data["stream_ticks_acked"])
        tally.inserted_keys = {(str(a), str(b), str(c)) for a, b, c in data["inserted_keys"]}
        tally.ingest_unknown = int(data["ingest_unknown"])
        tally.unknown_rows = [int(n) for n in data["unknown_rows"]]
        tally.overload.update(data["overload"])
        return tally

    def failure_report(self) -> str:
        """Every failure kind with its count and examples, one per line."""
        lines = []
        for key, count in self.failures.most_common():
            lines.append(f"{count:>7} x {key}")
            lines.extend(f"            e.g. {example}" for example in self.examples.get(key, []))
        return "\n".join(lines)


def _has_right_key(pairs: Iterable[tuple[str, str]], api_key: str) -> bool:
    """Whether some x-api-key header or metadata entry holds the key (surrounding blanks aside)."""
    return any(name.lower() == "x-api-key" and value.strip() == api_key for name, value in pairs)


def describe_rest(request: RestRequest) -> str:
    """A short description of a REST request for reports."""
    headers = ", ".join(f"{k}: {v[:40]}{'…' if len(v) > 40 else ''}" for k, v in request.headers)
    body = repr(request.body[:160]) if request.body is not None else "no body"
    size = f" ({len(request.body)} bytes)" if request.body else ""
    return f"{request.method} {request.target[:160]} [{headers}] {body}{size}"


def describe_grpc(call: GrpcInput) -> str:
    """A short description of a gRPC call for reports."""
    sizes = "+".join(str(len(r)) for r in call.requests)
    keys = ",".join(f"{k}={v[:12]}" for k, v in call.metadata)
    damaged = "corrupt " if call.corrupt else ""
    return f"{call.method.path} [{keys}] {damaged}{sizes} bytes {call.requests[0][:120]!r}"


class FuzzClient:
    """Sends inputs to a running mesh: REST through the gateway, gRPC straight to each service."""

    def __init__(
        self, gateway_url: str, addresses: Mapping[str, str], api_key: str, timeout: float = UNARY_TIMEOUT
    ) -> None:
        self._url = gateway_url.rstrip("/")
        self._timeout = timeout
        self._addresses = dict(addresses)
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._sync_channels: dict[str, grpc.Channel] = {}
        self._threads = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="fuzz-stream")

    async def __aenter__(self) -> FuzzClient:
        connector = aiohttp.TCPConnector(limit=256, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            # Some inputs use header names or values aiohttp would refuse or fold otherwise.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )
        options = [
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
            # Every answer as the server gave it: no transparent retries of refused calls.
            ("grpc.enable_retries", 0),
        ]
        self._channels = {
            name: grpc.aio.insecure_channel(address, options=options)
            for name, address in self._addresses.items()
        }
        self._sync_channels = {
            name: grpc.insecure_channel(address, options=options) for name, address in self._addresses.items()
        }
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        for channel in self._channels.values():
            await channel.close()
        self._threads.shutdown(wait=True)
        for sync in self._sync_channels.values():
            sync.close()

    async def run(self, inputs: Sequence[RestRequest | GrpcInput], concurrency: int = 32) -> Tally:
        """Send every input, ``concurrency`` at a time, and tally the outcomes."""
        tally = Tally()
        slots = asyncio.Semaphore(concurrency)

        async def one(item: RestRequest | GrpcInput) -> None:
            async with slots:
                await self.send(item, tally)

        await asyncio.gather(*(one(item) for item in inputs))
        return tally

    async def send(self, item: RestRequest | GrpcInput, tally: Tally) -> Outcome:
        """Send one input and add its outcome to ``tally``."""
        if isinstance(item, RestRequest):
            outcome = await self.send_rest(item)
            tally.add(outcome, describe_rest(item))
        else:
            outcome = await self.send_grpc(item)
            tally.add(outcome, describe_grpc(item))
        return outcome

    # --- REST --------------------------------------------------------------------------------------

    async def send_rest(self, request: RestRequest) -> Outcome:
        """Send one REST request and judge the answer."""
        assert self._session is not None
        headers = list(request.headers)
        skip = set() if any(k.lower() == "content-type" for k, _ in headers) else {"Content-Type"}
        url = yarl.URL(self._url + request.target, encoded=True)
        try:
            async with self._session.request(
                request.method,
                url,
                data=request.body,
                headers=headers,
                skip_auto_headers=skip,
                allow_redirects=False,
            ) as response:
                body = await response.read()  # whole: content.read(n) may stop at a chunk
                status = response.status
                grpc_status = response.headers.get("grpc-status")
                grpc_message = response.headers.get("grpc-message", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._no_rest_answer(request, exc)
        if grpc_status is not None and not body.startswith((b"{", b"[")):
            # A gRPC content type: Envoy answered as gRPC (Trailers-Only), the status is in a header.
            outcome = Outcome(
                "rest", request.route, f"{status} grpc-status {grpc_status}", detail=grpc_message
            )
            if status >= 500 or int(grpc_status) not in ALLOWED_GRPC_NUMBERS:
                outcome.failure = f"grpc-status {grpc_status}"
            return outcome
        return self._judge_rest(request, status, body)

    def _no_rest_answer(self, request: RestRequest, exc: BaseException) -> Outcome:
        text = f"{type(exc).__name__}: {exc}"
        # Envoy closing the connection on an oversized or malformed request head is a refusal too
        # (aiohttp reports it as a disconnection); anything else without an answer is a failure.
        return Outcome(
            "rest",
            request.route,
            "no answer",
            failure=f"no answer ({type(exc).__name__})",
            detail=text,
            unknown_rows=_rest_row_bound(request),
        )

    def _judge_rest(self, request: RestRequest, status: int, body: bytes) -> Outcome:
        outcome = Outcome("rest", request.route, str(status), detail=body[:300].decode("utf-8", "replace"))
        if status == 503 and request.rpc == CHECK_HEALTH and b"not serving" in body:
            pass  # the mesh's health, answering as documented that a peer did not answer in time
        elif status >= 500:
            outcome.failure = f"HTTP {status}"
        elif status not in ALLOWED_HTTP:
            outcome.failure = f"unexpected HTTP {status}"
        elif _TRAILER_OVERFLOW.search(outcome.detail):
            outcome.failure = "error trailers too large to deliver"
        try:
            parsed = json.loads(body)
        except ValueError:
            # A gRPC(-web) content type gets Envoy's plain-text local replies on purpose (see
            # envoy.yaml, local_reply_config); every other client must be able to parse the answer.
            if not any(
                k.lower() == "content-type" and v.startswith("application/grpc") for k, v in request.headers
            ):
                outcome.failure = outcome.failure or "answer is not JSON"
            return outcome
        if status == 200:
            if (
                request.rpc
                and request.rpc not in OPEN_RPCS
                and not _has_right_key(request.headers, self._api_key)
            ):
                outcome.failure = "accepted without the right API key"
            if request.rpc == INGEST_CANDLES and isinstance(parsed, dict):
                outcome.candles_inserted = int(parsed.get("inserted", 0))
                outcome.candle_changes = outcome.candles_inserted + int(parsed.get("updated", 0))
                outcome.inserted_keys = tuple(
                    (str(d["symbol"]), str(d["timeframe"]), _rfc3339(str(d["ts_bucket"])))
                    for d in parsed.get("details", [])
                    if isinstance(d, dict) and d.get("status") == "inserted"
                )
            elif request.rpc == INGEST_TICKS and isinstance(parsed, dict):
                outcome.ticks_stored = int(parsed.get("stored", 0))
        return outcome

    # --- gRPC --------------------------------------------------------------------------------------

    async def send_grpc(self, call: GrpcInput) -> Outcome:
        """Make one gRPC call and judge its status and (for scores and ingest) its answer."""
        method = call.method
        channel = self._channels[method.process]
        outcome = Outcome("grpc", method.name, "")
        responses: list[bytes] = []
        try:
            if method.server_streaming and not method.client_streaming:
                stream = channel.unary_stream(method.path)(
                    call.requests[0], metadata=call.metadata, timeout=self._timeout
                )
                code, details = await _peek_stream(stream, responses)
            elif method.client_streaming:
                sync = self._sync_channels[method.process]
                code, details = await asyncio.get_running_loop().run_in_executor(
                    self._threads, _bidi, sync, method.path, call, responses, self._timeout
                )
            else:
                unary = channel.unary_unary(method.path)
                try:
                    responses.append(
                        await unary(call.requests[0], metadata=call.metadata, timeout=self._timeout)
                    )
                    code, details = grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details() or ""
        except Exception as exc:  # the client itself failed: say so, do not hide it
            outcome.answer = "client error"
            outcome.failure = f"client error {type(exc).__name__}"
            outcome.detail = str(exc)
            outcome.unknown_rows = _grpc_row_bound(call)
            return outcome
        outcome.answer = code.name if code is not None else "stream open"
        outcome.detail = details
        if code == grpc.StatusCode.UNAVAILABLE and method.path == CHECK_HEALTH and "not serving" in details:
            pass  # the mesh's health, answering as documented that a peer did not answer in time
        elif code is not None and code not in ALLOWED_GRPC:
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                outcome.failure = "no answer within the deadline"
            else:
                outcome.failure = code.name
            # Only a call that may have reached the commit without its answer reaching us is unknown;
            # a status from the server (UNKNOWN included) came before or instead of storing anything.
            if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED) or (
                code == grpc.StatusCode.UNAVAILABLE and "storage unavailable" not in details
            ):
                outcome.unknown_rows = _grpc_row_bound(call)
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TRAILER_OVERFLOW.search(details):
            outcome.failure = "error trailers too large to deliver"
        if (code is None or code == grpc.StatusCode.OK or responses) and responses:
            if method.path not in OPEN_RPCS and not _has_right_key(call.metadata, self._api_key):
                outcome.failure = "answered without the right API key"
            _read_answers(call, responses, outcome)
        return outcome


def _candle_bound(keys: list[tuple[Any, ...]]) -> tuple[int, int, int]:
    """At most one row per distinct key in ingest_candles, one log row per item."""
    return (len(set(keys)), len(keys), 0)


def _rest_row_bound(request: RestRequest) -> tuple[int, int, int] | None:
    """The most rows an unanswered REST ingest request could have added (None: not an ingest route)."""
    if request.rpc not in (INGEST_CANDLES, INGEST_TICKS):
        return None
    try:
        body = json.loads(request.body or b"")
    except ValueError:
        return (0, 0, 0)  # Envoy refuses JSON it cannot parse before any service sees it
    if request.rpc == INGEST_TICKS:
        ticks = body.get("ticks") if isinstance(body, dict) else None
        return (0, 0, len(ticks) if isinstance(ticks, list) else 0)
    items = body if isinstance(body, list) else body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        items = [body]
    keys = [
        tuple(json.dumps(item.get(k)) for k in ("symbol", "timeframe", "ts"))
        if isinstance(item, dict)
        else ()
        for item in items
    ]
    return _candle_bound(keys)


def _grpc_row_bound(call: GrpcInput) -> tuple[int, int, int] | None:
    """The most rows an unanswered gRPC ingest call could have added (None: not an ingest RPC)."""
    path = call.method.path
    try:
        if path == INGEST_CANDLES:
            request = ingest_service_pb2.IngestCandlesRequest.FromString(call.requests[0])
            items: list[Any] = list(request.items) or [request]
            return _candle_bound([(c.symbol, c.timeframe, c.ts.seconds) for c in items])
        if path == INGEST_TICKS:
            return (0, 0, len(ingest_service_pb2.IngestTicksRequest.FromString(call.requests[0]).ticks))
    except Exception:  # a damaged request never parsed on the server either
        return (0, 0, 0)
    # StreamTicks: every streamed row belongs to a batch in ingest_source_batches, which row_check reads.
    return None


async def _peek_stream(stream: Any, responses: list[bytes]) -> tuple[grpc.StatusCode | None, str]:
    """Read a subscription briefly; None when it is still open after that (the client hangs up)."""
    read = asyncio.ensure_future(stream.read())
    done, _ = await asyncio.wait({read}, timeout=STREAM_PEEK_SECONDS)
    if not done:
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await read
        return None, ""
    try:
        first = read.result()
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    if first is not grpc.aio.EOF:
        responses.append(first)
    if stream.done():
        return await stream.code(), await stream.details() or ""
    stream.cancel()
    return None, ""


def _bidi(
    channel: grpc.Channel, path: str, call: GrpcInput, responses: list[bytes], timeout: float
) -> tuple[grpc.StatusCode, str]:
    """Send every request of a client stream, half-close, and read every answer (blocking).

    A synchronous channel, run in a thread: grpc.aio's client reports INTERNAL ("Internal error from
    Core") for about one call in ten when the server ends a client stream while requests are still
    being written, hiding the status the server sent; the synchronous client reports it faithfully.
    """
    stream = channel.stream_stream(path)(iter(call.requests), metadata=call.metadata, timeout=timeout)
    try:
        responses.extend(stream)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _rfc3339(text: str) -> str:
    """One spelling of an instant, whatever the JSON printer or the database gave."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.UTC).isoformat()


def _probabilities_ok(values: Iterable[float]) -> bool:
    return all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in values)


def _read_answers(call: GrpcInput, responses: list[bytes], outcome: Outcome) -> None:
    """Check scores and add up what ingest says it stored."""
    path = call.method.path
    if path == INGEST_CANDLES:
        candles = ingest_service_pb2.IngestCandlesResponse.FromString(responses[0])
        outcome.candles_inserted = candles.inserted
        outcome.inserted_keys = tuple(
            (d.symbol, market_pb2.Timeframe.Name(d.timeframe), _rfc3339(d.ts_bucket.ToJsonString()))
            for d in candles.details
            if d.status == "inserted"
        )
        outcome.candle_changes = candles.inserted + candles.updated
    elif path == INGEST_TICKS:
        outcome.ticks_stored = ingest_service_pb2.IngestTicksResponse.FromString(responses[0]).stored
    elif path == STREAM_TICKS:
        acks = [ingest_service_pb2.StreamTicksResponse.FromString(r) for r in responses]
        outcome.stream_ticks_acked = sum(a.stored for a in acks if not a.replayed)
    elif path == PREDICT:
        predictions = inference_service_pb2.PredictResponse.FromString(responses[0]).predictions
        if not _probabilities_ok(p.prob_up for p in predictions):
            outcome.failure = "prob_up is not a probability"
    elif path == PREDICT_STREAM:
        streamed = [inference_service_pb2.PredictStreamResponse.FromString(r).prediction for r in responses]
        if not _probabilities_ok(p.prob_up for p in streamed):
            outcome.failure = "prob_up is not a probability"
    elif path == MODEL_INFER:
        answer = grpc_predict_v2_pb2.ModelInferResponse.FromString(responses[0])
        values: list[float] = []
        for i, tensor in enumerate(answer.outputs):
            if tensor.name == "prob_up":
                if answer.raw_output_contents:
                    raw = answer.raw_output_contents[i]
                    values.extend(memoryview(raw).cast("d").tolist())
                else:
                    values.extend(tensor.contents.fp64_contents)
        if not _probabilities_ok(values):
            outcome.failure = "prob_up is not a probability"


# --- what the ingest tables hold -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IngestRows:
    """Row counts of the ingest tables, ticks split by how they came (``source_id``)."""

    candles: int
    candle_log: int
    ticks: int
    unary_ticks: int  # source_id NULL: stored by IngestTicks (REST or gRPC)
    stream_ticks: int  # source_id set: stored by a StreamTicks batch
    batch_ticks: int  # the ticks of every committed streamed batch (ingest_source_batches.ticks)
    # Per source_id: (rows of ingest_ticks with that source, ticks of its committed batches).
    by_source: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


def ingest_rows(engine: Engine) -> IngestRows:
    """Count the rows of every ingest table (streamed ticks per source)."""
    with engine.connect() as conn:

        def count(table: Any, *where: Any) -> int:
            return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())

        by_source: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        stored = select(ingest_ticks.c.source_id, func.count()).where(ingest_ticks.c.source_id.is_not(None))
        for source, n in conn.execute(stored.group_by(ingest_ticks.c.source_id)):
            by_source[str(source)][0] = int(n)
        batches = select(ingest_source_batches.c.source_id, func.sum(ingest_source_batches.c.ticks))
        for source, n in conn.execute(batches.group_by(ingest_source_batches.c.source_id)):
            by_source[str(source)][1] = int(n)
        return IngestRows(
            candles=count(ingest_candles),
            candle_log=count(ingest_candle_log),
            ticks=count(ingest_ticks),
            unary_ticks=count(ingest_ticks, ingest_ticks.c.source_id.is_(None)),
            stream_ticks=sum(rows for rows, _ in by_source.values()),
            batch_ticks=sum(ticks for _, ticks in by_source.values()),
            by_source={source: (rows, ticks) for source, (rows, ticks) in by_source.items()},
        )


def stray_stream_ticks(before: IngestRows, after: IngestRows) -> dict[str, int]:
    """Per source_id, streamed rows added beyond the ticks of the batches it committed meanwhile.

    A streamed batch is committed only once validated, in the same transaction as its ticks and
    its ``ingest_source_batches`` row, so a source's new rows can never outnumber its new batches'
    ticks (fewer when some ticks were duplicates); any excess came from a refused batch.
    """
    stray: dict[str, int] = {}
    for source, (rows, ticks) in after.by_source.items():
        rows_before, ticks_before = before.by_source.get(source, (0, 0))
        excess = (rows - rows_before) - (ticks - ticks_before)
        if excess > 0:
            stray[source] = excess
    return stray


@dataclasses.dataclass(frozen=True)
class RowCheck:
    """Rows in the ingest tables against what accepted answers account for.

    Candles and IngestTicks' ticks (``source_id`` NULL) must equal what the accepted answers say they
    stored (plus, at most, what calls of unknown outcome could have stored). Streamed ticks are
    checked source by source against the batches committed (``stray_stream_ticks``): acks are not
    what is counted, since a later bad batch ends the stream before earlier acks may be read.
    """

    before: IngestRows
    after: IngestRows
    candles_accounted: int
    candle_log_accounted: int
    unary_ticks_accounted: int
    stream_ticks_acked: int
    unknown_outcomes: int
    unknown_rows: tuple[int, int, int] = (0, 0, 0)  # the most rows calls of unknown outcome could add
    stray_keys: tuple[CandleKey, ...] = ()  # candles in the table that no accepted answer inserted

    def _added(self, field: str) -> int:
        return int(getattr(self.after, field)) - int(getattr(self.before, field))

    @property
    def unaccounted(self) -> dict[str, int]:
        """Rows that nothing valid accounts for, per table (all zero when no refused input was stored)."""
        extra = {
            "ingest_candles": self._added("candles") - self.candles_accounted,
            "ingest_candle_log": self._added("candle_log") - self.candle_log_accounted,
            "ingest_ticks (IngestTicks)": self._added("unary_ticks") - self.unary_ticks_accounted,
        }
        allowance = dict(zip(extra, self.unknown_rows, strict=True))
        found = {table: n - min(n, allowance[table]) if n > 0 else n for table, n in extra.items()}
        found["ingest_ticks (StreamTicks)"] = sum(stray_stream_ticks(self.before, self.after).values())
        return found

    @property
    def leaked(self) -> bool:
        """Whether some row came from a refused input."""
        return any(n > 0 for n in self.unaccounted.values())

    @property
    def exact(self) -> bool:
        """Whether every ingest call's outcome is known, so the candle and tick checks are equalities."""
        return self.unknown_outcomes == 0

    def as_json(self) -> dict[str, Any]:
        """The check as plain data for reports."""
        return {
            "rows_added": {
                "ingest_candles": self._added("candles"),
                "ingest_candle_log": self._added("candle_log"),
                "ingest_ticks (IngestTicks)": self._added("unary_ticks"),
                "ingest_ticks (StreamTicks)": self._added("stream_ticks"),
            },
            "accounted_by_accepted_answers": {
                "ingest_candles": self.candles_accounted,
                "ingest_candle_log": self.candle_log_accounted,
                "ingest_ticks (IngestTicks)": self.unary_ticks_accounted,
                "ingest_ticks (StreamTicks), at most the committed batches' ticks": self._added(
                    "batch_ticks"
                ),
            },
            "stream_ticks_acknowledged_new": self.stream_ticks_acked,
            "calls_with_unknown_outcome": self.unknown_outcomes,
            "most_rows_those_calls_could_add": dict(
                zip(
                    ("ingest_candles", "ingest_candle_log", "ingest_ticks (IngestTicks)"),
                    self.unknown_rows,
                    strict=True,
                )
            ),
            "rows_from_rejected_requests": self.unaccounted,
            "candles_no_accepted_answer_inserted": [list(k) for k in self.stray_keys[:20]],
            "stream_sources_with_stray_rows": dict(
                list(stray_stream_ticks(self.before, self.after).items())[:20]
            ),
        }


def stray_candles(engine: Engine, inserted: set[CandleKey], limit: int = 20) -> tuple[CandleKey, ...]:
    """Candles in the table whose key no accepted answer reported as inserted (a diagnostic)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(ingest_candles.c.symbol, ingest_candles.c.timeframe, ingest_candles.c.ts)
        ).all()
    keys = ((str(s), str(t), ts.astimezone(dt.UTC).isoformat()) for s, t, ts in rows)
    return tuple(k for k in keys if k not in inserted)[:limit]


def row_check(engine: Engine, before: IngestRows, tally: Tally) -> RowCheck:
    """Compare the ingest tables now with ``before`` and with what ``tally``'s accepted answers stored."""
    return RowCheck(
        before,
        ingest_rows(engine),
        tally.candles_inserted,
        tally.candle_changes,
        tally.ticks_stored,
        tally.stream_ticks_acked,
        tally.ingest_unknown,
        (tally.unknown_rows[0], tally.unknown_rows[1], tally.unknown_rows[2]),
        stray_candles(engine, tally.inserted_keys) if before.candles == 0 else (),
    )


# --- processes -------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (0 when it is gone)."""
    with contextlib.suppress(OSError):
        text = pathlib.Path(f"/proc/{pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        if match:
            return round(int(match.group(1)) / 1024, 1)
    return 0.0

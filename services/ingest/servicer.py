"""IngestService over gRPC: messages in, domain calls, messages out. No SQL here."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from mt5.ingest.v1 import ingest_service_pb2 as pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as pb_grpc

from services.common import db, protoconv, telemetry
from services.common.errors import abort_if_any, abort_invalid
from services.common.feed import SubscriberSlots, follow
from services.common.market import shard_of
from services.common.ordered import in_order
from services.common.validation import FieldViolation, ValidationFailed
from services.ingest import convert, domain, metrics
from services.ingest.commits import CommitQueue, StoreUnavailable
from services.ingest.config import IngestConfig
from services.ingest.store import IngestStore, StoredCandleChange, StoredTick, TickBatch

MeshCheck = Callable[[], Awaitable[list[str]]]
_Item = TypeVar("_Item", StoredTick, StoredCandleChange)
_R = TypeVar("_R")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _count(kind: str, statuses: Sequence[str]) -> None:
    for status in set(statuses):
        metrics.ITEMS.labels(kind, status).inc(statuses.count(status))


class IngestServicer(pb_grpc.IngestServiceServicer):
    """Thin glue between gRPC and ingest's domain, commit queue and feeds."""

    def __init__(
        self, config: IngestConfig, commits: CommitQueue, store: IngestStore, unhealthy_services: MeshCheck
    ) -> None:
        self._config = config
        self._commits = commits
        self._store = store
        self._unhealthy_services = unhealthy_services
        self._slots = SubscriberSlots(config.max_subscribers)

    async def IngestCandles(
        self, request: pb.IngestCandlesRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestCandlesResponse:
        """Validate the whole request, then upsert it in one commit."""
        try:
            raw, field = convert.candles_of(request)
            candles = domain.validate_candles(raw, _now(), field)
        except ValidationFailed as exc:
            metrics.REJECTED.labels("candles", metrics.rejection_reason(exc.violations[0].field)).inc()
            await abort_invalid(context, exc.violations)
        statuses = await self._guard(context, self._commits.submit_candles(candles, context.time_remaining()))
        _count("candles", statuses)
        return convert.candles_response(convert.original_timestamps(request), candles, statuses)

    async def IngestTicks(
        self, request: pb.IngestTicksRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestTicksResponse:
        """Validate every tick, then store them deduplicated in one commit."""
        try:
            ticks = domain.validate_ticks(convert.raw_ticks(request.ticks), _now())
        except ValidationFailed as exc:
            metrics.REJECTED.labels("ticks", metrics.rejection_reason(exc.violations[0].field)).inc()
            await abort_invalid(context, exc.violations)
        result = await self._guard(
            context, self._commits.submit_ticks(TickBatch(ticks), context.time_remaining())
        )
        _count("ticks", result.statuses)
        return convert.ticks_response(request.ticks, ticks, result.statuses)

    async def StreamTicks(
        self, request_iterator: AsyncIterator[pb.StreamTicksRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamTicksResponse]:
        """Acknowledge each batch, in order, once committed; a bad batch ends the stream."""

        def prepare(request: pb.StreamTicksRequest) -> tuple[int, TickBatch]:
            domain.validate_source(request.source_id, request.sequence)
            ticks = domain.validate_ticks(convert.raw_ticks(request.ticks), _now())
            return request.sequence, TickBatch(ticks, request.source_id, request.sequence)

        async def commit(prepared: tuple[int, TickBatch]) -> pb.StreamTicksResponse:
            sequence, batch = prepared
            # A stream lasts as long as its feed: each batch is a trace of its own, linked to it.
            attributes: dict[str, str | int] = {
                "mt5.source_id": batch.source_id or "",
                "mt5.sequence": sequence,
            }
            with telemetry.message_span("ingest.StreamTicks batch", attributes=attributes):
                result = await self._commits.submit_ticks(batch)
            _count("ticks", result.statuses)
            metrics.REPLAYED_BATCHES.inc(result.replayed)
            stored = result.statuses.count(domain.TickStatus.RECEIVED)
            return pb.StreamTicksResponse(
                sequence=sequence,
                stored=stored,
                duplicates=len(batch.ticks) - stored,
                replayed=result.replayed,
            )

        try:
            async for ack in in_order(
                request_iterator, prepare, commit, max_in_flight=self._config.max_in_flight_batches
            ):
                yield ack
        except ValidationFailed as exc:
            metrics.REJECTED.labels("stream", metrics.rejection_reason(exc.violations[0].field)).inc()
            await abort_invalid(context, exc.violations)
        except StoreUnavailable as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"storage unavailable, re-send unacknowledged batches: {exc}"
            )

    async def SubscribeTicks(
        self, request: pb.SubscribeTicksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeTicksResponse]:
        """Stream committed ticks after the cursor, then live ones (of one shard's symbols if asked)."""
        await abort_if_any(context, protoconv.subscription_violations(request.from_cursor, request.symbols))
        symbols = list(request.symbols)
        mine = await self._shard_filter(request.shard_count, request.shard_index, context)

        async def read(cursor: int, limit: int) -> list[StoredTick]:
            return await db.read(context.time_remaining(), self._store.ticks_after, cursor, symbols, limit)

        with self._slots.take() as admitted:
            if not admitted:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many subscribers; retry later")
            cursor = request.from_cursor
            async for page in self._follow(read, cursor, metrics.TICKS_FEED, announce_head=True):
                ours = [item for item in page if mine(item.tick.symbol)]
                cursor = page[-1].cursor if page else cursor
                yield pb.SubscribeTicksResponse(
                    cursor=cursor,
                    at_head=len(page) < self._config.feed_page_size,
                    ticks=[
                        pb.CursorTick(cursor=item.cursor, tick=protoconv.tick_to_pb(item.tick))
                        for item in ours
                    ],
                    traceparents=list(dict.fromkeys(item.traceparent for item in ours if item.traceparent)),
                )

    async def SubscribeCandles(
        self, request: pb.SubscribeCandlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeCandlesResponse]:
        """Stream committed EA candle changes after the cursor, then live ones."""
        await abort_if_any(context, protoconv.subscription_violations(request.from_cursor, request.symbols))
        symbols = list(request.symbols)
        mine = await self._shard_filter(request.shard_count, request.shard_index, context)
        try:
            timeframes = protoconv.timeframes_from_pb(list(request.timeframes))
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "timeframes: unknown timeframe")

        async def read(cursor: int, limit: int) -> list[StoredCandleChange]:
            return await db.read(
                context.time_remaining(), self._store.candles_after, cursor, symbols, timeframes, limit
            )

        with self._slots.take() as admitted:
            if not admitted:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many subscribers; retry later")
            async for page in self._follow(read, request.from_cursor, metrics.CANDLES_FEED):
                for item in page:
                    if not mine(item.candle.symbol):
                        continue
                    yield pb.SubscribeCandlesResponse(
                        cursor=item.cursor,
                        candle=protoconv.candle_to_pb(item.candle),
                        revision=item.revision,
                        traceparent=item.traceparent or "",
                    )

    async def CheckHealth(
        self, request: pb.CheckHealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckHealthResponse:
        """Healthy only when this service and every peer of the mesh are SERVING."""
        down = await self._unhealthy_services()
        if down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not serving: " + ", ".join(down))
        return pb.CheckHealthResponse(status="healthy", timestamp=protoconv.timestamp(_now()))

    @staticmethod
    async def _shard_filter(
        count: int, index: int, context: grpc.aio.ServicerContext
    ) -> Callable[[str], bool]:
        if count > 1 and index >= count:
            await abort_invalid(
                context, [FieldViolation("shard_index", f"must be below shard_count ({count})")]
            )
        if count <= 1:
            return lambda _symbol: True
        return lambda symbol: shard_of(symbol, count) == index

    def _follow(
        self,
        read: Callable[[int, int], Awaitable[list[_Item]]],
        cursor: int,
        feed: str,
        *,
        announce_head: bool = False,
    ) -> AsyncIterator[Sequence[_Item]]:
        return follow(
            read,
            self._commits.committed,
            cursor,
            announce_head=announce_head,
            page_size=self._config.feed_page_size,
            poll_seconds=self._config.feed_poll_seconds,
            feed=feed,
        )

    @staticmethod
    async def _guard(context: grpc.aio.ServicerContext, work: Awaitable[_R]) -> _R:
        try:
            return await work
        except StoreUnavailable as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"storage unavailable, nothing was stored: {exc}"
            )
            raise

"""AggregatorService over gRPC: messages in, stage calls, messages out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from mt5.aggregator.v1 import aggregator_service_pb2 as pb
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc

from services.aggregator import convert
from services.aggregator.stage import AggregationStage
from services.common import db, protoconv
from services.common.errors import abort_if_any, abort_invalid
from services.common.feed import SubscriberSlots
from services.common.live import CutOff, SubscriberTooSlow
from services.common.market import SYMBOL_PATTERN, Timeframe, shard_of
from services.common.validation import FieldViolation

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000


class AggregatorServicer(pb_grpc.AggregatorServiceServicer):
    """Thin glue between gRPC and the aggregation stage."""

    def __init__(self, stage: AggregationStage, max_subscribers: int) -> None:
        self._stage = stage
        self._slots = SubscriberSlots(max_subscribers)

    async def SubscribeCandles(
        self, request: pb.SubscribeCandlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeCandlesResponse]:
        """Final bars after the cursor (stored, then live), with forming bars when asked."""
        await abort_if_any(context, protoconv.subscription_violations(request.from_cursor, request.symbols))
        try:
            timeframes = [Timeframe(v) for v in request.timeframes]
        except ValueError:
            await abort_invalid(context, [FieldViolation("timeframes", "unknown timeframe")])
        count, index = request.shard_count, request.shard_index
        if count > 1 and index >= count:
            await abort_invalid(
                context, [FieldViolation("shard_index", f"must be below shard_count ({count})")]
            )
        with self._slots.take() as admitted:
            if not admitted:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many subscribers; retry later")
            cut_off = CutOff(context)
            try:
                async for cursor, bar, traceparent in self._stage.candles(
                    request.from_cursor,
                    list(request.symbols),
                    timeframes,
                    request.include_forming,
                    lambda symbol: shard_of(symbol, count) == index if count > 1 else True,
                    cut_off,
                ):
                    yield pb.SubscribeCandlesResponse(
                        cursor=cursor, bar=convert.bar_to_pb(bar), traceparent=traceparent or ""
                    )
            except SubscriberTooSlow:
                await cut_off.finish()

    async def GetCandles(
        self, request: pb.GetCandlesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCandlesResponse:
        """Stored bars of one symbol and timeframe in a time range, oldest first."""
        await abort_if_any(context, protoconv.timestamp_violations(request, "from", "to"))
        violations = []
        if not SYMBOL_PATTERN.fullmatch(request.symbol):
            violations.append(FieldViolation("symbol", "must be 1 to 32 letters, digits or ._-#"))
        if request.timeframe not in {tf.value for tf in Timeframe}:
            violations.append(
                FieldViolation("timeframe", "is required: one of " + ", ".join(Timeframe.__members__))
            )
        if request.limit > MAX_LIMIT:
            violations.append(FieldViolation("limit", f"must be at most {MAX_LIMIT}"))
        start, end = convert.optional_time(request, "from"), convert.optional_time(request, "to")
        if start is not None and end is not None and end <= start:
            violations.append(FieldViolation("to", "must be after from"))
        if violations:
            await abort_invalid(context, violations)
        bars = await db.read(
            context.time_remaining(),
            self._stage.candles_stored,
            request.symbol,
            Timeframe(request.timeframe),
            start,
            end,
            request.limit or DEFAULT_LIMIT,
        )
        return pb.GetCandlesResponse(bars=[convert.bar_to_pb(bar) for bar in bars])

"""IndicatorsService over gRPC: messages in, stage and catalog calls, messages out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from mt5.indicators.v1 import indicators_service_pb2 as pb
from mt5.indicators.v1 import indicators_service_pb2_grpc as pb_grpc

from services.aggregator.convert import optional_time
from services.common import db, protoconv
from services.common.errors import abort_if_any, abort_invalid
from services.common.feed import SubscriberSlots
from services.common.live import CutOff, SubscriberTooSlow
from services.common.market import SYMBOL_PATTERN, Timeframe
from services.common.validation import FieldViolation, ValidationFailed
from services.indicators import catalog, convert
from services.indicators.stage import IndicatorStage

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000
_STATUS_DETAILS = "grpc-status-details-bin"


def _series_violations(symbol: str, timeframe: int) -> list[FieldViolation]:
    found = []
    if not SYMBOL_PATTERN.fullmatch(symbol):
        found.append(FieldViolation("symbol", "must be 1 to 32 letters, digits or ._-#"))
    if timeframe not in {tf.value for tf in Timeframe}:
        found.append(FieldViolation("timeframe", "is required: one of " + ", ".join(Timeframe.__members__)))
    return found


class IndicatorsServicer(pb_grpc.IndicatorsServiceServicer):
    """Thin glue between gRPC and the indicators stage and TA-Lib catalog."""

    def __init__(self, stage: IndicatorStage, max_subscribers: int) -> None:
        self._stage = stage
        self._slots = SubscriberSlots(max_subscribers)

    async def SubscribeIndicators(
        self, request: pb.SubscribeIndicatorsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeIndicatorsResponse]:
        """Final values after the cursor (stored, then live), with provisional ones when asked."""
        await abort_if_any(context, protoconv.subscription_violations(request.from_cursor, request.symbols))
        try:
            timeframes = [Timeframe(v) for v in request.timeframes]
        except ValueError:
            await abort_invalid(context, [FieldViolation("timeframes", "unknown timeframe")])
        with self._slots.take() as admitted:
            if not admitted:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many subscribers; retry later")
            cut_off = CutOff(context)
            try:
                async for cursor, values, traceparent in self._stage.values_feed(
                    request.from_cursor, list(request.symbols), timeframes, request.include_forming, cut_off
                ):
                    yield pb.SubscribeIndicatorsResponse(
                        cursor=cursor, values=convert.values_to_pb(values), traceparent=traceparent or ""
                    )
            except SubscriberTooSlow:
                await cut_off.finish()

    async def GetIndicators(
        self, request: pb.GetIndicatorsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetIndicatorsResponse:
        """Stored values of one symbol and timeframe, oldest first."""
        await abort_if_any(context, protoconv.timestamp_violations(request, "from", "to"))
        violations = _series_violations(request.symbol, request.timeframe)
        if request.limit > MAX_LIMIT:
            violations.append(FieldViolation("limit", f"must be at most {MAX_LIMIT}"))
        if violations:
            await abort_invalid(context, violations)
        values = await db.read(
            context.time_remaining(),
            self._stage.stored,
            request.symbol,
            Timeframe(request.timeframe),
            optional_time(request, "from"),
            optional_time(request, "to"),
            request.limit or DEFAULT_LIMIT,
            request.newest,
        )
        return pb.GetIndicatorsResponse(values=[convert.values_to_pb(v) for v in values])

    async def ListIndicators(
        self, request: pb.ListIndicatorsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListIndicatorsResponse:
        """TA-Lib's catalog."""
        functions = catalog.list_functions(request.group)
        if request.group and not functions:
            await abort_invalid(
                context, [FieldViolation("group", f"no TA-Lib group is called {request.group!r}")]
            )
        return pb.ListIndicatorsResponse(functions=[convert.function_to_pb(fn) for fn in functions])

    async def ComputeIndicator(
        self, request: pb.ComputeIndicatorRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeIndicatorResponse:
        """Run one TA-Lib function over stored bars of a symbol, timeframe and range."""
        await abort_if_any(context, protoconv.timestamp_violations(request, "from", "to"))
        violations = _series_violations(request.symbol, request.timeframe)
        start, end = optional_time(request, "from"), optional_time(request, "to")
        if start is not None and end is not None and end <= start:
            violations.append(FieldViolation("to", "must be after from"))
        if violations:
            await abort_invalid(context, violations)
        try:
            catalog.describe(request.function)
            bars = await self._stage.bars_between(request.symbol, Timeframe(request.timeframe), start, end)
            computation = catalog.compute(
                request.function,
                dict(request.parameters),
                [b.open for b in bars],
                [b.high for b in bars],
                [b.low for b in bars],
                [b.close for b in bars],
                [b.volume for b in bars],
            )
        except ValidationFailed as exc:
            await abort_invalid(context, exc.violations)
        except catalog.NotEnoughData as exc:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"not enough data: {request.function} needs at least {exc.needed} final bars in "
                f"the range, there are {exc.got}",
            )
        except grpc.aio.AioRpcError as exc:  # reading the bars from the aggregator failed
            code, message = convert.upstream_failure(exc.code(), exc.details())
            # Passed through, the status keeps its details (a BadRequest's field violations).
            passed = tuple(
                (key, value)
                for key, value in (exc.trailing_metadata() or ())
                if code == exc.code() and key == _STATUS_DETAILS
            )
            await context.abort(code, message, passed)
        return convert.computation_to_pb(computation, [b.ts for b in bars])

"""InferenceService over gRPC: messages in, stage, store and batcher calls, messages out."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import numpy as np
from google.api import httpbody_pb2
from mt5.inference.v1 import inference_service_pb2 as pb
from mt5.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.common import db, protoconv
from services.common.errors import abort_if_any, abort_invalid
from services.common.feed import SubscriberSlots
from services.common.market import SYMBOL_PATTERN, Timeframe
from services.common.validation import FieldViolation
from services.inference import convert
from services.inference.domain import MAX_ROWS, range_violations, row_violations
from services.inference.registry import LoadedModel
from services.inference.serving import NO_MODEL, MicroBatcher, ModelHolder, Scored
from services.inference.stage import InferenceStage
from services.inference.store import SignalStore

DEFAULT_LIMIT = 100
STREAM_IN_FLIGHT = 256  # rows of one PredictStream scored ahead of the responses


async def _ending_on_failure(reading: Awaitable[None], pending: asyncio.Queue[Any]) -> None:
    """Run a client stream's reader; when it fails, queue the exception for the answering loop.

    The loop waits on the queue: without this, a request stream that fails (a message that does
    not parse, a client gone) would leave the call hanging until its deadline.
    """
    try:
        await reading
    except Exception as exc:
        await pending.put(exc)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Thin glue between gRPC and the inference stage, signal store and micro-batcher."""

    def __init__(
        self,
        stage: InferenceStage,
        store: SignalStore,
        holder: ModelHolder,
        batcher: MicroBatcher,
        max_subscribers: int,
    ) -> None:
        self._stage = stage
        self._store = store
        self._holder = holder
        self._batcher = batcher
        self._slots = SubscriberSlots(max_subscribers)

    async def _model(self, context: grpc.aio.ServicerContext) -> LoadedModel:
        """The served model; UNAVAILABLE (HTTP 503) until one is trained and loaded."""
        if self._holder.current is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, NO_MODEL)
        return self._holder.require()

    async def _timeframe(self, value: int, context: grpc.aio.ServicerContext) -> Timeframe:
        """The requested timeframe; unset means the served model's."""
        model = await self._model(context)
        if value == 0:
            return Timeframe[model.manifest.timeframe]
        if value not in {tf.value for tf in Timeframe}:
            await abort_invalid(
                context, [FieldViolation("timeframe", "one of " + ", ".join(Timeframe.__members__))]
            )
        return Timeframe(value)

    async def _limit(self, value: int, context: grpc.aio.ServicerContext) -> int:
        if value > MAX_ROWS:
            await abort_invalid(context, [FieldViolation("limit", f"must be at most {MAX_ROWS}")])
        return value or DEFAULT_LIMIT

    async def _symbol(self, value: str, context: grpc.aio.ServicerContext) -> str:
        if not SYMBOL_PATTERN.fullmatch(value):
            await abort_invalid(
                context, [FieldViolation("symbol", "is required: 1 to 32 letters, digits or ._-#")]
            )
        return value

    async def SubscribeSignals(
        self, request: pb.SubscribeSignalsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeSignalsResponse]:
        """Signals after the cursor: stored ones, then live ones."""
        await abort_if_any(context, protoconv.subscription_violations(request.from_cursor, request.symbols))
        try:
            timeframes = [Timeframe(v) for v in request.timeframes]
        except ValueError:
            await abort_invalid(context, [FieldViolation("timeframes", "unknown timeframe")])
        with self._slots.take() as admitted:
            if not admitted:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many subscribers; retry later")
            async for cursor, signal, traceparent in self._stage.signals_feed(
                request.from_cursor, list(request.symbols), timeframes
            ):
                yield pb.SubscribeSignalsResponse(
                    cursor=cursor, signal=convert.signal_to_pb(signal), traceparent=traceparent or ""
                )

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        """Score explicit feature rows."""
        model = await self._model(context)
        rows = [list(r.values) for r in request.rows]
        violations = row_violations(rows, model.manifest.n_inputs, "rows[{i}].values")
        if violations:
            await abort_invalid(context, violations)
        array = np.array(rows, dtype=np.float64)
        violations = range_violations(array, model.scorer.out_of_range(array), "rows[{i}].values")
        if violations:
            await abort_invalid(context, violations)
        scored = await self._batcher.score(array)
        return pb.PredictResponse(predictions=_predictions(scored), model_version=scored.version)

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        """Score rows as they come, several in flight, answering in order."""
        model = await self._model(context)
        pending: asyncio.Queue[asyncio.Future[Scored] | list[FieldViolation] | None] = asyncio.Queue(
            STREAM_IN_FLIGHT
        )

        async def read() -> None:
            async for message in request_iterator:
                row = list(message.row.values)
                violations = row_violations([row], model.manifest.n_inputs, "row.values")
                if not violations:
                    array = np.array([row], dtype=np.float64)
                    violations = range_violations(array, model.scorer.out_of_range(array), "row.values")
                if violations:
                    await pending.put(violations)
                    return
                await pending.put(await self._batcher.submit(array))
            await pending.put(None)

        reader = asyncio.create_task(_ending_on_failure(read(), pending))
        try:
            while (item := await pending.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, list):
                    await abort_invalid(context, item)
                scored = await item
                yield pb.PredictStreamResponse(
                    prediction=_predictions(scored)[0], model_version=scored.version
                )
        finally:
            reader.cancel()

    async def ListSignals(
        self, request: pb.ListSignalsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSignalsResponse:
        """The signal of each symbol's latest final candle."""
        timeframe = await self._timeframe(request.timeframe, context)
        signals = await db.read(context.time_remaining(), self._store.current, timeframe)
        return pb.ListSignalsResponse(signals=[convert.signal_to_pb(s) for s in signals])

    async def SaveSignals(
        self, request: pb.SaveSignalsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SaveSignalsResponse:
        """Copy the current signals into the saved history."""
        timeframe = await self._timeframe(request.timeframe, context)
        saved = await asyncio.to_thread(self._store.save, timeframe, dt.datetime.now(dt.UTC))
        return pb.SaveSignalsResponse(saved=saved, timeframe=timeframe.value)  # type: ignore[arg-type]

    async def GetSignalHistory(
        self, request: pb.GetSignalHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSignalHistoryResponse:
        """Saved signals of a symbol, newest first."""
        timeframe = await self._timeframe(request.timeframe, context)
        symbol = await self._symbol(request.symbol, context)
        limit = await self._limit(request.limit, context)
        signals = await db.read(context.time_remaining(), self._store.history, symbol, timeframe, limit)
        return pb.GetSignalHistoryResponse(signals=[convert.signal_to_pb(s) for s in signals])

    async def GetLatestSignals(
        self, request: pb.GetLatestSignalsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLatestSignalsResponse:
        """The last saved signal of each symbol."""
        timeframe = await self._timeframe(request.timeframe, context)
        signals = await db.read(context.time_remaining(), self._store.latest_saved, timeframe)
        return pb.GetLatestSignalsResponse(signals=[convert.signal_to_pb(s) for s in signals])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        """The served model's manifest and metrics."""
        return convert.manifest_to_pb((await self._model(context)).manifest)

    async def ExportSignals(
        self, request: pb.ExportSignalsRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        """The seed's ``GET /signals``: a bare JSON array."""
        listed = await self.ListSignals(pb.ListSignalsRequest(timeframe=request.timeframe), context)
        return convert.signals_json([convert.signal_from_pb(s) for s in listed.signals])

    async def ExportSignalHistory(
        self, request: pb.ExportSignalHistoryRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        """The seed's ``GET /signals/history``: a bare JSON array."""
        history = await self.GetSignalHistory(
            pb.GetSignalHistoryRequest(
                symbol=request.symbol, timeframe=request.timeframe, limit=request.limit
            ),
            context,
        )
        return convert.signals_json([convert.signal_from_pb(s) for s in history.signals])

    async def ExportLatestSignals(
        self, request: pb.ExportLatestSignalsRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        """The seed's ``GET /signals/latest``: a bare JSON array."""
        latest = await self.GetLatestSignals(pb.GetLatestSignalsRequest(timeframe=request.timeframe), context)
        return convert.signals_json([convert.signal_from_pb(s) for s in latest.signals])


def _predictions(scored: Scored) -> list[pb.Prediction]:
    return [
        pb.Prediction(prob_up=float(p), label=int(label))
        for p, label in zip(scored.probabilities, scored.labels, strict=True)
    ]

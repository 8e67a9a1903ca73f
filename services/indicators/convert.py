"""Indicators' domain values and catalog to messages; the aggregator's failures to statuses."""

from __future__ import annotations

import grpc
from mt5.indicators.v1 import indicators_service_pb2 as pb
from mt5.market.v1 import market_pb2

from services.common.protoconv import timestamp
from services.common.schema import CANDLE_INPUT_NAMES, INDICATOR_NAMES
from services.indicators.catalog import Computation, IndicatorFunction
from services.indicators.engine import IndicatorValues


def values_to_pb(v: IndicatorValues) -> market_pb2.IndicatorValues:
    """Values as their message; an indicator still warming up is left unset (absent in JSON)."""
    present = {
        name: getattr(v, name)
        for name in (*INDICATOR_NAMES, *CANDLE_INPUT_NAMES)
        if getattr(v, name) is not None
    }
    return market_pb2.IndicatorValues(
        symbol=v.symbol,
        timeframe=v.timeframe.name,
        ts=timestamp(v.ts),
        revision=v.revision,
        final=v.final,
        **present,
    )


def function_to_pb(fn: IndicatorFunction) -> pb.IndicatorFunction:
    """A catalog entry as its message."""
    return pb.IndicatorFunction(
        name=fn.name,
        group=fn.group,
        display_name=fn.display_name,
        inputs=fn.inputs,
        parameters=[pb.IndicatorParameter(name=p.name, default_value=p.default) for p in fn.parameters],
        outputs=fn.outputs,
    )


def computation_to_pb(computation: Computation, times: list[object]) -> pb.ComputeIndicatorResponse:
    """Output series aligned with the bar times."""
    return pb.ComputeIndicatorResponse(
        timestamps=[timestamp(t) for t in times],  # type: ignore[arg-type]
        outputs=[
            pb.OutputSeries(
                name=name,
                values=[pb.OptionalDouble() if x is None else pb.OptionalDouble(value=x) for x in series],
            )
            for name, series in zip(computation.outputs, computation.series, strict=True)
        ],
    )


# Failures of an upstream call that are about the caller's own request: passed on as they are.
_CALLERS_OWN = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)


def upstream_failure(code: grpc.StatusCode, details: str | None) -> tuple[grpc.StatusCode, str]:
    """The status to answer a request with when the aggregator failed a call made for it.

    A failure about the request (bad argument, its deadline) passes through with its message. Any
    other is the aggregator being away or broken: UNAVAILABLE, which clients may retry, without
    the aggregator's own message (it is no business of the caller's).
    """
    if code in _CALLERS_OWN:
        return code, details or code.name
    return grpc.StatusCode.UNAVAILABLE, f"the aggregator could not answer ({code.name}); retry later"

"""Inference's domain values to messages and back."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from google.api import httpbody_pb2
from google.protobuf import json_format
from mt5.inference.v1 import inference_service_pb2 as pb
from mt5.market.v1 import market_pb2

from services.common.market import Timeframe
from services.common.protoconv import timestamp, to_datetime
from services.inference.domain import Inputs, Signal
from services.inference.features import INPUTS
from services.inference.registry import Manifest

METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")


def inputs_from_pb(values: market_pb2.IndicatorValues) -> Inputs:
    """A candle's model inputs from its indicator message; NaN for an absent value."""
    return tuple(getattr(values, name) if values.HasField(name) else math.nan for name in INPUTS)


def signal_to_pb(s: Signal) -> market_pb2.Signal:
    """A signal as its message."""
    return market_pb2.Signal(
        symbol=s.symbol,
        timeframe=s.timeframe.name,
        ts=timestamp(s.ts),
        prob_up=s.prob_up,
        label=s.label,
        model_version=s.model_version,
        candle_revision=s.candle_revision,
    )


def signal_from_pb(m: market_pb2.Signal) -> Signal:
    """A signal message as the domain value."""
    return Signal(
        m.symbol,
        Timeframe(m.timeframe),
        to_datetime(m.ts),
        m.prob_up,
        m.label,
        m.model_version,
        m.candle_revision,
    )


def signals_json(signals: Sequence[Signal]) -> httpbody_pb2.HttpBody:
    """The seed's bare JSON array of signals, with the JSON names ListSignals has through Envoy."""
    items = [
        json_format.MessageToDict(
            signal_to_pb(s), preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for s in signals
    ]
    return httpbody_pb2.HttpBody(content_type="application/json", data=json.dumps(items).encode())


def manifest_to_pb(m: Manifest) -> pb.GetModelResponse:
    """A model's manifest and test metrics as GetModel's answer."""
    metrics = {}
    for model, values in m.metrics.items():
        known = {k: float(v) for k, v in values.items() if k in METRIC_NAMES and _finite(v)}
        metrics[model] = pb.ModelMetrics(**known)
    return pb.GetModelResponse(
        name=m.name,
        version=m.version,
        created=m.created,
        timeframe=Timeframe[m.timeframe].value,  # type: ignore[arg-type]
        symbols=list(m.symbols),
        data_from=m.data_from,
        data_to=m.data_to,
        features=list(m.features),
        window=m.window,
        horizon=m.horizon,
        threshold=m.threshold,
        metrics=metrics,
        weights_sha256=m.weights_sha256,
        torch_version=m.torch_version,
    )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)

from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from mt5.market.v1 import market_pb2 as _market_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubscribeSignalsRequest(_message.Message):
    __slots__ = ("symbols", "timeframes", "from_cursor")
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAMES_FIELD_NUMBER: _ClassVar[int]
    FROM_CURSOR_FIELD_NUMBER: _ClassVar[int]
    symbols: _containers.RepeatedScalarFieldContainer[str]
    timeframes: _containers.RepeatedScalarFieldContainer[_market_pb2.Timeframe]
    from_cursor: int
    def __init__(self, symbols: _Optional[_Iterable[str]] = ..., timeframes: _Optional[_Iterable[_Union[_market_pb2.Timeframe, str]]] = ..., from_cursor: _Optional[int] = ...) -> None: ...

class SubscribeSignalsResponse(_message.Message):
    __slots__ = ("cursor", "signal", "traceparent")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    signal: _market_pb2.Signal
    traceparent: str
    def __init__(self, cursor: _Optional[int] = ..., signal: _Optional[_Union[_market_pb2.Signal, _Mapping]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class FeatureRow(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[FeatureRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[FeatureRow, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "model_version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: str
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("prob_up", "label")
    PROB_UP_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    prob_up: float
    label: int
    def __init__(self, prob_up: _Optional[float] = ..., label: _Optional[int] = ...) -> None: ...

class PredictStreamRequest(_message.Message):
    __slots__ = ("row",)
    ROW_FIELD_NUMBER: _ClassVar[int]
    row: FeatureRow
    def __init__(self, row: _Optional[_Union[FeatureRow, _Mapping]] = ...) -> None: ...

class PredictStreamResponse(_message.Message):
    __slots__ = ("prediction", "model_version")
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    prediction: Prediction
    model_version: str
    def __init__(self, prediction: _Optional[_Union[Prediction, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListSignalsRequest(_message.Message):
    __slots__ = ("timeframe",)
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    timeframe: _market_pb2.Timeframe
    def __init__(self, timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ...) -> None: ...

class ListSignalsResponse(_message.Message):
    __slots__ = ("signals",)
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    signals: _containers.RepeatedCompositeFieldContainer[_market_pb2.Signal]
    def __init__(self, signals: _Optional[_Iterable[_Union[_market_pb2.Signal, _Mapping]]] = ...) -> None: ...

class SaveSignalsRequest(_message.Message):
    __slots__ = ("timeframe",)
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    timeframe: _market_pb2.Timeframe
    def __init__(self, timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ...) -> None: ...

class SaveSignalsResponse(_message.Message):
    __slots__ = ("saved", "timeframe")
    SAVED_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    saved: int
    timeframe: _market_pb2.Timeframe
    def __init__(self, saved: _Optional[int] = ..., timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ...) -> None: ...

class GetSignalHistoryRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "limit")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: _market_pb2.Timeframe
    limit: int
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class GetSignalHistoryResponse(_message.Message):
    __slots__ = ("signals",)
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    signals: _containers.RepeatedCompositeFieldContainer[_market_pb2.Signal]
    def __init__(self, signals: _Optional[_Iterable[_Union[_market_pb2.Signal, _Mapping]]] = ...) -> None: ...

class GetLatestSignalsRequest(_message.Message):
    __slots__ = ("timeframe",)
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    timeframe: _market_pb2.Timeframe
    def __init__(self, timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ...) -> None: ...

class GetLatestSignalsResponse(_message.Message):
    __slots__ = ("signals",)
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    signals: _containers.RepeatedCompositeFieldContainer[_market_pb2.Signal]
    def __init__(self, signals: _Optional[_Iterable[_Union[_market_pb2.Signal, _Mapping]]] = ...) -> None: ...

class ExportSignalsRequest(_message.Message):
    __slots__ = ("timeframe",)
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    timeframe: _market_pb2.Timeframe
    def __init__(self, timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ...) -> None: ...

class ExportSignalHistoryRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "limit")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: _market_pb2.Timeframe
    limit: int
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ExportLatestSignalsRequest(_message.Message):
    __slots__ = ("timeframe",)
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    timeframe: _market_pb2.Timeframe
    def __init__(self, timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("name", "version", "created", "timeframe", "symbols", "data_from", "data_to", "features", "window", "horizon", "threshold", "metrics", "weights_sha256", "torch_version")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ModelMetrics
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ModelMetrics, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    DATA_FROM_FIELD_NUMBER: _ClassVar[int]
    DATA_TO_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    created: str
    timeframe: _market_pb2.Timeframe
    symbols: _containers.RepeatedScalarFieldContainer[str]
    data_from: str
    data_to: str
    features: _containers.RepeatedScalarFieldContainer[str]
    window: int
    horizon: int
    threshold: float
    metrics: _containers.MessageMap[str, ModelMetrics]
    weights_sha256: str
    torch_version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., created: _Optional[str] = ..., timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ..., symbols: _Optional[_Iterable[str]] = ..., data_from: _Optional[str] = ..., data_to: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., window: _Optional[int] = ..., horizon: _Optional[int] = ..., threshold: _Optional[float] = ..., metrics: _Optional[_Mapping[str, ModelMetrics]] = ..., weights_sha256: _Optional[str] = ..., torch_version: _Optional[str] = ...) -> None: ...

class ModelMetrics(_message.Message):
    __slots__ = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    ROC_AUC_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_FIELD_NUMBER: _ClassVar[int]
    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float
    log_loss: float
    def __init__(self, accuracy: _Optional[float] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., roc_auc: _Optional[float] = ..., log_loss: _Optional[float] = ...) -> None: ...

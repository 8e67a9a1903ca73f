import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mt5.market.v1 import market_pb2 as _market_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubscribeIndicatorsRequest(_message.Message):
    __slots__ = ("symbols", "timeframes", "from_cursor", "include_forming")
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAMES_FIELD_NUMBER: _ClassVar[int]
    FROM_CURSOR_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FORMING_FIELD_NUMBER: _ClassVar[int]
    symbols: _containers.RepeatedScalarFieldContainer[str]
    timeframes: _containers.RepeatedScalarFieldContainer[_market_pb2.Timeframe]
    from_cursor: int
    include_forming: bool
    def __init__(self, symbols: _Optional[_Iterable[str]] = ..., timeframes: _Optional[_Iterable[_Union[_market_pb2.Timeframe, str]]] = ..., from_cursor: _Optional[int] = ..., include_forming: _Optional[bool] = ...) -> None: ...

class SubscribeIndicatorsResponse(_message.Message):
    __slots__ = ("cursor", "values", "traceparent")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    values: _market_pb2.IndicatorValues
    traceparent: str
    def __init__(self, cursor: _Optional[int] = ..., values: _Optional[_Union[_market_pb2.IndicatorValues, _Mapping]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class GetIndicatorsRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "to", "limit", "newest")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: _market_pb2.Timeframe
    to: _timestamp_pb2.Timestamp
    limit: int
    newest: bool
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ..., to: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ..., newest: _Optional[bool] = ..., **kwargs) -> None: ...

class GetIndicatorsResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[_market_pb2.IndicatorValues]
    def __init__(self, values: _Optional[_Iterable[_Union[_market_pb2.IndicatorValues, _Mapping]]] = ...) -> None: ...

class ListIndicatorsRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class ListIndicatorsResponse(_message.Message):
    __slots__ = ("functions",)
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    functions: _containers.RepeatedCompositeFieldContainer[IndicatorFunction]
    def __init__(self, functions: _Optional[_Iterable[_Union[IndicatorFunction, _Mapping]]] = ...) -> None: ...

class IndicatorFunction(_message.Message):
    __slots__ = ("name", "group", "display_name", "inputs", "parameters", "outputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    group: str
    display_name: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    parameters: _containers.RepeatedCompositeFieldContainer[IndicatorParameter]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., group: _Optional[str] = ..., display_name: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., parameters: _Optional[_Iterable[_Union[IndicatorParameter, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class IndicatorParameter(_message.Message):
    __slots__ = ("name", "default_value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_value: float
    def __init__(self, name: _Optional[str] = ..., default_value: _Optional[float] = ...) -> None: ...

class ComputeIndicatorRequest(_message.Message):
    __slots__ = ("function", "parameters", "symbol", "timeframe", "to")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    function: str
    parameters: _containers.ScalarMap[str, float]
    symbol: str
    timeframe: _market_pb2.Timeframe
    to: _timestamp_pb2.Timestamp
    def __init__(self, function: _Optional[str] = ..., parameters: _Optional[_Mapping[str, float]] = ..., symbol: _Optional[str] = ..., timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ..., to: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., **kwargs) -> None: ...

class ComputeIndicatorResponse(_message.Message):
    __slots__ = ("timestamps", "outputs")
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    timestamps: _containers.RepeatedCompositeFieldContainer[_timestamp_pb2.Timestamp]
    outputs: _containers.RepeatedCompositeFieldContainer[OutputSeries]
    def __init__(self, timestamps: _Optional[_Iterable[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[OutputSeries, _Mapping]]] = ...) -> None: ...

class OutputSeries(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedCompositeFieldContainer[OptionalDouble]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[_Union[OptionalDouble, _Mapping]]] = ...) -> None: ...

class OptionalDouble(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: float
    def __init__(self, value: _Optional[float] = ...) -> None: ...

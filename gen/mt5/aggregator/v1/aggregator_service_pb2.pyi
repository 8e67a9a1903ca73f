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

class SubscribeCandlesRequest(_message.Message):
    __slots__ = ("symbols", "timeframes", "from_cursor", "include_forming", "shard_count", "shard_index")
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAMES_FIELD_NUMBER: _ClassVar[int]
    FROM_CURSOR_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FORMING_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    symbols: _containers.RepeatedScalarFieldContainer[str]
    timeframes: _containers.RepeatedScalarFieldContainer[_market_pb2.Timeframe]
    from_cursor: int
    include_forming: bool
    shard_count: int
    shard_index: int
    def __init__(self, symbols: _Optional[_Iterable[str]] = ..., timeframes: _Optional[_Iterable[_Union[_market_pb2.Timeframe, str]]] = ..., from_cursor: _Optional[int] = ..., include_forming: _Optional[bool] = ..., shard_count: _Optional[int] = ..., shard_index: _Optional[int] = ...) -> None: ...

class SubscribeCandlesResponse(_message.Message):
    __slots__ = ("cursor", "bar", "traceparent")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    BAR_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    bar: _market_pb2.Bar
    traceparent: str
    def __init__(self, cursor: _Optional[int] = ..., bar: _Optional[_Union[_market_pb2.Bar, _Mapping]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class GetCandlesRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "to", "limit")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: _market_pb2.Timeframe
    to: _timestamp_pb2.Timestamp
    limit: int
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ..., to: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ..., **kwargs) -> None: ...

class GetCandlesResponse(_message.Message):
    __slots__ = ("bars",)
    BARS_FIELD_NUMBER: _ClassVar[int]
    bars: _containers.RepeatedCompositeFieldContainer[_market_pb2.Bar]
    def __init__(self, bars: _Optional[_Iterable[_Union[_market_pb2.Bar, _Mapping]]] = ...) -> None: ...

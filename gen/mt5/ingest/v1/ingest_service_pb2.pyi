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

class IngestCandlesRequest(_message.Message):
    __slots__ = ("items", "symbol", "timeframe", "ts", "open", "high", "low", "close", "volume", "spread")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_market_pb2.Candle]
    symbol: str
    timeframe: _market_pb2.Timeframe
    ts: _timestamp_pb2.Timestamp
    open: float
    high: float
    low: float
    close: float
    volume: float
    spread: float
    def __init__(self, items: _Optional[_Iterable[_Union[_market_pb2.Candle, _Mapping]]] = ..., symbol: _Optional[str] = ..., timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ..., ts: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., open: _Optional[float] = ..., high: _Optional[float] = ..., low: _Optional[float] = ..., close: _Optional[float] = ..., volume: _Optional[float] = ..., spread: _Optional[float] = ...) -> None: ...

class IngestCandlesResponse(_message.Message):
    __slots__ = ("ok", "received", "inserted", "duplicates", "details", "updated")
    OK_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    received: int
    inserted: int
    duplicates: int
    details: _containers.RepeatedCompositeFieldContainer[CandleDetail]
    updated: int
    def __init__(self, ok: _Optional[bool] = ..., received: _Optional[int] = ..., inserted: _Optional[int] = ..., duplicates: _Optional[int] = ..., details: _Optional[_Iterable[_Union[CandleDetail, _Mapping]]] = ..., updated: _Optional[int] = ...) -> None: ...

class CandleDetail(_message.Message):
    __slots__ = ("symbol", "timeframe", "ts_original", "ts_bucket", "status")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    TS_ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    TS_BUCKET_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: _market_pb2.Timeframe
    ts_original: _timestamp_pb2.Timestamp
    ts_bucket: _timestamp_pb2.Timestamp
    status: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[_Union[_market_pb2.Timeframe, str]] = ..., ts_original: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ts_bucket: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[str] = ...) -> None: ...

class IngestTicksRequest(_message.Message):
    __slots__ = ("ticks",)
    TICKS_FIELD_NUMBER: _ClassVar[int]
    ticks: _containers.RepeatedCompositeFieldContainer[_market_pb2.Tick]
    def __init__(self, ticks: _Optional[_Iterable[_Union[_market_pb2.Tick, _Mapping]]] = ...) -> None: ...

class IngestTicksResponse(_message.Message):
    __slots__ = ("ok", "received", "details", "stored", "duplicates")
    OK_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    received: int
    details: _containers.RepeatedCompositeFieldContainer[TickDetail]
    stored: int
    duplicates: int
    def __init__(self, ok: _Optional[bool] = ..., received: _Optional[int] = ..., details: _Optional[_Iterable[_Union[TickDetail, _Mapping]]] = ..., stored: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class TickDetail(_message.Message):
    __slots__ = ("symbol", "ts_original", "ts_bucket", "status")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TS_ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    TS_BUCKET_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    ts_original: _timestamp_pb2.Timestamp
    ts_bucket: _timestamp_pb2.Timestamp
    status: str
    def __init__(self, symbol: _Optional[str] = ..., ts_original: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ts_bucket: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[str] = ...) -> None: ...

class StreamTicksRequest(_message.Message):
    __slots__ = ("source_id", "sequence", "ticks")
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TICKS_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    sequence: int
    ticks: _containers.RepeatedCompositeFieldContainer[_market_pb2.Tick]
    def __init__(self, source_id: _Optional[str] = ..., sequence: _Optional[int] = ..., ticks: _Optional[_Iterable[_Union[_market_pb2.Tick, _Mapping]]] = ...) -> None: ...

class StreamTicksResponse(_message.Message):
    __slots__ = ("sequence", "stored", "duplicates", "replayed")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    stored: int
    duplicates: int
    replayed: bool
    def __init__(self, sequence: _Optional[int] = ..., stored: _Optional[int] = ..., duplicates: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class SubscribeTicksRequest(_message.Message):
    __slots__ = ("from_cursor", "symbols", "shard_count", "shard_index")
    FROM_CURSOR_FIELD_NUMBER: _ClassVar[int]
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    from_cursor: int
    symbols: _containers.RepeatedScalarFieldContainer[str]
    shard_count: int
    shard_index: int
    def __init__(self, from_cursor: _Optional[int] = ..., symbols: _Optional[_Iterable[str]] = ..., shard_count: _Optional[int] = ..., shard_index: _Optional[int] = ...) -> None: ...

class SubscribeTicksResponse(_message.Message):
    __slots__ = ("cursor", "ticks", "traceparents", "at_head")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    TICKS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENTS_FIELD_NUMBER: _ClassVar[int]
    AT_HEAD_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    ticks: _containers.RepeatedCompositeFieldContainer[CursorTick]
    traceparents: _containers.RepeatedScalarFieldContainer[str]
    at_head: bool
    def __init__(self, cursor: _Optional[int] = ..., ticks: _Optional[_Iterable[_Union[CursorTick, _Mapping]]] = ..., traceparents: _Optional[_Iterable[str]] = ..., at_head: _Optional[bool] = ...) -> None: ...

class CursorTick(_message.Message):
    __slots__ = ("cursor", "tick")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    tick: _market_pb2.Tick
    def __init__(self, cursor: _Optional[int] = ..., tick: _Optional[_Union[_market_pb2.Tick, _Mapping]] = ...) -> None: ...

class SubscribeCandlesRequest(_message.Message):
    __slots__ = ("from_cursor", "symbols", "timeframes", "shard_count", "shard_index")
    FROM_CURSOR_FIELD_NUMBER: _ClassVar[int]
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAMES_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    from_cursor: int
    symbols: _containers.RepeatedScalarFieldContainer[str]
    timeframes: _containers.RepeatedScalarFieldContainer[_market_pb2.Timeframe]
    shard_count: int
    shard_index: int
    def __init__(self, from_cursor: _Optional[int] = ..., symbols: _Optional[_Iterable[str]] = ..., timeframes: _Optional[_Iterable[_Union[_market_pb2.Timeframe, str]]] = ..., shard_count: _Optional[int] = ..., shard_index: _Optional[int] = ...) -> None: ...

class SubscribeCandlesResponse(_message.Message):
    __slots__ = ("cursor", "candle", "revision", "traceparent")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    CANDLE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    candle: _market_pb2.Candle
    revision: int
    traceparent: str
    def __init__(self, cursor: _Optional[int] = ..., candle: _Optional[_Union[_market_pb2.Candle, _Mapping]] = ..., revision: _Optional[int] = ..., traceparent: _Optional[str] = ...) -> None: ...

class CheckHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckHealthResponse(_message.Message):
    __slots__ = ("status", "timestamp")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    status: str
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, status: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

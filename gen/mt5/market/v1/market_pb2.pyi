import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Timeframe(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIMEFRAME_UNSPECIFIED: _ClassVar[Timeframe]
    M1: _ClassVar[Timeframe]
    M5: _ClassVar[Timeframe]
    M15: _ClassVar[Timeframe]
    M30: _ClassVar[Timeframe]
    H1: _ClassVar[Timeframe]
    H4: _ClassVar[Timeframe]
    D1: _ClassVar[Timeframe]
    W1: _ClassVar[Timeframe]
    MN1: _ClassVar[Timeframe]

class CandleSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANDLE_SOURCE_UNSPECIFIED: _ClassVar[CandleSource]
    CANDLE_SOURCE_EA: _ClassVar[CandleSource]
    CANDLE_SOURCE_TICKS: _ClassVar[CandleSource]
    CANDLE_SOURCE_ROLLUP: _ClassVar[CandleSource]
TIMEFRAME_UNSPECIFIED: Timeframe
M1: Timeframe
M5: Timeframe
M15: Timeframe
M30: Timeframe
H1: Timeframe
H4: Timeframe
D1: Timeframe
W1: Timeframe
MN1: Timeframe
CANDLE_SOURCE_UNSPECIFIED: CandleSource
CANDLE_SOURCE_EA: CandleSource
CANDLE_SOURCE_TICKS: CandleSource
CANDLE_SOURCE_ROLLUP: CandleSource

class Tick(_message.Message):
    __slots__ = ("symbol", "ts", "bid", "ask", "volume")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    BID_FIELD_NUMBER: _ClassVar[int]
    ASK_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    ts: _timestamp_pb2.Timestamp
    bid: float
    ask: float
    volume: float
    def __init__(self, symbol: _Optional[str] = ..., ts: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., bid: _Optional[float] = ..., ask: _Optional[float] = ..., volume: _Optional[float] = ...) -> None: ...

class Candle(_message.Message):
    __slots__ = ("symbol", "timeframe", "ts", "open", "high", "low", "close", "volume", "spread")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: Timeframe
    ts: _timestamp_pb2.Timestamp
    open: float
    high: float
    low: float
    close: float
    volume: float
    spread: float
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[_Union[Timeframe, str]] = ..., ts: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., open: _Optional[float] = ..., high: _Optional[float] = ..., low: _Optional[float] = ..., close: _Optional[float] = ..., volume: _Optional[float] = ..., spread: _Optional[float] = ...) -> None: ...

class Bar(_message.Message):
    __slots__ = ("candle", "source", "revision", "final", "tick_count", "ea_disagrees")
    CANDLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    TICK_COUNT_FIELD_NUMBER: _ClassVar[int]
    EA_DISAGREES_FIELD_NUMBER: _ClassVar[int]
    candle: Candle
    source: CandleSource
    revision: int
    final: bool
    tick_count: int
    ea_disagrees: bool
    def __init__(self, candle: _Optional[_Union[Candle, _Mapping]] = ..., source: _Optional[_Union[CandleSource, str]] = ..., revision: _Optional[int] = ..., final: _Optional[bool] = ..., tick_count: _Optional[int] = ..., ea_disagrees: _Optional[bool] = ...) -> None: ...

class IndicatorValues(_message.Message):
    __slots__ = ("symbol", "timeframe", "ts", "revision", "final", "rsi", "macd", "macd_signal", "macd_hist", "atr", "bb_upper", "bb_middle", "bb_lower", "close", "volume", "spread")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    RSI_FIELD_NUMBER: _ClassVar[int]
    MACD_FIELD_NUMBER: _ClassVar[int]
    MACD_SIGNAL_FIELD_NUMBER: _ClassVar[int]
    MACD_HIST_FIELD_NUMBER: _ClassVar[int]
    ATR_FIELD_NUMBER: _ClassVar[int]
    BB_UPPER_FIELD_NUMBER: _ClassVar[int]
    BB_MIDDLE_FIELD_NUMBER: _ClassVar[int]
    BB_LOWER_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: Timeframe
    ts: _timestamp_pb2.Timestamp
    revision: int
    final: bool
    rsi: float
    macd: float
    macd_signal: float
    macd_hist: float
    atr: float
    bb_upper: float
    bb_middle: float
    bb_lower: float
    close: float
    volume: float
    spread: float
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[_Union[Timeframe, str]] = ..., ts: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revision: _Optional[int] = ..., final: _Optional[bool] = ..., rsi: _Optional[float] = ..., macd: _Optional[float] = ..., macd_signal: _Optional[float] = ..., macd_hist: _Optional[float] = ..., atr: _Optional[float] = ..., bb_upper: _Optional[float] = ..., bb_middle: _Optional[float] = ..., bb_lower: _Optional[float] = ..., close: _Optional[float] = ..., volume: _Optional[float] = ..., spread: _Optional[float] = ...) -> None: ...

class Signal(_message.Message):
    __slots__ = ("symbol", "timeframe", "ts", "prob_up", "label", "model_version", "candle_revision")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    PROB_UP_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDLE_REVISION_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: Timeframe
    ts: _timestamp_pb2.Timestamp
    prob_up: float
    label: int
    model_version: str
    candle_revision: int
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[_Union[Timeframe, str]] = ..., ts: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., prob_up: _Optional[float] = ..., label: _Optional[int] = ..., model_version: _Optional[str] = ..., candle_revision: _Optional[int] = ...) -> None: ...

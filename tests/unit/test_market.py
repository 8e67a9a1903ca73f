"""Timeframe buckets follow the seed's normalization table."""

from __future__ import annotations

import datetime as dt

import pytest

from services.common.market import Timeframe, bucket_start


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("timeframe", "ts", "expected"),
    [
        (Timeframe.M1, utc(2025, 10, 20, 3, 5, 23, 500), utc(2025, 10, 20, 3, 5)),
        (Timeframe.M5, utc(2025, 10, 20, 3, 7), utc(2025, 10, 20, 3, 5)),
        (Timeframe.M15, utc(2025, 10, 20, 3, 12), utc(2025, 10, 20, 3, 0)),
        (Timeframe.M30, utc(2025, 10, 20, 3, 45), utc(2025, 10, 20, 3, 30)),
        (Timeframe.H1, utc(2025, 10, 20, 3, 59, 59), utc(2025, 10, 20, 3, 0)),
        (Timeframe.H4, utc(2025, 10, 20, 7, 30), utc(2025, 10, 20, 4, 0)),
        (Timeframe.H4, utc(2025, 10, 20, 23, 59), utc(2025, 10, 20, 20, 0)),
        (Timeframe.D1, utc(2025, 10, 20, 23, 59), utc(2025, 10, 20)),
        (Timeframe.W1, utc(2025, 10, 26, 12), utc(2025, 10, 20)),  # Sunday -> Monday before
        (Timeframe.W1, utc(2025, 10, 20, 0, 0), utc(2025, 10, 20)),  # Monday midnight is its own start
        (Timeframe.MN1, utc(2025, 10, 31, 23, 59), utc(2025, 10, 1)),
        (Timeframe.MN1, utc(2024, 2, 29, 12), utc(2024, 2, 1)),
    ],
)
def test_bucket_start_each_timeframe_matches_seed_table(
    timeframe: Timeframe, ts: dt.datetime, expected: dt.datetime
) -> None:
    assert bucket_start(ts, timeframe) == expected


def test_bucket_start_other_offset_normalizes_to_utc() -> None:
    brt = dt.timezone(dt.timedelta(hours=-3))
    assert bucket_start(dt.datetime(2025, 10, 20, 0, 30, tzinfo=brt), Timeframe.D1) == utc(2025, 10, 20)


def test_timeframe_numbers_match_proto_enum() -> None:
    from mt5.market.v1 import market_pb2

    for tf in Timeframe:
        assert market_pb2.Timeframe.Value(tf.name) == tf.value
    assert set(market_pb2.Timeframe.keys()) - {"TIMEFRAME_UNSPECIFIED"} == set(Timeframe.__members__)

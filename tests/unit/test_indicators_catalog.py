"""TA-Lib's catalog and on-demand computation: listed as TA-Lib describes it, equal to its batch functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import talib

from services.common.validation import ValidationFailed
from services.indicators.catalog import (
    IndicatorParameter,
    NotEnoughData,
    ParameterKind,
    compute,
    describe,
    groups,
    list_functions,
)

INTEGER, REAL = ParameterKind.INTEGER, ParameterKind.REAL
# TA-Lib's own listings, typed (its stubs leave these two untyped).
TALIB_FUNCTIONS: Callable[[], list[str]] = talib.get_functions
TALIB_GROUPS: Callable[[], dict[str, list[str]]] = talib.get_function_groups
# Its stubs type matype as an MA_Type enum that talib does not export; the function takes an int.
BBANDS: Callable[..., tuple[npt.NDArray[np.float64], ...]] = talib.BBANDS
Candles = tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]


def candles(n: int, seed: int = 1) -> Candles:
    rng = np.random.default_rng(seed)
    close = 100 + np.cumsum(rng.normal(0, 1, n))
    open_ = np.r_[close[0], close[:-1]] + rng.normal(0, 0.2, n)
    high = np.maximum(open_, close) + rng.random(n)
    low = np.minimum(open_, close) - rng.random(n)
    volume = rng.integers(1, 1_000, n).astype(np.float64)
    return open_, high, low, close, volume


def as_optional(values: npt.ArrayLike) -> tuple[float | None, ...]:
    return tuple(None if np.isnan(x) else float(x) for x in np.asarray(values, dtype=np.float64))


def violation_fields(exc: pytest.ExceptionInfo[ValidationFailed]) -> list[str]:
    return [v.field for v in exc.value.violations]


# --- the catalog -----------------------------------------------------------------------------------


def test_catalog_known_functions_listed_with_inputs_parameters_and_outputs() -> None:
    rsi, macd, atr, bbands = (describe(name) for name in ("RSI", "MACD", "ATR", "BBANDS"))
    assert (rsi.group, rsi.display_name, rsi.inputs, rsi.outputs) == (
        "Momentum Indicators",
        "Relative Strength Index",
        ("close",),
        ("real",),
    )
    assert rsi.parameters == (IndicatorParameter("timeperiod", INTEGER, 14.0),)
    assert macd.outputs == ("macd", "macdsignal", "macdhist")
    assert [(p.name, p.default) for p in macd.parameters] == [
        ("fastperiod", 12.0),
        ("slowperiod", 26.0),
        ("signalperiod", 9.0),
    ]
    assert (atr.group, atr.inputs) == ("Volatility Indicators", ("high", "low", "close"))
    assert bbands.parameters == (
        IndicatorParameter("timeperiod", INTEGER, 20.0),
        IndicatorParameter("nbdevup", REAL, 2.0),
        IndicatorParameter("nbdevdn", REAL, 2.0),
        IndicatorParameter("matype", INTEGER, 0.0),
    )
    assert bbands.outputs == ("upperband", "middleband", "lowerband")
    assert describe("OBV").inputs == ("close", "volume")
    assert describe("CDLENGULFING").inputs == ("open", "high", "low", "close")
    assert describe("BETA").inputs == ("high", "low")  # price0 and price1 default to high and low


def test_catalog_lists_every_talib_function_by_name_except_mavp() -> None:
    names = [f.name for f in list_functions()]
    assert names == sorted(names)
    assert set(names) == set(TALIB_FUNCTIONS()) - {"MAVP"}
    assert all(set(f.inputs) <= {"open", "high", "low", "close", "volume"} for f in list_functions())


def test_catalog_group_filter_returns_only_that_group() -> None:
    momentum = list_functions("Momentum Indicators")
    assert {f.name for f in momentum} == set(TALIB_GROUPS()["Momentum Indicators"])
    assert {f.group for f in momentum} == {"Momentum Indicators"}
    assert list_functions("No Such Group") == ()
    assert set(groups()) == set(TALIB_GROUPS())


def test_catalog_describe_is_case_insensitive() -> None:
    assert describe(" rsi ") == describe("RSI")


def test_catalog_mavp_is_refused_with_its_reason() -> None:
    with pytest.raises(ValidationFailed, match="periods") as caught:
        describe("MAVP")
    assert violation_fields(caught) == ["function"]


# --- compute ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "parameters", "expected"),
    [
        ("RSI", {}, lambda o, h, lo, c, v: talib.RSI(c)),
        ("RSI", {"timeperiod": 9.0}, lambda o, h, lo, c, v: talib.RSI(c, 9)),
        (
            "MACD",
            {"fastperiod": 5, "slowperiod": 35, "signalperiod": 5},
            lambda o, h, lo, c, v: talib.MACD(c, 5, 35, 5),
        ),
        ("ATR", {"timeperiod": 21}, lambda o, h, lo, c, v: talib.ATR(h, lo, c, 21)),
        (
            "BBANDS",
            {"timeperiod": 10, "nbdevup": 1.5, "matype": 1},
            lambda o, h, lo, c, v: BBANDS(c, 10, 1.5, 2.0, 1),
        ),
        ("STOCH", {}, lambda o, h, lo, c, v: talib.STOCH(h, lo, c)),
        ("OBV", {}, lambda o, h, lo, c, v: talib.OBV(c, v)),
        ("BETA", {"timeperiod": 7}, lambda o, h, lo, c, v: talib.BETA(h, lo, 7)),
        ("CDLENGULFING", {}, lambda o, h, lo, c, v: talib.CDLENGULFING(o, h, lo, c)),
    ],
)
def test_compute_equals_batch_talib_with_nan_as_none(
    function: str, parameters: dict[str, float], expected: Callable[..., Any]
) -> None:
    data = candles(400)
    got = compute(function, parameters, *data)
    want = expected(*data)
    want = want if isinstance(want, tuple) else (want,)
    assert got.outputs == describe(function).outputs
    assert got.series == tuple(as_optional(w) for w in want)
    assert all(len(s) == 400 for s in got.series)
    assert None in got.series[0] or function.startswith("CDL") or function == "OBV"  # warm-up shows as None


def test_compute_unknown_function_names_function_field() -> None:
    with pytest.raises(ValidationFailed) as caught:
        compute("NOPE", {}, *candles(50))
    assert violation_fields(caught) == ["function"]


def test_compute_unknown_parameter_names_that_parameter() -> None:
    with pytest.raises(ValidationFailed, match="timeperiod") as caught:
        compute("RSI", {"period": 14}, *candles(50))
    assert violation_fields(caught) == ["parameters.period"]


@pytest.mark.parametrize(
    ("function", "parameters", "field"),
    [
        ("RSI", {"timeperiod": 14.5}, "parameters.timeperiod"),
        ("RSI", {"timeperiod": 1}, "parameters.timeperiod"),
        ("RSI", {"timeperiod": 100_001}, "parameters.timeperiod"),
        ("RSI", {"timeperiod": -(2.0**31)}, "parameters.timeperiod"),  # TA-Lib's "use the default"
        ("RSI", {"timeperiod": float("nan")}, "parameters.timeperiod"),
        ("BBANDS", {"matype": 99}, "parameters.matype"),
        ("BBANDS", {"matype": 1.5}, "parameters.matype"),
        ("BBANDS", {"nbdevup": 1e38}, "parameters.nbdevup"),
        ("BBANDS", {"nbdevdn": float("inf")}, "parameters.nbdevdn"),
    ],
)
def test_compute_bad_parameter_value_names_that_parameter(
    function: str, parameters: dict[str, float], field: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        compute(function, parameters, *candles(200))
    assert violation_fields(caught) == [field]


def test_compute_every_bad_parameter_is_named_at_once() -> None:
    with pytest.raises(ValidationFailed) as caught:
        compute("MACD", {"fastperiod": 2.5, "slowperiod": 0, "window": 3}, *candles(200))
    assert violation_fields(caught) == ["parameters.fastperiod", "parameters.slowperiod", "parameters.window"]


@pytest.mark.parametrize(
    ("function", "parameters", "needed"),
    [("RSI", {}, 15), ("RSI", {"timeperiod": 30}, 31), ("MACD", {}, 34), ("BBANDS", {"timeperiod": 5}, 5)],
)
def test_compute_not_enough_data_raises_with_needed_and_got(
    function: str, parameters: dict[str, float], needed: int
) -> None:
    with pytest.raises(NotEnoughData) as caught:
        compute(function, parameters, *candles(needed - 1))
    assert (caught.value.needed, caught.value.got) == (needed, needed - 1)
    # One more bar is enough: exactly one value, the last.
    got = compute(function, parameters, *candles(needed))
    assert all(s[-1] is not None and set(s[:-1]) <= {None} for s in got.series)


def test_compute_no_bars_raises_not_enough_data() -> None:
    empty = np.array([], dtype=np.float64)
    with pytest.raises(NotEnoughData) as caught:
        compute("ATR", {}, empty, empty, empty, empty, empty)
    assert (caught.value.needed, caught.value.got) == (15, 0)


def test_compute_arrays_of_different_lengths_is_a_value_error() -> None:
    o, h, lo, c, v = candles(100)
    with pytest.raises(ValueError, match="length"):
        compute("RSI", {}, o, h, lo, c[:-1], v)

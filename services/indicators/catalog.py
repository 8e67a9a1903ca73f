"""TA-Lib's catalog (for ListIndicators) and any of its functions run over candles (ComputeIndicator). Pure.

The catalog comes from TA-Lib itself: ``talib.get_function_groups()`` for the groups and
``talib.abstract.Function(name).info`` for each function's display name, inputs (price series),
parameters with their defaults, and outputs. A parameter is an integer one (periods, MA types)
when TA-Lib's default is an ``int``, else a real one. TA-Lib does not expose its parameter ranges
in Python, but its lookback does: ``Function(name, **params).lookback`` is -1 for a value outside
them, which is how ``compute`` finds and names a bad parameter before running anything (the batch
function itself would raise a bare ``Exception`` with ``TA_BAD_PARAM``).

Only functions that read candle series (open, high, low, close, volume) are listed: MAVP reads a
per-bar ``periods`` series, which candles do not have, so it is left out and refused by name.

``compute`` answers like the batch function over the arrays given: one series per output, aligned
with the input, with ``None`` where TA-Lib gives NaN (the lookback warming up; or the few functions
flagged "Output can be NaN or infinite"). Candlestick patterns' integer outputs come back as floats.
With fewer bars than ``lookback + 1`` the batch function would return nothing but NaN: ``compute``
raises ``NotEnoughData`` instead, so the service can answer that explicitly.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import talib
from talib import abstract

from services.common.validation import FieldViolation, ValidationFailed

# talib's bundled stubs (talib/*.pyi) miss or leave untyped these public names; typed here, once.
InsufficientHistory: type[Exception] = talib.InsufficientHistory  # type: ignore[attr-defined]
_FUNCTION: Callable[..., Any] = abstract.Function  # type: ignore[attr-defined]
_FUNCTION_GROUPS: Callable[[], dict[str, list[str]]] = talib.get_function_groups

CANDLE_SERIES = ("open", "high", "low", "close", "volume")
# TA-Lib reads INT_MIN and -4e37 as "use the default"; its real ranges end at 3e37.
_MAX_INTEGER = 2**31 - 1
_MAX_REAL = 3e37


class ParameterKind(enum.Enum):
    """How TA-Lib reads a parameter."""

    INTEGER = "integer"  # periods, MA types: a float must be a whole number
    REAL = "real"  # deviations, factors


@dataclasses.dataclass(frozen=True, slots=True)
class IndicatorParameter:
    """One parameter of a TA-Lib function."""

    name: str  # e.g. "timeperiod"
    kind: ParameterKind
    default: float


@dataclasses.dataclass(frozen=True, slots=True)
class IndicatorFunction:
    """One TA-Lib function: what it reads, what it takes, what it gives."""

    name: str  # e.g. "MACD"
    group: str  # e.g. "Momentum Indicators"
    display_name: str  # e.g. "Moving Average Convergence/Divergence"
    inputs: tuple[str, ...]  # candle series in the order TA-Lib reads them, e.g. ("high", "low", "close")
    parameters: tuple[IndicatorParameter, ...]
    outputs: tuple[str, ...]  # e.g. ("macd", "macdsignal", "macdhist")

    def parameter(self, name: str) -> IndicatorParameter | None:
        """The parameter called ``name``, if the function has one."""
        return next((p for p in self.parameters if p.name == name), None)


class NotEnoughData(Exception):
    """Fewer bars than the function's lookback + 1: TA-Lib would give no value at all."""

    def __init__(self, needed: int, got: int) -> None:
        super().__init__(f"at least {needed} bars are needed, got {got}")
        self.needed = needed
        self.got = got


class Computation(NamedTuple):
    """A function's outputs over the bars given: names, and one series per output."""

    outputs: tuple[str, ...]
    series: tuple[tuple[float | None, ...], ...]  # None where TA-Lib gives NaN


def _inputs(info: Mapping[str, Any]) -> tuple[str, ...]:
    """The price series a function reads, flattened in TA-Lib's order."""
    names: list[str] = []
    for series in info["input_names"].values():
        names.extend(series if isinstance(series, list) else [series])
    return tuple(names)


@functools.cache
def _catalog() -> tuple[dict[str, IndicatorFunction], dict[str, str]]:
    """Every listed function by name, and the reason each unlisted one is not."""
    listed: dict[str, IndicatorFunction] = {}
    refused: dict[str, str] = {}
    for group, names in _FUNCTION_GROUPS().items():
        for name in names:
            info = _FUNCTION(name).info
            inputs = _inputs(info)
            foreign = [series for series in inputs if series not in CANDLE_SERIES]
            if foreign:
                refused[name] = f"{name} reads a {', '.join(foreign)} series, which candles do not have"
                continue
            listed[name] = IndicatorFunction(
                name=name,
                group=group,
                display_name=info["display_name"],
                inputs=inputs,
                parameters=tuple(
                    IndicatorParameter(
                        pname,
                        ParameterKind.INTEGER if isinstance(default, int) else ParameterKind.REAL,
                        float(default),
                    )
                    for pname, default in info["parameters"].items()
                ),
                outputs=tuple(info["output_names"]),
            )
    return dict(sorted(listed.items())), refused


def list_functions(group: str = "") -> tuple[IndicatorFunction, ...]:
    """The catalog by name, or the functions of one TA-Lib group (none for a group TA-Lib lacks)."""
    functions = tuple(_catalog()[0].values())
    return functions if not group else tuple(f for f in functions if f.group == group)


def groups() -> tuple[str, ...]:
    """TA-Lib's groups, sorted."""
    return tuple(sorted({f.group for f in _catalog()[0].values()}))


def describe(function: str) -> IndicatorFunction:
    """One function by name, case-insensitively (``ValidationFailed`` on field "function")."""
    listed, refused = _catalog()
    name = function.strip().upper()
    found = listed.get(name)
    if found is not None:
        return found
    reason = refused.get(name, f"TA-Lib has no function {function!r}")
    raise ValidationFailed([FieldViolation("function", reason)])


def lookback(function: str, parameters: Mapping[str, int | float]) -> int:
    """TA-Lib's lookback with these parameters (the rest default): -1 if one is out of range.

    Integer parameters must be given as ``int`` and real ones as ``float``, as TA-Lib checks.
    """
    return int(_FUNCTION(function, **parameters).lookback)


def _parameters(fn: IndicatorFunction, given: Mapping[str, float]) -> dict[str, int | float]:
    """Given parameters as TA-Lib takes them, or ``ValidationFailed`` naming every bad one."""
    violations: list[FieldViolation] = []
    resolved: dict[str, int | float] = {}
    for name, value in given.items():
        field = f"parameters.{name}"
        spec = fn.parameter(name)
        if spec is None:
            known = ", ".join(p.name for p in fn.parameters) or "none"
            violations.append(
                FieldViolation(field, f"{fn.name} has no parameter {name!r} (its parameters: {known})")
            )
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            violations.append(FieldViolation(field, f"must be a number, got {value!r}"))
            continue
        number = float(value)
        if not math.isfinite(number):
            violations.append(FieldViolation(field, f"must be finite, got {number}"))
        elif spec.kind is ParameterKind.INTEGER and not number.is_integer():
            violations.append(FieldViolation(field, f"must be a whole number, got {number}"))
        elif abs(number) > (_MAX_INTEGER if spec.kind is ParameterKind.INTEGER else _MAX_REAL):
            violations.append(
                FieldViolation(field, f"is outside TA-Lib's range for {fn.name}, got {number:g}")
            )
        else:
            typed = int(number) if spec.kind is ParameterKind.INTEGER else number
            if lookback(fn.name, {name: typed}) < 0:
                violations.append(
                    FieldViolation(field, f"is outside TA-Lib's range for {fn.name}, got {typed}")
                )
            else:
                resolved[name] = typed
    if violations:
        raise ValidationFailed(violations)
    if resolved and lookback(fn.name, resolved) < 0:
        raise ValidationFailed(
            [FieldViolation("parameters", f"TA-Lib refuses this combination for {fn.name}")]
        )
    return resolved


def compute(
    function: str,
    parameters: Mapping[str, float],
    open: npt.ArrayLike,
    high: npt.ArrayLike,
    low: npt.ArrayLike,
    close: npt.ArrayLike,
    volume: npt.ArrayLike,
) -> Computation:
    """Run one TA-Lib function over candle arrays, exactly as its batch function does.

    Raises ``ValidationFailed`` naming "function" or "parameters.<name>", ``NotEnoughData`` with
    fewer bars than the lookback needs, and ``ValueError`` for arrays of different lengths or with
    values that are not finite (the caller's own data, not the request's).
    """
    fn = describe(function)
    params = _parameters(fn, parameters)
    columns: dict[str, npt.NDArray[np.float64]] = {}
    for name, data in zip(CANDLE_SERIES, (open, high, low, close, volume), strict=True):
        columns[name] = np.ascontiguousarray(data, dtype=np.float64)
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"candle arrays differ in length: {lengths}")
    inputs = [columns[name] for name in fn.inputs]
    for name in fn.inputs:
        if not np.isfinite(columns[name]).all():
            raise ValueError(f"the {name} series holds values that are not finite")
    needed = lookback(fn.name, params) + 1
    got = lengths["close"]
    if got < needed:
        raise NotEnoughData(needed, got)
    batch: Callable[..., Any] = getattr(talib, fn.name)
    result = batch(*inputs, **params)
    outputs = result if isinstance(result, tuple | list) else (result,)
    series = tuple(
        tuple(None if math.isnan(x) else x for x in np.asarray(out, dtype=np.float64).tolist())
        for out in outputs
    )
    return Computation(fn.outputs, series)

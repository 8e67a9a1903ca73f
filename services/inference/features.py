"""Model features and target, computed the same way for training and for live signals (pure numpy).

A candle contributes its stored values (``INPUTS``: close, volume, spread and the indicators the
indicators service computed) plus two derived ones: ``ma60``, the mean of the last 60 closes, and
``ret_1``, the return since the previous close. A feature row for candle *t* is the ten features of
the ``window`` candles ending at *t*, oldest first, so it never holds anything after *t*.

Live and offline rows are bit-identical: every derived value is computed from a fixed slice of
history in a fixed order, whatever the length of the array it is computed in (the live path keeps
only the last ``history_needed(window)`` candles of each series).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

INPUTS = ("close", "volume", "spread", "rsi", "macd", "macd_signal", "macd_hist", "atr")
FEATURES = (*INPUTS, "ma60", "ret_1")
MA_PERIOD = 60
_CLOSE = 0

Array = npt.NDArray[np.float64]


def history_needed(window: int) -> int:
    """Candles of history, the last included, that a feature row of ``window`` candles needs."""
    return window + MA_PERIOD - 1


def candle_features(inputs: Array) -> Array:
    """``(n, len(INPUTS))`` candle values → ``(n, len(FEATURES))``; NaN where history is too short."""
    n = inputs.shape[0]
    close = inputs[:, _CLOSE]
    ma = np.full(n, np.nan)
    if n >= MA_PERIOD:
        # Each candle's 60 closes summed oldest first, one after the other (an accumulation is
        # sequential, where a reduction may sum pairwise), so a candle's mean is the same bits for
        # any n.
        lagged = np.lib.stride_tricks.sliding_window_view(close, MA_PERIOD).T
        ma[MA_PERIOD - 1 :] = np.add.accumulate(lagged, axis=0)[-1] / MA_PERIOD
    ret = np.full(n, np.nan)
    if n >= 2:
        ret[1:] = close[1:] / close[:-1] - 1.0
    return np.column_stack([inputs, ma, ret])


def feature_rows(inputs: Array, window: int) -> Array:
    """``(n, len(INPUTS))`` → ``(n, window * len(FEATURES))``: row t is candles t-window+1..t, oldest first.

    A row is all NaN when it is incomplete (the series is too short) and holds NaN wherever a
    stored value is missing (an indicator still warming up); ``complete`` tells the two apart.
    """
    per_candle = candle_features(inputs)
    n, width = per_candle.shape
    rows = np.full((n, window * width), np.nan)
    if n >= window:
        windows = np.lib.stride_tricks.sliding_window_view(per_candle, (window, width))[:, 0]
        rows[window - 1 :] = windows.reshape(n - window + 1, window * width)
    return rows


def last_row(inputs: Array, window: int) -> Array:
    """``feature_rows(inputs, window)[-1]``, computed from the candles it needs only (the live path)."""
    if inputs.shape[0] < window:
        return np.full(window * len(FEATURES), np.nan)
    needed = history_needed(window)
    recent = inputs[-needed:]
    padded = np.full((needed, inputs.shape[1]), np.nan)
    padded[needed - recent.shape[0] :] = recent
    row: Array = last_rows(padded[np.newaxis], window)[0]
    return row


def last_rows(windows: Array, window: int) -> Array:
    """Many candles' feature rows at once, each from its own candles.

    ``windows`` is ``(m, history_needed(window), len(INPUTS))``: row k of the result (``m`` rows of
    ``window * len(FEATURES)``) is built from ``windows[k]``, whose last candle is the one scored.
    Row k equals ``last_row(windows[k], window)`` bit for bit (the same sums in the same order), and
    holds NaN wherever a candle is missing: pad a short history with NaN rows at the front.
    """
    m, needed, width = windows.shape
    if needed != history_needed(window):
        raise ValueError(f"windows must hold {history_needed(window)} candles, got {needed}")
    close = windows[:, :, _CLOSE]
    # Each of the last ``window`` candles' 60 closes, summed oldest first (as ``candle_features``).
    lagged = np.lib.stride_tricks.sliding_window_view(close, MA_PERIOD, axis=1)
    ma = np.add.accumulate(lagged, axis=2)[:, :, -1] / MA_PERIOD
    ret = close[:, -window:] / close[:, -window - 1 : -1] - 1.0
    per_candle = np.concatenate(
        [windows[:, -window:, :], ma[:, :, np.newaxis], ret[:, :, np.newaxis]], axis=2
    )
    return per_candle.reshape(m, window * (width + 2))


def complete(rows: Array) -> npt.NDArray[np.bool_]:
    """Which rows are entirely finite (and so may reach the model)."""
    return np.asarray(np.isfinite(rows).all(axis=1))


def targets(close: Array, horizon: int) -> Array:
    """1.0 where the close ``horizon`` candles later is higher, 0.0 where not, NaN where unknown yet.

    A missing close (NaN) at either end makes the target unknown too, not "not higher".
    """
    n = close.shape[0]
    out = np.full(n, np.nan)
    if n > horizon:
        later, now = close[horizon:], close[: n - horizon]
        known = np.isfinite(later) & np.isfinite(now)
        out[: n - horizon] = np.where(known, (later > now).astype(np.float64), np.nan)
    return out

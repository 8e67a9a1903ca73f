"""The aggregation core: ticks and EA candles in, bars of every timeframe out. Pure and deterministic.

Ticks of a symbol build M1 bars: OHLC of the mid price ``(bid + ask) / 2``; ``spread`` the mean of
``ask - bid``; ``volume`` the sum of the ticks' volumes, where a tick without a volume counts 1
(so a feed without volumes gets the seed's tick count). Each higher timeframe is rolled up from
the next lower one (M1→M5→M15→M30→H1→H4→D1, D1→W1 and D1→MN1) with exact OHLC rules — first
open, highest high, lowest low, last close, summed volume, spread as a tick-weighted mean — never
by averaging values across timeframes.

Lifecycle. A bar is *forming* until the symbol's horizon passes its end, then *final*. The horizon
is the later of the *tick horizon* — the latest tick time minus the allowed lateness (for a symbol
that has had no tick: the end of its newest EA bar) — and, while the market is quiet (no tick or EA
candle has arrived for a grace period), the wall clock minus that grace. A
tick arriving for a final bar revises it (``revision`` + 1) and every final bar above it, whether
the tick horizon or the clock closed it, as long as the bar ends within the retention window
before the tick horizon; an older tick is counted and dropped.

Only tick times judge a tick: lateness and retention are measured against the tick horizon, never
against the wall clock. Tick times and wall time are different clocks — a replay of old ticks, a
broker whose server time is not UTC — so the clock may close the bars of a quiet market, but it
never makes a tick too old to apply. When ticks arrive again the clock's horizon is withdrawn: a
feed that resumes after a pause (or after a restart) goes on where it stopped, and whatever the
clock closed meanwhile is revised by the ticks that belong to it. For the same reason bars leave
memory by the tick horizon's retention window, which is also what a restart restores; a symbol
without ticks (EA candles only) keeps the window before its newest EA bar or the wall clock's,
whichever is later, so its memory stays bounded even while the clock waits for a tick backlog.

EA candles (the broker's bars) take precedence over computed bars of the same key, are final as
posted, and roll up like any other bar; a changed re-post is a revision. When an EA bar and the bar
computed from ticks disagree, the bar says so (``ea_disagrees``).

Outputs are deterministic: whatever the split of the same ticks into batches, the same final bars
come out with the same revisions, because lateness is judged against the horizon at each tick's
own arrival. Times are integer microseconds since the epoch inside; datetimes at the edges.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from services.common.market import Candle, Timeframe, bucket_start
from services.common.market import from_us as from_us  # re-exported: the core speaks microseconds
from services.common.market import to_us as to_us

_US = 1_000_000
M1_US = 60 * _US

# Each timeframe is built from the one before it in the chain.
SOURCE_OF: dict[Timeframe, Timeframe] = {
    Timeframe.M5: Timeframe.M1,
    Timeframe.M15: Timeframe.M5,
    Timeframe.M30: Timeframe.M15,
    Timeframe.H1: Timeframe.M30,
    Timeframe.H4: Timeframe.H1,
    Timeframe.D1: Timeframe.H4,
    Timeframe.W1: Timeframe.D1,
    Timeframe.MN1: Timeframe.D1,
}
PARENTS_OF: dict[Timeframe, tuple[Timeframe, ...]] = {}
for _child_tf in Timeframe:
    PARENTS_OF[_child_tf] = tuple(p for p, c in SOURCE_OF.items() if c is _child_tf)
ORDER = tuple(Timeframe)  # M1 first: children are always settled before their parents


class BarSource(enum.Enum):
    """Where a bar's values come from; values equal ``mt5.market.v1.CandleSource`` numbers."""

    EA = 1
    TICKS = 2
    ROLLUP = 3


@dataclasses.dataclass(frozen=True, slots=True)
class AggregationSettings:
    """How long to wait for late ticks, for a quiet market, and how long bars stay revisable."""

    lateness: dt.timedelta = dt.timedelta(seconds=2)
    grace: dt.timedelta = dt.timedelta(seconds=5)
    retention: dt.timedelta = dt.timedelta(hours=1)


@dataclasses.dataclass(frozen=True, slots=True)
class Bar:
    """One published version of a bar."""

    symbol: str
    timeframe: Timeframe
    ts: dt.datetime
    open: float
    high: float
    low: float
    close: float
    volume: float
    spread: float
    tick_count: int
    source: BarSource
    revision: int
    final: bool
    ea_disagrees: bool = False
    # The accumulator behind the values (spread sum, tick weight, first and last tick times), so a
    # stored bar can be restored exactly after a restart. Not part of what subscribers compare.
    state: Values | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, Timeframe, dt.datetime]:
        """Natural key: one bar per symbol, timeframe and bucket start."""
        return (self.symbol, self.timeframe, self.ts)


@dataclasses.dataclass(slots=True)
class Values:
    """A mergeable OHLC accumulator; first/last times order opens and closes."""

    open: float
    high: float
    low: float
    close: float
    volume: float
    spread_sum: float
    weight: int  # ticks behind spread_sum (an EA bar weighs 1)
    ticks: int
    first_us: int
    last_us: int

    def merge(self, other: Values) -> None:
        """Add ``other``, which arrived after ``self`` (ties in time keep the earlier open)."""
        if other.first_us < self.first_us:
            self.open, self.first_us = other.open, other.first_us
        if other.last_us >= self.last_us:
            self.close, self.last_us = other.close, other.last_us
        self.high = max(self.high, other.high)
        self.low = min(self.low, other.low)
        self.volume += other.volume
        self.spread_sum += other.spread_sum
        self.weight += other.weight
        self.ticks += other.ticks

    def copy(self) -> Values:
        """An independent copy (a direct constructor call: this is on the hot path)."""
        return Values(
            self.open,
            self.high,
            self.low,
            self.close,
            self.volume,
            self.spread_sum,
            self.weight,
            self.ticks,
            self.first_us,
            self.last_us,
        )

    @property
    def prices(self) -> tuple[float, float, float, float, float, float]:
        """What a subscriber sees: OHLC, volume and mean spread."""
        return (self.open, self.high, self.low, self.close, self.volume, self.spread_sum / self.weight)


@dataclasses.dataclass(slots=True)
class Slot:
    """One bar of one timeframe: its computed values, an EA override, and its lifecycle."""

    ts_us: int
    end_us: int
    computed: Values | None = None
    ea: Values | None = None
    children: dict[int, Values] | None = None  # higher timeframes: effective values of each child
    revision: int = 0
    final: bool = False
    published: tuple[tuple[float, ...], bool] | None = None  # what subscribers last saw
    published_final: bool = False

    @property
    def effective(self) -> Values | None:
        """The EA bar when there is one, else the computed bar."""
        return self.ea if self.ea is not None else self.computed

    @property
    def disagrees(self) -> bool:
        """An EA bar overrides a different computed bar."""
        return (
            self.ea is not None
            and self.computed is not None
            and self.ea.prices[:4] != self.computed.prices[:4]
        )


@dataclasses.dataclass(slots=True)
class Emitted:
    """What one input produced: final or revised bars, and bars still forming that changed."""

    final: list[Bar] = dataclasses.field(default_factory=list)
    forming: list[Bar] = dataclasses.field(default_factory=list)

    def extend(self, other: Emitted) -> None:
        """Append another input's output."""
        self.final.extend(other.final)
        self.forming.extend(other.forming)


def bucket_bounds(ts_us: int, timeframe: Timeframe) -> tuple[int, int]:
    """Start and end (exclusive) of the bucket containing ``ts_us``."""
    size = _FIXED_US.get(timeframe)
    if size is not None:
        # Up to D1 buckets are fixed multiples aligned on the epoch's midnight: integer arithmetic.
        start = ts_us - ts_us % size
        return start, start + size
    start_dt = bucket_start(from_us(ts_us), timeframe)
    if timeframe is Timeframe.MN1:
        end_dt = start_dt.replace(year=start_dt.year + start_dt.month // 12, month=start_dt.month % 12 + 1)
    else:  # W1
        end_dt = start_dt + dt.timedelta(days=7)
    return to_us(start_dt), to_us(end_dt)


_FIXED_US = {Timeframe.M1: M1_US} | {
    tf: minutes * M1_US
    for tf, minutes in {
        Timeframe.M5: 5,
        Timeframe.M15: 15,
        Timeframe.M30: 30,
        Timeframe.H1: 60,
        Timeframe.H4: 240,
        Timeframe.D1: 1440,
    }.items()
}


class SymbolBars:
    """Every live bar of one symbol, across timeframes."""

    def __init__(self, symbol: str, settings: AggregationSettings) -> None:
        self.symbol = symbol
        self._lateness = settings.lateness // dt.timedelta(microseconds=1)
        self._grace = settings.grace // dt.timedelta(microseconds=1)
        self._retention = settings.retention // dt.timedelta(microseconds=1)
        self.slots: dict[Timeframe, dict[int, Slot]] = {tf: {} for tf in Timeframe}
        # Starts of the bars not final yet, per timeframe: finalizing looks only at these.
        self.open: dict[Timeframe, set[int]] = {tf: set() for tf in Timeframe}
        self._pruned_below = -(2**62)  # the retention edge of the last pruning
        self.latest_tick_us: int | None = None
        self.latest_ea_end_us: int | None = None  # end of the newest EA bar
        self.clock_us: int | None = None
        self.late_dropped = 0
        self.last_cursor = 0  # the highest input cursor applied
        self.last_arrival_us: int | None = None  # wall time of the last tick batch

    # --- horizon --------------------------------------------------------------------------------

    @property
    def horizon_us(self) -> int | None:
        """Bars ending at or before this are final.

        For a symbol without ticks, the newest EA bar's end is a horizon too: the bars it rolls up
        into are complete once the EA has posted past them (a later EA candle for an older bar
        revises them).
        """
        candidates = []
        if self.latest_tick_us is not None:
            candidates.append(self.latest_tick_us - self._lateness)
        elif self.latest_ea_end_us is not None:
            candidates.append(self.latest_ea_end_us)
        if self.clock_us is not None:
            candidates.append(self.clock_us - self._grace)
        return max(candidates) if candidates else None

    @property
    def retention_edge_us(self) -> int | None:
        """Final bars ending before this are no longer revisable: dropped from memory, their ticks too.

        Measured from the tick horizon; for a symbol that has had no tick, from the later of its
        newest EA bar's end and the clock's horizon.
        """
        if self.latest_tick_us is not None:
            return self.latest_tick_us - self._lateness - self._retention
        candidates = [] if self.latest_ea_end_us is None else [self.latest_ea_end_us]
        if self.clock_us is not None:
            candidates.append(self.clock_us - self._grace)
        return max(candidates) - self._retention if candidates else None

    # --- inputs ---------------------------------------------------------------------------------

    def add_ticks(
        self,
        ts_us: npt.NDArray[np.int64],
        bid: npt.NDArray[np.float64],
        ask: npt.NDArray[np.float64],
        volume: npt.NDArray[np.float64],
        arrival_us: int | None = None,
    ) -> Emitted:
        """Apply ticks in arrival order (vectorized for the on-time ones); ``arrival_us`` is wall time."""
        if len(ts_us) == 0:
            return Emitted()
        if arrival_us is not None:
            self.last_arrival_us = arrival_us
        # Ticks again: the market is not quiet. The clock's horizon is withdrawn and tick times alone
        # move the horizon, so a feed resuming after a pause goes on where it stopped; bars the clock
        # closed meanwhile stay final, and ticks for them revise them.
        self.clock_us = None
        mid = (bid + ask) / 2
        spread = ask - bid
        contribution = np.where(volume > 0, volume, 1.0)
        bucket = ts_us - ts_us % M1_US
        # Lateness is judged against the horizon when each tick arrives: its predecessors' max.
        running = np.maximum.accumulate(ts_us)
        before = np.empty_like(running)
        # Far in the past, but far enough from int64's minimum that subtracting the lateness cannot wrap.
        before[0] = self.latest_tick_us if self.latest_tick_us is not None else -(2**62)
        before[1:] = np.maximum(running[:-1], before[0])
        horizon = before - self._lateness
        end = bucket + M1_US
        # Too old: before the retention window at the tick's arrival, or before bars already dropped
        # from memory (a symbol's first ticks after the clock pruned its EA bars).
        dropped = end < np.maximum(horizon - self._retention, self._pruned_below)
        late = (end <= horizon) & ~dropped
        self.late_dropped += int(np.count_nonzero(dropped))
        dirty: set[tuple[Timeframe, int]] = set()
        on_time = np.flatnonzero(~late & ~dropped)
        if len(on_time):
            self._merge_on_time(on_time, ts_us, bucket, mid, spread, contribution, dirty)
        self.latest_tick_us = (
            int(running[-1]) if self.latest_tick_us is None else max(self.latest_tick_us, int(running[-1]))
        )
        out = self._settle(dirty)
        for i in np.flatnonzero(late):
            out.extend(
                self._late_tick(
                    int(ts_us[i]),
                    int(bucket[i]),
                    float(mid[i]),
                    float(spread[i]),
                    float(contribution[i]),
                )
            )
        self._prune()
        return out

    def add_ea_candle(self, candle: Candle, arrival_us: int | None = None) -> Emitted:
        """An EA bar: final as posted, taking precedence over the computed bar of its key.

        Like a tick, an EA candle arriving (``arrival_us``, wall time) means the market is not quiet:
        the clock's horizon is withdrawn and the clock waits a grace period again, so an EA posting a
        batch of history is not cut short by the clock between two of its candles.
        """
        if arrival_us is not None:
            self.last_arrival_us = arrival_us
            self.clock_us = None
        start, end = bucket_bounds(to_us(candle.ts), candle.timeframe)
        slot = self._slot(candle.timeframe, start, end)
        slot.ea = Values(
            candle.open,
            candle.high,
            candle.low,
            candle.close,
            candle.volume,
            candle.spread,
            1,
            0,
            start,
            end - 1,
        )
        self._set_final(candle.timeframe, slot)
        self.latest_ea_end_us = end if self.latest_ea_end_us is None else max(self.latest_ea_end_us, end)
        out = self._settle({(candle.timeframe, start)})
        self._prune()
        return out

    def advance_clock(self, now_us: int) -> Emitted:
        """The wall clock: bars of a quiet market become final after their end plus the grace.

        The symbol is quiet when no tick has arrived for the grace period. While ticks keep coming
        (a live market, or a backfill of old ticks) only their own times move the horizon, and the
        next tick after a quiet spell withdraws the clock's horizon again (see ``add_ticks``).
        """
        if self.last_arrival_us is not None and now_us - self.last_arrival_us < self._grace:
            return Emitted()
        self.clock_us = now_us if self.clock_us is None else max(self.clock_us, now_us)
        out = self._settle(set())
        self._prune()
        return out

    # --- internals ------------------------------------------------------------------------------

    def _merge_on_time(
        self,
        idx: npt.NDArray[np.intp],
        ts_us: npt.NDArray[np.int64],
        bucket: npt.NDArray[np.int64],
        mid: npt.NDArray[np.float64],
        spread: npt.NDArray[np.float64],
        contribution: npt.NDArray[np.float64],
        dirty: set[tuple[Timeframe, int]],
    ) -> None:
        # Sort by bucket, then time, then arrival: the first of a bucket opens it, the last closes it.
        order = idx[np.lexsort((idx, ts_us[idx], bucket[idx]))]
        b = bucket[order]
        starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        ends = np.r_[starts[1:], len(order)]
        m = mid[order]
        highs = np.maximum.reduceat(m, starts)
        lows = np.minimum.reduceat(m, starts)
        volumes = np.add.reduceat(contribution[order], starts)
        spreads = np.add.reduceat(spread[order], starts)
        t = ts_us[order]
        m1 = self.slots[Timeframe.M1]
        for k, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            start = int(b[s])
            part = Values(
                float(m[s]),
                float(highs[k]),
                float(lows[k]),
                float(m[e - 1]),
                float(volumes[k]),
                float(spreads[k]),
                e - s,
                e - s,
                int(t[s]),
                int(t[e - 1]),
            )
            slot = m1.get(start) or self._slot(Timeframe.M1, start, start + M1_US)
            if slot.computed is None:
                slot.computed = part
            else:
                slot.computed.merge(part)
            dirty.add((Timeframe.M1, start))

    def _late_tick(self, ts_us: int, bucket: int, mid: float, spread: float, contribution: float) -> Emitted:
        slot = self.slots[Timeframe.M1].get(bucket) or self._slot(Timeframe.M1, bucket, bucket + M1_US)
        part = Values(mid, mid, mid, mid, contribution, spread, 1, 1, ts_us, ts_us)
        if slot.computed is None:
            slot.computed = part
        else:
            slot.computed.merge(part)
        return self._settle({(Timeframe.M1, bucket)})

    def _slot(self, timeframe: Timeframe, start: int, end: int) -> Slot:
        slot = self.slots[timeframe].get(start)
        if slot is None:
            slot = Slot(start, end, children={} if timeframe is not Timeframe.M1 else None)
            self.slots[timeframe][start] = slot
            self.open[timeframe].add(start)
        return slot

    def _set_final(self, timeframe: Timeframe, slot: Slot, final: bool = True) -> None:
        slot.final = final
        if final:
            self.open[timeframe].discard(slot.ts_us)
        else:
            self.open[timeframe].add(slot.ts_us)

    def _settle(self, dirty: set[tuple[Timeframe, int]]) -> Emitted:
        """Roll changes up, finalize what the horizon passed, and publish what changed."""
        horizon = self.horizon_us
        out = Emitted()
        for tf in ORDER:
            changed = sorted(start for t, start in dirty if t is tf)
            for start in changed:
                slot = self.slots[tf][start]
                effective = slot.effective
                if effective is None:
                    continue
                for parent_tf in PARENTS_OF[tf]:
                    p_start, p_end = bucket_bounds(start, parent_tf)
                    parent = self._slot(parent_tf, p_start, p_end)
                    assert parent.children is not None
                    parent.children[start] = effective.copy()
                    parent.computed = _roll_up(parent.children)
                    dirty.add((parent_tf, p_start))
            # Finalize by the horizon: every bar of this timeframe that ended.
            if horizon is not None:
                for start in sorted(self.open[tf]):
                    slot = self.slots[tf][start]
                    if slot.end_us <= horizon and slot.effective is not None:
                        self._set_final(tf, slot)
                        dirty.add((tf, start))
            for start in sorted(s for t, s in dirty if t is tf):
                bar = self._publish(tf, self.slots[tf][start])
                if bar is not None:
                    (out.final if bar.final else out.forming).append(bar)
        return out

    def _publish(self, tf: Timeframe, slot: Slot) -> Bar | None:
        """The bar to publish when what subscribers see changed, else None."""
        effective = slot.effective
        if effective is None:
            return None
        state = (effective.prices, slot.disagrees)
        if slot.final and slot.published_final:
            if slot.published == state:
                return None
            slot.revision += 1  # a final bar changed: a late tick, or an EA re-post
        elif not slot.final and slot.published == state:
            return None
        slot.published, slot.published_final = state, slot.final
        return self._bar(tf, slot)

    def _bar(self, tf: Timeframe, slot: Slot) -> Bar:
        effective = slot.effective
        assert effective is not None
        if slot.ea is not None:
            source = BarSource.EA
        else:
            source = BarSource.TICKS if tf is Timeframe.M1 else BarSource.ROLLUP
        o, h, low, c, v, s = effective.prices
        ticks = slot.computed.ticks if slot.computed is not None else 0
        return Bar(
            self.symbol,
            tf,
            from_us(slot.ts_us),
            o,
            h,
            low,
            c,
            v,
            s,
            ticks,
            source,
            slot.revision,
            slot.final,
            slot.disagrees,
            effective.copy(),
        )

    def restore(
        self,
        bars: Iterable[Bar],
        latest_tick_us: int | None,
        last_cursor: int,
        restored_us: int | None = None,
    ) -> None:
        """Rebuild the live bars from their stored versions (after a restart).

        ``bars`` must hold, for every restored bar of a higher timeframe, all its stored children.
        ``restored_us`` (wall time) counts as the last arrival: a restart is no quiet spell, so the
        clock waits a full grace period before it closes anything.
        """
        for bar in sorted(bars, key=lambda b: (ORDER.index(b.timeframe), b.ts)):
            assert bar.state is not None, "a stored bar carries its accumulator"
            start, end = bucket_bounds(to_us(bar.ts), bar.timeframe)
            slot = self._slot(bar.timeframe, start, end)
            values = bar.state.copy()
            if bar.source is BarSource.EA:
                slot.ea = values
                self.latest_ea_end_us = max(end, self.latest_ea_end_us or end)
            else:
                slot.computed = values
            slot.revision = bar.revision
            self._set_final(bar.timeframe, slot, bar.final)
            slot.published, slot.published_final = (values.prices, bar.ea_disagrees), bar.final
        for tf in ORDER[1:]:
            children = self.slots[SOURCE_OF[tf]]
            for start, slot in self.slots[tf].items():
                slot.children = {
                    c: child.effective.copy()
                    for c, child in children.items()
                    if start <= c < slot.end_us and child.effective is not None
                }
        self.latest_tick_us = latest_tick_us
        self.last_cursor = last_cursor
        if restored_us is not None:
            self.last_arrival_us = restored_us
        self._prune()

    def is_live(self, timeframe: Timeframe, start_us: int) -> bool:
        """Whether the bar starting at ``start_us`` is in memory (not pruned, or never seen)."""
        return start_us in self.slots[timeframe]

    def adopt(self, bars: Iterable[Bar], target: tuple[Timeframe, int] | None = None) -> None:
        """Bring stored bars that are no longer in memory back, without touching live ones.

        Used before an EA candle for an old bar: its stored version (and its ancestors with their
        children) must be live so that the EA bar revises it, rather than starting a new one.

        With ``target`` (the timeframe and start of the EA candle's bar), only what it needs is
        adopted: the bar, its ancestors not in memory, and the children of those. A live ancestor
        already holds its children's values; adopting one of them anyway (a sibling of the bar) would
        give it only the children still in memory, and a later roll-up of it would be wrong.
        """
        if target is not None:
            bars = self._needed_by(bars, *target)
        adopted: list[tuple[Timeframe, int]] = []
        for bar in sorted(bars, key=lambda b: (ORDER.index(b.timeframe), b.ts)):
            start, end = bucket_bounds(to_us(bar.ts), bar.timeframe)
            if start in self.slots[bar.timeframe] or bar.state is None:
                continue
            slot = self._slot(bar.timeframe, start, end)
            values = bar.state.copy()
            if bar.source is BarSource.EA:
                slot.ea = values
                self.latest_ea_end_us = max(end, self.latest_ea_end_us or end)
            else:
                slot.computed = values
            slot.revision = bar.revision
            self._set_final(bar.timeframe, slot, bar.final)
            slot.published, slot.published_final = (values.prices, bar.ea_disagrees), bar.final
            adopted.append((bar.timeframe, start))
        for tf, start in adopted:
            slot = self.slots[tf][start]
            if tf in SOURCE_OF and slot.children is not None:
                for c_start, c_slot in self.slots[SOURCE_OF[tf]].items():
                    if start <= c_start < slot.end_us and c_slot.effective is not None:
                        slot.children.setdefault(c_start, c_slot.effective.copy())
            child = slot.effective
            for parent_tf in PARENTS_OF[tf]:
                parent = self.slots[parent_tf].get(bucket_bounds(start, parent_tf)[0])
                if parent is not None and parent.children is not None and child is not None:
                    parent.children.setdefault(start, child.copy())

    def _needed_by(self, bars: Iterable[Bar], timeframe: Timeframe, start_us: int) -> list[Bar]:
        """Of ``bars``, those an EA candle for the bar at (``timeframe``, ``start_us``) needs adopted."""
        levels = [(timeframe, start_us)]
        stack = [timeframe]
        while stack:
            for parent_tf in PARENTS_OF[stack.pop()]:
                levels.append((parent_tf, bucket_bounds(start_us, parent_tf)[0]))
                stack.append(parent_tf)
        needed: set[tuple[Timeframe, int]] = set()
        spans: list[tuple[Timeframe, int, int]] = []  # children of each needed level
        for tf, start in levels:
            if start in self.slots[tf]:
                continue  # live: it holds its children's values
            needed.add((tf, start))
            if tf in SOURCE_OF:
                spans.append((SOURCE_OF[tf], start, bucket_bounds(start, tf)[1]))
        out = []
        for bar in bars:
            key = (bar.timeframe, bucket_bounds(to_us(bar.ts), bar.timeframe)[0])
            if key in needed or any(bar.timeframe is tf and a <= key[1] < b for tf, a, b in spans):
                out.append(bar)
        return out

    def forming(self) -> list[Bar]:
        """The bars still forming, lowest timeframe first."""
        return [
            self._bar(tf, slot)
            for tf in ORDER
            for _, slot in sorted(self.slots[tf].items())
            if not slot.final and slot.effective is not None
        ]

    def _prune(self) -> None:
        oldest = self.retention_edge_us
        if oldest is None:
            return
        if oldest // M1_US <= self._pruned_below // M1_US:
            return  # prune once per minute of horizon: keeping a bar a little longer is harmless
        self._pruned_below = oldest
        for tf in Timeframe:
            slots = self.slots[tf]
            for start in [s for s, slot in slots.items() if slot.final and slot.end_us < oldest]:
                del slots[start]


def _roll_up(children: dict[int, Values]) -> Values:
    """Exact OHLC roll-up of child bars, in time order."""
    ordered = [children[k] for k in sorted(children)]
    total = ordered[0].copy()
    for child in ordered[1:]:
        total.merge(child)
    return total


class Aggregator:
    """Bars of every symbol."""

    def __init__(self, settings: AggregationSettings | None = None) -> None:
        self.settings = settings or AggregationSettings()
        self.symbols: dict[str, SymbolBars] = {}

    def _of(self, symbol: str) -> SymbolBars:
        bars = self.symbols.get(symbol)
        if bars is None:
            bars = self.symbols[symbol] = SymbolBars(symbol, self.settings)
        return bars

    def add_ticks(
        self,
        symbol: str,
        ts_us: npt.NDArray[np.int64],
        bid: npt.NDArray[np.float64],
        ask: npt.NDArray[np.float64],
        volume: npt.NDArray[np.float64] | None = None,
        cursors: npt.NDArray[np.int64] | None = None,
        arrived: dt.datetime | None = None,
    ) -> Emitted:
        """Ticks of one symbol, in arrival order; ``arrived`` is the wall time they came in.

        With ``cursors`` (the feed's, increasing), ticks at or below the last applied cursor are
        skipped: a batch delivered again after a reconnect changes nothing.
        """
        bars = self._of(symbol)
        vol = np.zeros(len(ts_us)) if volume is None else volume
        if cursors is not None and len(cursors):
            keep = cursors > bars.last_cursor
            if not keep.all():
                ts_us, bid, ask, vol = ts_us[keep], bid[keep], ask[keep], vol[keep]
            bars.last_cursor = max(bars.last_cursor, int(cursors[-1]))
        return bars.add_ticks(ts_us, bid, ask, vol, None if arrived is None else to_us(arrived))

    def add_ea_candle(self, candle: Candle, arrived: dt.datetime | None = None) -> Emitted:
        """One EA candle; ``arrived`` is the wall time it came in."""
        return self._of(candle.symbol).add_ea_candle(candle, None if arrived is None else to_us(arrived))

    def advance_clock(self, now: dt.datetime) -> Emitted:
        """The wall clock moved on."""
        out = Emitted()
        now_us = to_us(now)
        for symbol in sorted(self.symbols):
            out.extend(self.symbols[symbol].advance_clock(now_us))
        return out

    def is_live(self, symbol: str, timeframe: Timeframe, ts: dt.datetime) -> bool:
        """Whether the bar of ``ts`` is in memory."""
        bars = self.symbols.get(symbol)
        return bars is not None and bars.is_live(timeframe, bucket_bounds(to_us(ts), timeframe)[0])

    def adopt(
        self, symbol: str, bars: Iterable[Bar], target: tuple[Timeframe, dt.datetime] | None = None
    ) -> None:
        """Bring stored, no longer live bars back (see ``SymbolBars.adopt``).

        ``target`` is the EA candle's timeframe and time.
        """
        key = None if target is None else (target[0], bucket_bounds(to_us(target[1]), target[0])[0])
        self._of(symbol).adopt(bars, key)

    def restore(
        self,
        symbol: str,
        bars: Iterable[Bar],
        latest_tick_us: int | None,
        last_cursor: int,
        restored: dt.datetime | None = None,
    ) -> None:
        """Rebuild one symbol's live bars from stored versions (see ``SymbolBars.restore``)."""
        self._of(symbol).restore(
            bars, latest_tick_us, last_cursor, None if restored is None else to_us(restored)
        )

    @property
    def late_dropped(self) -> int:
        """Ticks too late to apply (older than the retention window), over all symbols."""
        return sum(s.late_dropped for s in self.symbols.values())

    def forming(self, symbols: Iterable[str] | None = None) -> list[Bar]:
        """The bars still forming, for a subscriber that asks for them."""
        names = sorted(self.symbols) if symbols is None else sorted(set(symbols) & set(self.symbols))
        return [bar for name in names for bar in self.symbols[name].forming()]

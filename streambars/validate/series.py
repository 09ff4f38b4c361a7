"""All single-series rules for one (symbol, timeframe), fed slice by slice in time order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..rules import RECORD_RULES
from ..timeframes import Timeframe
from ..timeutil import NS, iso
from .checks import (
    duplicate_rows,
    fmt_duration,
    fmt_price,
    gaps_in_session,
    group_volume_limits,
    price_jump_rows,
    rows_above,
    scan_bars,
    session_slots,
)
from .report import SeriesResult

MIN_GROUP = 12  # fewer bars than this in a (month, time of session) group: not judged
SAMPLE = 100_000  # bars per month the volume statistics are computed from (evenly spaced)
PROFILE_NS = 15 * 60 * NS  # the volume profile's resolution: bars are compared by quarter hour
#: Where a bar's ts_event can lie: the span of the session calendar (Session.boundaries). A
#: stored row outside it (negative, int64's extremes: a damaged or hand-edited file) is
#: counted under ts_misaligned and kept out of every other rule, whose arithmetic (session
#: slots, months, datetimes) is only defined inside it.
VALID_FROM = 631_152_000 * NS  # 1990-01-01T00:00Z
VALID_UNTIL = 4_133_980_800 * NS  # 2101-01-01T00:00Z
OUT_OF_RANGE = "ts_event outside 1990..2100: not a bar time (a damaged or hand-edited row)"


def out_of_range(ts: np.ndarray) -> np.ndarray:
    """Mask of timestamps outside [VALID_FROM, VALID_UNTIL)."""
    return (ts < VALID_FROM) | (ts >= VALID_UNTIL)


@dataclass(frozen=True)
class Params:
    """The thresholds, from ValidationSettings."""

    max_volume: int = 0
    price_jump: float = 0.10
    gap_ns: int = 300 * NS
    volume_sigma: float = 8.0
    max_inputs: int = 0  # count above this is count_invalid (0: unknown input, only count == 0)


def _bar_text(bars: np.ndarray, r: int) -> str:
    b = bars[r]
    return (
        f"o={fmt_price(int(b['open']))} h={fmt_price(int(b['high']))} l={fmt_price(int(b['low']))} "
        f"c={fmt_price(int(b['close']))} v={int(b['volume'])} n={int(b['count'])}"
    )


def _month(ts: np.ndarray) -> np.ndarray:
    return ts.astype("datetime64[ns]").astype("datetime64[M]").astype(np.int64)


class SeriesCheck:
    """Per-record rules (through rules.record_violations), duplicates, count, price jumps,
    volume outliers (robust statistics per UTC calendar month and session hour) and, when
    given trading hours, gaps in session. ``boundaries``: the session boundaries (daily
    alignment); ``hours_from``: the same, to count session hours from (volume profile)."""

    def __init__(
        self,
        result: SeriesResult,
        tf: Timeframe,
        params: Params,
        boundaries: np.ndarray | None = None,
        sessions: tuple[np.ndarray, np.ndarray] | None = None,
        hours_from: np.ndarray | None = None,
    ):
        self.r = result
        self.tf = tf
        self.p = params
        self.boundaries = boundaries if tf.is_daily else None
        self.hours_from = hours_from if hours_from is not None else np.zeros(1, np.int64)
        self.sessions = sessions
        self.prev_ts = -1
        self.prev_dup_ts = -1
        self.prev_close = -1
        self.prev_end = -1
        self._vol_month: int | None = None
        self._vol: list[np.ndarray] = []
        self._vol_ts: list[np.ndarray] = []
        self._vol_slot: list[np.ndarray] = []
        #: out-of-range timestamps the walk already counted (a file's first or last row)
        self.counted_out_of_range: set[int] = set()
        for rule in RECORD_RULES:
            result.tally(rule.name)
        for name in ("ts_duplicate", "count_invalid", "price_jump", "volume_outlier"):
            result.tally(name)
        if sessions is not None:
            result.tally("gap_in_session")

    def feed(self, bars: np.ndarray) -> None:
        n = bars.shape[0]
        if n == 0:
            return
        r = self.r
        bad = out_of_range(bars["ts_event"])
        if bad.any():
            odd = [t for t in bars["ts_event"][bad].tolist() if t not in self.counted_out_of_range]
            r.rows += len(odd)
            r.tally("ts_misaligned").add(np.array(odd, np.int64), [OUT_OF_RANGE] * min(len(odd), 40))
            bars = bars[~bad]
            n = bars.shape[0]
            if n == 0:
                return
        ts = bars["ts_event"]
        r.rows += n
        prev_ts = self.prev_ts
        hits, self.prev_ts = scan_bars(
            bars, 0 if self.tf.is_daily else self.tf.nanos, self.boundaries, self.p.max_volume, prev_ts,
            self.p.max_inputs,
        )  # fmt: skip
        if "ts_not_increasing" in hits:
            lo, hi = int(ts.min()), int(ts.max())
        else:
            lo, hi = int(ts[0]), int(ts[-1])
        r.first_ts = lo if r.first_ts is None else min(r.first_ts, lo)
        r.last_ts = hi if r.last_ts is None else max(r.last_ts, hi)
        for name, (count, rows) in hits.items():
            if name == "same_ts":
                continue
            details = []
            for i in rows.tolist():
                if name == "ts_not_increasing":
                    prev = int(ts[i - 1]) if i > 0 else prev_ts
                    details.append(f"after {iso(prev)}")
                elif name == "ts_misaligned":
                    details.append("not on a session boundary" if self.tf.is_daily else f"not a multiple of {self.tf.name}")
                elif name == "count_invalid":
                    details.append(f"count={int(bars['count'][i])}")
                else:
                    details.append(_bar_text(bars, i))
            r.tally(name).add(ts[rows], details, count=count)

        if "ts_not_increasing" not in hits:  # in order: a duplicate is a ts equal to the previous
            count, rows = hits.get("same_ts", (0, np.empty(0, np.int64)))
            r.tally("ts_duplicate").add(ts[rows], ["timestamp already stored"] * rows.size, count=count)
        else:
            dup = duplicate_rows(ts, self.prev_dup_ts)
            r.tally("ts_duplicate").add(ts[dup], ["timestamp already stored"] * min(dup.size, 40))
        self.prev_dup_ts = int(ts[-1])

        jumps, self.prev_close = price_jump_rows(bars["open"], bars["close"], self.p.price_jump, self.prev_close)
        if jumps.size:
            details = []
            for i in jumps[:40].tolist():
                details.append(f"open {fmt_price(int(bars['open'][i]))} close {fmt_price(int(bars['close'][i]))}")
            r.tally("price_jump").add(ts[jumps], details)

        self._feed_volume(ts, bars["volume"])

        if self.sessions is not None:
            starts, lengths, self.prev_end = gaps_in_session(
                ts, self._ends(ts), *self.sessions,
                self.p.gap_ns, self.prev_end,
            )  # fmt: skip
            r.tally("gap_in_session").add(
                starts, [f"no bar for {fmt_duration(x)} of trading time" for x in lengths[:40].tolist()]
            )

    def _ends(self, ts: np.ndarray) -> np.ndarray:
        if self.boundaries is None:
            return ts + self.tf.nanos
        j = np.minimum(np.searchsorted(self.boundaries, ts, side="right"), self.boundaries.size - 1)
        return np.maximum(self.boundaries[j], ts + 1)

    def _feed_volume(self, ts: np.ndarray, volume: np.ndarray) -> None:
        if self.tf.is_daily:
            slots = np.zeros(ts.shape[0], np.int64)
        else:
            slots = session_slots(ts, self.hours_from, np.int64(PROFILE_NS))
        lo, hi = _month(ts[:1])[0], _month(ts[-1:])[0]
        if lo == hi and (ts.shape[0] < 2 or ts[0] <= ts[-1]):
            parts = [(int(lo), slice(None))]
        else:  # a slice across months (or unsorted): split by each row's month
            months = _month(ts)
            order = np.argsort(months, kind="stable")
            cuts = np.flatnonzero(np.diff(months[order])) + 1
            parts = [(int(months[g[0]]), np.sort(g)) for g in np.split(order, cuts)]
        for m, sel in parts:
            if self._vol_month is not None and m != self._vol_month:
                self._flush_volume()
            self._vol_month = m
            self._vol.append(np.asarray(volume[sel]))
            self._vol_ts.append(np.asarray(ts[sel]))
            self._vol_slot.append(slots[sel])

    def _flush_volume(self) -> None:
        """Outliers among the month's bars that start at the same time of the session.

        Volume has a strong intraday profile (the open, the close, the quiet night), so a bar
        is compared with the bars that start in the same quarter hour of the session that
        month, not with the night's. Time of session counts from the session boundary (17:00
        Chicago), so it follows daylight saving (a 2h bar at 14:00 UTC is 08:00 Chicago in
        winter and 09:00 in summer: two groups). Daily bars form one group per month.
        """
        if not self._vol:
            return
        one = len(self._vol) == 1
        v = self._vol[0] if one else np.concatenate(self._vol)
        t = self._vol_ts[0] if one else np.concatenate(self._vol_ts)
        slot = self._vol_slot[0] if one else np.concatenate(self._vol_slot)
        self._vol, self._vol_ts, self._vol_slot = [], [], []
        n_slots = int(slot.max()) + 1
        # the statistics from an evenly spaced sample (<= SAMPLE bars), the test on every bar
        step = max(1, v.size // SAMPLE)
        sv, ss = v[::step], slot[::step]
        order = np.argsort(ss, kind="stable")
        starts = np.searchsorted(ss[order], np.arange(n_slots + 1))
        x = np.log1p(sv[order].astype(np.float64))
        limits = group_volume_limits(x, starts, float(self.p.volume_sigma), max(1, MIN_GROUP // step))
        rows = rows_above(v, slot, limits)
        if rows.size:
            self.r.tally("volume_outlier").add(
                t[rows],
                [f"volume {int(v[i])} > {limits[slot[i]]:,.0f} (robust limit for this time of session "
                 "and month)" for i in rows[:40].tolist()],
            )  # fmt: skip

    def finish(self) -> None:
        self._flush_volume()

"""Cross-timeframe consistency: every stored bar equals the aggregation of the finest bars.

The finest stored bars are aggregated into every coarser timeframe by a numba pass that
carries its open bucket between slices, so a year of 1-second bars is walked a month at a
time. Timeframes cascade: 1h is built from the computed 30min buckets (never from the
*stored* 30min bars), which is exact because aggregation is associative when intervals
nest, and costs one pass over the finest bars instead of one per timeframe.

Finest bars the engine could never merge are left out, as the engine leaves them out:
rows not after the previous accepted row (``ts_not_increasing``, duplicates) and rows
with an undefined price (``price_undefined``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from ..records import BAR_DTYPE, UNDEF_PRICE
from .checks import Tally, fmt_price

I64_MIN = np.iinfo(np.int64).min
I64_MAX = np.iinfo(np.int64).max
FIELDS = ("open", "high", "low", "close", "volume", "count")

# istate: key, open, high, low, close, has, last accepted ts, end of the open bucket
_KEY, _O, _H, _L, _C, _HAS, _LAST, _END = range(8)


@numba.njit(cache=True)
def _bucket(t, interval_ns, boundaries):
    """(key, end) of the interval holding t."""
    if boundaries.shape[0] > 0:
        j = np.searchsorted(boundaries, t, side="right")
        key = boundaries[j - 1] if j >= 1 else I64_MIN
        end = boundaries[j] if j < boundaries.shape[0] else I64_MAX
        return key, end
    key = t - t % interval_ns
    return key, key + interval_ns


@numba.njit(cache=True)
def _aggregate(ts, o, h, lo, c, v, n, interval_ns, boundaries, filter_in, ist, ust,
               out_ts, out_o, out_h, out_l, out_c, out_v, out_n):  # fmt: skip
    """Fold bars (sorted) into buckets; emit each bucket when a later one starts."""
    k = 0
    for i in range(ts.shape[0]):
        t = ts[i]
        if filter_in:
            if ist[_LAST] != I64_MIN and t <= ist[_LAST]:
                continue
            if o[i] == UNDEF_PRICE or h[i] == UNDEF_PRICE or lo[i] == UNDEF_PRICE or c[i] == UNDEF_PRICE:
                continue
            ist[_LAST] = t
        if ist[_HAS] == 1 and ist[_KEY] <= t < ist[_END]:  # the usual case: the same bucket
            if h[i] > ist[_H]:
                ist[_H] = h[i]
            if lo[i] < ist[_L]:
                ist[_L] = lo[i]
            ist[_C] = c[i]
            ust[0] += v[i]
            ust[1] += n[i]
            continue
        key, end = _bucket(t, interval_ns, boundaries)
        if ist[_HAS] == 1:
            if key < ist[_KEY]:  # cannot happen on filtered or computed input
                continue
            out_ts[k] = ist[_KEY]
            out_o[k] = ist[_O]
            out_h[k] = ist[_H]
            out_l[k] = ist[_L]
            out_c[k] = ist[_C]
            out_v[k] = ust[0]
            out_n[k] = ust[1]
            k += 1
        ist[_KEY] = key
        ist[_END] = end
        ist[_O] = o[i]
        ist[_H] = h[i]
        ist[_L] = lo[i]
        ist[_C] = c[i]
        ist[_HAS] = 1
        ust[0] = v[i]
        ust[1] = n[i]
    return k


@dataclass
class Buckets:
    """Computed aggregates (columns), ts ascending and unique."""

    ts: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    count: np.ndarray

    @classmethod
    def empty(cls) -> Buckets:
        i = np.empty(0, np.int64)
        u = np.empty(0, np.uint64)
        return cls(i, i, i, i, i, u, u)

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def take(self, sel) -> Buckets:
        return Buckets(*(getattr(self, f)[sel] for f in ("ts", *FIELDS)))

    @classmethod
    def concat(cls, parts: list[Buckets]) -> Buckets:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ts", *FIELDS)))

    def to_bars(self) -> np.ndarray:
        out = np.empty(len(self), BAR_DTYPE)
        for f in ("ts", *FIELDS):
            out["ts_event" if f == "ts" else f] = getattr(self, f)
        return out


class Aggregation:
    """Running aggregation of one timeframe; feed sorted bars (or a parent's buckets)."""

    def __init__(self, interval_ns: int, boundaries: np.ndarray | None, filter_in: bool):
        self.interval_ns = int(interval_ns)
        self.boundaries = (
            np.empty(0, np.int64) if boundaries is None else np.ascontiguousarray(boundaries, np.int64)
        )
        self.filter_in = filter_in
        self.ist = np.zeros(8, np.int64)
        self.ist[_LAST] = I64_MIN
        self.ust = np.zeros(2, np.uint64)
        self._buf = Buckets.empty()  # reused output columns (fresh memory per call is slow)

    def key_of(self, ts: np.ndarray | int) -> np.ndarray:
        ts = np.asarray(ts, np.int64)
        if self.boundaries.size:
            j = np.searchsorted(self.boundaries, ts, side="right") - 1
            return np.where(j >= 0, self.boundaries[np.maximum(j, 0)], I64_MIN)
        return ts - ts % self.interval_ns

    def end_of(self, key: np.ndarray | int) -> np.ndarray:
        key = np.asarray(key, np.int64)
        if self.boundaries.size:
            j = np.searchsorted(self.boundaries, key, side="right")
            return np.where(j < self.boundaries.size, self.boundaries[np.minimum(j, self.boundaries.size - 1)], I64_MAX)
        return key + self.interval_ns

    @property
    def open_key(self) -> int | None:
        return int(self.ist[_KEY]) if self.ist[_HAS] else None

    def feed_bars(self, bars: np.ndarray) -> Buckets:
        return self._feed(bars["ts_event"], bars["open"], bars["high"], bars["low"], bars["close"],
                          bars["volume"], bars["count"].astype(np.uint64))  # fmt: skip

    def feed_buckets(self, b: Buckets) -> Buckets:
        return self._feed(b.ts, b.open, b.high, b.low, b.close, b.volume, b.count)

    def _feed(self, ts, o, h, lo, c, v, n) -> Buckets:
        m = ts.shape[0]
        if len(self._buf) < m:
            cap = max(m, 2 * len(self._buf), 1024)
            self._buf = Buckets(*(np.empty(cap, np.int64) for _ in range(5)), np.empty(cap, np.uint64),
                                np.empty(cap, np.uint64))  # fmt: skip
        out = self._buf
        k = _aggregate(ts, o, h, lo, c, v, n, np.int64(self.interval_ns), self.boundaries, self.filter_in,
                       self.ist, self.ust, out.ts, out.open, out.high, out.low, out.close, out.volume,
                       out.count)  # fmt: skip
        return Buckets(*(getattr(out, f)[:k].copy() for f in ("ts", *FIELDS)))

    def close_until(self, t: int) -> Buckets:
        """Emit the open bucket if it ends at or before ``t`` (no later input can reach it)."""
        if not self.ist[_HAS] or int(self.end_of(self.ist[_KEY])) > t:
            return Buckets.empty()
        return self.flush()

    def flush(self) -> Buckets:
        if not self.ist[_HAS]:
            return Buckets.empty()
        i, u = self.ist, self.ust
        out = Buckets(*(np.array([x], np.int64) for x in (i[_KEY], i[_O], i[_H], i[_L], i[_C])),
                      np.array([u[0]], np.uint64), np.array([u[1]], np.uint64))  # fmt: skip
        self.ist[_HAS] = 0
        return out


@numba.njit(cache=True)
def _join(keys, o, h, lo, c, v, n, bts, bo, bh, bl, bc, bv, bn, found, differs, matched):
    """Each stored bar (bucket key ``keys[i]``) against the bucket with that key."""
    nb = bts.shape[0]
    j = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        if not (j < nb and bts[j] == k):
            if j + 1 < nb and bts[j + 1] == k:
                j += 1
            else:
                j = np.searchsorted(bts, k)
        if j < nb and bts[j] == k:
            found[i] = True
            matched[j] = True
            if (o[i] != bo[j] or h[i] != bh[j] or lo[i] != bl[j] or c[i] != bc[j]
                    or np.uint64(v[i]) != bv[j] or np.uint64(n[i]) != bn[j]):  # fmt: skip
                differs[i] = True
        else:
            j = 0 if j >= nb else j


def compare(coarse: np.ndarray, keys: np.ndarray, buckets: Buckets) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Stored coarse bars (with their bucket keys) against computed buckets.

    Returns the ts of coarse bars that differ or have no finest bars, their explanations,
    and a mask of the buckets matched by some coarse bar.
    """
    m = coarse.shape[0]
    matched = np.zeros(len(buckets), bool)
    found = np.zeros(m, bool)
    differs = np.zeros(m, bool)
    if m:
        _join(np.ascontiguousarray(keys, np.int64), coarse["open"], coarse["high"], coarse["low"],
              coarse["close"], coarse["volume"], coarse["count"], buckets.ts, buckets.open, buckets.high,
              buckets.low, buckets.close, buckets.volume, buckets.count, found, differs, matched)  # fmt: skip
    rows = np.flatnonzero(~found | differs)
    if rows.size == 0:
        return np.empty(0, np.int64), [], matched
    pos = np.searchsorted(buckets.ts, keys[rows[:40]])
    details = []
    for r, j in zip(rows[:40].tolist(), pos.tolist(), strict=True):
        if not found[r]:
            details.append("no finest bars in its interval")
            continue
        parts = []
        for f in FIELDS:
            mine, agg = int(coarse[f][r]), int(getattr(buckets, f)[j])
            if mine != agg:
                if f in ("volume", "count"):
                    parts.append(f"{f} {mine} != {agg}")
                else:
                    parts.append(f"{f} {fmt_price(mine)} != {fmt_price(agg)}")
        details.append("; ".join(parts) + " (stored != aggregated)")
    return coarse["ts_event"][rows], details, matched


@dataclass
class Level:
    """One coarser timeframe under check: its aggregation, pending bars and tally."""

    name: str
    agg: Aggregation
    parent: int | None  # index of the level it is built from; None: the finest stored bars
    start: int  # buckets before this (a range cut mid-interval) are not complete
    tally: Tally = field(default_factory=lambda: Tally("cross_timeframe"))
    coarse: list[np.ndarray] = field(default_factory=list)  # stored bars not yet comparable
    buckets: list[Buckets] = field(default_factory=list)
    tail: list[Buckets] = field(default_factory=list)  # unmatched buckets after the last stored bar
    max_coarse: int = I64_MIN
    skipped_partial: int = 0


class CrossTimeframe:
    """Walk the finest bars once; check every coarser timeframe (``levels``) against them."""

    def __init__(self, levels: list[Level]):
        self.levels = levels

    def feed(self, fine: np.ndarray, coarse: dict[str, np.ndarray], until: int) -> None:
        """Feed the finest bars and the stored coarse bars with ts < ``until`` (all read so far)."""
        emitted: list[Buckets] = []
        for lv in self.levels:
            src = lv.agg.feed_bars(fine) if lv.parent is None else lv.agg.feed_buckets(emitted[lv.parent])
            closed = lv.agg.close_until(until)
            out = Buckets.concat([src, closed])
            emitted.append(out)
            lv.buckets.append(out)
            bars = coarse.get(lv.name)
            if bars is not None and bars.shape[0]:
                lv.coarse.append(bars)
                lv.max_coarse = max(lv.max_coarse, int(bars["ts_event"].max()))
            open_key = lv.agg.open_key
            limit = int(lv.agg.key_of(until))
            if open_key is not None:
                limit = min(limit, open_key)
            self._settle(lv, limit)

    def finish(self, complete_until: int | None = None) -> None:
        """End of input: close every bucket and compare what is left.

        ``complete_until``: the end of the range read (exclusive) when the user cut it; bars
        whose interval runs past it are not compared (their finest bars were not read).
        """
        emitted: list[Buckets] = []
        for lv in self.levels:
            src = Buckets.empty() if lv.parent is None else lv.agg.feed_buckets(emitted[lv.parent])
            out = Buckets.concat([src, lv.agg.flush()])
            emitted.append(out)
            lv.buckets.append(out)
            if complete_until is not None and lv.coarse:
                bars = np.concatenate(lv.coarse)
                ends = lv.agg.end_of(lv.agg.key_of(bars["ts_event"]))
                keep = ends <= complete_until
                lv.skipped_partial += int((~keep).sum())
                lv.coarse = [bars[keep]]
            self._settle(lv, I64_MAX, final=True, complete_until=complete_until)

    def _settle(self, lv: Level, limit: int, final: bool = False, complete_until: int | None = None) -> None:
        """Compare stored bars and buckets whose intervals are complete (key < limit)."""
        if not lv.coarse and not lv.buckets and not lv.tail:
            return
        if not lv.coarse:
            bars = np.empty(0, BAR_DTYPE)
        else:
            bars = lv.coarse[0] if len(lv.coarse) == 1 else np.concatenate(lv.coarse)
        keys = lv.agg.key_of(bars["ts_event"])
        if keys.size < 2 or bool((keys[1:] >= keys[:-1]).all()):  # sorted: a prefix is ready
            r = int(np.searchsorted(keys, limit))
            lv.coarse = [bars[r:]] if r < keys.size else []
            bars, keys = bars[:r], keys[:r]
        else:
            ready = keys < limit
            lv.coarse = [bars[~ready]] if not ready.all() else []
            bars, keys = bars[ready], keys[ready]
        buckets = Buckets.concat(lv.tail + lv.buckets)
        if lv.tail and len(buckets):  # tail + new: keep ts order
            order = np.argsort(buckets.ts, kind="stable")
            buckets = buckets.take(order)
        lv.buckets, lv.tail = [], []
        bts, details, matched = compare(bars, keys, buckets)
        lv.tally.add(bts, details)
        missing = ~matched & (buckets.ts >= lv.start)
        if complete_until is not None and len(buckets):
            missing &= lv.agg.end_of(buckets.ts) <= complete_until  # partly read: not judged
        # after the last stored bar the coarse bar may simply not be closed yet (a live file)
        later = buckets.ts > lv.max_coarse
        keep = missing & later
        if not final and keep.any():
            lv.tail = [buckets.take(keep)]
        report = missing & ~later
        if report.any():
            miss = buckets.ts[report]
            lv.tally.add(miss, ["missing: the finest bars have trades in this interval"] * min(40, miss.size))

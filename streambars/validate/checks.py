"""The rules over arrays of stored bars: pure functions, plus small carriers of state.

Per-record rules call :func:`streambars.rules.record_violations`, the very function the
engine's kernel calls (one definition per rule). The series rules (duplicates, count, gaps,
price jumps, volume outliers) are plain numpy over one series in time order. Each
``*Check`` class feeds on consecutive slices of one series and gives the same findings
however the series is sliced: the store walk reads a month at a time to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from ..records import UNDEF_PRICE
from ..rules import (
    N_RECORD_RULES,
    RECORD_RULES,
    RULES,
    TS_MISALIGNED,
    VOLUME_OVERFLOW,
    Severity,
    record_violations,
)
from ..timeutil import NS

MAX_FIRST = 10  # offending timestamps kept per rule
U64_MAX = np.iinfo(np.uint64).max


@dataclass
class Tally:
    """One rule's result for one series: how many, and the earliest offending timestamps."""

    rule: str
    count: int = 0
    first: list[int] = field(default_factory=list)  # ts_event ns, ascending, <= MAX_FIRST
    details: dict[int, str] = field(default_factory=dict)  # ts -> short explanation

    @property
    def severity(self) -> Severity:
        return RULES[self.rule].severity

    def add(self, ts: np.ndarray, details: list[str] | None = None, count: int | None = None) -> None:
        """Count ``count`` (default len(ts)) offences; keep the earliest timestamps."""
        n = int(len(ts)) if count is None else int(count)
        if n == 0:
            return
        self.count += n
        ts = np.asarray(ts, dtype=np.int64)
        if details is not None:
            for t, d in zip(ts[: 4 * MAX_FIRST].tolist(), details, strict=False):
                self.details.setdefault(t, d)
        keep = sorted(set(self.first) | set(np.sort(ts)[:MAX_FIRST].tolist()))[:MAX_FIRST]
        self.first = keep
        self.details = {t: d for t, d in self.details.items() if t in keep}


# --------------------------------------------------------------------------- per-record rules


# numba's cache is keyed on this file alone: the rule bits below are compiled in, so a change
# of them in rules.py must come with a change here (or a cleared cache)
SAME_TS = N_RECORD_RULES  # extra rows of the scan's counters: a ts equal to the previous row's
COUNT_INVALID = N_RECORD_RULES + 1
_SCAN_ROWS = N_RECORD_RULES + 2


@numba.njit(cache=True)
def _record_pass(ts, o, h, lo, c, v, n, prev_ts, interval_ns, boundaries, max_volume, max_inputs,
                 counts, first, nfirst):  # fmt: skip
    """Run record_violations over stored bars; returns the last ts (the next slice's prev_ts).

    Bars are checked against the previous row (``ts_not_increasing`` when earlier; equal
    timestamps are counted apart, for ``ts_duplicate``). A bar of ``count`` inputs may hold
    up to ``count * max_volume``. Daily bars (``boundaries`` non-empty) must start on a
    session boundary. A volume of 2**64 - 1 is one the engine saturated (``volume_overflow``).
    Also counts ``count_invalid`` (0, or above ``max_inputs`` when > 0).
    ``first[rule, :]`` receives row indices.
    """
    kmax = first.shape[1]
    nb = boundaries.shape[0]
    for i in range(ts.shape[0]):
        limit = np.uint64(0)
        cnt = np.uint64(n[i])
        if max_volume > 0:
            if cnt > 0 and max_volume > np.uint64(U64_MAX) // cnt:
                limit = np.uint64(U64_MAX)
            else:
                limit = max_volume * cnt
            if limit == 0:
                limit = max_volume
        m = record_violations(ts[i], o[i], h[i], lo[i], c[i], v[i], prev_ts, False, interval_ns, limit)
        if v[i] == U64_MAX:
            m |= 1 << VOLUME_OVERFLOW
        if nb > 0:
            j = np.searchsorted(boundaries, ts[i])
            if j >= nb or boundaries[j] != ts[i]:
                m |= 1 << TS_MISALIGNED
        if prev_ts >= 0 and ts[i] == prev_ts:
            m |= 1 << SAME_TS
        if cnt == 0 or (max_inputs > 0 and cnt > max_inputs):
            m |= 1 << COUNT_INVALID
        prev_ts = ts[i]
        if m != 0:
            for b in range(counts.shape[0]):
                if m & (1 << b):
                    counts[b] += 1
                    if nfirst[b] < kmax:
                        first[b, nfirst[b]] = i
                        nfirst[b] += 1
    return prev_ts


def scan_bars(
    bars: np.ndarray,
    interval_ns: int,
    boundaries: np.ndarray | None = None,
    max_volume: int = 0,
    prev_ts: int = -1,
    max_inputs: int = 0,
) -> tuple[dict[str, tuple[int, np.ndarray]], int]:
    """One pass over ``bars`` (BAR_DTYPE): {rule: (count, first row indices)}, last ts.

    The per-record rules (through ``rules.record_violations``), ``count_invalid``, and
    ``same_ts`` (rows whose ts equals the previous row's). ``interval_ns`` is the timeframe
    (sub-day: epoch alignment); for daily bars pass 0 and the session ``boundaries``.
    """
    counts = np.zeros(_SCAN_ROWS, np.int64)
    first = np.zeros((_SCAN_ROWS, MAX_FIRST), np.int64)
    nfirst = np.zeros(_SCAN_ROWS, np.int64)
    b = np.empty(0, np.int64) if boundaries is None else np.ascontiguousarray(boundaries, np.int64)
    last = _record_pass(
        bars["ts_event"], bars["open"], bars["high"], bars["low"], bars["close"], bars["volume"],
        bars["count"], np.int64(prev_ts), np.int64(interval_ns), b, np.uint64(max_volume),
        np.uint64(max_inputs), counts, first, nfirst,
    )  # fmt: skip
    out = {}
    names = [r.name for r in RECORD_RULES] + ["same_ts", "count_invalid"]
    for k, name in enumerate(names):
        if counts[k]:
            out[name] = (int(counts[k]), first[k, : nfirst[k]].copy())
    return out, int(last)


def record_rule_hits(
    bars: np.ndarray,
    interval_ns: int,
    boundaries: np.ndarray | None = None,
    max_volume: int = 0,
    prev_ts: int = -1,
) -> tuple[dict[str, tuple[int, np.ndarray]], int]:
    """Only the per-record rules of :func:`scan_bars`."""
    hits, last = scan_bars(bars, interval_ns, boundaries, max_volume, prev_ts)
    return {k: v for k, v in hits.items() if k in RULES and RULES[k].bit >= 0}, last


# --------------------------------------------------------------------------- series rules


def duplicate_rows(ts: np.ndarray, prev_ts: int = -1) -> np.ndarray:
    """Rows whose timestamp already occurred (in this slice, or equals ``prev_ts``)."""
    if ts.size == 0:
        return np.empty(0, np.int64)
    d = np.diff(ts)
    if (d >= 0).all():  # the normal case: sorted, so duplicates are adjacent
        rows = np.flatnonzero(d == 0) + 1
    else:
        order = np.argsort(ts, kind="stable")
        s = ts[order]
        rows = np.sort(order[1:][s[1:] == s[:-1]])
    if prev_ts >= 0 and ts[0] == prev_ts:
        rows = np.concatenate(([0], rows))
    return rows


def count_invalid_rows(count: np.ndarray, max_inputs: int = 0) -> np.ndarray:
    """Rows with count 0, or more inputs than the interval can hold (``max_inputs`` > 0)."""
    bad = count == 0
    if max_inputs > 0:
        bad |= count > max_inputs
    return np.flatnonzero(bad)


def _valid_price(p: np.ndarray) -> np.ndarray:
    return (p > 0) & (p != UNDEF_PRICE)


@numba.njit(cache=True)
def _price_jump_pass(o, c, threshold, prev_close, out):
    k = 0
    for i in range(c.shape[0]):
        if prev_close > 0:
            limit = threshold * prev_close
            oi, ci = o[i], c[i]
            if (oi > 0 and oi != UNDEF_PRICE and abs(float(oi - prev_close)) > limit) or (
                ci > 0 and ci != UNDEF_PRICE and abs(float(ci - prev_close)) > limit
            ):
                out[k] = i
                k += 1
        if c[i] > 0 and c[i] != UNDEF_PRICE:
            prev_close = c[i]
    return k, prev_close


def price_jump_rows(
    open_: np.ndarray, close: np.ndarray, threshold: float, prev_close: int = -1
) -> tuple[np.ndarray, int]:
    """Rows whose open or close is more than ``threshold`` (fraction) away from the last close.

    The last close is the previous bar's with a valid close (``prev_close`` carries it
    across slices; -1 none). Returns the rows and the close to carry.
    """
    out = np.empty(close.shape[0], np.int64)
    k, carry = _price_jump_pass(open_, close, float(threshold), np.int64(prev_close), out)
    return out[:k], int(carry)


@numba.njit(cache=True)
def group_volume_limits(x, starts, sigma, min_bars):
    """Per group (``x[starts[g]:starts[g+1]]``, log(1 + volume)) the outlier volume limit.

    A robust z-score: (x - median) / (1.4826 * MAD) above ``sigma``; when the MAD is 0 (most
    bars alike) the mean absolute deviation * 1.2533 stands in; when that is 0 too, or the
    group has fewer than ``min_bars`` bars, nothing is an outlier (inf).
    """
    out = np.full(starts.shape[0] - 1, np.inf)
    for g in range(starts.shape[0] - 1):
        seg = x[starts[g] : starts[g + 1]]
        if seg.shape[0] < min_bars or seg.shape[0] == 0:
            continue
        med = np.median(seg)
        dev = np.abs(seg - med)
        scale = 1.4826 * np.median(dev)
        if scale == 0:
            scale = 1.2533 * dev.mean()
        if scale == 0:
            continue
        out[g] = np.expm1(med + sigma * scale)
    return out


@numba.njit(cache=True)
def rows_above(v, slot, limits):
    """Rows i with v[i] > limits[slot[i]] (float limits; inf never)."""
    out = np.empty(v.shape[0], np.int64)
    k = 0
    for i in range(v.shape[0]):
        if float(v[i]) > limits[slot[i]]:
            out[k] = i
            k += 1
    return out[:k]


def volume_limit(volume: np.ndarray, sigma: float, min_bars: int = 20, sample: int = 20_000) -> float:
    """The volume above which a bar is an outlier among ``volume`` (inf: cannot judge).

    Log scale, because volume errors multiply (see :func:`group_volume_limits`). Above
    ``sample`` bars the statistics come from an evenly spaced sample of that many.
    """
    n = volume.shape[0]
    if n > sample:
        volume = volume[:: n // sample]
    x = np.log1p(volume.astype(np.float64))
    return float(group_volume_limits(x, np.array([0, x.shape[0]], np.int64), float(sigma), int(min_bars))[0])


def volume_outlier_rows(volume: np.ndarray, sigma: float, min_bars: int = 20) -> tuple[np.ndarray, float]:
    """Rows of ``volume`` above :func:`volume_limit`, and the limit."""
    limit = volume_limit(volume, sigma, min_bars)
    if limit == float("inf"):
        return np.empty(0, np.int64), limit
    return np.flatnonzero(volume > limit), limit


@numba.njit(cache=True)
def session_slots(ts, boundaries, width):
    """(ts - the session boundary at or before ts) // width, for each ts (any order)."""
    out = np.empty(ts.shape[0], np.int64)
    nb = boundaries.shape[0]
    j = 0
    for i in range(ts.shape[0]):
        t = ts[i]
        if j >= nb or boundaries[j] > t or (j + 1 < nb and boundaries[j + 1] <= t):
            j = np.searchsorted(boundaries, t, side="right") - 1
            if j < 0:
                j = 0
        out[i] = (t - boundaries[j]) // width
    return out


@numba.njit(cache=True)
def _gap_pass(ts, ends, prev_end, opens, closes, threshold_ns, out_start, out_len):
    """Each in-session stretch of each empty interval between bars longer than the threshold.

    The empty interval after a bar is [its end, next ts); every trading interval it
    overlaps by more than ``threshold_ns`` is one gap (a hole across a close and a reopen is
    two). Out-of-order rows are skipped (they are ts_not_increasing's). Returns (found,
    prev_end); stops adding when ``out_start`` is full.
    """
    k = 0
    ns = opens.shape[0]
    cap = out_start.shape[0]
    for i in range(ts.shape[0]):
        t = ts[i]
        if prev_end >= 0 and t - prev_end > threshold_ns:
            a = prev_end
            j = np.searchsorted(closes, a, side="right")
            while j < ns and opens[j] < t:
                lo = max(a, opens[j])
                hi = min(t, closes[j])
                if hi - lo > threshold_ns and k < cap:
                    out_start[k] = lo
                    out_len[k] = hi - lo
                    k += 1
                j += 1
        end = ends[i]
        if end > prev_end:
            prev_end = end
    return k, prev_end


def gaps_in_session(
    ts: np.ndarray,
    ends: np.ndarray,
    opens: np.ndarray,
    closes: np.ndarray,
    threshold_ns: int,
    prev_end: int = -1,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Gaps: stretches inside trading hours with no bar, longer than ``threshold_ns``.

    ``ends``: each bar's interval end (ts + timeframe; the next session boundary for daily
    bars). ``opens``/``closes``: sorted disjoint trading intervals. Returns the start and
    length (ns) of every gap, and the end of the last bar (carry to the next slice).
    """
    cap = ts.shape[0] + opens.shape[0] + 1
    out_s = np.empty(cap, np.int64)
    out_l = np.empty(cap, np.int64)
    k, end = _gap_pass(
        ts, np.ascontiguousarray(ends, np.int64), np.int64(prev_end), opens, closes, np.int64(threshold_ns), out_s, out_l
    )
    return out_s[:k], out_l[:k], int(end)


def fmt_duration(ns: int) -> str:
    s = int(ns // NS)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def fmt_price(p: int) -> str:
    if p == UNDEF_PRICE:
        return "UNDEF"
    return f"{p / 1e9:.9f}".rstrip("0").rstrip(".")

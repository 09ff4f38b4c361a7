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
from ..rules import N_RECORD_RULES, RECORD_RULES, RULES, TS_MISALIGNED, Severity, record_violations

MAX_FIRST = 10  # offending timestamps kept per rule
NS = 1_000_000_000
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


@numba.njit(cache=True)
def _record_pass(ts, o, h, lo, c, v, n, prev_ts, interval_ns, boundaries, max_volume, counts, first, nfirst):
    """Run record_violations over stored bars; returns the last ts (the next slice's prev_ts).

    Bars are checked against the previous row (``ts_not_increasing`` when earlier; equal
    timestamps are ``ts_duplicate``'s). A bar of ``count`` inputs may hold up to
    ``count * max_volume``. Daily bars (``boundaries`` non-empty) must start on a session
    boundary. ``first[rule, :]`` receives row indices.
    """
    kmax = first.shape[1]
    nb = boundaries.shape[0]
    for i in range(ts.shape[0]):
        limit = np.uint64(0)
        if max_volume > 0:
            cnt = np.uint64(n[i])
            if cnt > 0 and max_volume > np.uint64(U64_MAX) // cnt:
                limit = np.uint64(U64_MAX)
            else:
                limit = max_volume * cnt
            if limit == 0:
                limit = max_volume
        m = record_violations(ts[i], o[i], h[i], lo[i], c[i], v[i], prev_ts, False, interval_ns, limit)
        if nb > 0:
            j = np.searchsorted(boundaries, ts[i])
            if j >= nb or boundaries[j] != ts[i]:
                m |= 1 << TS_MISALIGNED
        prev_ts = ts[i]
        if m != 0:
            for b in range(counts.shape[0]):
                if m & (1 << b):
                    counts[b] += 1
                    if nfirst[b] < kmax:
                        first[b, nfirst[b]] = i
                        nfirst[b] += 1
    return prev_ts


def record_rule_hits(
    bars: np.ndarray,
    interval_ns: int,
    boundaries: np.ndarray | None = None,
    max_volume: int = 0,
    prev_ts: int = -1,
) -> tuple[dict[str, tuple[int, np.ndarray]], int]:
    """Per-record rules over ``bars`` (BAR_DTYPE): {rule: (count, first row indices)}, last ts.

    ``interval_ns`` is the timeframe (sub-day: epoch alignment); for daily bars pass 0 and
    the session ``boundaries``.
    """
    counts = np.zeros(N_RECORD_RULES, np.int64)
    first = np.zeros((N_RECORD_RULES, MAX_FIRST), np.int64)
    nfirst = np.zeros(N_RECORD_RULES, np.int64)
    b = np.empty(0, np.int64) if boundaries is None else np.ascontiguousarray(boundaries, np.int64)
    last = _record_pass(
        bars["ts_event"], bars["open"], bars["high"], bars["low"], bars["close"], bars["volume"],
        bars["count"], np.int64(prev_ts), np.int64(interval_ns), b, np.uint64(max_volume),
        counts, first, nfirst,
    )  # fmt: skip
    out = {}
    for rule in RECORD_RULES:
        k = rule.bit
        if counts[k]:
            out[rule.name] = (int(counts[k]), first[k, : nfirst[k]].copy())
    return out, int(last)


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


def price_jump_rows(
    open_: np.ndarray, close: np.ndarray, threshold: float, prev_close: int = -1
) -> tuple[np.ndarray, int]:
    """Rows whose open or close is more than ``threshold`` (fraction) away from the last close.

    The last close is the previous bar's with a valid close (``prev_close`` carries it
    across slices; -1 none). Returns the rows and the close to carry.
    """
    n = close.shape[0]
    if n == 0:
        return np.empty(0, np.int64), prev_close
    ok_c = _valid_price(close)
    idx = np.where(ok_c, np.arange(n), -1)
    np.maximum.accumulate(idx, out=idx)
    # the valid close before row i: idx[i-1]
    before = np.empty(n, np.int64)
    before[0] = -1
    before[1:] = idx[:-1]
    prev = np.where(before >= 0, close[np.maximum(before, 0)], prev_close).astype(np.float64)
    has_prev = (before >= 0) | (prev_close > 0)
    limit = threshold * prev
    o = open_.astype(np.float64)
    c = close.astype(np.float64)
    jump = (_valid_price(open_) & (np.abs(o - prev) > limit)) | (ok_c & (np.abs(c - prev) > limit))
    rows = np.flatnonzero(jump & has_prev)
    carry = int(close[idx[-1]]) if idx[-1] >= 0 else prev_close
    return rows, carry


def volume_outlier_rows(volume: np.ndarray, sigma: float, min_bars: int = 20) -> tuple[np.ndarray, float]:
    """Rows whose volume is an outlier: robust z-score of log(1 + volume) above ``sigma``.

    z = (x - median) / (1.4826 * MAD); when the MAD is 0 (most bars alike) the mean absolute
    deviation * 1.2533 stands in; when that is 0 too nothing is an outlier. Log scale, because
    volumes are multiplicative (a unit error multiplies). Returns rows and the volume limit.
    """
    if volume.shape[0] < min_bars:
        return np.empty(0, np.int64), float("inf")
    x = np.log1p(volume.astype(np.float64))
    med = float(np.median(x))
    dev = np.abs(x - med)
    scale = 1.4826 * float(np.median(dev))
    if scale == 0:
        scale = 1.2533 * float(dev.mean())
    if scale == 0:
        return np.empty(0, np.int64), float("inf")
    cut = med + sigma * scale
    return np.flatnonzero(x > cut), float(np.expm1(cut))


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

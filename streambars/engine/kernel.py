"""The numba kernels: every timeframe of every series in one pass over a batch of records.

State lives in three small int64 arrays the wrapper owns (and saves/restores):

``lv[series, level, L_*]``
    the running bar of each timeframe ("level", ascending): active flag, interval start and
    end (ns), open, high, low, close, volume (uint64 bits kept in int64) and count.
``ser[series, S_*]``
    per series: last accepted ``ts_event``, the late floor set by flush, then per rule the
    violation count and the first ``N_FIRST`` offending timestamps.
``cfg[level, C_*]`` and ``par[P_*]`` (read-only)
    each level's length in ns, whether it is the session-aligned daily level, its *source*
    level (the coarsest finer level whose every interval lies inside one of its intervals,
    or -1: a root, fed by the input records themselves) and how many levels it feeds; then
    the input's ordering rule, interval, volume ceiling and the drop/fail rule masks.

A record first closes every bar it proves finished (``ts >= end``), then is folded into the
root levels only. A closed bar is emitted and folded into the levels it feeds, which are
checked in turn, so most records touch one or two levels instead of all of them. After a
flush has closed a root (or for a series' first record) one full sweep restores the
invariant that every running bar contains the series' clock.

Output goes into a caller-owned, reused TAGGED_BAR_DTYPE buffer; a kernel stops early (and
says where) when the buffer could overflow, when a record names a series the state has no
room for yet, or when a rule with policy fail is broken.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types

from ..records import TAGGED_BAR_DTYPE
from ..rules import N_RECORD_RULES, record_violations

# lv[s, k, :]
L_ACTIVE, L_START, L_END, L_OPEN, L_HIGH, L_LOW, L_CLOSE, L_VOLUME, L_COUNT = range(9)
N_LEVEL_FIELDS = 9

# ser[s, :]
N_FIRST = 8  # first offending timestamps kept per rule
S_LAST, S_FLOOR = 0, 1
S_COUNTS = 2
S_FIRST = S_COUNTS + N_RECORD_RULES
N_SERIES_FIELDS = S_FIRST + N_FIRST * N_RECORD_RULES

# cfg[k, :] (C_MARK is the kernels' scratch: the step at which the level last closed)
C_NANOS, C_DAILY, C_SOURCE, C_CHILDREN, C_MARK = range(5)
N_CFG_FIELDS = 5

# par[:]
P_STRICT, P_INTERVAL, P_MAX_VOLUME, P_LAST_ROOT, P_DROP_MASK, P_FAIL_MASK = range(6)
N_PAR_FIELDS = 6

# kernel status
OK, FULL, GROW, FAIL, BAD_SERIES = range(5)

DAY_NS = 86_400 * 1_000_000_000


@numba.njit(cache=True, inline="always", _nrt=False)
def bucket(x, nanos, daily, bounds):
    """[start, end) of the interval containing ``x``: epoch-aligned, or between session boundaries."""
    if daily == 0:
        start = x - x % nanos
        return start, start + nanos
    # j = the last boundary <= x. A plain binary search: np.searchsorted(side="right") inlined
    # into the flush kernel returned the index left of an exact boundary (found by the tests).
    lo, hi = 0, bounds.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if bounds[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    j = lo - 1
    if j < 0:  # before the boundary table: whole days back from its first boundary
        start = bounds[0] - ((bounds[0] - x + DAY_NS - 1) // DAY_NS) * DAY_NS
        return start, start + DAY_NS
    if j >= bounds.shape[0] - 1:  # after it: whole days on from its last boundary
        start = bounds[-1] + ((x - bounds[-1]) // DAY_NS) * DAY_NS
        return start, start + DAY_NS
    return bounds[j], bounds[j + 1]


@numba.njit(cache=True, inline="always", _nrt=False)
def _emit(lv, s, k, out, nout):
    row = out[nout]
    row.series = s
    row.timeframe = k
    row.ts_event = lv[s, k, L_START]
    row.open = lv[s, k, L_OPEN]
    row.high = lv[s, k, L_HIGH]
    row.low = lv[s, k, L_LOW]
    row.close = lv[s, k, L_CLOSE]
    row.volume = np.uint64(lv[s, k, L_VOLUME])
    row.count = np.uint32(lv[s, k, L_COUNT])
    lv[s, k, L_ACTIVE] = 0
    return nout + 1


@numba.njit(cache=True, inline="always", _nrt=False)
def _fold_bar(lv, s, src, k, cfg, bounds):
    """Add level ``src``'s just-closed bar to level ``k``'s running bar (starting one if none)."""
    if lv[s, k, L_ACTIVE] == 0:
        start, end = bucket(lv[s, src, L_START], cfg[k, C_NANOS], cfg[k, C_DAILY], bounds)
        lv[s, k, L_ACTIVE] = 1
        lv[s, k, L_START] = start
        lv[s, k, L_END] = end
        lv[s, k, L_OPEN] = lv[s, src, L_OPEN]
        lv[s, k, L_HIGH] = lv[s, src, L_HIGH]
        lv[s, k, L_LOW] = lv[s, src, L_LOW]
        lv[s, k, L_VOLUME] = lv[s, src, L_VOLUME]
        lv[s, k, L_COUNT] = lv[s, src, L_COUNT]
    else:
        if lv[s, src, L_HIGH] > lv[s, k, L_HIGH]:
            lv[s, k, L_HIGH] = lv[s, src, L_HIGH]
        if lv[s, src, L_LOW] < lv[s, k, L_LOW]:
            lv[s, k, L_LOW] = lv[s, src, L_LOW]
        lv[s, k, L_VOLUME] += lv[s, src, L_VOLUME]
        lv[s, k, L_COUNT] += lv[s, src, L_COUNT]
    lv[s, k, L_CLOSE] = lv[s, src, L_CLOSE]


@numba.njit(cache=True, inline="always", _nrt=False)
def _advance(lv, s, t, mark, sweep, closed, cfg, par, bounds, out, nout):
    """Close every bar of series ``s`` that time ``t`` proves finished; returns the new nout.

    Levels are visited finest first. A root is checked directly; any other level only when
    its source closed at this step (``closed[src] == mark``), after folding that bar in,
    unless ``sweep`` asks to check every level (after a flush, or to flush).
    """
    last_root = par[P_LAST_ROOT]
    if not sweep:
        for r in range(last_root + 1):
            if cfg[r, C_SOURCE] < 0 and lv[s, r, L_ACTIVE] == 0:
                sweep = True
    pending = 0
    for k in range(cfg.shape[0]):
        src = cfg[k, C_SOURCE]
        if src >= 0 and closed[src] == mark:
            pending -= 1
            _fold_bar(lv, s, src, k, cfg, bounds)
            check = True
        else:
            check = (src < 0 or sweep) and lv[s, k, L_ACTIVE] != 0
        if check and t >= lv[s, k, L_END]:
            nout = _emit(lv, s, k, out, nout)
            closed[k] = mark
            pending += cfg[k, C_CHILDREN]
        if pending == 0 and k >= last_root and not sweep:
            break
    return nout


@numba.njit(cache=True, inline="always", _nrt=False)
def _count(ser, s, mask, t):
    for b in range(N_RECORD_RULES):
        if (mask >> b) & 1:
            c = ser[s, S_COUNTS + b]
            if c < N_FIRST:
                ser[s, S_FIRST + b * N_FIRST + c] = t
            ser[s, S_COUNTS + b] = c + 1


# Explicit signatures: compiled (or loaded from the cache) once at import, and a batch of any
# other dtype or layout is refused with TypeError (the wrapper converts it) instead of silently
# compiling a new specialisation. No NRT: the kernels allocate nothing, and without reference
# counting on every inlined helper call the loop runs several times faster.
_I4 = types.Array(types.int32, 1, "C")
_I8 = types.Array(types.int64, 1, "C")
_U8 = types.Array(types.uint64, 1, "C")
_I8_2 = types.Array(types.int64, 2, "C")
_I8_3 = types.Array(types.int64, 3, "C")
_OUT = numba.typeof(np.empty(1, TAGGED_BAR_DTYPE))
_RET4 = types.UniTuple(types.int64, 4)
AGGREGATE_SIG = _RET4(_I4, _I8, _I8, _I8, _I8, _I8, _U8, types.int64, _I8_3, _I8_2, _I8_2, _I8, _I8, _OUT)
FLUSH_SIG = types.UniTuple(types.int64, 2)(
    types.int64, types.boolean, types.int64, _I8_3, _I8_2, _I8_2, _I8, _I8, _OUT
)


@numba.njit(AGGREGATE_SIG, cache=True, _nrt=False)
def aggregate(series, ts, op, hi, lo, cl, vol, start, lv, ser, cfg, par, bounds, out):
    """Fold records ``start..`` into the state, emitting closed bars into ``out``.

    Returns ``(next_record, n_out, status, info)``: status OK (all consumed), FULL (output
    buffer full: call again from next_record), GROW (record next_record names series
    ``info``, and the largest in the rest of the batch is ``info``: grow the state and call
    again), BAD_SERIES (negative series index) or FAIL (record next_record broke rule bit
    ``info`` whose policy is fail; it is counted but not applied).
    """
    n = ts.shape[0]
    n_levels = cfg.shape[0]
    n_series = lv.shape[0]
    cap = out.shape[0]
    strict = par[P_STRICT] != 0
    interval = par[P_INTERVAL]
    max_volume = np.uint64(par[P_MAX_VOLUME])
    drop_mask = par[P_DROP_MASK]
    fail_mask = par[P_FAIL_MASK]
    last_root = par[P_LAST_ROOT]
    closed = cfg[:, C_MARK]
    closed[:] = -1
    nout = 0
    for i in range(start, n):
        if nout + n_levels > cap:
            return i, nout, FULL, 0
        s = series[i]
        if s < 0:
            return i, nout, BAD_SERIES, s
        if s >= n_series:
            top = s
            for j in range(i + 1, n):
                if series[j] > top:
                    top = series[j]
            return i, nout, GROW, top
        t = ts[i]
        o, h, low, c, v = op[i], hi[i], lo[i], cl[i], vol[i]
        prev = ser[s, S_LAST]
        floor = ser[s, S_FLOOR]
        if floor >= 0:  # after flush(until): ts must be >= until
            eff = floor - 1 if strict else floor
            if eff > prev:
                prev = eff
        mask = record_violations(t, o, h, low, c, v, prev, strict, interval, max_volume)
        if mask != 0:
            _count(ser, s, mask, t)
            bad = mask & fail_mask
            if bad != 0:
                b = 0
                while (bad >> b) & 1 == 0:
                    b += 1
                return i, nout, FAIL, b
            if mask & drop_mask:
                continue
        nout = _advance(lv, s, t, i, False, closed, cfg, par, bounds, out, nout)
        for r in range(last_root + 1):
            if cfg[r, C_SOURCE] >= 0:
                continue
            if lv[s, r, L_ACTIVE] == 0:
                b0, b1 = bucket(t, cfg[r, C_NANOS], cfg[r, C_DAILY], bounds)
                lv[s, r, L_ACTIVE] = 1
                lv[s, r, L_START] = b0
                lv[s, r, L_END] = b1
                lv[s, r, L_OPEN] = o
                lv[s, r, L_HIGH] = h
                lv[s, r, L_LOW] = low
                lv[s, r, L_CLOSE] = c
                lv[s, r, L_VOLUME] = np.int64(v)
                lv[s, r, L_COUNT] = 1
            else:
                if h > lv[s, r, L_HIGH]:
                    lv[s, r, L_HIGH] = h
                if low < lv[s, r, L_LOW]:
                    lv[s, r, L_LOW] = low
                lv[s, r, L_CLOSE] = c
                lv[s, r, L_VOLUME] += np.int64(v)
                lv[s, r, L_COUNT] += 1
        ser[s, S_LAST] = t
    return n, nout, OK, 0


@numba.njit(FLUSH_SIG, cache=True, _nrt=False)
def flush(until, close_all, first_series, lv, ser, cfg, par, bounds, out):
    """Close the bars of series ``first_series..`` whose end is <= ``until`` (all if close_all).

    Raises each series' late floor to ``until`` (close_all: to the end of the latest bar it
    closed, so a record that belongs to a closed bar is late, never a second bar). Returns
    ``(next_series, n_out)``; next_series < number of series means the buffer filled up.
    """
    n_levels = cfg.shape[0]
    cap = out.shape[0]
    closed = cfg[:, C_MARK]
    closed[:] = -1
    nout = 0
    t = np.iinfo(np.int64).max if close_all else until
    for s in range(first_series, lv.shape[0]):
        if nout + n_levels > cap:
            return s, nout
        floor = until
        if close_all:
            floor = -1
            for k in range(n_levels):
                if lv[s, k, L_ACTIVE] != 0 and lv[s, k, L_END] > floor:
                    floor = lv[s, k, L_END]
        nout = _advance(lv, s, t, -2 - s, True, closed, cfg, par, bounds, out, nout)
        if floor > ser[s, S_FLOOR]:
            ser[s, S_FLOOR] = floor
    return np.int64(lv.shape[0]), nout

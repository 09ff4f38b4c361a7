"""The numba kernel: every timeframe of every series in one pass over a batch of records.

All state and configuration live in one flat int64 array ``st`` (the "arena") that the wrapper
owns, saves and restores; one array instead of five keeps both the per-call dispatch cost and
the loop's register pressure low. Its regions, located by the header:

``cfg[level, C_*]``
    each timeframe ("level", ascending) as length in ns, whether it is the session-aligned
    daily level, its *source* level (the coarsest finer level whose every interval lies
    inside one of its intervals, or -1: a root, fed by the input records themselves), how many
    levels it feeds, and a scratch mark (the step at which it last closed).
``bounds``
    the session boundaries (sorted ns) that daily intervals run between.
``kids[level]``
    the levels it feeds as a bit mask (0 with more than MAX_RUN_LEVELS levels: no run loop
    then uses it), for the cascade of :func:`_run_exact`.
``lv[series, level, L_*]``
    the running bar: active flag, interval start and end (ns), open, high, low, close, volume
    (uint64 bits kept in int64) and count.
``ser[series, S_*]``
    last accepted ``ts_event``, the late floor set by flush, then per rule the violation count
    and the first ``N_FIRST`` offending timestamps.

A record first closes every bar it proves finished (``ts >= end``), then is folded into the
root levels only. Records of a series may share a ``ts_event`` (trades in one nanosecond,
several publishers' bars of one interval): a tie folds into the running bar like any record
inside it; only a ts before the series' last one is late. A closed bar is emitted and folded into the levels it feeds, which are
checked in turn, so most records touch one or two levels instead of all of them. After a
flush has closed a root (or for a series' first record) one full sweep restores the
invariant that every running bar contains the series' clock.

That is the general path. With one root level, the records of a series that follow one
another take a run loop instead, the running bars held in registers and written back once
(:func:`_run_root`: records into the root's bar, which they close and open; :func:`_run_single`:
input bars at the one level's interval; :func:`_run_passes`: input bars at the finest level's
interval, by segments level by level, each level's closed bars from its source's just
written; :func:`_run_exact`, each record closing the previous one into level 1 and the
cascade entered at level 1's end, where a segment could overflow). A run hands every other
record back to the general path, so the bars and the state are the general path's
(tests/test_engine_runs_diff.py, tests/test_engine_passes.py); only the order across
timeframes differs: a segment's bars come out level by level, each level in time order.

Volumes are uint64 sums and saturate at 2**64 - 1 instead of wrapping (rule volume_overflow).
A record whose own volume would overflow a running root bar is checked before anything
changes, so its policy applies like any rule's. A closed bar folded into a coarser running bar
(1min into 1d) can overflow too: that bar saturates and the overflow is counted against the
record whose arrival closed the finer bar (in a flush, the series' last record); drop cannot
take volume back out of a bar, so such a record is kept unless the policy is fail.

Output goes into a caller-owned, reused TAGGED_BAR_DTYPE buffer; the kernel stops early (and
says where) when the buffer could overflow, when a record names a series the arena has no
room for yet, or when a rule with policy fail is broken. Flushing runs in the same compiled
function (``st[H_MODE]``), so a new process loads one kernel from the cache.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.cpython.unsafe.numbers import trailing_zeros

from ..records import TAGGED_BAR_DTYPE, UNDEF_PRICE
from ..rules import N_RECORD_RULES, TS_MISALIGNED, VOLUME_OVERFLOW, record_violations

# header st[H_*]
(H_LEVELS, H_SERIES, H_CFG, H_BOUNDS, H_NBOUNDS, H_LV, H_SER, H_INTERVAL, H_MAX_VOLUME,
 H_LAST_ROOT, H_DROP_MASK, H_FAIL_MASK, H_MODE, H_UNTIL, H_FOLD_OVERFLOW, H_KIDS, H_SCRATCH) = range(17)
MODE_RECORDS, MODE_FLUSH, MODE_FINISH = 0, 1, 2  # st[H_MODE]: what aggregate() does
N_HEADER = 17

# scratch rows (per level, written and read within one segment of _run_passes)
X_FIRST, X_END, X_CLOSE = range(3)
N_SCRATCH_FIELDS = 3

# cfg rows
C_NANOS, C_DAILY, C_SOURCE, C_CHILDREN, C_MARK = range(5)
N_CFG_FIELDS = 5

# lv rows
L_ACTIVE, L_START, L_END, L_OPEN, L_HIGH, L_LOW, L_CLOSE, L_VOLUME, L_COUNT = range(9)
N_LEVEL_FIELDS = 9

# ser rows
N_FIRST = 8  # first offending timestamps kept per rule
S_LAST, S_FLOOR = 0, 1
S_COUNTS = 2
S_FIRST = S_COUNTS + N_RECORD_RULES
N_SERIES_FIELDS = S_FIRST + N_FIRST * N_RECORD_RULES

# kernel status
OK, FULL, GROW, FAIL, BAD_SERIES = range(5)
# which run loop follows a record (aggregate() picks it from the configuration)
RUN_NONE, RUN_ROOT, RUN_EXACT, RUN_SINGLE = range(4)

DAY_NS = 86_400 * 1_000_000_000
U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)  # a volume sum saturates here (volume_overflow)
I64_MIN, I64_MAX = np.int64(-(2**63)), np.int64(2**63 - 1)


@numba.njit(cache=True, inline="always", _nrt=False)
def _U(i):
    """An index as unsigned: numba then skips the negative-index wraparound code it emits for
    every signed index (measured: the loop runs ~35% faster). Every index here is >= 0."""
    return np.uint64(i)



#: a run's cascade (:func:`_cascade`) keeps the levels to visit as bits of one int64
MAX_RUN_LEVELS = 63


def layout(n_levels: int, n_bounds: int, n_series: int) -> dict[str, int]:
    """Offsets of the arena's regions (the wrapper builds and slices the arena with them)."""
    cfg = N_HEADER
    bounds = cfg + n_levels * N_CFG_FIELDS
    kids = bounds + n_bounds
    scratch = kids + n_levels
    lv = scratch + n_levels * N_SCRATCH_FIELDS
    ser = lv + n_series * n_levels * N_LEVEL_FIELDS
    return {"cfg": cfg, "bounds": bounds, "kids": kids, "scratch": scratch, "lv": lv, "ser": ser, "size": ser + n_series * N_SERIES_FIELDS}


@numba.njit(cache=True, inline="always", _nrt=False)
def bucket(st, x, nanos, daily, hint):
    """[start, end) of the interval containing ``x``: epoch-aligned, or between session boundaries.

    ``hint`` is an interval boundary at or before x when known (the level's previous end, or
    0): 64-bit integer division is the slowest instruction in the loop, so the next interval
    is found without one, and a nearby one with a float quotient corrected to be exact.
    """
    if daily == 0:
        d = x - hint
        if 0 <= d < nanos:
            start = hint
        elif 0 <= d < (1 << 52):  # exact in float64: the quotient is off by at most one
            start = hint + np.int64(d / nanos) * nanos
            if start > x:
                start -= nanos
            elif start + nanos <= x:
                start += nanos
        else:
            start = x - x % nanos
        return start, start + nanos
    # the last boundary <= x, by binary search (np.searchsorted(side="right") inlined into
    # the flush kernel returned the index left of an exact boundary: found by the tests)
    first, n = st[_U(H_BOUNDS)], st[_U(H_NBOUNDS)]
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) >> 1
        if st[_U(first + mid)] <= x:
            lo = mid + 1
        else:
            hi = mid
    j = lo - 1
    if j < 0:  # before the boundary table: whole days back from its first boundary
        start = st[_U(first)] - ((st[_U(first)] - x + DAY_NS - 1) // DAY_NS) * DAY_NS
        return start, start + DAY_NS
    if j >= n - 1:  # after it: whole days on from its last boundary
        start = st[_U(first + n - 1)] + ((x - st[_U(first + n - 1)]) // DAY_NS) * DAY_NS
        return start, start + DAY_NS
    return st[_U(first + j)], st[_U(first + j + 1)]


@numba.njit(cache=True, inline="always", _nrt=False)
def _put(out, nout, s, k, t, o, h, lw, c, v, n):
    """Write one closed bar (series s, level k) to ``out[nout]``; returns the next nout. The
    run loops write their register-held finest bar with it, :func:`_emit` a bar of the arena."""
    row = out[_U(nout)]
    row.series = s
    row.timeframe = k
    row.ts_event = t
    row.open = o
    row.high = h
    row.low = lw
    row.close = c
    row.volume = np.uint64(v)
    row.count = np.uint32(n)
    return nout + 1


@numba.njit(cache=True, inline="always", _nrt=False)
def _set_bar(st, b, start, end, o, h, lw, c, v, n):
    """Store a running bar at ``st[_U(b:)]`` (its active flag is the caller's): where a run
    loop writes back the bars it held in registers, and where a record opens a root's bar."""
    st[_U(b + L_START)] = start
    st[_U(b + L_END)] = end
    st[_U(b + L_OPEN)] = o
    st[_U(b + L_HIGH)] = h
    st[_U(b + L_LOW)] = lw
    st[_U(b + L_CLOSE)] = c
    st[_U(b + L_VOLUME)] = np.int64(v)
    st[_U(b + L_COUNT)] = n


@numba.njit(cache=True, inline="always", _nrt=False)
def _emit(st, b, s, k, out, nout):
    """Write the bar at ``st[_U(b:)]`` (series s, level k) to ``out[nout]`` and deactivate it."""
    st[_U(b + L_ACTIVE)] = 0
    return _put(out, nout, s, k, st[_U(b + L_START)], st[_U(b + L_OPEN)], st[_U(b + L_HIGH)],
                st[_U(b + L_LOW)], st[_U(b + L_CLOSE)], st[_U(b + L_VOLUME)], st[_U(b + L_COUNT)])


@numba.njit(cache=True, inline="always", _nrt=False)
def _fold_bar(st, b, src, c):
    """Add the just-closed bar at ``st[_U(src:)]`` to the running bar at ``st[_U(b:)]`` (cfg row c)."""
    if st[_U(b + L_ACTIVE)] == 0:
        start, end = bucket(st, st[_U(src + L_START)], st[_U(c + C_NANOS)], st[_U(c + C_DAILY)], st[_U(b + L_END)])
        st[_U(b + L_ACTIVE)] = 1
        st[_U(b + L_START)] = start
        st[_U(b + L_END)] = end
        st[_U(b + L_OPEN)] = st[_U(src + L_OPEN)]
        st[_U(b + L_HIGH)] = st[_U(src + L_HIGH)]
        st[_U(b + L_LOW)] = st[_U(src + L_LOW)]
        st[_U(b + L_VOLUME)] = st[_U(src + L_VOLUME)]
        st[_U(b + L_COUNT)] = st[_U(src + L_COUNT)]
    else:
        # unconditional stores of max/min compile to conditional moves: whether a bar makes a
        # new high or low is data, and a mispredicted branch per level cost more than the store
        st[_U(b + L_HIGH)] = max(st[_U(b + L_HIGH)], st[_U(src + L_HIGH)])
        st[_U(b + L_LOW)] = min(st[_U(b + L_LOW)], st[_U(src + L_LOW)])
        old = np.uint64(st[_U(b + L_VOLUME)])
        vol = old + np.uint64(st[_U(src + L_VOLUME)])
        if vol < old:  # wrapped: saturate, and tell the caller (it counts volume_overflow)
            vol = U64_MAX
            st[_U(H_FOLD_OVERFLOW)] = 1
        st[_U(b + L_VOLUME)] = np.int64(vol)
        st[_U(b + L_COUNT)] += st[_U(src + L_COUNT)]
    st[_U(b + L_CLOSE)] = st[_U(src + L_CLOSE)]


@numba.njit(cache=True, inline="always", _nrt=False)
def _advance(st, s, t, mark, sweep, out, nout):
    """Close every bar of series ``s`` that time ``t`` proves finished; returns the new nout.

    Levels are visited finest first. A root is checked directly; any other level only when
    its source closed at this step (its mark is ``mark``), after folding that bar in, unless
    ``sweep`` asks to check every level (after a flush closed a root, or to flush).
    """
    n_levels = st[_U(H_LEVELS)]
    last_root = st[_U(H_LAST_ROOT)]
    cfg = st[_U(H_CFG)]
    base = st[_U(H_LV)] + s * n_levels * N_LEVEL_FIELDS
    if not sweep:
        for r in range(last_root + 1):
            if st[_U(cfg + r * N_CFG_FIELDS + C_SOURCE)] < 0 and st[_U(base + r * N_LEVEL_FIELDS + L_ACTIVE)] == 0:
                sweep = True
    return _levels(st, s, t, mark, sweep, out, nout, 0, 0)


@numba.njit(cache=True, inline="always", _nrt=False)
def _levels(st, s, t, mark, sweep, out, nout, k0, pending):
    """:func:`_advance` from level ``k0`` on, ``pending`` closed bars not yet folded."""
    n_levels = st[_U(H_LEVELS)]
    last_root = st[_U(H_LAST_ROOT)]
    cfg = st[_U(H_CFG)]
    base = st[_U(H_LV)] + s * n_levels * N_LEVEL_FIELDS
    for k in range(k0, n_levels):
        c = cfg + k * N_CFG_FIELDS
        b = base + k * N_LEVEL_FIELDS
        src = st[_U(c + C_SOURCE)]
        if src >= 0 and st[_U(cfg + src * N_CFG_FIELDS + C_MARK)] == mark:
            pending -= 1
            _fold_bar(st, b, base + src * N_LEVEL_FIELDS, c)
            check = True
        else:
            check = (src < 0 or sweep) and st[_U(b + L_ACTIVE)] != 0
        if check and t >= st[_U(b + L_END)]:
            nout = _emit(st, b, s, k, out, nout)
            st[_U(c + C_MARK)] = mark
            pending += st[_U(c + C_CHILDREN)]
        if pending == 0 and k >= last_root and not sweep:
            break
    return nout


@numba.njit(cache=True, inline="always", _nrt=False)
def _cascade(st, s, t, out, nout, todo, cfg, base):
    """:func:`_levels` inside a run (one root, no sweep): ``todo`` holds the levels whose
    source just closed as bits, taken finest first, so only the levels that fold are visited,
    in the order and with the folds and bars of :func:`_levels`, with no marks to read or
    write (a level's children are coarser: their bits are above its own)."""
    kids = st[_U(H_KIDS)]
    while todo != 0:
        k = np.int64(trailing_zeros(todo))
        todo &= todo - 1
        c = cfg + k * N_CFG_FIELDS
        b = base + k * N_LEVEL_FIELDS
        _fold_bar(st, b, base + st[_U(c + C_SOURCE)] * N_LEVEL_FIELDS, c)
        if t >= st[_U(b + L_END)]:
            nout = _emit(st, b, s, k, out, nout)
            todo |= st[_U(kids + k)]
    return nout


@numba.njit(cache=True, inline="always", _nrt=False)
def _count(st, sb, mask, t):
    for bit in range(N_RECORD_RULES):
        if (mask >> bit) & 1:
            n = st[_U(sb + S_COUNTS + bit)]
            if n < N_FIRST:
                st[_U(sb + S_FIRST + bit * N_FIRST + n)] = t
            st[_U(sb + S_COUNTS + bit)] = n + 1


@numba.njit(cache=True, inline="always", _nrt=False)
def _fold_overflowed(st, sb, t, fail_mask):
    """A closing cascade saturated a coarser bar's volume: count volume_overflow against the
    record at ``t`` that closed the finer bar. True if the policy is fail: the bars the record
    closed stay closed, so the series' clock moves to ``t`` (an earlier record is late, never
    a second bar), but the record itself is not folded in."""
    st[_U(H_FOLD_OVERFLOW)] = 0
    _count(st, sb, np.int64(1) << VOLUME_OVERFLOW, t)
    if (fail_mask >> VOLUME_OVERFLOW) & 1:
        st[_U(sb + S_LAST)] = t
        return True
    return False


@numba.njit(cache=True, inline="always", _nrt=False)
def _reset_marks(st):
    for k in range(st[_U(H_LEVELS)]):
        st[_U(st[_U(H_CFG)] + k * N_CFG_FIELDS + C_MARK)] = -1


@numba.njit(cache=True, inline="always", _nrt=False)
def _flush(until, close_all, first_series, st, out, out_start):
    """Close the bars of series ``first_series..`` whose end is <= ``until`` (all if close_all).

    Raises each series' late floor to ``until`` (close_all: to the end of the latest bar it
    closed, so a record that belongs to a closed bar is late, never a second bar). That end
    is read after the closing cascade: a coarse bar can start during it (a closed finer bar
    folded into an idle level) and is closed by it too. Returns ``(next_series, n_out)``;
    next_series < number of series means the buffer filled up.
    """
    n_levels = st[_U(H_LEVELS)]
    n_series = st[_U(H_SERIES)]
    cfg = st[_U(H_CFG)]
    cap = out.shape[0]
    _reset_marks(st)
    nout = out_start
    t = np.iinfo(np.int64).max if close_all else until
    for s in range(first_series, n_series):
        if nout + n_levels > cap:
            return s, nout
        base = st[_U(H_LV)] + s * n_levels * N_LEVEL_FIELDS
        mark = -2 - s
        nout = _advance(st, s, t, mark, True, out, nout)
        floor = until
        if close_all:  # every level the cascade closed carries this series' mark
            floor = -1
            for k in range(n_levels):
                end = st[_U(base + k * N_LEVEL_FIELDS + L_END)]
                if st[_U(cfg + k * N_CFG_FIELDS + C_MARK)] == mark and end > floor:
                    floor = end
        sb = st[_U(H_SER)] + s * N_SERIES_FIELDS
        if st[_U(H_FOLD_OVERFLOW)] != 0:  # no record at hand: charged to the series' last one
            st[_U(H_FOLD_OVERFLOW)] = 0
            _count(st, sb, np.int64(1) << VOLUME_OVERFLOW, st[_U(sb + S_LAST)])
        if floor > st[_U(sb + S_FLOOR)]:
            st[_U(sb + S_FLOOR)] = floor
    return n_series, np.int64(nout)


@numba.njit(cache=True, inline="always", _nrt=False)
def _clean(t, o, h, lw, c, v, max_volume, interval, tz, inv, lim, low):
    """The common record in a few comparisons: breaks no per-record rule (its clock is checked
    by the caller) and is aligned to the input interval (see aggregate() for the arithmetic)."""
    ok = (lw > 0 and h < UNDEF_PRICE and lw <= o and lw <= c and o <= h and c <= h
          and v != np.uint64(0) and (max_volume == np.uint64(0) or v <= max_volume))
    if interval > 0:
        ok = ok and t >= 0 and (t & low) == 0 and np.uint64(t >> tz) * inv <= lim
    return ok


@numba.njit(cache=True, inline="always", _nrt=False)
def _run_root(series, ts, op, hi, lo, cl, vol, i, n, s, st, b, sb, c0, out, nout, n_levels,
              max_volume, interval, tz, inv, lim, low, fail_mask):
    """Records ``i..`` of series ``s`` with one root level (at ``st[b:]``, cfg row ``c0``):
    each clean record is folded into the root's bar held in registers; one that reaches the
    bar's end first runs the general path's closing cascade (:func:`_levels`) and opens the
    next bar with itself. Stops before a record that is not clean, late, of another series,
    that would overflow the bar's volume, or when ``out`` is full; the general path takes it.
    Returns ``(first record not taken, nout, failed)``: failed means that record's cascade
    broke volume_overflow with policy fail (the state is then the general path's)."""
    end = st[_U(b + L_END)]
    hh, ll, cc = st[_U(b + L_HIGH)], st[_U(b + L_LOW)], st[_U(b + L_CLOSE)]
    vv = np.uint64(st[_U(b + L_VOLUME)])
    nn = st[_U(b + L_COUNT)]
    last = st[_U(sb + S_LAST)]
    prev = max(last, st[_U(sb + S_FLOOR)])
    cap = out.shape[0]
    failed = False
    j = i
    while j < n and nout + n_levels <= cap:
        uj = _U(j)
        t = ts[uj]
        if series[uj] != s or t < prev:
            break
        o, h, lw, c, v = op[uj], hi[uj], lo[uj], cl[uj], vol[uj]
        if not _clean(t, o, h, lw, c, v, max_volume, interval, tz, inv, lim, low):
            break
        if t >= end:  # the bar closes: the cascade from the state in st, then the next bar
            st[_U(b + L_HIGH)] = hh
            st[_U(b + L_LOW)] = ll
            st[_U(b + L_CLOSE)] = cc
            st[_U(b + L_VOLUME)] = np.int64(vv)
            st[_U(b + L_COUNT)] = nn
            nout = _levels(st, s, t, j, False, out, nout, 0, 0)
            if st[_U(H_FOLD_OVERFLOW)] != 0 and _fold_overflowed(st, sb, t, fail_mask):
                failed = True  # the bar stays closed, the record out, the clock at it
                break
            start, end = bucket(st, t, st[_U(c0 + C_NANOS)], st[_U(c0 + C_DAILY)], end)
            st[_U(b + L_ACTIVE)] = 1
            st[_U(b + L_START)] = start
            st[_U(b + L_END)] = end
            st[_U(b + L_OPEN)] = o
            hh, ll, cc, vv, nn = h, lw, c, v, 1
        else:
            summed = vv + v
            if summed < vv:
                break
            vv = summed
            hh = max(hh, h)
            ll = min(ll, lw)
            cc = c
            nn += 1
        prev = t
        last = t
        j += 1
    if not failed:
        st[_U(b + L_HIGH)] = hh
        st[_U(b + L_LOW)] = ll
        st[_U(b + L_CLOSE)] = cc
        st[_U(b + L_VOLUME)] = np.int64(vv)
        st[_U(b + L_COUNT)] = nn
        st[_U(sb + S_LAST)] = last
    return j, nout, failed


@numba.njit(cache=True, inline="always", _nrt=False)
def _stop(j, n, cap, nout, n_levels):
    """How far a run may go before it must look at ``out`` again: a record emits at most
    ``n_levels`` bars, so the records before the returned index all have the room the general
    path asks for (``nout + n_levels <= cap``), and one check serves many records."""
    return min(n, j + (cap - nout) // n_levels)


@numba.njit(cache=True, inline="always", _nrt=False)
def _clean_exact(t, e0, o, h, lw, c, v, vmax, tz, inv, lim, low):
    """:func:`_clean` for a run at the input interval, plus "past the running finest bar"
    (t >= e0: a tie takes the general path), as one expression of ``&`` so that it compiles
    to a single branch instead of one per condition. ``vmax`` is max_volume or, with no
    ceiling, 2**64 - 1, so ``v - 1 < vmax`` (wrapping at v = 0) is v != 0 and v <= max_volume."""
    return ((t >= e0) & (lw > 0) & (h < UNDEF_PRICE) & (lw <= min(o, c)) & (max(o, c) <= h)
            & (v - np.uint64(1) < vmax) & (t >= 0) & ((t & low) == 0)
            & (np.uint64(t >> tz) * inv <= lim))


@numba.njit(cache=True, inline="always", _nrt=False)
def _run_single(series, ts, op, hi, lo, cl, vol, i, n, s, st, b, sb, out, nout,
                max_volume, interval, tz, inv, lim, low):
    """Records ``i..`` of series ``s`` when the one level is the input interval (1s bars into
    1s alone): each record emits the running bar from registers and becomes the next one.
    Stops before a record that is not clean, not past the running bar (a tie), of another
    series, or when ``out`` is full; the general path takes it. Returns the first record
    not taken and nout."""
    t0, e0 = st[_U(b + L_START)], st[_U(b + L_END)]
    o0, h0, l0, k0 = st[_U(b + L_OPEN)], st[_U(b + L_HIGH)], st[_U(b + L_LOW)], st[_U(b + L_CLOSE)]
    v0, n0 = np.uint64(st[_U(b + L_VOLUME)]), st[_U(b + L_COUNT)]
    vmax = max_volume if max_volume != np.uint64(0) else U64_MAX
    cap = out.shape[0]
    j = i
    stop = j
    while True:
        if j >= stop:
            stop = _stop(j, n, cap, nout, 1)
            if j >= stop:
                break
        uj = _U(j)
        t = ts[uj]
        o, h, lw, c, v = op[uj], hi[uj], lo[uj], cl[uj], vol[uj]
        if not ((series[uj] == s) & _clean_exact(t, e0, o, h, lw, c, v, vmax, tz, inv, lim, low)):
            break
        nout = _put(out, nout, s, 0, t0, o0, h0, l0, k0, v0, n0)
        t0, e0, o0, h0, l0, k0, v0, n0 = t, t + interval, o, h, lw, c, v, 1
        j += 1
    if j > i:
        _set_bar(st, b, t0, e0, o0, h0, l0, k0, v0, n0)
        st[_U(sb + S_LAST)] = t0
    return j, nout


@numba.njit(cache=True, _nrt=False)
def _level1(st, b1, t0, o0, k0, nanos1, daily1):
    """Level 1's running bar for a run loop's registers: (idle, start, end, open, high, low,
    close, volume, count); an idle level 1 as the identity of the fold (high -inf, low +inf,
    volume and count 0) with the interval of ``t0`` (the finest bar running on entry) and
    its open and close, so the fold needs no branch on whether it opens the bar."""
    s1, e1 = st[_U(b1 + L_START)], st[_U(b1 + L_END)]
    idle1 = st[_U(b1 + L_ACTIVE)] == 0
    if idle1:
        s1, e1 = bucket(st, t0, nanos1, daily1, e1)
        return idle1, s1, e1, o0, I64_MIN, I64_MAX, k0, np.uint64(0), np.int64(0)
    return (idle1, s1, e1, st[_U(b1 + L_OPEN)], st[_U(b1 + L_HIGH)], st[_U(b1 + L_LOW)],
            st[_U(b1 + L_CLOSE)], np.uint64(st[_U(b1 + L_VOLUME)]), st[_U(b1 + L_COUNT)])


@numba.njit(cache=True, inline="always", _nrt=False)
def _run_exact(series, ts, op, hi, lo, cl, vol, i, n, s, st, b, sb, c1, out, nout, n_levels,
               max_volume, interval, tz, inv, lim, low, fail_mask):
    """Records ``i..`` of series ``s`` when the finest level is the input interval (1s bars
    into 1s, 5s, ...) and feeds level 1 alone: each record closes the running finest bar,
    which is emitted and folded into level 1, both held in registers. A coarser level can
    only close when level 1 does, so one comparison a record (``t >= end of level 1``)
    decides whether the closing cascade (:func:`_levels`, from level 2) runs at all. Stops
    before a record that is not clean, not past the finest bar (a tie), of another series,
    that would overflow level 1's volume, or when ``out`` is full; the general path takes it.
    Returns ``(first record not taken, nout, failed)``: failed means that record's cascade
    broke volume_overflow with policy fail (the state is then the general path's).

    An idle level 1 (just closed, or idle on entry) is held as the identity of the fold
    (high -inf, low +inf, volume and count 0) with the next bar's open and interval, so the
    fold needs no branch on whether it opens the bar; ``idle1`` says the registers hold no
    bar yet, and then st keeps what the general path would have left there."""
    b1 = b + N_LEVEL_FIELDS
    a0, t0, e0 = st[_U(b + L_ACTIVE)], st[_U(b + L_START)], st[_U(b + L_END)]
    o0, h0, l0, k0 = st[_U(b + L_OPEN)], st[_U(b + L_HIGH)], st[_U(b + L_LOW)], st[_U(b + L_CLOSE)]
    v0, n0 = np.uint64(st[_U(b + L_VOLUME)]), st[_U(b + L_COUNT)]
    nanos1, daily1 = st[_U(c1 + C_NANOS)], st[_U(c1 + C_DAILY)]
    kids1 = st[_U(st[_U(H_KIDS)] + 1)]
    cfg = st[_U(H_CFG)]
    idle1, s1, e1, o1, h1, l1, k1, v1, n1 = _level1(st, b1, t0, o0, k0, nanos1, daily1)
    vmax = max_volume if max_volume != np.uint64(0) else U64_MAX
    last = st[_U(sb + S_LAST)]
    cap = out.shape[0]
    failed = False
    j = i
    stop = j
    while True:
        if j >= stop:
            stop = _stop(j, n, cap, nout, n_levels)
            if j >= stop:
                break
        uj = _U(j)
        t = ts[uj]
        o, h, lw, c, v = op[uj], hi[uj], lo[uj], cl[uj], vol[uj]
        summed = v1 + v0
        if not ((series[uj] == s) & _clean_exact(t, e0, o, h, lw, c, v, vmax, tz, inv, lim, low)
                & (summed >= v1)):
            break
        # the finest bar closes and folds into level 1
        v1 = summed
        h1 = max(h1, h0)
        l1 = min(l1, l0)
        n1 += n0
        k1 = k0
        idle1 = False
        nout = _put(out, nout, s, 0, t0, o0, h0, l0, k0, v0, n0)
        if t >= e1:  # level 1 closes: emit it and cascade from level 2 (state in st for that)
            _set_bar(st, b1, s1, e1, o1, h1, l1, k1, v1, n1)
            nout = _emit(st, b1, s, 1, out, nout)
            nout = _cascade(st, s, t, out, nout, kids1, cfg, b)
            if st[_U(H_FOLD_OVERFLOW)] != 0 and _fold_overflowed(st, sb, t, fail_mask):
                a0, last, failed = 0, t, True  # the finest bar stays emitted, the record out
                break
            # the record's bar is the next one folded into level 1: open level 1 for it
            s1, e1 = bucket(st, t, nanos1, daily1, e1)
            o1, h1, l1, v1, n1, idle1 = o, I64_MIN, I64_MAX, np.uint64(0), np.int64(0), True
        t0, e0, o0, h0, l0, k0, v0, n0 = t, t + interval, o, h, lw, c, v, 1
        last = t
        j += 1
    st[_U(b + L_ACTIVE)] = a0
    _set_bar(st, b, t0, e0, o0, h0, l0, k0, v0, n0)
    if not (failed or idle1):  # else st holds level 1 as the general path leaves it
        st[_U(b1 + L_ACTIVE)] = 1
        _set_bar(st, b1, s1, e1, o1, h1, l1, k1, v1, n1)
    st[_U(sb + S_LAST)] = last
    return j, nout, failed


#: records a segment of :func:`_run_passes` takes at most: its bars stay in the cache between
#: the passes, and every bar's count fits the output's uint32 (see _segment's guard)
MAX_SEGMENT = 8192
#: why a segment stopped: a record the run loops do not take (or the batch end), the output
#: buffer's room, or a volume or count that could overflow a coarser level (_run_exact then)
SEG_RECORD, SEG_ROOM, SEG_RISK = range(3)
#: a segment's volume guard: it starts only while the running bars' volumes sum below the
#: first, and takes only records of volume up to the second (MAX_SEGMENT of them cannot wrap)
SEG_RUNNING_VOLUME = np.uint64(1 << 62)
SEG_RECORD_VOLUME = np.uint64(1 << 49)
assert int(SEG_RUNNING_VOLUME) + MAX_SEGMENT * int(SEG_RECORD_VOLUME) <= 2**63  # far from 2**64


@numba.njit(cache=True, inline="always", _nrt=False)
def _pass(st, s, k, b, c, out, r0, r1, close, w):
    """Level ``k`` (its running bar at ``st[b:]``, cfg row ``c``) from its source's closed bars
    ``out[r0:r1]`` (time order): each is folded into the running bar held in locals, which
    closes when the time that closed the source bar reaches its end; its closed bars go to
    ``out[w:]``. The source bar after bar q started at floor(the time that closed q) on the
    source's grid, and a level's end is on that grid, so the next bar's start stands for that
    time; the last one's is ``close``. Returns (w, the time that closed level k's last bar)."""
    nanos, daily = st[_U(c + C_NANOS)], st[_U(c + C_DAILY)]
    a, start, end = st[_U(b + L_ACTIVE)], st[_U(b + L_START)], st[_U(b + L_END)]
    o, h, lw, cl = st[_U(b + L_OPEN)], st[_U(b + L_HIGH)], st[_U(b + L_LOW)], st[_U(b + L_CLOSE)]
    v, cnt = np.uint64(st[_U(b + L_VOLUME)]), st[_U(b + L_COUNT)]
    last = close
    for q in range(r0, r1):
        row = out[_U(q)]
        if a == 0:
            start, end = bucket(st, row.ts_event, nanos, daily, end)
            a = 1
            o, h, lw, v, cnt = row.open, row.high, row.low, row.volume, np.int64(row.count)
        else:
            h = max(h, row.high)
            lw = min(lw, row.low)
            v += row.volume
            cnt += np.int64(row.count)
        cl = row.close
        x = out[_U(q + 1)].ts_event if q + 1 < r1 else close
        if x >= end:
            w = _put(out, w, s, k, start, o, h, lw, cl, v, cnt)
            a = 0
            last = x
    st[_U(b + L_ACTIVE)] = a
    _set_bar(st, b, start, end, o, h, lw, cl, v, cnt)
    return w, last


@numba.njit(cache=True, inline="always", _nrt=False)
def _segment(series, ts, op, hi, lo, cl, vol, i, n, s, st, b, sb, c1, out, nout, n_levels,
             vmax, interval, tz, inv, lim, low):
    """Records ``i..`` of series ``s`` under :func:`_run_exact`'s conditions, level by level:
    one loop over the records checks each and writes it as the finest bar it will close to
    (the columns are in registers then: reading them again later cost more); one loop folds
    level 1 from the finest bars (records, now in cache: no checks, no lag of one record)
    and writes level 1's closed bars; then each coarser level, in ascending order, one loop
    over its source's closed bars (:func:`_pass`). So each level's bars come out together,
    in time order. The arena ends as _run_exact leaves it: every level's running bar (or the
    last closed one of an idle level, inactive).

    Taken only while no level's volume can wrap and every count stays below 2**32 (the
    output's field, which the passes read), and while every level's bar of every record fits
    ``out``. No wrap is proven before the loop, not by a sum and a branch per record: the
    running volumes sum below 2**62 and the segment takes at most MAX_SEGMENT records of
    volume <= 2**49 each (a larger one is left to the general path). Returns
    ``(first record not taken, nout, why)`` with why SEG_RECORD, SEG_ROOM or SEG_RISK."""
    b1 = b + N_LEVEL_FIELDS
    cfg = st[_U(H_CFG)]
    x = st[_U(H_SCRATCH)]
    t0, e0 = st[_U(b + L_START)], st[_U(b + L_END)]
    o0, h0, l0, k0 = st[_U(b + L_OPEN)], st[_U(b + L_HIGH)], st[_U(b + L_LOW)], st[_U(b + L_CLOSE)]
    v0, n0 = np.uint64(st[_U(b + L_VOLUME)]), st[_U(b + L_COUNT)]
    # the guard: a finer running bar's volume flows into every coarser one, so acc (all the
    # running volumes) plus the segment's records bounds every level's volume to the
    # segment's end; likewise counts, which stay < 2**31 + MAX_SEGMENT
    acc = v0
    big = n0
    for k in range(1, n_levels):
        bk = b + k * N_LEVEL_FIELDS
        if st[_U(bk + L_ACTIVE)] != 0:
            summed = acc + np.uint64(st[_U(bk + L_VOLUME)])
            if summed < acc:
                return i, nout, SEG_RISK
            acc = summed
            big += min(st[_U(bk + L_COUNT)], np.int64(1) << 31)  # < 2**37: no wrap
    if big >= (1 << 31) or n0 >= (1 << 31) or acc >= SEG_RUNNING_VOLUME:
        return i, nout, SEG_RISK
    vseg = min(vmax, SEG_RECORD_VOLUME)  # every sum stays below 2**62 + MAX_SEGMENT * 2**49
    cap = out.shape[0]
    stop = min(n, i + min(MAX_SEGMENT, (cap - nout) // n_levels))
    if stop <= i:
        return i, nout, SEG_ROOM
    why = SEG_ROOM if stop < n else SEG_RECORD
    # 1. the records the segment takes, each written as the finest bar it will close to
    # (record r at out[nout + 1 + r - i]; the bar running on entry closes first, at out[nout]):
    # the check and the copy in one loop over the input, with the columns in registers
    j = i
    e = e0
    while j < stop:
        uj = _U(j)
        t = ts[uj]
        o, h, lw, c, v = op[uj], hi[uj], lo[uj], cl[uj], vol[uj]
        if not ((series[uj] == s) & _clean_exact(t, e, o, h, lw, c, v, vseg, tz, inv, lim, low)):
            why = SEG_RECORD
            break
        _put(out, nout + 1 + (j - i), s, 0, t, o, h, lw, c, v, 1)
        e = t + interval
        j += 1
    if j == i:
        return i, nout, why
    _put(out, nout, s, 0, t0, o0, h0, l0, k0, v0, n0)
    # 2. level 1 from the finest bars closed: the one running on entry, then records i..j-2,
    # each folded after the record's time closed level 1's bar if it reached its end (the
    # order of _run_exact: fold the closed finest bar, then check the next record's time)
    nanos1, daily1 = st[_U(c1 + C_NANOS)], st[_U(c1 + C_DAILY)]
    idle1, s1, e1, o1, h1, l1, k1, v1, n1 = _level1(st, b1, t0, o0, k0, nanos1, daily1)
    v1 += v0
    h1 = max(h1, h0)
    l1 = min(l1, l0)
    n1 += n0
    k1 = k0
    w = nout + (j - i)
    close1 = np.int64(0)
    for r in range(i, j - 1):
        ur = _U(r)
        t = ts[ur]
        if t >= e1:  # level 1 closes: its bar to out, the next one opened by this record
            w = _put(out, w, s, 1, s1, o1, h1, l1, k1, v1, n1)
            close1 = t
            s1, e1 = bucket(st, t, nanos1, daily1, e1)
            o1, h1, l1, k1, v1, n1 = op[ur], hi[ur], lo[ur], cl[ur], vol[ur], np.int64(1)
        else:
            v1 += vol[ur]
            h1 = max(h1, hi[ur])
            l1 = min(l1, lo[ur])
            k1 = cl[ur]
            n1 += 1
    uj = _U(j - 1)
    t = ts[uj]
    idle1 = False
    if t >= e1:  # the last record closes level 1 and leaves it idle: the arena as _emit leaves it
        w = _put(out, w, s, 1, s1, o1, h1, l1, k1, v1, n1)
        st[_U(b1 + L_ACTIVE)] = 0
        _set_bar(st, b1, s1, e1, o1, h1, l1, k1, v1, n1)
        close1 = t
        idle1 = True
    # 3. every coarser level from its source's closed bars
    st[_U(x + N_SCRATCH_FIELDS + X_FIRST)] = nout + (j - i)
    st[_U(x + N_SCRATCH_FIELDS + X_END)] = w
    st[_U(x + N_SCRATCH_FIELDS + X_CLOSE)] = close1
    for k in range(2, n_levels):
        c = cfg + k * N_CFG_FIELDS
        src = x + st[_U(c + C_SOURCE)] * N_SCRATCH_FIELDS
        r0, r1 = st[_U(src + X_FIRST)], st[_U(src + X_END)]
        xk = x + k * N_SCRATCH_FIELDS
        st[_U(xk + X_FIRST)] = w
        if r1 > r0:
            w, close = _pass(st, s, k, b + k * N_LEVEL_FIELDS, c, out, r0, r1, st[_U(src + X_CLOSE)], w)
            st[_U(xk + X_CLOSE)] = close
        st[_U(xk + X_END)] = w
    # the finest bar running now: the last record's
    _set_bar(st, b, t, t + interval, op[uj], hi[uj], lo[uj], cl[uj], vol[uj], 1)
    if not idle1:
        st[_U(b1 + L_ACTIVE)] = 1
        _set_bar(st, b1, s1, e1, o1, h1, l1, k1, v1, n1)
    st[_U(sb + S_LAST)] = t
    return j, w, why


@numba.njit(cache=True, _nrt=False)
def _run_passes(series, ts, op, hi, lo, cl, vol, i, n, s, st, b, sb, c1, out, nout, n_levels,
                max_volume, interval, tz, inv, lim, low, fail_mask):
    """:func:`_run_exact`'s records taken by segments (:func:`_segment`) while they can be;
    a segment stopped by a volume or count that could overflow hands the rest of the run to
    _run_exact. Not inlined: one compiled copy, called once a run (the cold compile of the
    inlined run loops is most of the kernel's). Returns _run_exact's triple."""
    vmax = max_volume if max_volume != np.uint64(0) else U64_MAX
    while True:
        j, nout, why = _segment(series, ts, op, hi, lo, cl, vol, i, n, s, st, b, sb, c1, out, nout,
                                n_levels, vmax, interval, tz, inv, lim, low)
        if why == SEG_RISK:
            return _run_exact(series, ts, op, hi, lo, cl, vol, j, n, s, st, b, sb, c1, out, nout,
                              n_levels, max_volume, interval, tz, inv, lim, low, fail_mask)
        if why == SEG_RECORD or j == i:
            return j, nout, False
        i = j


@numba.njit(cache=True, inline="always", _nrt=False)
def _follow(run, series, ts, op, hi, lo, cl, vol, i, n, s, st, base, sb, cfg, out, nout, n_levels,
            max_volume, interval, tz, inv, lim, low, fail_mask):
    """After record ``i`` of series ``s`` (its root bar running), the records of ``s`` that
    follow take the set-up's run loop; the one place both of aggregate()'s paths enter one.
    Returns ``(last record taken, nout, failed)``: the caller's loop steps past it."""
    if run == RUN_NONE or i + 1 >= n or series[_U(i + 1)] != s or st[_U(base + L_ACTIVE)] == 0:
        return i, nout, False
    return _run(run, series, ts, op, hi, lo, cl, vol, i, n, s, st, base, sb, cfg, out, nout, n_levels,
                max_volume, interval, tz, inv, lim, low, fail_mask)


@numba.njit(cache=True, _nrt=False)
def _run(run, series, ts, op, hi, lo, cl, vol, i, n, s, st, base, sb, cfg, out, nout, n_levels,
         max_volume, interval, tz, inv, lim, low, fail_mask):
    """:func:`_follow`'s run loop. Not inlined: aggregate() enters runs from two places, and
    inlining the run loops into both compiled them twice, most of the kernel's cold compile;
    a call costs tens of ns once a run, a one-record call none (_follow checks first)."""
    if run == RUN_ROOT:
        j, nout, failed = _run_root(series, ts, op, hi, lo, cl, vol, i + 1, n, s, st, base, sb, cfg,
                                    out, nout, n_levels, max_volume, interval, tz, inv, lim, low, fail_mask)
    elif run == RUN_EXACT:
        j, nout, failed = _run_passes(series, ts, op, hi, lo, cl, vol, i + 1, n, s, st, base, sb,
                                      cfg + N_CFG_FIELDS, out, nout, n_levels, max_volume,
                                      interval, tz, inv, lim, low, fail_mask)
    else:
        j, nout = _run_single(series, ts, op, hi, lo, cl, vol, i + 1, n, s, st, base, sb, out, nout,
                              max_volume, interval, tz, inv, lim, low)
        failed = False
    return (j if failed else j - 1), nout, failed


# Explicit signatures: compiled (or loaded from the cache) once at import, and a batch of any
# other dtype or layout is refused with TypeError (the wrapper converts it) instead of silently
# compiling a new specialisation. No NRT: the kernels allocate nothing, and without reference
# counting on every inlined helper call the loop runs several times faster. nogil: the loop
# releases the GIL, so the pipeline's engine thread runs beside decode (zstd releases it
# too) and the writer on the other core instead of taking turns with them.
_I4 = types.Array(types.int32, 1, "C")
_I8 = types.Array(types.int64, 1, "C")
_U8 = types.Array(types.uint64, 1, "C")
_OUT = numba.typeof(np.empty(1, TAGGED_BAR_DTYPE))
AGGREGATE_SIG = types.UniTuple(types.int64, 4)(_I4, _I8, _I8, _I8, _I8, _I8, _U8, types.int64, _I8, _OUT, types.int64)


@numba.njit(AGGREGATE_SIG, cache=True, nogil=True, _nrt=False)
def aggregate(series, ts, op, hi, lo, cl, vol, start, st, out, out_start):
    """Fold records ``start..`` into the arena, emitting closed bars into ``out`` from row
    ``out_start`` on (a live caller's shared pool: its result is then one slice, not two).

    Returns ``(next_record, n_out, status, info)``, n_out the row after the last bar written:
    status OK (all consumed), FULL (output buffer full: call again from next_record), GROW
    (record next_record names a series the arena has no room for; ``info`` is the largest
    series index in the rest of the batch), BAD_SERIES (negative series index) or FAIL
    (record next_record broke rule bit ``info`` whose policy is fail; it is counted but not
    applied).

    With ``st[H_MODE]`` set to MODE_FLUSH or MODE_FINISH it flushes instead (see
    :func:`_flush`; ``start`` is then the first series): one compiled function, so a new
    process loads one kernel from the cache, not two.
    """
    st[_U(H_FOLD_OVERFLOW)] = 0
    if st[_U(H_MODE)] != MODE_RECORDS:
        s, nout = _flush(st[_U(H_UNTIL)], st[_U(H_MODE)] == MODE_FINISH, start, st, out, out_start)
        return s, nout, OK, 0
    n = ts.shape[0]
    n_levels = st[_U(H_LEVELS)]
    n_series = st[_U(H_SERIES)]
    cfg = st[_U(H_CFG)]
    lv = st[_U(H_LV)]
    ser = st[_U(H_SER)]
    cap = out.shape[0]
    interval = st[_U(H_INTERVAL)]
    max_volume = np.uint64(st[_U(H_MAX_VOLUME)])
    zero = np.uint64(0)
    drop_mask = st[_U(H_DROP_MASK)]
    fail_mask = st[_U(H_FAIL_MASK)]
    last_root = st[_U(H_LAST_ROOT)]
    # ts alignment without a 64-bit division per record: interval = 2**tz * m (m odd), and
    # a ts >= 0 is a multiple of it iff its low tz bits are 0 and (ts >> tz) * m**-1 (mod 2**64)
    # <= (2**64 - 1) // m (divisibility by multiplying with the modular inverse)
    tz = np.int64(0)
    odd = np.uint64(1)
    if interval > 0:
        m = interval
        while m & 1 == 0:
            m >>= 1
            tz += 1
        odd = np.uint64(m)
    inv = odd
    for _ in range(5):  # Newton: 3 correct low bits, doubled each step
        inv = inv * (np.uint64(2) - odd * inv)
    lim = np.uint64(0xFFFFFFFFFFFFFFFF) // odd
    low = (np.int64(1) << tz) - 1
    # the finest level is the input interval (1s bars into 1s..): an aligned record's bar is
    # [ts, ts + interval), no bucket search needed
    exact0 = (interval > 0 and st[_U(cfg + C_NANOS)] == interval and st[_U(cfg + C_DAILY)] == 0
              and st[_U(cfg + C_SOURCE)] < 0)
    fast = exact0 and last_root == 0
    children0 = st[_U(cfg + C_CHILDREN)]
    # after a record, the records of its series that follow it are taken by a run loop that
    # holds the running bars in registers (see _run_root and _run_exact): with one root level,
    # only a record that closes a bar (or breaks a rule) needs the general path below
    run = RUN_NONE
    if fast and 1 < n_levels <= MAX_RUN_LEVELS and children0 == 1:
        run = RUN_EXACT
    elif fast and n_levels == 1:
        run = RUN_SINGLE
    elif last_root == 0 and not exact0:
        run = RUN_ROOT
    _reset_marks(st)
    nout = out_start
    i = start - 1
    while True:
        i += 1
        if i >= n:
            break
        if nout + n_levels > cap:
            return i, nout, FULL, 0
        s = np.int64(series[_U(i)])
        if s < 0:
            return i, nout, BAD_SERIES, s
        if s >= n_series:
            top = s
            for j in range(i + 1, n):
                if series[_U(j)] > top:
                    top = series[_U(j)]
            return i, nout, GROW, top
        ui = _U(i)
        t = ts[ui]
        o, h, lw, c, v = op[ui], hi[ui], lo[ui], cl[ui], vol[ui]
        sb = ser + s * N_SERIES_FIELDS
        prev = st[_U(sb + S_LAST)]
        floor = st[_U(sb + S_FLOOR)]
        if floor > prev:  # after flush(until): ts must be >= until
            prev = floor
        # the common case in a few comparisons (every price <= h < UNDEF_PRICE, all > 0 as
        # lw > 0); anything else gets the full rule check
        if (lw > 0 and h < UNDEF_PRICE and lw <= o and lw <= c and o <= h and c <= h and v != zero
                and (max_volume == zero or v <= max_volume) and t >= prev):
            mask = 0
        else:
            mask = record_violations(t, o, h, lw, c, v, prev, False, 0, max_volume)
        aligned = True
        if interval > 0:
            if t >= 0:
                aligned = (t & low) == 0 and np.uint64(t >> tz) * inv <= lim
            else:
                aligned = t % interval == 0
            if not aligned:
                mask |= 1 << TS_MISALIGNED
        if mask != 0:
            _count(st, sb, mask, t)
            bad = mask & fail_mask
            if bad != 0:
                bit = 0
                while (bad >> bit) & 1 == 0:
                    bit += 1
                return i, nout, FAIL, bit
            if mask & drop_mask:
                continue
        base = lv + s * n_levels * N_LEVEL_FIELDS
        if fast and mask == 0 and st[_U(base + L_ACTIVE)] != 0 and t >= st[_U(base + L_END)]:
            # the common case: the finest level is the only root and the input interval, so
            # this record closes its running bar and starts the next one (no merge, no search);
            # a record with the running bar's ts (another publisher) is not >= its end: it
            # takes the general path below and folds into that bar
            nout = _emit(st, base, s, 0, out, nout)
            if children0 > 0:
                st[_U(cfg + C_MARK)] = i
                nout = _levels(st, s, t, i, False, out, nout, 1, children0)
                if st[_U(H_FOLD_OVERFLOW)] != 0 and _fold_overflowed(st, sb, t, fail_mask):
                    return i, nout, FAIL, VOLUME_OVERFLOW
            st[_U(base + L_ACTIVE)] = 1
            _set_bar(st, base, t, t + interval, o, h, lw, c, v, 1)
            st[_U(sb + S_LAST)] = t
            i, nout, failed = _follow(run, series, ts, op, hi, lo, cl, vol, i, n, s, st, base, sb, cfg, out,
                                      nout, n_levels, max_volume, interval, tz, inv, lim, low, fail_mask)
            if failed:
                return i, nout, FAIL, VOLUME_OVERFLOW
            continue
        # volume_overflow by the record itself: it can only overflow a running root bar it
        # lands in (t before its end), and must be known before anything changes so that drop
        # and fail leave no trace. With one root (the usual set-up) the merge below checks it:
        # a record that overflows the one root's running bar lies inside it, so _advance
        # closed nothing. With several roots (7s and 13s) it is checked here, first.
        ovf = False
        if last_root > 0:
            for r in range(last_root + 1):
                b = base + r * N_LEVEL_FIELDS
                old = np.uint64(st[_U(b + L_VOLUME)])
                if (old + v < old and st[_U(b + L_ACTIVE)] != 0 and t < st[_U(b + L_END)]
                        and st[_U(cfg + r * N_CFG_FIELDS + C_SOURCE)] < 0):
                    ovf = True
            if ovf:
                _count(st, sb, np.int64(1) << VOLUME_OVERFLOW, t)
                if (fail_mask >> VOLUME_OVERFLOW) & 1:
                    return i, nout, FAIL, VOLUME_OVERFLOW
                if (drop_mask >> VOLUME_OVERFLOW) & 1:
                    continue
        nout = _advance(st, s, t, i, False, out, nout)
        if st[_U(H_FOLD_OVERFLOW)] != 0:
            if ovf:  # one count a record
                st[_U(H_FOLD_OVERFLOW)] = 0
            elif _fold_overflowed(st, sb, t, fail_mask):
                return i, nout, FAIL, VOLUME_OVERFLOW
        last = t  # the series' clock after this record (unchanged if it is dropped below)
        for r in range(last_root + 1):
            cr = cfg + r * N_CFG_FIELDS
            if st[_U(cr + C_SOURCE)] >= 0:
                continue
            b = base + r * N_LEVEL_FIELDS
            if st[_U(b + L_ACTIVE)] == 0:
                if r == 0 and exact0 and aligned:
                    b0, b1 = t, t + interval
                else:
                    b0, b1 = bucket(st, t, st[_U(cr + C_NANOS)], st[_U(cr + C_DAILY)], st[_U(b + L_END)])
                st[_U(b + L_ACTIVE)] = 1
                _set_bar(st, b, b0, b1, o, h, lw, c, v, 1)
            else:
                old = np.uint64(st[_U(b + L_VOLUME)])
                summed = old + v
                if summed < old:  # wrapped: saturate (one root: nothing changed yet, see above)
                    if last_root == 0:
                        _count(st, sb, np.int64(1) << VOLUME_OVERFLOW, t)
                        if (fail_mask >> VOLUME_OVERFLOW) & 1:
                            return i, nout, FAIL, VOLUME_OVERFLOW
                        if (drop_mask >> VOLUME_OVERFLOW) & 1:
                            last = st[_U(sb + S_LAST)]
                            break
                    summed = U64_MAX
                st[_U(b + L_VOLUME)] = np.int64(summed)
                st[_U(b + L_HIGH)] = max(st[_U(b + L_HIGH)], h)
                st[_U(b + L_LOW)] = min(st[_U(b + L_LOW)], lw)
                st[_U(b + L_CLOSE)] = c
                st[_U(b + L_COUNT)] += 1
        st[_U(sb + S_LAST)] = last
        i, nout, failed = _follow(run, series, ts, op, hi, lo, cl, vol, i, n, s, st, base, sb, cfg, out,
                                  nout, n_levels, max_volume, interval, tz, inv, lim, low, fail_mask)
        if failed:
            return i, nout, FAIL, VOLUME_OVERFLOW
    return n, nout, OK, 0

"""A frozen copy of streambars/engine/kernel.py as of commit 99050b8 (before issue 13's
run loops): the reference the differential test (tests/test_engine_kernel_diff.py) holds the
current kernel to, bar for bar and state word for state word. Do not edit: it is the old
behaviour, kept only to compare against."""


from __future__ import annotations

import numba
import numpy as np
from numba import types

from streambars.records import TAGGED_BAR_DTYPE, UNDEF_PRICE
from streambars.rules import N_RECORD_RULES, TS_MISALIGNED, VOLUME_OVERFLOW, record_violations

# header st[H_*]
(H_LEVELS, H_SERIES, H_CFG, H_BOUNDS, H_NBOUNDS, H_LV, H_SER, H_INTERVAL, H_MAX_VOLUME,
 H_LAST_ROOT, H_DROP_MASK, H_FAIL_MASK, H_MODE, H_UNTIL, H_FOLD_OVERFLOW) = range(15)
MODE_RECORDS, MODE_FLUSH, MODE_FINISH = 0, 1, 2  # st[H_MODE]: what aggregate() does
N_HEADER = 16

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

DAY_NS = 86_400 * 1_000_000_000
U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)  # a volume sum saturates here (volume_overflow)


@numba.njit(cache=True, inline="always", _nrt=False)
def _U(i):
    """An index as unsigned: numba then skips the negative-index wraparound code it emits for
    every signed index (measured: the loop runs ~35% faster). Every index here is >= 0."""
    return np.uint64(i)



def layout(n_levels: int, n_bounds: int, n_series: int) -> dict[str, int]:
    """Offsets of the arena's regions (the wrapper builds and slices the arena with them)."""
    cfg = N_HEADER
    bounds = cfg + n_levels * N_CFG_FIELDS
    lv = bounds + n_bounds
    ser = lv + n_series * n_levels * N_LEVEL_FIELDS
    return {"cfg": cfg, "bounds": bounds, "lv": lv, "ser": ser, "size": ser + n_series * N_SERIES_FIELDS}


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
def _emit(st, b, s, k, out, nout):
    """Write the bar at ``st[_U(b:)]`` (series s, level k) to ``out[nout]`` and deactivate it."""
    row = out[_U(nout)]
    row.series = s
    row.timeframe = k
    row.ts_event = st[_U(b + L_START)]
    row.open = st[_U(b + L_OPEN)]
    row.high = st[_U(b + L_HIGH)]
    row.low = st[_U(b + L_LOW)]
    row.close = st[_U(b + L_CLOSE)]
    row.volume = np.uint64(st[_U(b + L_VOLUME)])
    row.count = np.uint32(st[_U(b + L_COUNT)])
    st[_U(b + L_ACTIVE)] = 0
    return nout + 1


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
def _flush(until, close_all, first_series, st, out):
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
    nout = 0
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
AGGREGATE_SIG = types.UniTuple(types.int64, 4)(_I4, _I8, _I8, _I8, _I8, _I8, _U8, types.int64, _I8, _OUT)


@numba.njit(AGGREGATE_SIG, cache=True, nogil=True, _nrt=False)
def aggregate(series, ts, op, hi, lo, cl, vol, start, st, out):
    """Fold records ``start..`` into the arena, emitting closed bars into ``out``.

    Returns ``(next_record, n_out, status, info)``: status OK (all consumed), FULL (output
    buffer full: call again from next_record), GROW (record next_record names a series the
    arena has no room for; ``info`` is the largest series index in the rest of the batch),
    BAD_SERIES (negative series index) or FAIL (record next_record broke rule bit ``info``
    whose policy is fail; it is counted but not applied).

    With ``st[H_MODE]`` set to MODE_FLUSH or MODE_FINISH it flushes instead (see
    :func:`_flush`; ``start`` is then the first series): one compiled function, so a new
    process loads one kernel from the cache, not two.
    """
    st[_U(H_FOLD_OVERFLOW)] = 0
    if st[_U(H_MODE)] != MODE_RECORDS:
        s, nout = _flush(st[_U(H_UNTIL)], st[_U(H_MODE)] == MODE_FINISH, start, st, out)
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
    _reset_marks(st)
    nout = 0
    for i in range(start, n):
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
            st[_U(base + L_START)] = t
            st[_U(base + L_END)] = t + interval
            st[_U(base + L_OPEN)] = o
            st[_U(base + L_HIGH)] = h
            st[_U(base + L_LOW)] = lw
            st[_U(base + L_CLOSE)] = c
            st[_U(base + L_VOLUME)] = np.int64(v)
            st[_U(base + L_COUNT)] = 1
            st[_U(sb + S_LAST)] = t
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
                st[_U(b + L_START)] = b0
                st[_U(b + L_END)] = b1
                st[_U(b + L_OPEN)] = o
                st[_U(b + L_HIGH)] = h
                st[_U(b + L_LOW)] = lw
                st[_U(b + L_CLOSE)] = c
                st[_U(b + L_VOLUME)] = np.int64(v)
                st[_U(b + L_COUNT)] = 1
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
    return n, nout, OK, 0

"""The aggregation engine: records in, closed bars of every timeframe out, validated inline.

:class:`Aggregator` owns the plain-numpy state of :mod:`.kernel` and feeds it batches. It is
cheap to call with one record (live) and streams any batch size through a bounded, reused
output buffer (backfill); the bars never depend on how the input was split into batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import RuleViolationError
from ..jitcache import freeze_import_heap, load_without_refresh
from ..records import INPUT_INTERVAL_NS, INPUT_KINDS, TAGGED_BAR_DTYPE, BarBatch, RecordBatch
from ..rules import ALWAYS_DROP_MASK, RECORD_RULE_NAMES, RULES, Policy, policy_array
from ..timeframes import Session, Timeframe, parse_timeframe

# The kernel loads from numba's cache without numba's ~0.6 s registry refresh (jitcache.py);
# the heap numba and numpy built is then frozen, out of every later garbage collection's way.
load_without_refresh(f"{__name__}.kernel", "aggregate")
from . import kernel as K  # noqa: E402

freeze_import_heap()

__all__ = ["Aggregator", "STATE_LAYOUT_VERSION"]

#: Bumped whenever the meaning of the saved state arrays changes. 2: volume_overflow appended
#: to the rule counters (so the series row grew), and equal timestamps of bars merge.
STATE_LAYOUT_VERSION = 2
#: Rules the per-series counters held in each older layout version (read by _upgrade).
_RULES_IN_LAYOUT = {1: 7}

_NO_BARS = np.empty(0, TAGGED_BAR_DTYPE)
_NO_BARS.setflags(write=False)
#: Rows of a small batches' pool (240 kB): a result is a view that keeps its pool alive.
_POOL_ROWS = 4096


_aggregate, _OK, _ROW = K.aggregate, K.OK, TAGGED_BAR_DTYPE.itemsize
_NO_RECORDS = tuple(np.empty(0, dt) for dt in (np.int32, np.int64, np.int64, np.int64, np.int64, np.int64, np.uint64))
_COLUMN_DTYPES = (np.int32, np.int64, np.int64, np.int64, np.int64, np.int64, np.uint64)
#: The compiled kernel without numba's dispatcher, whose type resolution of ten arguments is
#: ~2 us: half of a one-record live call. The entry point itself checks only item sizes (a
#: strided or 2-d column would be read out of bounds), so process() calls it only for columns
#: of exactly these dtypes and unit strides; anything else goes through the dispatcher.
_direct = K.aggregate.overloads[K.AGGREGATE_SIG.args].entry_point
_DTYPES = tuple(np.dtype(dt) for dt in _COLUMN_DTYPES)
_STRIDES = tuple((dt.itemsize,) for dt in _DTYPES)


def _bars(acc: bytearray) -> np.ndarray:
    """Bars accumulated as bytes: np.concatenate on a packed structured dtype is ~10x slower."""
    return np.frombuffer(acc, TAGGED_BAR_DTYPE) if acc else _NO_BARS


class Aggregator:
    """Every requested timeframe of every series, in one pass, with per-record validation.

    ``timeframes``: strings ("5min") or :class:`Timeframe`; sorted ascending, and a bar's
    ``timeframe`` field indexes :attr:`timeframes`. ``input_kind``: "ohlcv-1s", "ohlcv-1m"
    or "trades". ``session``: where daily bars start. ``policies``: rule name -> "flag" |
    "drop" | "fail" for the per-record rules (others get ``default_policy``). ``max_volume``:
    a record's volume above it breaks volume_absurd (0: no ceiling). ``series_names``: how
    errors name a series (a sequence or a :class:`~streambars.records.SeriesRegistry`).

    Records of one series arrive in time order; several may share a ``ts_event`` (trades in
    one nanosecond; an instrument's OHLCV bars from several publishers, e.g. OPRA venues
    reporting the same minute). They all go into the bar of that interval: volume and count
    summed, high the max, low the min, open the first record's open and close the last
    record's close in input order (the feed's order; Databento gives no better one across
    publishers). Only a record before the series' previous one is ``ts_not_increasing``.

    Volumes are uint64 sums that saturate at 2**64 - 1, never wrap: a record whose volume
    would overflow the bar it goes into breaks ``volume_overflow`` (flag: kept, saturated;
    drop: left out of every bar; fail: raises). A closed bar folded into a coarser one (1min
    into 1d) can overflow it too: that bar saturates and the record whose arrival closed the
    finer bar is charged (in flush/finish, the series' last record); it is kept under drop
    (its own volume is not what overflowed), and under fail the error carries the bars it
    closed, which stay closed. A record counts at most once for what it adds and closes.

    Any batch size gives the same bars. Throughput is best with batches of a few thousand
    to ~16k records: their bars fit the reused output buffer (``out_capacity`` rows) and the
    cache; much larger batches spend their time materialising one large result in fresh memory.
    """

    def __init__(
        self,
        timeframes: Sequence[str | Timeframe],
        *,
        input_kind: str,
        session: Session,
        policies: dict[str, Policy | str] | None = None,
        default_policy: Policy | str = "flag",
        max_volume: int = 0,
        out_capacity: int = 65536,
        series_names=None,
    ):
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind {input_kind!r} is not one of {', '.join(INPUT_KINDS)}")
        tfs = tuple(sorted({t if isinstance(t, Timeframe) else parse_timeframe(t) for t in timeframes}))
        if not tfs:
            raise ValueError("no timeframes given")
        self.timeframes: tuple[Timeframe, ...] = tfs
        self.input_kind = input_kind
        self.session = session
        self.series_names = series_names
        interval = INPUT_INTERVAL_NS[input_kind]
        daily = any(t.is_daily for t in tfs)
        bounds = session.boundaries() if daily else np.zeros(1, np.int64)
        # every boundary is a multiple of x iff this step is (0 without daily bars: any x)
        self._bound_step = session.boundary_step() if daily else 0
        for t in tfs:
            if interval and (t.nanos % interval or (t.is_daily and self._bound_step % interval)):
                raise ValueError(
                    f"timeframe {t.name} cannot be built from {input_kind} records: every "
                    f"timeframe (and the session boundary {session}) must be a whole multiple "
                    f"of the input interval ({interval // 1_000_000_000} s)"
                )
        self._bounds = np.asarray(bounds, dtype=np.int64)

        n = len(tfs)
        cfg = np.zeros((n, K.N_CFG_FIELDS), np.int64)
        for k, t in enumerate(tfs):
            cfg[k, K.C_NANOS] = t.nanos
            cfg[k, K.C_DAILY] = int(t.is_daily)
            cfg[k, K.C_SOURCE] = self._source(k)
        for k in range(n):
            if cfg[k, K.C_SOURCE] >= 0:
                cfg[cfg[k, K.C_SOURCE], K.C_CHILDREN] += 1
        self.sources: tuple[int, ...] = tuple(int(x) for x in cfg[:, K.C_SOURCE])
        self._kids = np.zeros(n, np.int64)  # the levels each one feeds, as bits (see kernel.py)
        if n <= K.MAX_RUN_LEVELS:
            for k, src in enumerate(self.sources):
                if src >= 0:
                    self._kids[src] |= 1 << k

        pol = policy_array(policies or {}, default_policy)
        head = np.zeros(K.N_HEADER, np.int64)
        head[K.H_LEVELS] = n
        head[K.H_NBOUNDS] = len(self._bounds)
        head[K.H_INTERVAL] = interval
        head[K.H_MAX_VOLUME] = np.uint64(max_volume).view(np.int64) if max_volume else 0
        head[K.H_LAST_ROOT] = max(k for k in range(n) if cfg[k, K.C_SOURCE] < 0)
        codes = pol.tolist()  # plain ints: each comparison with an enum member costs ~1 us
        self.policies = {name: Policy(code) for name, code in zip(RECORD_RULE_NAMES, codes, strict=True)}
        drop, fail = int(Policy.DROP), int(Policy.FAIL)
        head[K.H_DROP_MASK] = ALWAYS_DROP_MASK | sum(1 << b for b, code in enumerate(codes) if code == drop)
        head[K.H_FAIL_MASK] = sum(1 << b for b, code in enumerate(codes) if code == fail)
        self._head, self._cfg = head, cfg

        self._min_out = n  # the kernel needs room for every level's bar before each record
        self._out = np.empty(max(int(out_capacity), 2 * n), TAGGED_BAR_DTYPE)
        self._out_bytes = memoryview(self._out.view(np.uint8))
        self._pool, self._pos = _NO_BARS, 0  # small batches' bars: see process()
        self._floor = -1
        self._arena(0)

    # -- set-up ----------------------------------------------------------------------------

    def _source(self, k: int) -> int:
        """The coarsest finer level whose every interval lies inside one interval of level k."""
        tk = self.timeframes[k]
        for j in range(k - 1, -1, -1):
            tj = self.timeframes[j]
            if tk.is_daily:
                if tj.divides_day and self._bound_step % tj.nanos == 0:
                    return j
            elif tk.seconds % tj.seconds == 0:
                return j
        return -1

    def _arena(self, n_series: int, lv: np.ndarray | None = None, ser: np.ndarray | None = None) -> None:
        """(Re)build the kernels' one state array for ``n_series`` series, keeping lv/ser rows given."""
        n, nb = len(self.timeframes), len(self._bounds)
        off = K.layout(n, nb, n_series)
        st = np.zeros(off["size"], np.int64)
        st[: K.N_HEADER] = self._head
        st[K.H_SERIES] = n_series
        st[K.H_CFG], st[K.H_BOUNDS], st[K.H_LV], st[K.H_SER] = off["cfg"], off["bounds"], off["lv"], off["ser"]
        st[K.H_KIDS], st[K.H_SCRATCH] = off["kids"], off["scratch"]
        st[off["cfg"]:off["bounds"]] = self._cfg.ravel()
        st[off["bounds"]:off["kids"]] = self._bounds
        st[off["kids"]:off["scratch"]] = self._kids
        self._st = st
        self._lv = st[off["lv"]:off["ser"]].reshape(n_series, n, K.N_LEVEL_FIELDS)  # views of st
        self._ser = st[off["ser"]:].reshape(n_series, K.N_SERIES_FIELDS)
        self._ser[:, K.S_LAST] = -1
        self._ser[:, K.S_FLOOR] = self._floor
        if lv is not None:
            self._lv[: len(lv)] = lv
            self._ser[: len(ser)] = ser

    @property
    def n_series(self) -> int:
        return int(self._lv.shape[0])

    def _grow(self, n_series: int) -> None:
        if n_series > self.n_series:
            self._arena(n_series, self._lv, self._ser)

    def _name(self, series: int) -> str:
        names = getattr(self.series_names, "names", self.series_names)
        if names is not None and 0 <= series < len(names):
            return str(names[series])
        return f"series {series}"

    # -- feeding ---------------------------------------------------------------------------

    def process(self, batch: RecordBatch) -> BarBatch:
        """Fold a batch in; returns the bars it closed, each (series, timeframe) in time order
        (across timeframes in no set order: a run of 1s bars comes out level by level).

        Raises :class:`RuleViolationError` (with ``.bars``: the bars closed before the bad
        record, ``.index``: its position in the batch) when a rule with policy fail is broken;
        the state then holds everything before that record, so the caller may go on after it.
        """
        if batch.kind != self.input_kind:
            raise ValueError(f"a {batch.kind} batch given to an aggregator of {self.input_kind} records")
        b = batch
        s, t, o, h, lo, c, v = b.series, b.ts_event, b.open, b.high, b.low, b.close, b.volume
        # The bars go straight into rows that become the result, with no copy: a small batch
        # (live feeding: one record) is written from row pos of a pool shared by the calls,
        # which never hands a row out twice; a larger one into a fresh array sized for the
        # usual case (about 1.6 bars a record with 16 timeframes). A batch that closes more
        # bars (or a huge one) falls back to the reused buffer, accumulated as bytes.
        n = t.shape[0]
        pos = 0
        if n < 64:
            out, pos = self._pool, self._pos
            if pos + 2 * n + self._min_out > out.shape[0]:
                out = self._pool = np.empty(_POOL_ROWS, TAGGED_BAR_DTYPE)
                pos = 0
        else:
            cap = 2 * n + self._min_out
            out = self._out if cap > self._out.shape[0] else np.empty(cap, TAGGED_BAR_DTYPE)
        # One record reads element 0 of each column whatever its stride, but the entry point
        # writes ndim shapes and strides into a one-dimensional array's struct.
        ok = (s.dtype, t.dtype, o.dtype, h.dtype, lo.dtype, c.dtype, v.dtype) == _DTYPES and (
            s.ndim == t.ndim == o.ndim == h.ndim == lo.ndim == c.ndim == v.ndim == 1 if n <= 1 else
            (s.strides, t.strides, o.strides, h.strides, lo.strides, c.strides, v.strides) == _STRIDES)
        call = _direct if ok else _aggregate
        try:  # the fast path, kept lean: live feeding calls this once per record
            done, nout, status, info = call(s, t, o, h, lo, c, v, 0, self._st, out, pos)
        except TypeError:  # another dtype, or a non-contiguous or read-only view: convert once
            cols = (s, t, o, h, lo, c, v)
            cols = tuple(np.require(c, dt, "CW") for c, dt in zip(cols, _COLUMN_DTYPES, strict=True))
            call = _aggregate
            done, nout, status, info = call(*cols, 0, self._st, out, pos)
        else:
            if status == _OK and out is not self._out:
                if nout > pos:
                    if out is self._pool:
                        self._pos = nout
                    return BarBatch(out[pos:nout])
                return BarBatch(_NO_BARS)
            cols = (s, t, o, h, lo, c, v)
        acc = bytearray()
        if out is not self._out:  # the first chunk went into the pool or the fresh array
            acc += memoryview(out.view(np.uint8))[pos * _ROW : nout * _ROW]
            if status == K.OK:
                return BarBatch(_bars(acc))
            nout = 0
        while True:
            acc += self._out_bytes[: nout * _ROW]
            if status == K.OK:
                break
            if status == K.GROW:
                self._grow(info + 1)
            elif status == K.BAD_SERIES:
                raise ValueError(f"record {done} of the batch has a negative series index {info}")
            elif status == K.FAIL:
                raise self._violation(cols, done, info, acc)
            # the columns the first call took, the same way: the dispatcher refuses read-only
            # columns that the entry point reads well (a live record's broadcast prices)
            done, nout, status, info = call(*cols, done, self._st, self._out, 0)
        return BarBatch(_bars(acc))

    def _violation(self, cols, index: int, bit: int, acc: bytearray) -> RuleViolationError:
        series, ts = int(cols[0][index]), int(cols[1][index])
        err = RuleViolationError(RECORD_RULE_NAMES[bit], self._name(series), ts, f"record {index} of the batch")
        err.bars = BarBatch(_bars(acc))
        err.index = index
        err.series_index = series
        return err

    def flush(self, until_ts: int) -> BarBatch:
        """Close every running bar whose interval ends at or before ``until_ts``.

        From then on a record with ``ts_event < until_ts`` is late: counted as
        ts_not_increasing and dropped, so a closed bar is never reopened or duplicated.
        """
        until = int(until_ts)
        self._floor = max(self._floor, until)
        return self._flush(until, False)

    def finish(self) -> BarBatch:
        """End of input: close every running bar (a later record inside one of them is late)."""
        return self._flush(np.iinfo(np.int64).max, True)

    def _flush(self, until: int, close_all: bool) -> BarBatch:
        acc = bytearray()
        s, st = 0, self._st
        st[K.H_UNTIL] = until
        st[K.H_MODE] = K.MODE_FINISH if close_all else K.MODE_FLUSH
        try:
            while s < self.n_series:
                s, nout, _, _ = _direct(*_NO_RECORDS, s, st, self._out, 0)
                acc += self._out_bytes[: nout * _ROW]
        finally:
            st[K.H_MODE] = K.MODE_RECORDS
        return BarBatch(_bars(acc))

    # -- counters --------------------------------------------------------------------------

    @property
    def counts(self) -> np.ndarray:
        """Per-record rule violations so far, int64 (series, rule in RECORD_RULE_NAMES order)."""
        return self._ser[:, K.S_COUNTS:K.S_COUNTS + len(RECORD_RULE_NAMES)].copy()

    def first_violations(self, series: int, rule: str | int) -> list[int]:
        """The first (up to 8) ``ts_event`` of records of ``series`` that broke ``rule``."""
        bit = rule if isinstance(rule, int) else getattr(RULES.get(rule), "bit", -1)
        if not 0 <= bit < len(RECORD_RULE_NAMES):
            raise ValueError(f"{rule!r} is not a per-record rule ({', '.join(RECORD_RULE_NAMES)})")
        if not 0 <= series < self.n_series:
            return []
        n = min(int(self._ser[series, K.S_COUNTS + bit]), K.N_FIRST)
        first = K.S_FIRST + bit * K.N_FIRST
        return [int(x) for x in self._ser[series, first:first + n]]

    # -- state -----------------------------------------------------------------------------

    def _layout(self) -> dict[str, np.ndarray]:
        return {
            "layout": np.array(
                [STATE_LAYOUT_VERSION, K.N_LEVEL_FIELDS, K.N_SERIES_FIELDS, INPUT_INTERVAL_NS[self.input_kind],
                 int(self.input_kind != "trades")],  # bars or trades (once: whether ties were late)
                np.int64,
            ),
            "timeframes": np.array([t.seconds for t in self.timeframes], np.int64),
            "session": np.array(str(self.session)),
        }

    def _upgrade(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A state saved by an older layout version, in today's layout (stores keep engine
        states across upgrades). Rules are only ever appended, so the series row is the clock
        and floor, then the counters, then N_FIRST timestamps a rule: pad both with zeros."""
        old = np.asarray(state.get("layout", ()))
        if old.shape != (5,) or int(old[0]) not in _RULES_IN_LAYOUT or int(old[0]) == STATE_LAYOUT_VERSION:
            return state
        n_old = _RULES_IN_LAYOUT[int(old[0])]
        mine = self._layout()["layout"]
        expect = [int(old[0]), K.N_LEVEL_FIELDS, K.S_COUNTS + n_old * (1 + K.N_FIRST), *mine[3:].tolist()]
        if old.tolist() != expect:
            return state  # another configuration: _check_layout says so
        ser = np.asarray(state["series"], np.int64)
        new = np.zeros(ser.shape[:-1] + (K.N_SERIES_FIELDS,), np.int64)
        new[..., : K.S_COUNTS + n_old] = ser[..., : K.S_COUNTS + n_old]
        first = K.S_COUNTS + n_old
        new[..., K.S_FIRST : K.S_FIRST + n_old * K.N_FIRST] = ser[..., first : first + n_old * K.N_FIRST]
        return {**state, "series": new, "layout": mine}

    def _check_layout(self, state: dict[str, np.ndarray]) -> None:
        for key, mine in self._layout().items():
            theirs = state.get(key)
            if theirs is None or np.asarray(theirs).shape != mine.shape or not np.array_equal(theirs, mine):
                raise ValueError(
                    f"saved engine state does not fit this aggregator: {key} is "
                    f"{None if theirs is None else np.asarray(theirs).tolist()}, expected {mine.tolist()}"
                )

    def get_series_state(self, series: int) -> dict[str, np.ndarray]:
        """One series' state as plain arrays (running bars, clock, counters); see set_series_state.

        A series not seen yet has the state of a fresh one (nothing running, no counts)."""
        if series < 0:
            raise ValueError(f"series index {series} is negative")
        if series < self.n_series:
            levels, ser = self._lv[series].copy(), self._ser[series].copy()
        else:
            levels = np.zeros(self._lv.shape[1:], np.int64)
            ser = np.zeros(K.N_SERIES_FIELDS, np.int64)
            ser[K.S_LAST], ser[K.S_FLOOR] = -1, self._floor
        return {"levels": levels, "series": ser, **self._layout()}

    def set_series_state(self, series: int, state: dict[str, np.ndarray]) -> None:
        """Restore one series exactly as :meth:`get_series_state` saved it (growing if needed);
        a state of an older layout version is upgraded (new rules' counters start at 0)."""
        state = self._upgrade(state)
        self._check_layout(state)
        levels = np.asarray(state["levels"], np.int64)
        ser = np.asarray(state["series"], np.int64)
        if levels.shape != self._lv.shape[1:] or ser.shape != self._ser.shape[1:]:
            raise ValueError(f"saved engine state has shapes {levels.shape}, {ser.shape}")
        self._grow(series + 1)
        self._lv[series] = levels
        self._ser[series] = ser

    def get_state(self) -> dict[str, np.ndarray]:
        """The whole aggregator's state (every series) as plain arrays."""
        return {
            "levels": self._lv.copy(),
            "series": self._ser.copy(),
            "floor": np.array(self._floor, np.int64),
            **self._layout(),
        }

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`get_state` saved (replacing every series); older layout
        versions are upgraded as in :meth:`set_series_state`."""
        state = self._upgrade(state)
        self._check_layout(state)
        levels = np.array(state["levels"], np.int64)
        ser = np.array(state["series"], np.int64)
        if levels.shape[1:] != self._lv.shape[1:] or ser.shape[1:] != self._ser.shape[1:] or len(levels) != len(ser):
            raise ValueError(f"saved engine state has shapes {levels.shape}, {ser.shape}")
        self._floor = int(state["floor"])
        self._arena(len(levels), levels, ser)

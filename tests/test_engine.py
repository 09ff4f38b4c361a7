"""The engine's guarantees: batch size never matters, state restores exactly, bad records are
counted per rule and kept out of the bars their policy says, and bad arguments are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streambars.engine import Aggregator
from streambars.errors import RuleViolationError
from streambars.records import TAGGED_BAR_DTYPE, UNDEF_PRICE, RecordBatch, SeriesRegistry
from streambars.rules import RECORD_RULE_NAMES, RULES
from streambars.timeframes import STANDARD_TIMEFRAMES, Session, TimeframeError

from .reference import by_key, diff_bars, reference_bars, sort_bars

S = 1_000_000_000
TICK = 250_000_000
CHICAGO = Session.parse("17:00 America/Chicago")
START = 1_709_856_000 * S  # 2024-03-08 00:00 UTC: the streams cross the 2024-03-10 DST change
TIMEFRAME_SETS = [
    STANDARD_TIMEFRAMES,
    ("1s", "7s", "1min", "1d"),
    ("5s", "13s", "90s", "4h", "1d"),
    ("1min", "2h"),
]
PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_stream(seed: int, n: int = 600, n_series: int = 3, kind: str = "ohlcv-1s", publishers: int = 1) -> RecordBatch:
    """Clean interleaved records: gaps from one second to a weekend, prices on a tick grid.

    ``publishers`` > 1: each bar comes 1..publishers times with the same ts_event and its own
    prices and volume, as an instrument's OHLCV does from several venues (they merge)."""
    rng = np.random.default_rng(seed)
    gaps = np.array([1, 1, 1, 1, 2, 3, 5, 9, 31, 61, 299, 3_599, 14_401, 86_400, 200_000])
    series, ts = [], []
    for s in range(n_series):
        m = int(rng.integers(n // (2 * n_series), 2 * n // n_series))
        secs = np.cumsum(rng.choice(gaps, m, p=np.r_[[0.5], np.full(14, 0.5 / 14)]))
        if kind == "trades":  # nanosecond times, a few exactly equal to the one before
            t = START + secs * S + rng.integers(0, S, m)
            t = np.sort(t)
            dup = rng.random(m) < 0.1
            dup[0] = False
            t[dup] = t[np.flatnonzero(dup) - 1]
        else:
            t = START + secs * S
            if publishers > 1:
                t = np.repeat(t, rng.integers(1, publishers + 1, m))[:m]
        series.append(np.full(m, s, np.int32))
        ts.append(t)
    series, ts = np.concatenate(series), np.concatenate(ts)
    order = np.argsort(ts, kind="stable")
    series, ts = series[order], ts[order]
    n = ts.size
    close = (20_000 + np.cumsum(rng.integers(-3, 4, n))) * TICK
    if kind == "trades":
        price = close
        return RecordBatch(kind, series, ts, price, price, price, price, rng.integers(1, 50, n).astype(np.uint64))
    open_ = close + rng.integers(-2, 3, n) * TICK
    high = np.maximum(open_, close) + rng.integers(0, 3, n) * TICK
    low = np.minimum(open_, close) - rng.integers(0, 3, n) * TICK
    return RecordBatch(kind, series, ts, open_, high, low, close, rng.integers(1, 500, n).astype(np.uint64))


def concat(batches: list[RecordBatch]) -> RecordBatch:
    cols = ("series", "ts_event", "open", "high", "low", "close", "volume")
    return RecordBatch(batches[0].kind, *(np.concatenate([getattr(b, c) for b in batches]) for c in cols))


def take(batch: RecordBatch, idx: np.ndarray) -> RecordBatch:
    cols = ("series", "ts_event", "open", "high", "low", "close", "volume")
    return RecordBatch(batch.kind, *(np.ascontiguousarray(getattr(batch, c)[idx]) for c in cols))


def copy_batch(batch: RecordBatch) -> RecordBatch:
    return take(batch, np.arange(len(batch)))


def make(tfs=STANDARD_TIMEFRAMES, kind="ohlcv-1s", **kw) -> Aggregator:
    return Aggregator(tfs, input_kind=kind, session=CHICAGO, **kw)


def feed(agg: Aggregator, batch: RecordBatch, sizes=None) -> np.ndarray:
    """Process in chunks of the given sizes (cycled), then finish; all bars grouped by (series,
    timeframe), each group in emission order (the order the engine promises; across
    timeframes it depends on how the input was split)."""
    parts, i, j = [], 0, 0
    sizes = sizes or [len(batch) or 1]
    while i < len(batch):
        n = sizes[j % len(sizes)]
        parts.append(agg.process(batch.slice(i, i + n)).bars)
        i, j = i + n, j + 1
    parts.append(agg.finish().bars)
    return by_key(np.concatenate(parts))


def reference(agg: Aggregator, batch: RecordBatch) -> np.ndarray:
    b = batch
    return reference_bars(b.series, b.ts_event, b.open, b.high, b.low, b.close, b.volume, agg.timeframes, agg.session)


# -- properties ------------------------------------------------------------------------------


@PROPERTY
@given(
    seed=st.integers(0, 2**32 - 1),
    tfs=st.sampled_from(TIMEFRAME_SETS),
    kind=st.sampled_from(["ohlcv-1s", "trades"]),
    split=st.one_of(st.sampled_from([[1], [2], [64]]), st.lists(st.integers(1, 97), min_size=1, max_size=20)),
    publishers=st.sampled_from([1, 4]),
)
def test_batch_size_does_not_change_the_bars(seed, tfs, kind, split, publishers):
    batch = random_stream(seed, kind=kind, publishers=publishers)
    whole = feed(make(tfs, kind), batch)
    assert np.array_equal(feed(make(tfs, kind), batch, split), whole)


def test_a_tiny_output_buffer_streams_any_batch():
    batch = random_stream(1, n=2000)
    want = feed(make(), batch)
    assert np.array_equal(feed(make(out_capacity=1), batch), want)  # capacity is raised to 2 x levels


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), cut=st.floats(0, 1), tfs=st.sampled_from(TIMEFRAME_SETS),
       kind=st.sampled_from(["ohlcv-1s", "trades"]), whole=st.booleans(), publishers=st.sampled_from([1, 4]))
def test_saving_and_restoring_state_resumes_exactly(seed, cut, tfs, kind, whole, publishers):
    batch = random_stream(seed, kind=kind, publishers=publishers)  # the cut may fall between ties
    want = feed(make(tfs, kind), batch)
    i = int(cut * len(batch))
    first = make(tfs, kind)
    got = [first.process(batch.slice(0, i)).bars]
    if whole:
        buf = io.BytesIO()
        np.savez(buf, **first.get_state())  # plain arrays survive a file round trip
        buf.seek(0)
        second = make(tfs, kind)
        second.set_state(dict(np.load(buf)))
    else:
        second = make(tfs, kind)
        for s in range(first.n_series):
            second.set_series_state(s, first.get_series_state(s))
    got.append(feed(second, batch.slice(i, len(batch))))
    assert np.array_equal(by_key(np.concatenate(got)), want)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), tfs=st.sampled_from(TIMEFRAME_SETS),
       kind=st.sampled_from(["ohlcv-1s", "trades"]), data=st.data())
def test_flushing_up_to_the_next_record_changes_nothing(seed, tfs, kind, data):
    """flush(t) closes exactly what a record at t would: the bars are the same, none is late."""
    batch = random_stream(seed, kind=kind)
    want = feed(make(tfs, kind), batch)
    points = sorted(data.draw(st.lists(st.integers(1, len(batch) - 1), max_size=30, unique=True)))
    agg, parts, prev = make(tfs, kind), [], 0
    for p in points:
        parts.append(agg.process(batch.slice(prev, p)).bars)
        parts.append(agg.flush(int(batch.ts_event[p])).bars)
        prev = p
    parts.append(feed(agg, batch.slice(prev, len(batch))))
    got = np.concatenate(parts)
    assert not agg.counts.any()
    assert diff_bars(got, want) == ""


# -- injected violations ------------------------------------------------------------------------

INJECTIONS = ["undef", "negative", "zero", "ohlc", "zero_volume", "absurd_volume", "late", "duplicate", "misaligned"]
MAX_VOLUME = 10_000


def inject(batch: RecordBatch, rng: np.random.Generator, n: int) -> RecordBatch:
    b = copy_batch(batch)
    kinds = INJECTIONS if b.kind != "trades" else [k for k in INJECTIONS if k not in ("ohlc", "misaligned")]
    if b.kind == "trades":  # one price array: keep o/h/l/c the same array after editing
        b.open = b.high = b.low = b.close = b.close.copy()
    for i in rng.choice(np.arange(1, len(b)), size=n, replace=False):
        kind = kinds[rng.integers(len(kinds))]
        earlier = np.flatnonzero(b.series[:i] == b.series[i])
        if kind == "undef":
            b.close[i] = UNDEF_PRICE
        elif kind == "negative":
            b.low[i] = -TICK
        elif kind == "zero":
            b.low[i] = 0
        elif kind == "ohlc":
            b.high[i] = b.low[i] - TICK
        elif kind == "zero_volume":
            b.volume[i] = 0
        elif kind == "absurd_volume":
            b.volume[i] = MAX_VOLUME + 1 + rng.integers(0, 10**12)
        elif kind == "late" and earlier.size:
            b.ts_event[i] = b.ts_event[earlier[-1]] - int(rng.integers(1, 5000)) * S
        elif kind == "duplicate" and earlier.size:
            b.ts_event[i] = b.ts_event[earlier[-1]]
        elif kind == "misaligned":
            b.ts_event[i] += S // 2
    return b


def expected_violations(b: RecordBatch, drop_bits: set[int]):
    """An independent account of what each record breaks, and which records enter the bars."""
    interval = {"ohlcv-1s": S, "ohlcv-1m": 60 * S, "trades": 0}[b.kind]
    last: dict[int, int] = {}
    counts: dict[tuple[int, str], list[int]] = {}
    accepted = np.zeros(len(b), bool)
    for i in range(len(b)):
        s, t = int(b.series[i]), int(b.ts_event[i])
        o, h, lo, c, v = (int(x[i]) for x in (b.open, b.high, b.low, b.close, b.volume))
        broken = []
        if UNDEF_PRICE in (o, h, lo, c):
            broken.append("price_undefined")
        else:
            if min(o, h, lo, c) <= 0:
                broken.append("price_non_positive")
            if h < max(o, c) or lo > min(o, c) or h < lo:
                broken.append("ohlc_relation")
        if v == 0:
            broken.append("volume_zero")
        elif v > MAX_VOLUME:
            broken.append("volume_absurd")
        if s in last and t < last[s]:  # an equal ts (a "duplicate") merges, for bars as for trades
            broken.append("ts_not_increasing")
        if interval and t % interval:
            broken.append("ts_misaligned")
        for rule in broken:
            counts.setdefault((s, rule), []).append(t)
        if not any(RULES[r].bit in drop_bits for r in broken):
            accepted[i] = True
            last[s] = t
    return counts, accepted


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["ohlcv-1s", "trades"]),
       policy=st.sampled_from(["flag", "drop"]), n_bad=st.integers(1, 60))
def test_injected_violations_are_counted_exactly_and_never_corrupt_bars(seed, kind, policy, n_bad):
    rng = np.random.default_rng(seed)
    batch = inject(random_stream(seed, kind=kind), rng, n_bad)
    agg = make(("1s", "5s", "7s", "1min", "1h", "1d"), kind, default_policy=policy, max_volume=MAX_VOLUME)
    got = feed(agg, batch, [int(rng.integers(1, 50))])
    drop_bits = {r.bit for r in RULES.values() if r.always_drop}
    if policy == "drop":
        drop_bits |= set(range(len(RECORD_RULE_NAMES)))
    want_counts, accepted = expected_violations(batch, drop_bits)
    for s in range(agg.n_series):
        for bit, rule in enumerate(RECORD_RULE_NAMES):
            firsts = want_counts.get((s, rule), [])
            assert agg.counts[s, bit] == len(firsts), (s, rule)
            assert agg.first_violations(s, rule) == firsts[:8], (s, rule)
    # the bars are exactly those of the records the policy let in, as if the others never came
    assert diff_bars(got, reference(agg, take(batch, np.flatnonzero(accepted)))) == ""


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["7x", "0s", "25h", "1.5min", "2d"])
def test_unknown_timeframe_is_refused_naming_it(bad):
    with pytest.raises(TimeframeError, match=repr(bad).replace(".", r"\.")):
        make(("1s", bad))


def test_timeframes_the_input_cannot_build_are_refused():
    with pytest.raises(ValueError, match="30s cannot be built from ohlcv-1m"):
        make(("30s", "1min"), "ohlcv-1m")
    with pytest.raises(ValueError, match="input_kind"):
        make(("1s",), "mbo")
    with pytest.raises(ValueError, match="trades batch given"):
        make().process(random_stream(1, kind="trades"))
    with pytest.raises(ValueError, match="unknown rule"):
        make(policies={"no_such_rule": "drop"})


def test_empty_batch_gives_no_bars_and_changes_nothing():
    agg = make()
    batch = random_stream(2)
    agg.process(batch.slice(0, 100))
    before = agg.get_state()
    out = agg.process(RecordBatch.empty("ohlcv-1s"))
    assert len(out) == 0 and out.bars.dtype == TAGGED_BAR_DTYPE
    after = agg.get_state()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert len(make().finish()) == 0


def one(ts_s: float, o=100, h=101, lo=99, c=100, v=5, series=0) -> RecordBatch:
    p = [x * TICK if x not in (UNDEF_PRICE,) else x for x in (o, h, lo, c)]
    return RecordBatch(
        "ohlcv-1s", np.array([series], np.int32), np.array([int(START + ts_s * S)], np.int64),
        *(np.array([x], np.int64) for x in p), np.array([v], np.uint64),
    )


def run(agg: Aggregator, batches: list[RecordBatch]) -> np.ndarray:
    return np.concatenate([agg.process(b).bars for b in batches] + [agg.finish().bars])


def test_undefined_price_is_counted_and_kept_out_even_when_flagged():
    clean = [one(0), one(1, c=102, h=102), one(2)]
    agg = make(("1s", "1min"))
    got = run(agg, [clean[0], one(1, c=UNDEF_PRICE), *clean[1:]])
    assert agg.counts[0, RULES["price_undefined"].bit] == 1
    assert agg.first_violations(0, "price_undefined") == [START + S]
    assert diff_bars(got, run(make(("1s", "1min")), clean)) == ""


@pytest.mark.parametrize("policy", ["flag", "drop"])
def test_negative_price_is_counted_and_flagged_or_dropped(policy):
    bad = one(1, lo=-1)
    agg = make(("1s", "1min"), policies={"price_non_positive": policy})
    got = run(agg, [one(0), bad, one(2)])
    assert agg.counts[0, RULES["price_non_positive"].bit] == 1
    minute = got[got["timeframe"] == 1]
    assert len(minute) == 1
    if policy == "flag":
        assert minute["low"][0] == -TICK and minute["count"][0] == 3
    else:
        assert minute["low"][0] == 99 * TICK and minute["count"][0] == 2


def test_record_older_than_the_current_bar_is_dropped_counted_and_not_merged():
    agg = make(("1s", "1min"))
    bars = run(agg, [one(0), one(61), one(30, h=500, c=500), one(62), one(62), one(60, h=600)])
    nib = RULES["ts_not_increasing"].bit
    assert agg.counts[0, nib] == 2  # the two late ones; the equal ts merges (another publisher)
    assert agg.first_violations(0, "ts_not_increasing") == [START + 30 * S, START + 60 * S]
    minute = bars[bars["timeframe"] == 1]
    assert minute["ts_event"].tolist() == [START, START + 60 * S]
    assert minute["count"].tolist() == [1, 3] and minute["high"].max() == 101 * TICK
    second = bars[bars["timeframe"] == 0]
    assert second["ts_event"].tolist() == [START, START + 61 * S, START + 62 * S]
    assert second["count"].tolist() == [1, 1, 2] and second["volume"].tolist() == [5, 5, 10]


def test_misaligned_zero_and_absurd_volume_are_counted():
    agg = make(("1s",), max_volume=1000)
    run(agg, [one(0.5), one(1, v=0), one(2, v=1001), one(3, h=90)])
    c = dict(zip(RECORD_RULE_NAMES, agg.counts[0].tolist(), strict=True))
    assert c == {
        "price_undefined": 0, "price_non_positive": 0, "ohlc_relation": 1, "volume_zero": 1,
        "volume_absurd": 1, "ts_not_increasing": 0, "ts_misaligned": 1, "volume_overflow": 0,
    }


def test_fail_policy_raises_with_rule_series_and_ts_and_keeps_state_consistent():
    batch = random_stream(3, n=400)
    i = 250
    bad = copy_batch(batch)
    bad.low[i] = -TICK
    names = SeriesRegistry(["ESH4", "NQH4", "CLJ4"])
    agg = make(("1s", "1min", "1d"), policies={"price_non_positive": "fail"}, series_names=names)
    with pytest.raises(RuleViolationError) as info:
        agg.process(bad)
    err = info.value
    assert err.rule == "price_non_positive" and err.index == i
    assert err.series == names.names[bad.series[i]] and err.ts_event == int(bad.ts_event[i])
    assert str(err).startswith("validation rule price_non_positive (policy fail) broken by")
    before = make(("1s", "1min", "1d"))
    assert np.array_equal(by_key(err.bars.bars), by_key(before.process(batch.slice(0, i)).bars))
    # going on after the bad record is the same as never having seen it
    rest = by_key(np.concatenate([err.bars.bars, feed(agg, bad.slice(i + 1, len(bad)))]))
    skip = take(batch, np.r_[0:i, i + 1:len(batch)])
    assert np.array_equal(rest, feed(make(("1s", "1min", "1d")), skip))


def test_flush_closes_finished_bars_and_makes_earlier_records_late():
    agg = make(("1s", "1min", "1h"))
    agg.process(concat([one(0), one(59), one(61)]))
    out = agg.flush(START + 120 * S)
    assert sorted(zip(out.bars["timeframe"].tolist(), out.bars["ts_event"].tolist(), strict=True)) == [
        (0, START + 61 * S), (1, START + 60 * S)
    ]  # the hour is still running
    assert len(agg.process(one(119)).bars) == 0  # before the flush time: late, dropped
    assert agg.counts[0, RULES["ts_not_increasing"].bit] == 1
    agg.process(one(120))  # at the flush time: fine
    rest = agg.finish().bars
    assert sorted(rest["timeframe"].tolist()) == [0, 1, 2]
    hour = rest[rest["timeframe"] == 2]
    assert hour["count"][0] == 4 and hour["ts_event"][0] == START
    # a series first seen after the flush is late before it too
    agg.process(one(100, series=1))
    assert agg.counts[1, RULES["ts_not_increasing"].bit] == 1


def test_series_grow_with_the_batch_and_counters_follow():
    agg = make(("1min",))
    agg.process(one(0, series=4))
    assert agg.n_series == 5 and agg.counts.shape == (5, len(RECORD_RULE_NAMES))
    with pytest.raises(ValueError, match="negative series"):
        agg.process(one(1, series=-1))


def test_state_from_another_configuration_is_refused():
    state = make(("1s", "1min")).get_series_state(0)
    with pytest.raises(ValueError, match="timeframes"):
        make(("1s", "5min")).set_series_state(0, state)
    with pytest.raises(ValueError, match="layout"):
        make(("1s", "1min"), "trades").set_series_state(0, state)


def test_wrong_dtypes_and_strided_views_are_converted():
    batch = random_stream(4)
    want = feed(make(), batch)
    odd = RecordBatch(
        "ohlcv-1s", batch.series.astype(np.int64), batch.ts_event.astype(np.uint64),
        *(np.repeat(x, 2)[::2] for x in (batch.open, batch.high, batch.low, batch.close)),
        batch.volume.astype(np.int64),
    )
    assert np.array_equal(feed(make(), odd), want)



@pytest.mark.parametrize("column", ["series", "ts_event", "open", "high", "low", "close", "volume"])
@pytest.mark.parametrize("how", ["same itemsize, other kind", "byte-swapped", "strided"])
def test_one_odd_column_is_converted_not_misread(column, how):
    """process() calls the compiled kernel past numba's dispatcher when every column has its
    exact dtype and unit stride; the entry point checks only item sizes, so one column that
    differs in kind, byte order or stride alone must still take the converting path."""
    batch = random_stream(4)
    want = feed(make(), batch)
    col = getattr(batch, column)
    if how == "same itemsize, other kind":
        odd = col.astype({4: np.float32, 8: np.float64}[col.itemsize])
    elif how == "byte-swapped":
        odd = col.astype(col.dtype.newbyteorder(">"))
    else:
        odd = np.repeat(col, 3)[::3]
    assert np.array_equal(odd.astype(col.dtype), col)
    assert np.array_equal(feed(make(), RecordBatch(**{**vars(batch), column: odd})), want)

def test_bars_are_emitted_as_soon_as_a_record_proves_them_closed():
    agg = make(("1s", "5s", "1min"))
    assert len(agg.process(one(0))) == 0
    out = agg.process(one(60)).bars
    assert sort_bars(out)["timeframe"].tolist() == [0, 1, 2]


def test_state_of_a_series_not_seen_yet_is_fresh_and_restores_as_such():
    agg = make(("1s", "1min"))
    agg.process(one(0))
    fresh = agg.get_series_state(3)
    assert agg.n_series == 1  # asking does not add series
    other = make(("1s", "1min"))
    other.set_series_state(3, fresh)
    assert other.n_series == 4 and not other.counts.any()
    assert np.array_equal(run(other, [one(5, series=3)]), run(make(("1s", "1min")), [one(5, series=3)]))

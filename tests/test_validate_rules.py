"""The validate rules as pure functions over arrays, and their slicing invariance."""

from __future__ import annotations

import numpy as np
import pytest

from streambars.records import BAR_DTYPE, UNDEF_PRICE
from streambars.rules import RECORD_RULE_NAMES
from streambars.timeframes import parse_timeframe
from streambars.validate.checks import (
    count_invalid_rows,
    duplicate_rows,
    gaps_in_session,
    price_jump_rows,
    record_rule_hits,
    volume_outlier_rows,
)
from streambars.validate.crosstf import Aggregation, CrossTimeframe, Level
from streambars.validate.reference import compare_reference
from streambars.validate.report import SeriesResult
from streambars.validate.series import Params, SeriesCheck

from .test_validate_fixtures import (
    CME_SESSION,
    NS,
    aggregate,
    all_timeframes,
    bars_1s,
    ns,
    seconds_in,
)

P = 1_000_000_000  # one point in fixed-point


def mk(rows) -> np.ndarray:
    """rows of (ts_s, o, h, l, c, v, n) with prices in points."""
    out = np.empty(len(rows), BAR_DTYPE)
    for i, (t, o, h, lo, c, v, n) in enumerate(rows):
        out[i] = (t * NS, o * P, h * P, lo * P, c * P, v, n)
    return out


def test_record_rules_each_bit():
    bars = mk([
        (60, 10, 11, 9, 10, 5, 1),    # clean
        (120, 10, 9, 9, 10, 5, 1),    # high < open -> ohlc_relation
        (180, 10, 11, 0, 10, 5, 1),   # low 0 -> price_non_positive
        (240, 10, 11, 9, 10, 0, 1),   # volume_zero
        (300, 10, 11, 9, 10, 999, 1),  # volume_absurd (max 100 per input)
        (290, 10, 11, 9, 10, 5, 1),   # earlier than previous -> ts_not_increasing (+ misaligned)
        (420, 10, 11, 9, 10, 5, 1),
        (480, 10, 11, 9, 10, 2**64 - 1, 1),  # volume_overflow: the engine saturated it (+ absurd)
    ])  # fmt: skip
    bars["close"][6] = UNDEF_PRICE  # price_undefined
    hits, last = record_rule_hits(bars, 60 * NS, None, max_volume=100)
    got = {k: (c, bars["ts_event"][rows].tolist()) for k, (c, rows) in hits.items()}
    s = NS
    assert got == {
        "ohlc_relation": (1, [120 * s]),
        "price_non_positive": (1, [180 * s]),
        "volume_zero": (1, [240 * s]),
        "volume_absurd": (2, [300 * s, 480 * s]),
        "volume_overflow": (1, [480 * s]),
        "ts_not_increasing": (1, [290 * s]),
        "ts_misaligned": (1, [290 * s]),
        "price_undefined": (1, [420 * s]),
    }
    assert set(got) == set(RECORD_RULE_NAMES)
    assert last == 480 * s


def test_volume_absurd_scales_with_count_and_daily_alignment():
    bars = mk([(0, 10, 11, 9, 10, 250, 3), (60, 10, 11, 9, 10, 301, 3)])
    hits, _ = record_rule_hits(bars, 60 * NS, None, max_volume=100)
    assert hits["volume_absurd"][0] == 1 and hits["volume_absurd"][1].tolist() == [1]
    b = CME_SESSION.boundaries()
    day = mk([(0, 10, 11, 9, 10, 5, 1)] * 2)
    day["ts_event"] = [b[20000], b[20001] + 3600 * NS]
    hits, _ = record_rule_hits(day, 0, b)
    assert list(hits) == ["ts_misaligned"] and hits["ts_misaligned"][1].tolist() == [1]


def test_duplicates_sorted_unsorted_and_carried():
    assert duplicate_rows(np.array([1, 2, 2, 3, 3, 3])).tolist() == [2, 4, 5]
    assert duplicate_rows(np.array([5, 1, 5, 2])).tolist() == [2]
    assert duplicate_rows(np.array([7, 8]), prev_ts=7).tolist() == [0]
    assert count_invalid_rows(np.array([1, 0, 5, 61], np.uint32), max_inputs=60).tolist() == [1, 3]


def test_price_jump_uses_last_valid_close_and_carries():
    o = np.array([100, 100, 100, 120, 100], np.int64) * P
    c = np.array([100, 100, UNDEF_PRICE // P, 100, 100], np.int64) * P
    c[2] = UNDEF_PRICE
    rows, carry = price_jump_rows(o, c, 0.1)
    assert rows.tolist() == [3] and carry == 100 * P
    rows, _ = price_jump_rows(np.array([89 * P]), np.array([100 * P]), 0.1, prev_close=100 * P)
    assert rows.tolist() == [0]
    rows, _ = price_jump_rows(np.array([91 * P]), np.array([100 * P]), 0.1, prev_close=100 * P)
    assert rows.size == 0


def test_volume_outlier_robust_and_degenerate():
    rng = np.random.default_rng(0)
    v = rng.integers(10, 100, 1000).astype(np.uint64)
    v[[17, 500]] = [10**7, 10**9]
    rows, limit = volume_outlier_rows(v, 8.0)
    assert rows.tolist() == [17, 500] and 100 < limit < 10**7
    same = np.full(100, 5, np.uint64)
    assert volume_outlier_rows(same, 8.0)[0].size == 0
    same[3] = 10**6  # MAD 0: the mean absolute deviation stands in
    assert volume_outlier_rows(same, 8.0)[0].tolist() == [3]
    assert volume_outlier_rows(v[:10], 8.0)[0].size == 0  # too few bars to judge


def test_gaps_only_count_trading_time():
    opens = np.array([0, 1000]) * NS
    closes = np.array([600, 2000]) * NS
    ts = np.array([0, 100, 590, 1100, 1500, 1950]) * NS  # 1s bars
    starts, lengths, end = gaps_in_session(ts, ts + NS, opens, closes, 300 * NS)
    # 101..590 (489s) is in session; 591..1100 spans the close: 9s + 100s in session, not a gap;
    # 1101..1500 (399s); 1501..1950 (449s)
    assert (starts // NS).tolist() == [101, 1101, 1501]
    assert (lengths // NS).tolist() == [489, 399, 449]
    # one hole over a close and a reopen: each trading stretch longer than the limit is a gap
    s1, l1, _ = gaps_in_session(np.array([0, 1999]) * NS, np.array([1, 2000]) * NS, opens, closes, 300 * NS)
    assert (s1 // NS).tolist() == [1, 1000] and (l1 // NS).tolist() == [599, 999]
    assert end == 1951 * NS
    s2, _, _ = gaps_in_session(ts[3:], ts[3:] + NS, opens, closes, 300 * NS, prev_end=101 * NS)
    assert (s2 // NS).tolist() == [101, 1101, 1501]


def test_reference_compare_reports_every_kind():
    ours = mk([(0, 10, 11, 9, 10, 5, 1), (60, 10, 11, 9, 10, 5, 1), (120, 10, 11, 9, 10, 5, 1)])
    ref = ours.copy()[[0, 1]]
    ref["high"][1] += 1
    extra = ours.copy()[:1]
    extra["ts_event"] = 180 * NS
    ref = np.concatenate([ref, extra])
    ts, details = compare_reference(ours, ref)
    assert (ts // NS).tolist() == [60, 120, 180]
    assert "high" in details[0] and details[1] == "only in our store" and "Databento" in details[2]
    ts, _ = compare_reference(ours, ours.copy())
    assert ts.size == 0


def _week():
    opens = np.array([ns("2024-03-04T00:00:00"), ns("2024-03-05T00:00:00")])
    closes = opens + 20 * 3600 * NS
    return bars_1s(seconds_in(opens, closes, fill=0.5, seed=5), seed=5)


@pytest.mark.parametrize("seed", [0, 1])
def test_series_check_same_findings_however_sliced(seed):
    fine = _week()
    fine["high"][100] = fine["low"][100] - P
    fine["volume"][2000] = 10**9
    fine["ts_event"][3000] = fine["ts_event"][2999]
    fine["open"][5000] = fine["close"][4999] * 2
    fine["high"][5000] = fine["open"][5000]
    tf = parse_timeframe("1s")
    sessions = (np.array([ns("2024-03-04T00:00:00")]), np.array([ns("2024-03-06T00:00:00")]))

    def run(cuts):
        r = SeriesResult("D", "S", "1s")
        c = SeriesCheck(r, tf, Params(max_volume=10**6), None, sessions)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            c.feed(fine[a:b])
        c.finish()
        return {k: (t.count, t.first) for k, t in r.tallies.items()}

    whole = run([0, fine.size])
    rng = np.random.default_rng(seed)
    cuts = [0, *sorted(rng.choice(np.arange(1, fine.size), 7, replace=False).tolist()), fine.size]
    assert run(cuts) == whole
    assert whole["ohlc_relation"][0] == 1 and whole["ts_duplicate"][0] == 1
    assert whole["gap_in_session"][0] == 1  # the night between the two days (4h, in "session")


def test_cross_timeframe_cascade_same_however_sliced():
    fine = _week()
    bars = all_timeframes(fine, ["1s", "1min", "5min", "1h", "4h", "1d"])
    bars["5min"]["close"][7] += P
    bars["1h"] = np.delete(bars["1h"], 3)
    b = CME_SESSION.boundaries()

    def run(edges):
        levels, tfs = [], []
        for name in ["1min", "5min", "1h", "4h", "1d"]:
            tf = parse_timeframe(name)
            parent = None
            for j in range(len(tfs) - 1, -1, -1):
                p = tfs[j]
                if (tf.is_daily and (b % p.nanos == 0).all()) or (not tf.is_daily and tf.seconds % p.seconds == 0):
                    parent = j
                    break
            agg = Aggregation(tf.nanos, b if tf.is_daily else None, parent is None)
            levels.append(Level(name, agg, parent, np.iinfo(np.int64).min))
            tfs.append(tf)
        x = CrossTimeframe(levels)
        for a, z in zip(edges[:-1], edges[1:], strict=True):
            coarse = {}
            for name in ["1min", "5min", "1h", "4h", "1d"]:
                t = bars[name]["ts_event"]
                coarse[name] = bars[name][(t >= a) & (t < z)]
            t = fine["ts_event"]
            x.feed(fine[(t >= a) & (t < z)], coarse, z)
        x.finish()
        return {lv.name: (lv.tally.count, lv.tally.first) for lv in levels}

    lo = min(int(b["ts_event"][0]) for b in bars.values())  # the 1d bar starts before the 1s
    hi = int(fine["ts_event"][-1]) + 1
    whole = run([lo, hi])
    assert whole["1min"] == (0, []) and whole["4h"] == (0, []) and whole["1d"] == (0, [])
    assert whole["5min"] == (1, [int(bars["5min"]["ts_event"][7])])
    assert whole["1h"][0] == 1
    rng = np.random.default_rng(3)
    edges = [lo, *sorted(rng.integers(lo, hi, 9).tolist()), hi]
    assert run(edges) == whole
    assert aggregate(fine, parse_timeframe("1h")).size == bars["1h"].size + 1

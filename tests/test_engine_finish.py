"""finish() closes everything, and nothing fed afterwards can produce a bar a second time.

The store writer skips a row whose timestamp it already holds, so a (series, timeframe,
ts_event) emitted twice loses the second bar's data: every record inside a bar finish()
closed, at any timeframe, must be late.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from streambars.records import RecordBatch
from streambars.rules import RULES

from .test_engine import PROPERTY, START, TICK, TIMEFRAME_SETS, make, random_stream

S = 1_000_000_000


def keys(bars: np.ndarray) -> list[tuple[int, int, int]]:
    return list(zip(bars["series"].tolist(), bars["timeframe"].tolist(), bars["ts_event"].tolist(), strict=True))


def assert_no_bar_twice(bars: np.ndarray) -> None:
    k = keys(bars)
    dup = {x for x in k if k.count(x) > 1} if len(set(k)) != len(k) else set()
    assert not dup, f"bars emitted twice (series, timeframe, ts_event): {sorted(dup)[:5]}"


def trades(seconds: list[int]) -> RecordBatch:
    n = len(seconds)
    ts = np.array([START + 14 * 3600 * S + s * S for s in seconds], np.int64)
    price = np.full(n, 100 * TICK, np.int64)
    return RecordBatch("trades", np.zeros(n, np.int32), ts, price, price, price, price, np.full(n, 3, np.uint64))


def test_records_inside_an_hour_that_only_started_in_the_closing_cascade_are_late():
    # 14:00:00..14:00:50: the hour bar is not running yet when finish() starts (the minute
    # bar is folded into it only as finish closes the minute), yet finish() closes it
    agg = make(("1s", "1min", "1h"), "trades")
    first = np.concatenate([agg.process(trades([0, 10, 20, 30, 40, 50])).bars, agg.finish().bars])
    hour = first[first["timeframe"] == 2]
    assert hour["ts_event"].tolist() == [START + 14 * 3600 * S] and hour["count"].tolist() == [6]
    later = np.concatenate([agg.process(trades([1800, 1810, 1820, 1830, 1840, 1850])).bars, agg.finish().bars])
    assert len(later) == 0, f"reopened: {keys(later)}"
    assert agg.counts[0, RULES["ts_not_increasing"].bit] == 6
    # a record at the end of the closed hour starts new bars
    after = np.concatenate([agg.process(trades([3600])).bars, agg.finish().bars])
    assert sorted(after["timeframe"].tolist()) == [0, 1, 2]


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), tfs=st.sampled_from(TIMEFRAME_SETS),
       kind=st.sampled_from(["ohlcv-1s", "trades"]), cuts=st.lists(st.floats(0, 1), min_size=1, max_size=4))
def test_records_after_finish_never_emit_a_bar_again(seed, tfs, kind, cuts):
    batch = random_stream(seed, kind=kind)
    agg = make(tfs, kind)
    points = sorted({int(c * len(batch)) for c in cuts} | {len(batch)})
    parts, prev = [], 0
    for p in points:
        parts.append(agg.process(batch.slice(prev, p)).bars)
        parts.append(agg.finish().bars)
        prev = p
    assert_no_bar_twice(np.concatenate(parts))

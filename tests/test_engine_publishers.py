"""One instrument, several publishers: bars with the same ts_event merge into one bar.

Databento's OHLCV for an instrument traded on several venues (OPRA.PILLAR) has one record per
publisher and interval, all with the interval's ts_event. They are one series' inputs: volume
and count summed, high max, low min, open of the first and close of the last in input order.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streambars.records import RecordBatch, SeriesRegistry
from streambars.rules import RULES
from streambars.sources import dbnfile
from streambars.timeframes import STANDARD_TIMEFRAMES

from .conftest import SHARED_TESTDATA
from .reference import diff_bars, sort_bars
from .test_engine import PROPERTY, START, TICK, TIMEFRAME_SETS, feed, make, random_stream, reference

S = 1_000_000_000
OPRA = SHARED_TESTDATA / "OPRA.PILLAR"


def bars_at(ts_s: list[float], o, h, lo, c, v, kind: str = "ohlcv-1s") -> RecordBatch:
    n = len(ts_s)
    return RecordBatch(
        kind, np.zeros(n, np.int32), np.array([START + int(t * S) for t in ts_s], np.int64),
        *(np.array(x, np.int64) * TICK for x in (o, h, lo, c)), np.array(v, np.uint64),
    )


def test_equal_ts_records_merge_first_open_last_close_max_high_min_low_summed_volume():
    agg = make(("1s", "1min"))
    batch = bars_at([0, 1, 1, 1, 2], o=[10, 20, 15, 18, 30], h=[11, 22, 25, 19, 31], lo=[9, 19, 14, 12, 29],
                    c=[10, 21, 16, 13, 30], v=[1, 7, 3, 5, 2])
    got = sort_bars(feed(agg, batch))
    sec = got[got["timeframe"] == 0]
    assert sec["ts_event"].tolist() == [START, START + S, START + 2 * S]
    b = sec[1]
    assert (b["open"], b["high"], b["low"], b["close"]) == (20 * TICK, 25 * TICK, 12 * TICK, 13 * TICK)
    assert (b["volume"], b["count"]) == (15, 3)
    minute = got[got["timeframe"] == 1][0]
    assert (minute["volume"], minute["count"], minute["open"], minute["close"]) == (18, 5, 10 * TICK, 30 * TICK)
    assert not agg.counts.any()


def test_an_earlier_ts_after_ties_is_still_late():
    agg = make(("1s",))
    feed(agg, bars_at([1, 1, 0, 1], o=[10] * 4, h=[10] * 4, lo=[10] * 4, c=[10] * 4, v=[1] * 4))
    assert agg.counts[0, RULES["ts_not_increasing"].bit] == 1
    assert agg.first_violations(0, "ts_not_increasing") == [START]


@pytest.mark.parametrize("split", [[1], [2], [7, 1, 3]])
def test_a_tie_split_across_batches_still_merges(split):
    """The fast path (1s input into a 1s root) must not start a second bar for a tie that
    arrives in a later call: it goes to the general path and folds into the running bar."""
    batch = bars_at([0, 0, 0, 5, 5, 60, 60, 60, 60], o=[10] * 9, h=[12] * 9, lo=[9] * 9, c=[11] * 9,
                    v=[1, 2, 3, 4, 5, 6, 7, 8, 9])
    want = feed(make(), batch)
    got = feed(make(), batch, split)
    assert np.array_equal(got, want)
    sec = sort_bars(got)[sort_bars(got)["timeframe"] == 0]
    assert sec["volume"].tolist() == [6, 9, 30] and sec["count"].tolist() == [3, 2, 4]


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), tfs=st.sampled_from([STANDARD_TIMEFRAMES, *TIMEFRAME_SETS[1:]]),
       chunk=st.integers(1, 200))
def test_publisher_ties_match_the_reference_at_every_timeframe(seed, tfs, chunk):
    batch = random_stream(seed, publishers=4)
    ts = batch.ts_event
    assert any((np.diff(ts[batch.series == s]) == 0).any() for s in range(3)), "the data has ties"
    agg = make(tfs)
    got = feed(agg, batch, [chunk])
    assert not agg.counts.any()
    assert diff_bars(got, reference(agg, batch), [t.name for t in agg.timeframes]) == ""


def _opra(schema: str) -> RecordBatch:
    path = OPRA / f"test_data.{schema}.dbn.zst"
    if not path.exists():
        pytest.skip(f"{path} not present")
    batches = list(dbnfile.iter_batches(path, SeriesRegistry(), expected_schema=schema))
    cols = ("series", "ts_event", "open", "high", "low", "close", "volume")
    return RecordBatch(schema, *(np.concatenate([getattr(b, c) for b in batches]) for c in cols))


def test_opra_ohlcv_1m_four_publishers_give_one_minute_with_all_their_volume():
    batch = _opra("ohlcv-1m")
    assert len(batch) == 4 and len(set(batch.ts_event.tolist())) == 1  # 4 publishers, one minute
    agg = make(("1min", "5min", "1h", "1d"), "ohlcv-1m")
    got = sort_bars(feed(agg, batch))
    assert not agg.counts.any()
    assert got["timeframe"].tolist() == [0, 1, 2, 3]
    assert got["volume"].tolist() == [int(batch.volume.sum())] * 4 == [189] * 4
    assert got["count"].tolist() == [4] * 4
    assert (got["open"] == batch.open[0]).all() and (got["close"] == batch.close[-1]).all()
    assert (got["high"] == batch.high.max()).all() and (got["low"] == batch.low.min()).all()
    assert diff_bars(got, reference(agg, batch)) == ""


def test_opra_ohlcv_1s_two_publishers_in_one_second_merge():
    batch = _opra("ohlcv-1s")
    agg = make(("1s", "5s", "1min", "1h", "1d"))
    got = sort_bars(feed(agg, batch))
    assert not agg.counts.any()
    sec = got[got["timeframe"] == 0]
    assert sec["ts_event"].tolist() == sorted(set(batch.ts_event.tolist()))
    assert sec["volume"].tolist() == [1, 7, 6] and sec["count"].tolist() == [1, 2, 1]
    assert got[got["timeframe"] == 2]["volume"].tolist() == [int(batch.volume.sum())] == [14]
    assert diff_bars(got, reference(agg, batch)) == ""

"""The engine's bars equal an independent pandas reference on realistic ES-like data.

Several days of 1-second bars and of trades, several instruments interleaved, around both
2024 US daylight-saving changes, with daily bars on a Chicago and a New York session.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streambars import synthetic as sy
from streambars.engine import Aggregator
from streambars.records import RecordBatch
from streambars.timeframes import STANDARD_TIMEFRAMES, Session, parse_timeframes

from .reference import diff_bars, reference_bars

CHICAGO = Session.parse("17:00 America/Chicago")
NEW_YORK = Session.parse("00:00 America/New_York")
# Weeks around the 2024 DST changes (Sunday 2024-03-10 and Sunday 2024-11-03).
SPRING = pd.Timestamp("2024-03-06 12:00", tz="UTC").value
FALL = pd.Timestamp("2024-10-30 12:00", tz="UTC").value


def ohlcv_batch(records: np.ndarray, kind: str = "ohlcv-1s") -> RecordBatch:
    return RecordBatch.from_ohlcv(kind, records["instrument_id"].astype(np.int32) - 1, records)


def trades_batch(records: np.ndarray) -> RecordBatch:
    return RecordBatch.from_trades(records["instrument_id"].astype(np.int32) - 1, records, clock="ts_event")


def run_engine(agg: Aggregator, batch: RecordBatch, chunk: int | None = None) -> np.ndarray:
    chunk = chunk or len(batch)
    parts = [agg.process(batch.slice(i, i + chunk)).bars for i in range(0, len(batch), chunk)]
    parts.append(agg.finish().bars)
    return np.concatenate(parts)


def reference_for(agg: Aggregator, batch: RecordBatch) -> np.ndarray:
    return reference_bars(
        batch.series, batch.ts_event, batch.open, batch.high, batch.low, batch.close, batch.volume,
        agg.timeframes, agg.session,
    )


def assert_matches_reference(agg: Aggregator, batch: RecordBatch, chunk: int | None = None) -> np.ndarray:
    got = run_engine(agg, batch, chunk)
    want = reference_for(agg, batch)
    names = [t.name for t in agg.timeframes]
    assert diff_bars(got, want, names) == ""
    assert not agg.counts.any(), "clean data broke no rule"
    # closing order: per (series, timeframe) strictly increasing ts
    for s in np.unique(got["series"]):
        for k in range(len(agg.timeframes)):
            t = got["ts_event"][(got["series"] == s) & (got["timeframe"] == k)]
            assert (np.diff(t) > 0).all()
    return got


@pytest.fixture(scope="module", params=[SPRING, FALL], ids=["spring-dst", "fall-dst"])
def es_bars(request) -> np.ndarray:
    start = request.param
    return sy.interleave(
        sy.es_like_1s_bars(start, 7, seed=11, instrument_id=1),
        sy.es_like_1s_bars(start + 3_000_000_000, 6.5, seed=12, instrument_id=2, start_price=4100.0),
    )


def test_1s_bars_all_standard_timeframes_chicago_session(es_bars):
    agg = Aggregator(STANDARD_TIMEFRAMES, input_kind="ohlcv-1s", session=CHICAGO)
    got = assert_matches_reference(agg, ohlcv_batch(es_bars), chunk=100_000)
    daily = got[got["timeframe"] == len(STANDARD_TIMEFRAMES) - 1]
    # 17:00 Chicago is 22:00 UTC in summer time and 23:00 UTC in winter: both occur in the week
    hours = set(pd.to_datetime(daily["ts_event"], utc=True).hour)
    assert hours == {22, 23}


def test_1s_bars_daily_on_new_york_midnight_session(es_bars):
    agg = Aggregator(["1min", "4h", "1d"], input_kind="ohlcv-1s", session=NEW_YORK)
    got = assert_matches_reference(agg, ohlcv_batch(es_bars))
    daily = got[got["timeframe"] == 2]
    assert set(pd.to_datetime(daily["ts_event"], utc=True).hour) == {4, 5}
    # 4h intervals are epoch-aligned and 00:00 New York is not a multiple of 4h in UTC:
    assert agg.sources == (-1, 0, 0)


def test_trades_all_standard_timeframes():
    trades = sy.interleave(
        sy.es_like_trades(SPRING + 2 * 86_400_000_000_000, 3, seed=5, instrument_id=1),
        sy.es_like_trades(SPRING + 2 * 86_400_000_000_000, 3, seed=6, instrument_id=2, start_price=300.0),
    )
    ts = trades["ts_event"].astype(np.int64)
    assert (np.diff(ts[trades["instrument_id"] == 1]) == 0).any(), "data has same-nanosecond trades"
    agg = Aggregator(STANDARD_TIMEFRAMES, input_kind="trades", session=CHICAGO)
    got = assert_matches_reference(agg, trades_batch(trades), chunk=250_000)
    # 1-second bars built from trades: one bar per second that had a trade
    one_s = got[(got["timeframe"] == 0) & (got["series"] == 0)]
    assert len(one_s) == len(np.unique(ts[trades["instrument_id"] == 1] // 1_000_000_000))


def test_1m_input_builds_minute_multiples():
    records = sy.es_like_1m_bars(FALL, 7, seed=3)
    agg = Aggregator(["1min", "5min", "15min", "1h", "4h", "1d"], input_kind="ohlcv-1m", session=CHICAGO)
    assert_matches_reference(agg, ohlcv_batch(records, "ohlcv-1m"))


def test_timeframes_that_do_not_nest_use_the_general_path(es_bars):
    tfs = parse_timeframes(["7s", "13s", "90s", "1min", "1d"])
    agg = Aggregator(tfs, input_kind="ohlcv-1s", session=CHICAGO)
    assert agg.sources == (-1, -1, -1, -1, 3)  # only 1d nests (into 1min); 7s/13s/90s/1min are roots
    assert_matches_reference(agg, ohlcv_batch(es_bars[: len(es_bars) // 3]), chunk=4096)

"""The seeded ES-like generator behind the engine tests, the benchmark and the demo."""

from __future__ import annotations

import numpy as np
import pandas as pd
from databento import DBNStore

from streambars import synthetic as sy

START = pd.Timestamp("2024-03-04", tz="UTC").value  # a Monday


def test_1s_bars_look_like_es():
    bars = sy.es_like_1s_bars(START, 8, seed=7)
    assert bars.dtype == sy.OHLCV_DTYPE and set(bars["rtype"]) == {32} and set(bars["length"]) == {14}
    ts = bars["ts_event"].astype(np.int64)
    assert (np.diff(ts) > 0).all() and (ts % 1_000_000_000 == 0).all()
    o, h, lo, c = (bars[f] for f in ("open", "high", "low", "close"))
    assert (h >= np.maximum(o, c)).all() and (lo <= np.minimum(o, c)).all() and (lo > 0).all()
    assert (o % sy.TICK == 0).all() and (bars["volume"] > 0).all()
    local = pd.DatetimeIndex(ts, tz="UTC").tz_convert("America/Chicago")
    assert not ((local.day_of_week == 5) | ((local.day_of_week == 4) & (local.hour >= 16))).any()  # weekend
    assert not (local.hour == 16).any()  # the daily halt
    opens, closes = sy.trading_sessions(START, START + 8 * 86_400 * 10**9)
    seconds = int(((closes - opens) // 10**9).sum())
    assert 0.25 < 1 - len(bars) / seconds < 0.35  # about 30% of session seconds are empty
    assert np.array_equal(bars, sy.es_like_1s_bars(START, 8, seed=7))  # seeded
    assert not np.array_equal(bars["close"][:1000], sy.es_like_1s_bars(START, 1, seed=8)["close"][:1000])


def test_1m_bars_aggregate_the_1s_bars_of_the_same_seed():
    sec, minute = sy.es_like_1s_bars(START, 2, seed=3), sy.es_like_1m_bars(START, 2, seed=3)
    assert set(minute["rtype"]) == {33}
    assert minute["volume"].sum() == sec["volume"].sum() and minute["high"].max() == sec["high"].max()


def test_trades_are_non_decreasing_with_same_nanosecond_fills():
    trades = sy.es_like_trades(START, 3, seed=9, instrument_id=42)
    assert trades.dtype == sy.TRADE_DTYPE and set(trades["rtype"]) == {0} and set(trades["action"]) == {b"T"}
    ts = trades["ts_event"].astype(np.int64)
    d = np.diff(ts)
    assert (d >= 0).all() and (d == 0).any()
    assert (trades["ts_recv"] > trades["ts_event"]).all() and (trades["size"] > 0).all()
    assert set(trades["instrument_id"]) == {42}


def test_dbn_file_round_trips_through_databento(tmp_path):
    recs = sy.interleave(sy.es_like_1s_bars(START, 1, 1, instrument_id=11), sy.es_like_1s_bars(START, 1, 2, instrument_id=12))
    path = sy.write_dbn(tmp_path / "x.dbn.zst", recs, symbols={"ESH4": 11, "NQH4": 12})
    store = DBNStore.from_file(path)
    assert store.metadata.dataset == "GLBX.MDP3" and str(store.schema) == "ohlcv-1s"
    assert store.metadata.symbols == ["ESH4", "NQH4"]
    assert np.array_equal(store.to_ndarray(), recs)
    assert set(store.to_df()["symbol"]) == {"ESH4", "NQH4"}
    trades = sy.es_like_trades(START, 0.5, 3)
    assert np.array_equal(DBNStore.from_file(sy.write_dbn(tmp_path / "t.dbn.zst", trades)).to_ndarray(), trades)

"""The reading API (issue 12): last N bars, time zones, polars frames, datetimes in series().

References are independent of the reader: rows straight from h5py, times from zoneinfo.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import h5py
import numpy as np
import pandas as pd
import pytest

from streambars import open_store
from streambars.errors import UsageError
from streambars.records import BAR_DTYPE
from streambars.store import BarFileWriter, file_path
from streambars.store.rowio import RowIO
from streambars.timeframes import UTC_MIDNIGHT, parse_timeframes

from .store_worker import DATASET, SEC, SYMBOL, T0, expected

WORKER = Path(__file__).with_name("store_worker.py")
NY = "America/New_York"
#: 2024-03-10 07:00Z: New York goes from 01:59:59 EST to 03:00 EDT.
DST = int(pd.Timestamp("2024-03-10T07:00:00Z").value)


def make_store(root: Path) -> np.ndarray:
    """1min bars every 3 minutes from 2024-03-09 12:00Z to 2024-03-11 (across New York's DST start)."""
    ts = np.arange(DST - 19 * 3600 * SEC, DST + 17 * 3600 * SEC, 180 * SEC)
    bars = np.zeros(ts.size, BAR_DTYPE)
    i = np.arange(ts.size)
    bars["ts_event"] = ts
    bars["open"] = 5_000_000_000_000 + i * 250_000_000
    bars["high"] = bars["open"] + 1_000_000_000
    bars["low"] = bars["open"] - 500_000_000
    bars["close"] = bars["open"] + 250_000_000
    bars["volume"] = i * 3 + 1
    bars["count"] = 1 + i % 7
    with BarFileWriter(root, DATASET, SYMBOL, stype="raw_symbol", timeframes=parse_timeframes(["1min", "1h"]),
                       session=UTC_MIDNIGHT, chunk_rows=64) as w:
        w.append({"1min": bars})
    return bars


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading")
    make_store(root)
    with h5py.File(file_path(root, DATASET, SYMBOL), "r") as f:  # the reference: rows as stored
        ref = f["bars/1min"][:]
    return root, ref


def reference_frame(rows: np.ndarray, tz: str = "UTC") -> pd.DataFrame:
    """What read_df should give, built by hand from the stored rows."""
    index = pd.DatetimeIndex(pd.to_datetime(rows["ts_event"], unit="ns", utc=True), name="ts_event").tz_convert(tz)
    cols = {f: rows[f].astype(np.float64) / 1e9 for f in ("open", "high", "low", "close")}
    return pd.DataFrame({**cols, "volume": rows["volume"].astype(np.uint64), "count": rows["count"].astype(np.uint32)},
                        index=index)


def test_negative_limit_is_the_last_n_of_the_range(store):
    root, ref = store
    t0, t1 = int(ref["ts_event"][100]), int(ref["ts_event"][400])
    with open_store(root) as r:
        np.testing.assert_array_equal(r.read(SYMBOL, "1min", limit=-3), ref[-3:])
        np.testing.assert_array_equal(r.read(SYMBOL, "1min", limit=3), ref[:3])
        np.testing.assert_array_equal(r.read(SYMBOL, "1min", t0, t1, limit=-5), ref[395:400])
        np.testing.assert_array_equal(r.read(SYMBOL, "1min", t0, t1, limit=-10**9), ref[100:400])
        assert r.read(SYMBOL, "1min", limit=0).size == 0 and r.read(SYMBOL, "1min", limit=-0).size == 0
        assert r.read(SYMBOL, "1h", limit=-3).size == 0  # a timeframe without rows
        with pytest.raises(UsageError, match="limit 2.5 is not a whole number"):
            r.read(SYMBOL, "1min", limit=2.5)


def test_tail_reads_only_the_last_rows(store, monkeypatch):
    root, ref = store
    spans: list[int] = []
    real = RowIO.read

    def spy(self, lo, hi):
        spans.append(hi - lo)
        return real(self, lo, hi)

    with open_store(root) as r:
        monkeypatch.setattr(RowIO, "read", spy)
        df = r.tail(SYMBOL, "1min", 7)
        assert max(spans) <= 7, spans  # no whole-column read
        pd.testing.assert_frame_equal(df, reference_frame(ref[-7:]))
        spans.clear()
        end = int(ref["ts_event"][500])
        np.testing.assert_array_equal(r.tail(SYMBOL, "1min", 4, end=end, raw=True), ref[496:500])
        assert max(spans) <= 64, spans  # one chunk searched for `end`, then 4 rows
        assert r.tail(SYMBOL, "1min", 0, raw=True).size == 0
        with pytest.raises(UsageError, match="tail n -2"):
            r.tail(SYMBOL, "1min", -2)


def test_tz_converts_at_the_dst_change_and_reads_naive_bounds_there(store):
    root, ref = store
    zone = ZoneInfo(NY)
    with open_store(root) as r:
        df = r.read_df(SYMBOL, "1min", tz=NY)
        pd.testing.assert_frame_equal(df, reference_frame(ref, NY))
        assert str(df.index.tz) == NY
        # every index entry is the same instant as the stored ns, at zoneinfo's wall clock
        for k in (0, int(np.searchsorted(ref["ts_event"], DST)) - 1, int(np.searchsorted(ref["ts_event"], DST)), -1):
            want = datetime.fromtimestamp(int(ref["ts_event"][k]) // SEC, zone)
            assert df.index[k].to_pydatetime() == want and df.index[k].utcoffset() == want.utcoffset()
        before, after = df.index[df.index.asi8 < DST][-1], df.index[df.index.asi8 >= DST][0]
        assert (before.hour, before.utcoffset().total_seconds()) == (1, -5 * 3600)
        assert (after.hour, after.utcoffset().total_seconds()) == (3, -4 * 3600)
        # naive bounds are wall-clock times in tz: 03:00 New York on the 10th is 07:00Z
        part = r.read_df(SYMBOL, "1min", start="2024-03-10 03:00", end="2024-03-10 04:00", tz=NY)
        assert part.index[0].value == DST and part.index[-1].value < DST + 3600 * SEC and len(part) == 20
        assert r.count(SYMBOL, "1min", start="2024-03-10 03:00", end="2024-03-10 04:00", tz=NY) == 20
        assert r.read(SYMBOL, "1min", start="2024-03-10T03:00-04:00", limit=1)["ts_event"][0] == DST
        with pytest.raises(UsageError, match="not one time in America/New_York"):
            r.read_df(SYMBOL, "1min", start="2024-03-10 02:30", tz=NY)  # does not exist there
        with pytest.raises(UsageError, match="not one time in America/New_York"):
            r.read_df(SYMBOL, "1min", start="2024-11-03 01:30", tz=NY)  # exists twice
        with pytest.raises(UsageError, match="'Mars/Olympus' is not a time zone"):
            r.read_df(SYMBOL, "1min", tz="Mars/Olympus")
        # the default stays a UTC index, naive bounds UTC
        assert str(r.read_df(SYMBOL, "1min", start="2024-03-10 07:00", limit=1).index.tz) == "UTC"
        assert r.read_df(SYMBOL, "1min", start="2024-03-10 07:00", limit=1).index[0].value == DST


def test_series_gives_timestamps_raw_gives_ns(store):
    root, ref = store
    with open_store(root) as r:
        raw = {s.timeframe: s for s in r.series(raw=True)}
        utc = {s.timeframe: s for s in r.series()}
        ny = {s.timeframe: s for s in r.series(tz=NY)}
    first, last = int(ref["ts_event"][0]), int(ref["ts_event"][-1])
    assert (raw["1min"].first, raw["1min"].last) == (first, last)
    assert isinstance(utc["1min"].first, pd.Timestamp) and str(utc["1min"].first.tz) == "UTC"
    assert (utc["1min"].first.value, utc["1min"].last.value) == (first, last)
    assert ny["1min"].last.to_pydatetime() == datetime.fromtimestamp(last // SEC, ZoneInfo(NY))
    assert utc["1h"].rows == 0 and utc["1h"].first is None and utc["1h"].last is None


def test_polars_frame_equals_the_pandas_frame(store, monkeypatch):
    pl = pytest.importorskip("polars")
    root, ref = store
    with open_store(root) as r:
        for tz in (None, NY):
            got = r.read_df(SYMBOL, "1min", tz=tz, engine="polars")
            want = r.read_df(SYMBOL, "1min", tz=tz)
            assert isinstance(got, pl.DataFrame) and got.columns == ["ts_event", *want.columns]
            assert got.schema["ts_event"] == pl.Datetime("ns", tz or "UTC")
            assert (got["volume"].dtype, got["count"].dtype) == (pl.UInt64, pl.UInt32)
            np.testing.assert_array_equal(got["ts_event"].dt.epoch("ns").to_numpy(), want.index.asi8)
            for c in want.columns:
                np.testing.assert_array_equal(got[c].to_numpy(), want[c].to_numpy(), err_msg=c)
            pd.testing.assert_frame_equal(got.to_pandas().set_index("ts_event"), want)
        tail = r.tail(SYMBOL, "1min", 3, engine="polars")
        np.testing.assert_array_equal(tail["close"].to_numpy(), ref["close"][-3:] / 1e9)
        with pytest.raises(UsageError, match="engine 'arrow' is not one of pandas, polars"):
            r.read_df(SYMBOL, "1min", engine="arrow")
        monkeypatch.setitem(sys.modules, "polars", None)  # as if not installed
        with pytest.raises(UsageError, match=r"polars frames need polars: pip install '\.\[polars\]' in a checkout"):
            r.tail(SYMBOL, "1min", 3, engine="polars")


def test_tail_while_another_process_appends(tmp_path):
    """A writer process appends one 1s row every 20 ms; every tail(5) polled meanwhile is
    exactly the last rows flushed so far (checked against the writer's known sequence)."""
    writer = subprocess.Popen([sys.executable, str(WORKER), "pulse", str(tmp_path), "80", "0.02"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert '"ready"' in writer.stdout.readline()
        ends, deadline = [], time.monotonic() + 30
        with open_store(tmp_path) as r:
            while time.monotonic() < deadline:
                running = writer.poll() is None
                rows = r.tail(SYMBOL, "1s", 5, raw=True)
                if rows.size:
                    end = (int(rows["ts_event"][-1]) - T0) // SEC + 1
                    want = expected(1, max(0, end - 5), end)
                    assert rows.size == min(5, end)
                    for f in ("ts_event", "open", "high", "low", "close", "count"):  # volume: the writer's clock
                        np.testing.assert_array_equal(rows[f], want[f], err_msg=f)
                    assert not ends or end >= ends[-1], "tail went backwards"
                    ends.append(end)
                if not running:
                    break
                time.sleep(0.005)
        assert writer.wait(10) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    assert ends[-1] == 80, ends[-5:]
    assert len(set(ends)) >= 20, "tail should see the rows grow while the writer appends"

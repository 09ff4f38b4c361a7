"""The HDF5 store in one process: layout, appends, idempotency, readers, recovery, compaction.

(Crashes, concurrent processes, full disks and read-only directories: test_store_processes.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

import streambars
from streambars.errors import StoreError, StoreLockedError
from streambars.records import BAR_DTYPE, TAGGED_BAR_DTYPE, BarBatch
from streambars.store import (
    BarFileWriter,
    StoreWriterSet,
    compact_store,
    file_path,
    filename_to_symbol,
    inspect_store,
    open_store,
    symbol_to_filename,
)
from streambars.store import writer as store_writer
from streambars.store.layout import HWM, INDEX, LIBVER, META_BLOBS, PAGE, chunk_rows_by_timeframe
from streambars.store.recovery import clear_open_flags, lookup3, read_superblock
from streambars.store.writer import as_bars
from streambars.timeframes import STANDARD_TIMEFRAMES, Session, parse_timeframes

from .store_worker import SEC, T0, expected

TFS = parse_timeframes(["1s", "1min", "1h"])
CME = Session.parse("17:00 America/Chicago")


def writer(root: Path, symbol: str = "ES.c.0", tfs=TFS, **kw) -> BarFileWriter:
    return BarFileWriter(root, "GLBX.MDP3", symbol, stype="continuous", timeframes=tfs,
                         session=CME, **{"chunk_rows": 256, **kw})


def stepped(tf_seconds: int, start: int, stop: int, every: int = 1) -> np.ndarray:
    """Rows of the worker's sequence, keeping only every ``every``-th (gaps, like real bars)."""
    return expected(tf_seconds, start, stop)[::every]


@pytest.mark.parametrize("symbol", ["ES.c.0", "BRN FMJ0024!", "A/B", ".hidden", "ESM5-ESU5", "%41", "ü €", "..", "a" * 60])
def test_symbol_escaping_round_trips_and_is_a_plain_file_name(symbol):
    name = symbol_to_filename(symbol)
    assert "/" not in name and " " not in name and not name.startswith(".")
    assert filename_to_symbol(name) == symbol
    assert filename_to_symbol(name + ".h5") == symbol
    assert symbol_to_filename("BRN FMJ0024!") == "BRN%20FMJ0024%21"


def test_file_has_the_contract_every_timeframe_and_meta_before_any_row(tmp_path):
    with writer(tmp_path, tfs=parse_timeframes(list(STANDARD_TIMEFRAMES)), chunk_rows=4096) as w:
        assert w.high_water_marks() == {tf: -1 for tf in STANDARD_TIMEFRAMES}
        assert w.read_meta("engine_state") is None
    path = file_path(tmp_path, "GLBX.MDP3", "ES.c.0")
    assert path == tmp_path / "GLBX.MDP3" / "ES.c.0.h5"
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert (a["dataset"], a["symbol"], a["stype"], a["session"]) == (
            "GLBX.MDP3", "ES.c.0", "continuous", "17:00:00 America/Chicago")
        assert a["price_scale"] == 1_000_000_000 and a["format_version"] == 1
        assert list(a["timeframes"].astype(str)) == list(STANDARD_TIMEFRAMES)
        assert "UTC" in a["ts_event"] and "open" in a["ts_event"]
        assert sorted(f["bars"]) == sorted(STANDARD_TIMEFRAMES)
        for tf in STANDARD_TIMEFRAMES:
            ds = f["bars"][tf]
            assert ds.dtype == BAR_DTYPE and ds.maxshape == (None,) and ds.compression is None
            assert ds.chunks[0] == ds.attrs["index_stride"]
            # Whole 4 KiB pages (a chunk of 1024 52-byte rows is 13): page-aligned chunks leave no gap.
            assert ds.chunks[0] * BAR_DTYPE.itemsize % PAGE == 0, (tf, ds.chunks)
        # The default 4096 rows for the finest timeframe; coarser ones fewer, but never under 1024.
        assert {tf: f["bars"][tf].chunks[0] for tf in STANDARD_TIMEFRAMES} == {
            tf: 4096 if tf == "1s" else 1024 for tf in STANDARD_TIMEFRAMES}
        assert f[HWM].shape == (16,) and f["meta/engine_state"].shape[0] == 2
    assert read_superblock(path).version == 3  # libver v110


@pytest.mark.parametrize("chunk_rows", [1024, 4096, 5120, 65_536, 999_424])
@pytest.mark.parametrize("finest", ["1s", "1min"])
def test_every_chunk_the_config_allows_is_whole_pages(chunk_rows, finest):
    # Each chunk starts on a page (layout.FILE_SPACE): whole pages leave no gap after it.
    tfs = [tf for tf in parse_timeframes(list(STANDARD_TIMEFRAMES)) if tf.seconds >= parse_timeframes([finest])[0].seconds]
    rows = chunk_rows_by_timeframe(tfs, chunk_rows)
    assert rows[finest] == chunk_rows
    sizes = [rows[tf.name] for tf in sorted(tfs)]
    assert sizes == sorted(sizes, reverse=True)  # fewer rows for coarser timeframes
    assert min(sizes) >= 1024
    assert all(r * BAR_DTYPE.itemsize % PAGE == 0 for r in sizes), rows


def test_append_is_idempotent_and_returns_rows_written(tmp_path):
    with writer(tmp_path) as w:
        assert w.append({"1s": stepped(1, 0, 1000), "1min": stepped(60, 0, 17)}) == {"1s": 1000, "1min": 17}
        assert w.append({"1s": stepped(1, 0, 1000)}) == {"1s": 0}  # the same input again
        assert w.append({"1s": stepped(1, 500, 1500)}) == {"1s": 500}  # overlap: only the new part
        assert w.append({"1s": stepped(1, 10, 20)}) == {"1s": 0}  # older than the mark: ignored
        assert w.high_water_marks() == {"1s": T0 + 1499 * SEC, "1min": T0 + 16 * 60 * SEC, "1h": -1}
        w.append({}, meta={"progress": b'{"months": ["2024-01"]}'})
        w.append({}, meta={"progress": b"second"})
        assert w.read_meta("progress") == b"second"
    with writer(tmp_path) as w:  # reopen: marks and blobs persist
        assert w.high_water_marks()["1s"] == T0 + 1499 * SEC
        assert w.read_meta("progress") == b"second"
        assert w.append({"1s": stepped(1, 0, 1600)}) == {"1s": 100}
    with open_store(tmp_path) as r:
        np.testing.assert_array_equal(r.read("ES.c.0", "1s"), stepped(1, 0, 1600))


def test_append_refuses_what_would_break_the_file(tmp_path):
    with writer(tmp_path) as w:
        bad = stepped(1, 0, 10)[::-1]
        with pytest.raises(StoreError, match="not increasing"):
            w.append({"1s": bad})
        with pytest.raises(StoreError, match="no timeframe 5min"):
            w.append({"5min": stepped(300, 0, 2)})
        with pytest.raises(StoreError, match="no meta blob 'other'"):
            w.append({}, meta={"other": b"x"})
        tagged = np.zeros(3, TAGGED_BAR_DTYPE)  # wider dtypes are fine: fields by name
        tagged["ts_event"] = [1, 2, 3]
        tagged["count"] = 1
        assert w.append({"1h": tagged}) == {"1h": 3}


def test_torn_meta_slot_falls_back_to_the_previous_payload(tmp_path):
    with writer(tmp_path) as w:
        w.append({}, meta={"engine_state": b"A" * 5000})
        w.append({}, meta={"engine_state": b"B" * 100})
    with h5py.File(file_path(tmp_path, "GLBX.MDP3", "ES.c.0"), "r+", libver=LIBVER) as f:
        f["meta/engine_state"][0, 40] ^= 0xFF  # corrupt the newest slot (sequence 2 -> slot 0)
    with writer(tmp_path) as w:
        assert w.read_meta("engine_state") == b"A" * 5000


def test_reopen_checks_the_contract_and_says_what_differs(tmp_path):
    writer(tmp_path).close()
    with writer(tmp_path, tfs=parse_timeframes(["1min"])) as w:  # a subset is fine
        assert set(w.high_water_marks()) == {"1s", "1min", "1h"}
    with pytest.raises(StoreError, match=r"holds timeframes 1s, 1min, 1h; requested 5min"):
        writer(tmp_path, tfs=parse_timeframes(["1s", "5min"]))
    with pytest.raises(StoreError, match="session="):
        BarFileWriter(tmp_path, "GLBX.MDP3", "ES.c.0", stype="continuous", timeframes=TFS,
                      session=Session.parse("00:00 America/New_York"))
    with pytest.raises(StoreError, match="stype="):
        BarFileWriter(tmp_path, "GLBX.MDP3", "ES.c.0", stype="parent", timeframes=TFS, session=CME)
    with writer(tmp_path):  # and none of the refusals left the lock held
        pass


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    with writer(tmp_path, owner="daemon"), pytest.raises(StoreLockedError, match=rf"pid {os.getpid()} .*daemon"):
        writer(tmp_path)
    writer(tmp_path).close()


def test_writer_set_routes_tagged_bars_by_series_and_timeframe(tmp_path):
    names = ["ES.c.0", "NQ.c.0"]
    rng = np.random.default_rng(3)
    parts = []
    for s, _ in enumerate(names):
        for t, tf in enumerate(TFS):
            rows = stepped(tf.seconds, 0, 50 + 10 * s)
            tagged = np.zeros(rows.shape[0], TAGGED_BAR_DTYPE)
            for f in BAR_DTYPE.names:
                tagged[f] = rows[f]
            tagged["series"], tagged["timeframe"] = s, t
            parts.append(tagged)
    allbars = np.concatenate(parts)
    # Interleave series and timeframes, keeping each (series, timeframe) in ts order.
    allbars = allbars[np.argsort(rng.random(allbars.size) + allbars["ts_event"] / 1e20, kind="stable")]
    allbars = allbars[np.lexsort((allbars["ts_event"],))]
    with StoreWriterSet(tmp_path, "GLBX.MDP3", "continuous", TFS, CME, chunk_rows=64) as ws:
        assert ws.write(BarBatch(allbars), names, {"NQ.c.0": {"progress": b"p"}}) == allbars.size
        assert ws.write(BarBatch(allbars), names) == 0
        assert ws.writer("NQ.c.0").read_meta("progress") == b"p"
        with pytest.raises(StoreError, match="outside"):
            ws.write(BarBatch(allbars), names[:1])
    with open_store(tmp_path) as r:
        for s, name in enumerate(names):
            for tf in TFS:
                np.testing.assert_array_equal(r.read(name, tf.name), stepped(tf.seconds, 0, 50 + 10 * s))


def test_bars_are_taken_by_field_name_whatever_the_wider_layout(tmp_path):
    rows = stepped(1, 0, 40)
    tagged = np.zeros(rows.shape[0], TAGGED_BAR_DTYPE)  # bar fields at a fixed byte offset
    reordered = np.zeros(rows.shape[0], [("count", "<u4"), ("x", "<f8")] + [
        (n, BAR_DTYPE[n]) for n in reversed(BAR_DTYPE.names) if n != "count"])
    for arr in (tagged, reordered):
        for n in BAR_DTYPE.names:
            arr[n] = rows[n]
    assert as_bars(tagged, "t").dtype == as_bars(reordered, "r").dtype == BAR_DTYPE
    np.testing.assert_array_equal(as_bars(tagged, "t"), rows)
    np.testing.assert_array_equal(as_bars(tagged[::3], "t"), rows[::3])  # not contiguous
    np.testing.assert_array_equal(as_bars(reordered, "r"), rows)
    with pytest.raises(StoreError, match="lack the fields"):
        as_bars(np.zeros(2, [("ts_event", "<i8")]), "x")


@pytest.mark.parametrize("keep_rows", [1 << 20, 4])  # 4: batches too big to keep a gather buffer for
def test_writer_set_groups_one_pair_many_pairs_and_many_series(tmp_path, monkeypatch, keep_rows):
    monkeypatch.setattr(store_writer, "_GATHER_KEEP_ROWS", keep_rows)
    names = [f"S{i}" for i in range(5000)]  # 5000 * 3 keys: more than 16 bits
    tfs = list(TFS)

    def tagged(s: int, t: int, start: int, stop: int) -> np.ndarray:
        rows = stepped(tfs[t].seconds, start, stop)
        out = np.zeros(rows.shape[0], TAGGED_BAR_DTYPE)
        for f in BAR_DTYPE.names:
            out[f] = rows[f]
        out["series"], out["timeframe"] = s, t
        return out

    with StoreWriterSet(tmp_path, "GLBX.MDP3", "continuous", TFS, CME, chunk_rows=64) as ws:
        assert ws.write(BarBatch(tagged(4999, 0, 0, 300)), names) == 300  # one (series, tf) pair
        big = np.concatenate([tagged(4999, 0, 300, 900), tagged(7, 2, 0, 5), tagged(7, 1, 0, 40)])
        assert ws.write(BarBatch(big[np.argsort(big["ts_event"], kind="stable")]), names) == big.size
        small = np.concatenate([tagged(7, 1, 40, 45), tagged(4999, 0, 900, 903)])  # reuses buffers
        assert ws.write(BarBatch(small), names) == small.size
        assert ws.symbols == ["S4999", "S7"]
    with open_store(tmp_path) as r:
        np.testing.assert_array_equal(r.read("S4999", "1s"), stepped(1, 0, 903))
        np.testing.assert_array_equal(r.read("S7", "1min"), stepped(60, 0, 45))
        np.testing.assert_array_equal(r.read("S7", "1h"), stepped(3600, 0, 5))
        assert r.read("S7", "1s").size == 0


def _gappy_store(root: Path, n: int = 20_000) -> np.ndarray:
    rows = stepped(1, 0, n * 3)
    rows = rows[np.random.default_rng(7).random(rows.size) < 0.35][:n]  # bars only where trades were
    with writer(root) as w:
        for lo in range(0, rows.size, 3001):
            w.append({"1s": rows[lo : lo + 3001]})
    return rows


def test_read_by_time_range_matches_brute_force(tmp_path):
    rows = _gappy_store(tmp_path)
    ts = rows["ts_event"]
    rng = np.random.default_rng(11)
    probes = list(rng.integers(ts[0] - 50 * SEC, ts[-1] + 50 * SEC, 200)) + list(ts[rng.integers(0, ts.size, 50)])
    probes += [ts[0], ts[-1], ts[0] - 1, ts[-1] + 1, ts[255], ts[256], ts[257]]  # chunk edges (stride 256)
    with open_store(tmp_path) as r:
        for _ in range(150):
            a, b = sorted(int(x) for x in rng.choice(probes, 2))
            want = rows[(ts >= a) & (ts < b)]
            np.testing.assert_array_equal(r.read("ES.c.0", "1s", a, b), want)
            assert r.count("ES.c.0", "1s", a, b) == want.size
        for a in probes[:40]:
            np.testing.assert_array_equal(r.read("ES.c.0", "1s", start=int(a)), rows[ts >= a])
            np.testing.assert_array_equal(r.read("ES.c.0", "1s", end=int(a)), rows[ts < a])
        assert r.read("ES.c.0", "1s", ts[10], ts[5]).size == 0


def test_start_and_end_accept_strings_datetimes_timestamps_and_ints(tmp_path):
    rows = _gappy_store(tmp_path, 3000)
    ts = rows["ts_event"]
    a, b = int(ts[100]), int(ts[2000])
    sa = datetime.fromtimestamp(a / 1e9, UTC)
    forms = [
        (a, b),
        (sa.isoformat(), pd.Timestamp(b, tz="UTC").isoformat()),
        (sa.strftime("%Y-%m-%dT%H:%M:%SZ"), pd.Timestamp(b, tz="UTC").tz_convert("America/Chicago")),
        (sa.replace(tzinfo=None), np.datetime64(b, "ns")),  # naive = UTC
        (pd.Timestamp(a, tz="UTC"), pd.Timestamp(b, tz="UTC").to_pydatetime()),
    ]
    with open_store(tmp_path) as r:
        want = r.read("ES.c.0", "1s", a, b)
        assert want.size == ((ts >= a) & (ts < b)).sum()
        for start, end in forms:
            np.testing.assert_array_equal(r.read("ES.c.0", "1s", start, end), want)
        day = r.read("ES.c.0", "1s", "2024-01-01", "2024-01-02")
        assert day.size == ((ts >= T0) & (ts < T0 + 86400 * SEC)).sum()
        with pytest.raises(streambars.errors.UsageError, match="not a time"):
            r.read("ES.c.0", "1s", "yesterday-ish")


def test_read_df_has_utc_index_and_float_prices(tmp_path):
    rows = _gappy_store(tmp_path, 500)
    df = streambars.open_store(tmp_path).read_df("ES.c.0", "1s", end=int(rows["ts_event"][100]))
    assert len(df) == 100
    assert isinstance(df.index, pd.DatetimeIndex) and str(df.index.tz) == "UTC" and df.index.name == "ts_event"
    assert df.index[0] == pd.Timestamp(int(rows["ts_event"][0]), tz="UTC")
    assert list(df.columns) == ["open", "high", "low", "close", "volume", "count"]
    assert df["close"].dtype == np.float64
    assert df["close"].iloc[3] == rows["close"][3] / 1e9
    assert df["volume"].iloc[3] == rows["volume"][3] and df["count"].dtype == np.uint32


def test_series_inspect_and_errors_name_what_exists(tmp_path):
    with writer(tmp_path, "BRN FMJ0024!") as w:
        w.append({"1s": stepped(1, 0, 100), "1min": stepped(60, 0, 2)})
    writer(tmp_path, "ES.c.0").close()
    with open_store(tmp_path) as r:
        info = {(s.symbol, s.timeframe): s for s in r.series(raw=True)}
        s = info[("BRN FMJ0024!", "1s")]
        assert (s.dataset, s.rows, s.first, s.last) == ("GLBX.MDP3", 100, T0, T0 + 99 * SEC)
        assert s.file_size == os.path.getsize(s.path)
        assert info[("ES.c.0", "1h")].rows == 0 and info[("ES.c.0", "1h")].first is None
        assert r.symbols() == ["BRN FMJ0024!", "ES.c.0"] and r.datasets() == ["GLBX.MDP3"]
        assert r.read("ES.c.0", "1s").size == 0
        with pytest.raises(StoreError, match=r"no symbol 'CL.c.0'.*BRN FMJ0024!, ES.c.0"):
            r.read("CL.c.0", "1s")
        with pytest.raises(StoreError, match="no timeframe 5min"):
            r.read("ES.c.0", "5min")
        assert r.read("BRN FMJ0024!", "60s").size == 2  # any spelling of a timeframe
    one = open_store(file_path(tmp_path, "GLBX.MDP3", "BRN FMJ0024!"))  # one file works too
    assert one.symbols() == ["BRN FMJ0024!"]
    one.close()
    table = inspect_store(tmp_path)
    row = next(t for t in table if t["symbol"] == "BRN FMJ0024!" and t["timeframe"] == "1s")
    assert row["rows"] == 100 and row["first"] == "2024-01-01T00:00:00Z" and row["last"] == "2024-01-01T00:01:39Z"
    assert row["writer"] == "-" and row["file_size"].endswith("kB")
    with writer(tmp_path, "ES.c.0"):
        assert {t["writer"] for t in inspect_store(tmp_path) if t["symbol"] == "ES.c.0"} == {f"pid {os.getpid()}"}
    with pytest.raises(StoreError, match="no store at"):
        inspect_store(tmp_path / "nope")


def test_superblock_repair_clears_marks_and_keeps_later_writes_from_truncating(tmp_path):
    # A file left open-for-write with a stale EOA, made by hand (the kill test makes real ones).
    path = tmp_path / "x.h5"
    with h5py.File(path, "w", libver=LIBVER) as f:
        f.create_dataset("d", data=np.arange(100_000))
    sb = read_superblock(path)
    raw = bytearray(sb.raw)
    raw[11] = 0x05
    raw[28:36] = (500).to_bytes(8, "little")  # EOA far below the end, like a SWMR writer leaves it
    raw[-4:] = lookup3(bytes(raw[:-4])).to_bytes(4, "little")
    with open(path, "r+b") as fh:
        fh.write(raw)
    size = os.path.getsize(path)
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    assert clear_open_flags(path) and not clear_open_flags(path)
    sb = read_superblock(path)
    assert sb.flags == 0 and sb.eoa == size
    with h5py.File(path, "r+", libver=LIBVER) as f:
        f.create_dataset("e", data=np.arange(10))
    assert os.path.getsize(path) > size  # not truncated to the stale EOA
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["d"][:], np.arange(100_000))
    assert lookup3(b"") == 0xDEADBEEF


def test_reopen_recomputes_marks_and_index_from_the_rows(tmp_path):
    with writer(tmp_path) as w:
        w.append({"1s": stepped(1, 0, 1000)})
    path = file_path(tmp_path, "GLBX.MDP3", "ES.c.0")
    with h5py.File(path, "r+", libver=LIBVER) as f:  # as if killed between the flushes
        f[HWM][0] = T0 + 10 * SEC
        f[f"{INDEX}/1s"].resize((1,))
        ds = f["bars/1s"]  # and a row allocated but never written (count 0)
        ds.resize((1001,))
    with writer(tmp_path) as w:
        assert w.high_water_marks()["1s"] == T0 + 999 * SEC
        assert w.rows("1s") == 1000
        assert w.append({"1s": stepped(1, 0, 1001)}) == {"1s": 1}
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f[f"{INDEX}/1s"][:], stepped(1, 0, 1001)["ts_event"][::256])


def test_pytables_pandas_and_plain_h5py_read_the_file(tmp_path):
    tables = pytest.importorskip("tables")
    rows = stepped(60, 0, 300)
    with writer(tmp_path) as w:
        w.append({"1min": rows})
    path = file_path(tmp_path, "GLBX.MDP3", "ES.c.0")
    with tables.open_file(str(path)) as t:  # HDF5 1.14 (PyTables' own)
        got = t.get_node("/bars/1min").read()
        assert t.root._v_attrs.symbol == "ES.c.0"
    np.testing.assert_array_equal(got.astype(BAR_DTYPE), rows)
    df = pd.DataFrame(got)  # pandas on top of PyTables' array
    assert df["ts_event"].iloc[-1] == rows["ts_event"][-1]
    with h5py.File(path, "r", swmr=True, locking=False) as f:  # README's five lines
        bars = f["bars/1min"][-10:]
    np.testing.assert_array_equal(bars, rows[-10:])


def test_h5dump_reads_the_file(tmp_path):
    h5dump = shutil.which("h5dump")
    if h5dump is None:
        pytest.skip("h5dump (Debian hdf5-tools) not installed")
    with writer(tmp_path) as w:
        w.append({"1min": stepped(60, 0, 3)})
    path = file_path(tmp_path, "GLBX.MDP3", "ES.c.0")
    out = subprocess.run([h5dump, "-d", "/bars/1min", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "ts_event" in out.stdout and str(T0 + 120 * SEC) in out.stdout
    head = subprocess.run([h5dump, "-A", str(path)], capture_output=True, text=True, timeout=30)
    assert head.returncode == 0 and "GLBX.MDP3" in head.stdout


def test_compact_rewrites_closed_files_and_refuses_locked_ones(tmp_path):
    rows = stepped(1, 0, 20_000)
    with writer(tmp_path, "ES.c.0") as w:
        w.append({"1s": rows}, meta={"progress": b"kept"})
    with writer(tmp_path, "NQ.c.0") as w:
        w.append({"1s": rows})
    es, nq = (file_path(tmp_path, "GLBX.MDP3", s) for s in ("ES.c.0", "NQ.c.0"))
    with writer(tmp_path, "NQ.c.0", owner="daemon"):
        done = []
        with pytest.raises(StoreLockedError, match=rf"cannot compact {nq}.*pid {os.getpid()}"):
            for item in compact_store(tmp_path, [], "gzip"):
                done.append(item)
    assert [p for p, _, _ in done] == [es]
    _, before, after = done[0]
    assert after < before / 2
    with h5py.File(es, "r") as f:
        assert f["bars/1s"].compression == "gzip" and f["bars/1s"].chunks == (256,)
    with open_store(tmp_path) as r:
        np.testing.assert_array_equal(r.read("ES.c.0", "1s", rows["ts_event"][5000], rows["ts_event"][6000]),
                                      rows[5000:6000])
    # Appending again first rewrites the file uncompressed (SWMR flushes would leak otherwise).
    with writer(tmp_path, "ES.c.0") as w:
        assert w.read_meta("progress") == b"kept"
        assert w.append({"1s": stepped(1, 0, 20_010)}) == {"1s": 10}
    with h5py.File(es, "r") as f:
        assert f["bars/1s"].compression is None and f["bars/1s"].shape == (20_010,)
    # A reader holding the file across a compaction (by another process: HDF5 will not let one
    # process read a file while rewriting it) moves to the new file on refresh().
    held = open_store(tmp_path)
    inode = os.stat(es).st_ino
    out = subprocess.run([sys.executable, "-m", "streambars", "compact", "--store", str(tmp_path),
                          "--compression", "lzf", str(es)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert os.stat(es).st_ino != inode
    held.refresh()
    assert held._files[es].key[1] == os.stat(es).st_ino  # (same rows in both: check the inode)
    np.testing.assert_array_equal(held.read("ES.c.0", "1s"), stepped(1, 0, 20_010))
    held.close()
    assert not [p for p in es.parent.iterdir() if ".compact-" in p.name or ".creating-" in p.name]


def closing_bars(tfs, i0: int, i1: int) -> dict[str, np.ndarray]:
    """The 1s bars of seconds i0..i1-1 and every coarser bar that closes with one of them."""
    out = {"1s": stepped(1, i0, i1)}
    for tf in tfs[1:]:
        j0, j1 = -(-(i0 + 1) // tf.seconds) - 1, i1 // tf.seconds  # bars closing in (i0, i1]
        if j1 > j0:
            out[tf.name] = stepped(tf.seconds, j0, j1)
    return out


def chunk_bytes(f: h5py.File) -> int:
    """Bytes HDF5 allocated to the chunks of every dataset (what is not chunks is metadata, or gaps)."""
    sizes: list[int] = []
    f.visititems(lambda _, o: sizes.append(o.id.get_storage_size()) if isinstance(o, h5py.Dataset) else None)
    return sum(sizes)


def test_bytes_on_disk_per_bar_stay_within_twice_the_row_size(tmp_path):
    # A day of bars in 16 timeframes: the first half hour in the daemon's pattern (one 1s bar
    # per append, every coarser bar as it closes, a flush per append), the rest ten minutes per
    # append. A day, not less: a file's first chunk of each coarse timeframe (1024 rows, 13
    # pages) is allocated whole with its first bar, which a short file does not amortise.
    # (bench/store.py runs the day one second per append.)
    tfs = parse_timeframes(list(STANDARD_TIMEFRAMES))
    day, daemon = 86_400, 1800
    total = 0
    with writer(tmp_path, tfs=tfs, chunk_rows=4096) as w:
        for i in range(daemon):
            total += sum(w.append(closing_bars(tfs, i, i + 1)).values())
        early_size, early_chunks = os.path.getsize(w.path), chunk_bytes(w._f)
        for i in range(daemon, day, 600):
            total += sum(w.append(closing_bars(tfs, i, i + 600)).values())
        path = w.path
    size = os.path.getsize(path)
    assert size / total <= 2 * BAR_DTYPE.itemsize, f"{size / total:.1f} bytes per {BAR_DTYPE.itemsize}-byte row"
    with h5py.File(path, "r") as f:
        for tf in tfs:  # what chunk_bytes counts for bars: rows rounded up to whole chunks
            ds = f["bars"][tf.name]
            assert ds.shape[0] == day // tf.seconds
            assert ds.id.get_storage_size() == -(-ds.shape[0] // ds.chunks[0]) * ds.chunks[0] * BAR_DTYPE.itemsize
        chunks = chunk_bytes(f)
    # What a new file costs once, beside its chunks: every dataset's metadata blocks take a
    # page each (layout.FILE_SPACE, so that a kill cannot tear them), at most 4 pages per
    # dataset -- after 1800 flushes too: a flush leaks nothing.
    datasets = 2 * len(tfs) + 1 + len(META_BLOBS)
    assert early_size - early_chunks <= 4 * PAGE * datasets, f"{early_size - early_chunks} bytes not in chunks"
    # As the file grows, it grows by its chunks: each chunk is whole pages, so the aligned
    # allocation leaves no gap after it (64-row chunks, 3.3 kB in a 4 kB page, made this ~6%).
    grown, other = chunks - early_chunks, (size - chunks) - (early_size - early_chunks)
    assert other <= 0.02 * grown, f"{other} bytes besides {grown} bytes of chunks"


def test_writer_in_a_process_that_reads_the_file_says_why_it_cannot_open(tmp_path):
    writer(tmp_path).close()
    with open_store(tmp_path) as r:
        assert r.symbols() == ["ES.c.0"]
        with pytest.raises(StoreError, match="StoreReader in this process has it open"):
            writer(tmp_path)
    writer(tmp_path).close()  # the refusal released the lock; the reader's close freed the file

"""Backfill's bulk writing (bars coalesced into slabs, checkpoints writing them first, rows
grouped without the GIL) changes nothing in the store: every dataset, index, mark and meta blob
is byte-identical to what one append per engine batch writes and to the numpy grouping it
replaced, and the bars are the engine's own."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import pytest

import streambars.backfill as B
from streambars.config import load_settings
from streambars.engine import Aggregator
from streambars.errors import StoreError
from streambars.records import BAR_DTYPE, TAGGED_BAR_DTYPE, BarBatch, RecordBatch
from streambars.store import open_store
from streambars.store import writer as W
from streambars.store.gather import count_tagged, scatter_rows, scatter_tagged
from streambars.synthetic import es_like_1s_bars, write_dbn
from streambars.timeframes import STANDARD_TIMEFRAMES, Session, parse_timeframes

SYMBOLS = {"ESH4": 5602, "NQH4": 5603}
NS = 1_000_000_000


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[list[Path], dict[str, np.ndarray]]:
    """Two symbols in one DBN file a month, two months (so checkpoints fall mid-run)."""
    d = tmp_path_factory.mktemp("dbn")
    paths, by_symbol = [], {s: [] for s in SYMBOLS}
    for m, (a, b) in enumerate(((datetime(2024, 1, 29), datetime(2024, 2, 1)),
                                (datetime(2024, 2, 1), datetime(2024, 2, 3)))):
        start = int(a.replace(tzinfo=UTC).timestamp()) * NS
        end = int(b.replace(tzinfo=UTC).timestamp()) * NS
        parts = [es_like_1s_bars(start, (end - start) / 86_400 / NS, seed=10 * m + k, instrument_id=iid)
                 for k, iid in enumerate(SYMBOLS.values())]
        for sym, part in zip(SYMBOLS, parts, strict=True):
            by_symbol[sym].append(part)
        records = np.concatenate(parts)
        records = records[np.argsort(records["ts_event"], kind="stable")]
        paths.append(write_dbn(d / f"m{m}.dbn.zst", records, dataset="GLBX.MDP3", symbols=SYMBOLS,
                               start_ns=start, end_ns=end))
    return paths, {s: np.concatenate(p) for s, p in by_symbol.items()}


def _ingest(root: Path, paths: list[Path], coalesce: int, monkeypatch) -> None:
    monkeypatch.setattr(B, "COALESCE_ROWS", coalesce)
    settings = load_settings(None, {"store.path": str(root)})
    B.ingest_dbn_files(settings, paths, out=io.StringIO())


def _contents(path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with h5py.File(path, "r", locking=False) as f:
        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = obj.dtype.str.encode() + repr(obj.shape).encode() + obj[()].tobytes()
        f.visititems(visit)
    return out


@pytest.mark.parametrize("coalesce", [1000, 100_000, B.COALESCE_ROWS])
def test_coalesced_store_is_byte_identical_to_one_append_per_batch(inputs, tmp_path, monkeypatch, coalesce):
    paths, _ = inputs
    _ingest(tmp_path / "per-batch", paths, 0, monkeypatch)
    _ingest(tmp_path / "bulk", paths, coalesce, monkeypatch)
    for sym in SYMBOLS:
        a = _contents(tmp_path / "per-batch" / "GLBX.MDP3" / f"{sym}.h5")
        b = _contents(tmp_path / "bulk" / "GLBX.MDP3" / f"{sym}.h5")
        assert sorted(a) == sorted(b)
        assert sum(1 for k in a if k.startswith("bars/")) == len(STANDARD_TIMEFRAMES)
        for name in a:
            assert a[name] == b[name], f"{sym} {name} differs"


def test_coalesced_store_holds_the_engines_bars(inputs, tmp_path, monkeypatch):
    paths, records = inputs
    _ingest(tmp_path, paths, 1000, monkeypatch)
    tfs = parse_timeframes(list(STANDARD_TIMEFRAMES))
    with open_store(tmp_path) as reader:
        for sym, recs in records.items():
            agg = Aggregator(tfs, input_kind="ohlcv-1s", session=Session.parse("17:00 America/Chicago"))
            batch = RecordBatch.from_ohlcv("ohlcv-1s", np.zeros(len(recs), np.int32), recs)
            end = int(datetime(2024, 2, 3, tzinfo=UTC).timestamp()) * NS
            bars = np.concatenate([agg.process(batch).bars, agg.flush(end).bars])
            for k, tf in enumerate(agg.timeframes):
                exp = bars[bars["timeframe"] == k]
                got = reader.read(sym, tf.name, dataset="GLBX.MDP3")
                assert len(got) == len(exp) > 0
                for field in ("ts_event", "open", "high", "low", "close", "volume", "count"):
                    assert np.array_equal(got[field], exp[field]), (sym, tf.name, field)


@pytest.mark.parametrize("coalesce", [0, B.COALESCE_ROWS])
def test_store_is_byte_identical_to_the_numpy_grouping(inputs, tmp_path, monkeypatch, coalesce):
    """The writers' GIL-free grouping (store.gather) against the numpy path it replaced (a
    stable argsort and np.take), forced by refusing the word copy: the same bytes everywhere."""
    paths, _ = inputs
    _ingest(tmp_path / "gather", paths, coalesce, monkeypatch)
    monkeypatch.setattr(W, "scatter_rows", lambda *a: False)
    monkeypatch.setattr(W.StoreWriterSet, "_group_tagged", lambda *a: None)
    _ingest(tmp_path / "numpy", paths, coalesce, monkeypatch)
    for sym in SYMBOLS:
        a = _contents(tmp_path / "numpy" / "GLBX.MDP3" / f"{sym}.h5")
        b = _contents(tmp_path / "gather" / "GLBX.MDP3" / f"{sym}.h5")
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name] == b[name], f"{sym} {name} differs"


@pytest.mark.parametrize("nkeys", [1, 3, 48])
def test_scatter_rows_is_a_stable_sort_by_key(nkeys):
    rng = np.random.default_rng(nkeys)
    rows = np.zeros(5000, TAGGED_BAR_DTYPE)
    for name in BAR_DTYPE.names:
        rows[name] = rng.integers(0, 2**31, len(rows))
    key = rng.integers(0, nkeys, len(rows))
    out = np.empty(len(rows) + 7, np.dtype((np.void, BAR_DTYPE.itemsize)))
    assert scatter_rows(rows, 8, key, np.bincount(key, minlength=nkeys), out)
    expected = rows[np.argsort(key, kind="stable")]
    got = out[: len(rows)].view(BAR_DTYPE)
    for name in BAR_DTYPE.names:
        assert np.array_equal(got[name], expected[name]), name
    assert not scatter_rows(rows[::2], 8, key[::2], np.bincount(key[::2], minlength=nkeys), out)


def _tagged(rng: np.random.Generator, n: int, nseries: int, ntf: int, base: int = -(1 << 40)) -> np.ndarray:
    rows = np.zeros(n, TAGGED_BAR_DTYPE)
    for name in BAR_DTYPE.names:
        rows[name] = rng.integers(0, 2**31, n)
    rows["ts_event"] = np.arange(n) * 7 + base  # beyond 32 bits (negative): both halves matter
    rows["series"], rows["timeframe"] = rng.integers(0, nseries, n), rng.integers(0, ntf, n)
    return rows


@pytest.mark.parametrize(("nseries", "ntf"), [(1, 1), (1, 16), (3, 16)])
def test_scatter_tagged_is_a_stable_sort_by_key_across_arrays(nseries, ntf):
    """The writers' grouping of the engine's arrays as queued (no concatenation first)
    against numpy's stable argsort of the concatenation."""
    rng = np.random.default_rng(nseries * ntf)
    whole = _tagged(rng, 7000, nseries, ntf)
    parts = [whole[:2500], whole[2500:2500], whole[2500:6999], whole[6999:]]
    counts = count_tagged(parts, ntf, nseries)
    key = whole["series"].astype(np.int64) * ntf + whole["timeframe"]
    assert np.array_equal(counts, np.bincount(key, minlength=nseries * ntf))
    out = np.empty(len(whole) + 3, np.dtype((np.void, BAR_DTYPE.itemsize)))
    assert scatter_tagged(parts, ntf, counts, out)
    expected = whole[np.argsort(key, kind="stable")]
    got = out[: len(whole)].view(BAR_DTYPE)
    for name in BAR_DTYPE.names:
        assert np.array_equal(got[name], expected[name]), name


def test_scatter_tagged_finds_tags_out_of_range_and_ts_not_increasing():
    rng = np.random.default_rng(5)
    rows = _tagged(rng, 1000, 2, 4)
    assert count_tagged([rows], 4, 2) is not None
    assert count_tagged([rows], 4, 1) is None  # series 1 of only 1
    bad = rows.copy()
    bad["timeframe"][500] = -1
    assert count_tagged([rows[:10], bad], 4, 2) is None
    # a group whose ts_event steps back (across two arrays): grouped all the same, flagged
    late = rows[:1].copy()
    late["series"], late["timeframe"] = rows["series"][-1], rows["timeframe"][-1]
    late["ts_event"] = rows["ts_event"][-1]  # equal is not increasing
    counts = count_tagged([rows, late], 4, 2)
    out = np.empty(1001, np.dtype((np.void, BAR_DTYPE.itemsize)))
    assert not scatter_tagged([rows, late], 4, counts, out)
    assert scatter_tagged([rows], 4, count_tagged([rows], 4, 2), out)


def test_writer_set_refuses_bars_out_of_order_or_badly_tagged(tmp_path):
    """The writers' fast grouping leaves the ts_event check to append only when a group is out
    of order: such a batch is refused as before, naming the file, and so is a bad tag."""
    tfs = ["1s", "1min"]
    rows = np.zeros(4, TAGGED_BAR_DTYPE)
    rows["ts_event"] = [1, 2, 2, 3]
    rows["timeframe"] = [0, 0, 0, 1]
    with W.StoreWriterSet(tmp_path, "GLBX.MDP3", "raw_symbol", tfs, Session.parse("17:00 America/Chicago"),
                          coalesce_rows=100) as ws:
        assert ws.write(rows[:2], ["ESH4"]) == 0  # queued
        with pytest.raises(StoreError, match="ts_event not increasing at row 2"):
            ws.write(rows[2:], ["ESH4"], {"ESH4": {"progress": b"{}"}})
    bad = rows[:1].copy()
    bad["timeframe"] = 2
    with (W.StoreWriterSet(tmp_path / "b", "GLBX.MDP3", "raw_symbol", tfs,
                           Session.parse("17:00 America/Chicago")) as ws,
          pytest.raises(StoreError, match="outside the 1 symbols and 2 timeframes")):
        ws.write(bad, ["ESH4"])


def test_writer_set_uses_the_pipelines_counts_or_counts_itself(tmp_path):
    """BarBatch.counts (the pipeline's rows per series and timeframe) spare the writers a pass;
    counts of another shape are ignored (the tags are counted and checked again). Every way
    stores the same rows as the reference grouping."""
    rng = np.random.default_rng(3)
    tfs = ["1s", "1min", "1h"]
    rows = _tagged(rng, 3000, 2, 3, base=1 << 40)
    names = ["ESH4", "NQH4"]
    session = Session.parse("17:00 America/Chicago")
    def right(part: np.ndarray) -> np.ndarray:
        return np.bincount(part["series"] * 3 + part["timeframe"], minlength=6).reshape(2, 3)

    ways = [lambda p: None, right, lambda p: right(p)[:, :2], lambda p: np.zeros((3, 3), np.int64)]
    for k, counted in enumerate(ways):
        with W.StoreWriterSet(tmp_path / str(k), "GLBX.MDP3", "raw_symbol", tfs, session,
                              coalesce_rows=10_000) as ws:
            assert ws.write(BarBatch(rows[:1000], counted(rows[:1000])), names) == 0  # queued
            last = BarBatch(rows[1000:], counted(rows[1000:]))
            assert ws.write(last, names, {"ESH4": {"progress": b"{}"}}) == len(rows)
        with open_store(tmp_path / str(k)) as r:
            for s, name in enumerate(names):
                for t, tf in enumerate(tfs):
                    exp = rows[(rows["series"] == s) & (rows["timeframe"] == t)]
                    got = r.read(name, tf, dataset="GLBX.MDP3")
                    assert np.array_equal(got["ts_event"], exp["ts_event"]), (k, name, tf)
                    assert np.array_equal(got["volume"], exp["volume"]), (k, name, tf)

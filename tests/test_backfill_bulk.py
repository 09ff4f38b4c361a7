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
from streambars.records import BAR_DTYPE, TAGGED_BAR_DTYPE, RecordBatch
from streambars.store import open_store
from streambars.store import writer as W
from streambars.store.gather import scatter_rows
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

"""OHLCV records become the engine's columns in one GIL-free pass (sources/columns.py): the
same numbers as numpy's field-by-field copies, and a bad header found at the same record
with the same message as the numpy check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streambars.errors import SourceError
from streambars.records import RecordBatch, SeriesRegistry
from streambars.sources import dbnfile
from streambars.sources.columns import ohlcv_columns
from tests.fakes import NS, make_ohlcv, make_trades
from tests.test_sources_dbnfile import _md, _write

T0 = 1_704_067_200 * NS
FIELDS = ("ts_event", "open", "high", "low", "close", "volume")


def _random_records(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    recs = make_ohlcv(100, T0, n, fill=1.0)[:n]
    for k in ("open", "high", "low", "close"):
        recs[k] = rng.integers(-(2**62), 2**62, n)
    recs["volume"] = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    recs["ts_event"] = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)  # past int64 too
    return recs


@pytest.mark.parametrize("n", [1, 7, 5000])
def test_columns_are_numpys_copies(n: int) -> None:
    recs = _random_records(n, seed=n)
    bad, cols = ohlcv_columns(recs, recs.dtype.itemsize // 4, (0x20, 0x11))
    ref = RecordBatch.from_ohlcv("ohlcv-1s", np.zeros(n, np.int32), recs)
    assert bad == -1
    for name, col in zip(FIELDS, cols, strict=True):
        want = getattr(ref, name)
        assert col.dtype == want.dtype and col.flags.c_contiguous
        assert np.array_equal(col, want)


@pytest.mark.parametrize("field,value", [("rtype", 0x99), ("rtype", 0x00), ("length", 13), ("length", 0)])
def test_first_bad_header_is_the_numpy_checks(field: str, value: int) -> None:
    recs = _random_records(3000, seed=1)
    recs["rtype"][::2] = 0x11  # the deprecated OHLCV rtype is accepted too
    for at in (2999, 1234, 0):  # the first one wins
        recs[field][at] = value
        bad, _ = ohlcv_columns(recs, recs.dtype.itemsize // 4, (0x20, 0x11))
        ok = (recs["length"] == recs.dtype.itemsize // 4) & np.isin(recs["rtype"], (0x20, 0x11))
        assert bad == int(np.argmin(ok)) == at


@pytest.mark.parametrize("schema,field", [("ohlcv-1s", "rtype"), ("ohlcv-1s", "length"), ("trades", "rtype")])
def test_batches_refuse_a_bad_record_as_scan_does(tmp_path: Path, schema: str, field: str) -> None:
    recs = make_trades(100, T0, 9000) if schema == "trades" else make_ohlcv(100, T0, 9000)
    recs[field][7000] = 0x77  # in the second chunk of 4096
    p = _write(tmp_path / "bad.dbn.zst", _md(schema, ["ES.c.0"], {}), recs)
    with pytest.raises(SourceError) as by_scan:
        dbnfile.scan(p)
    got = []
    with pytest.raises(SourceError) as by_batches:
        for b in dbnfile.iter_batches(p, SeriesRegistry(), chunk_records=4096):
            got.append(len(b))
    assert "corrupt record 7000" in str(by_scan.value)
    assert str(by_batches.value) == str(by_scan.value)
    assert got == [4096]  # the chunk before the damage was handed on

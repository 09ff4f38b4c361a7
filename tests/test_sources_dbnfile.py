"""DBN files -> RecordBatch: real Databento files (v1/v2/v3), generated big files, damage."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from types import SimpleNamespace

import databento as db
import databento_dbn as dbn
import numpy as np
import pytest
import zstandard

from streambars import archive
from streambars.errors import SourceError
from streambars.records import SeriesRegistry
from streambars.sources import dbnfile
from tests.conftest import SHARED_TESTDATA
from tests.fakes import NS, make_ohlcv, make_trades

SCHEMAS = ("ohlcv-1s", "ohlcv-1m", "trades")
T0 = 1_704_067_200 * NS  # 2024-01-01


def _testdata_files(kinds: tuple[str, ...]) -> list[str]:
    if not SHARED_TESTDATA.is_dir():
        return ["<absent>"]
    out = []
    for p in sorted(SHARED_TESTDATA.rglob("*.dbn*")):
        name = p.name
        if any(f".{k}." in name for k in kinds):
            out.append(str(p.relative_to(SHARED_TESTDATA)))
    return out


@pytest.mark.parametrize("rel", _testdata_files(SCHEMAS))
def test_real_files_match_dbnstore(testdata: Path, rel: str) -> None:
    path = testdata / rel
    ref_store = db.DBNStore.from_file(path)
    ref = ref_store.to_ndarray()
    info = dbnfile.describe(path)
    assert info.version == ref_store.metadata.version
    assert info.dataset == ref_store.metadata.dataset and info.schema == str(ref_store.schema)
    assert info.symbols == tuple(ref_store.metadata.symbols)
    reg = SeriesRegistry()
    batches = list(dbnfile.iter_batches(path, reg, expected_schema=info.schema))
    assert reg.names == list(ref_store.metadata.symbols)
    got = {k: np.concatenate([getattr(b, k) for b in batches]) for k in
           ("series", "ts_event", "open", "high", "low", "close", "volume")}
    assert len(got["ts_event"]) == len(ref) > 0
    assert (got["series"] == 0).all()
    # a trade's time is its ts_recv by default (bars.trade_clock), as Databento bins its OHLCV
    clock = "ts_recv" if info.schema == "trades" else "ts_event"
    assert (got["ts_event"] == ref[clock].astype(np.int64)).all()
    if info.schema == "trades":
        for k in ("open", "high", "low", "close"):
            assert (got[k] == ref["price"]).all()
        assert (got["volume"] == ref["size"]).all()
    else:
        for k in ("open", "high", "low", "close", "volume"):
            assert (got[k] == ref[k]).all()
    # the raw structs are exactly DBNStore's (same dtype for the file's DBN version)
    raw = np.concatenate([a for _, a in dbnfile.iter_records(path)])
    assert raw.dtype == ref.dtype and (raw == ref).all()


@pytest.mark.parametrize("rel", _testdata_files(("mbo", "mbp-1", "definition", "ohlcv-1h", "ohlcv-1d", "tbbo",
                                                  "statistics", "live"))[:14])
def test_other_schemas_are_refused_naming_file_and_schema(testdata: Path, rel: str) -> None:
    path = testdata / rel
    with pytest.raises(SourceError) as e:
        list(dbnfile.iter_batches(path, SeriesRegistry()))
    assert str(path) in str(e.value)
    schema = dbnfile.describe(path).schema
    assert (schema or "several schemas") in str(e.value)


def _write(path: Path, md: dbn.Metadata, recs: np.ndarray, *, zstd: bool = True, frames: int = 1) -> Path:
    body = bytes(md) + recs.tobytes()
    if zstd:
        cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
        step = max(1, len(body) // frames + 1)
        body = b"".join(cctx.compress(body[i:i + step]) for i in range(0, len(body), step))
    path.write_bytes(body)
    return path


def _md(schema: str, symbols: list[str], mappings: dict[str, list[tuple[date, date, int]]],
        stype_in: str = "continuous") -> dbn.Metadata:
    return dbn.Metadata(
        dataset="GLBX.MDP3", start=T0, end=T0 + 40 * 86400 * NS, stype_in=dbn.SType(stype_in),
        stype_out=dbn.SType.INSTRUMENT_ID, schema=dbn.Schema(schema), symbols=symbols,
        mappings=[SimpleNamespace(raw_symbol=s, intervals=[SimpleNamespace(start_date=a, end_date=b, symbol=str(i))
                                                           for a, b, i in ivs]) for s, ivs in mappings.items()],
    )


@pytest.fixture
def multi_symbol_file(tmp_path: Path) -> Path:
    """Three symbols over 10 days, ~300k 1s bars; ES.c.0 rolls from 100 to 200 on Jan 5 and
    instrument 300 is NQ.c.0 until Jan 7, then (a symbol re-used) 'XX.c.0'."""
    a = make_ohlcv(100, T0, 100_000, seed=1)  # ~1.45 days from Jan 1
    b = make_ohlcv(200, T0 + 4 * 86400 * NS, 100_000, seed=2)  # from Jan 5
    c = make_ohlcv(300, T0 + 5 * 86400 * NS, 100_000, seed=3)  # Jan 6 .. Jan 7.4
    recs = np.concatenate([a, b, c])
    recs = recs[np.argsort(recs["ts_event"], kind="stable")]
    md = _md("ohlcv-1s", ["ES.c.0", "NQ.c.0", "XX.c.0"], {
        "ES.c.0": [(date(2024, 1, 1), date(2024, 1, 5), 100), (date(2024, 1, 5), date(2024, 1, 11), 200)],
        "NQ.c.0": [(date(2024, 1, 1), date(2024, 1, 7), 300)],
        "XX.c.0": [(date(2024, 1, 7), date(2024, 1, 11), 300)],
    })
    return _write(tmp_path / "multi.ohlcv-1s.dbn.zst", md, recs, frames=7)


def test_multi_symbol_file_maps_by_time_like_the_databento_client(multi_symbol_file: Path) -> None:
    reg = SeriesRegistry()
    batches = list(dbnfile.iter_batches(multi_symbol_file, reg, chunk_records=50_000))
    assert all(len(b) <= 50_000 for b in batches) and len(batches) == 6
    names = np.array(reg.names)[np.concatenate([b.series for b in batches])]
    df = db.DBNStore.from_file(multi_symbol_file).to_df(map_symbols=True)
    assert len(df) == len(names) > 290_000
    assert (df["symbol"].to_numpy() == names).all()
    assert set(reg.names) == {"ES.c.0", "NQ.c.0", "XX.c.0"}


def test_batch_size_does_not_change_the_result(multi_symbol_file: Path) -> None:
    def run(n: int) -> dict[str, np.ndarray]:
        bs = list(dbnfile.iter_batches(multi_symbol_file, SeriesRegistry(), chunk_records=n))
        return {k: np.concatenate([getattr(b, k) for b in bs]) for k in ("series", "ts_event", "close", "volume")}

    a, b = run(65_536), run(777)
    assert all((a[k] == b[k]).all() for k in a)


def test_symbol_argument_puts_a_rolling_contract_in_one_series(multi_symbol_file: Path) -> None:
    reg = SeriesRegistry(["other"])
    bs = list(dbnfile.iter_batches(multi_symbol_file, reg, symbol="ES.c.0"))
    assert reg.names == ["other", "ES.c.0"]
    assert all((b.series == 1).all() for b in bs)


def test_unknown_instrument_in_a_multi_symbol_file_is_an_error(tmp_path: Path) -> None:
    recs = np.concatenate([make_ohlcv(100, T0, 1000, seed=1), make_ohlcv(999, T0, 10, seed=2)])
    md = _md("ohlcv-1s", ["A", "B"], {"A": [(date(2024, 1, 1), date(2024, 1, 2), 100)],
                                     "B": [(date(2024, 1, 1), date(2024, 1, 2), 101)]}, "raw_symbol")
    p = _write(tmp_path / "x.dbn.zst", md, recs)
    with pytest.raises(SourceError, match="instrument_id 999"):
        list(dbnfile.iter_batches(p, SeriesRegistry()))


def test_parent_files_name_series_by_raw_symbol(tmp_path: Path) -> None:
    recs = np.concatenate([make_trades(100, T0, 20_000, seed=1), make_trades(200, T0, 20_000, seed=2)])
    recs = recs[np.argsort(recs["ts_recv"], kind="stable")]
    md = _md("trades", ["ES.FUT"], {"ES.FUT": [(date(2024, 1, 1), date(2024, 1, 3), 100),
                                               (date(2024, 1, 1), date(2024, 1, 3), 200)]}, "parent")
    dest = archive.path(tmp_path, "GLBX.MDP3", "ES.FUT", "2024-01")
    dest.parent.mkdir(parents=True)
    p = _write(dest, md, recs)
    reg = SeriesRegistry()
    iid = np.concatenate([a["instrument_id"] for _, a in dbnfile.iter_records(p)])
    series = np.concatenate([b.series for b in dbnfile.iter_batches(p, reg)])
    assert sorted(reg.names) == ["100", "200"]  # no sidecar: named by instrument_id
    archive.write_symbols(p, {100: "ESH4", 200: "ESM4"})
    reg = SeriesRegistry()
    series = np.concatenate([b.series for b in dbnfile.iter_batches(p, reg)])
    names = np.array(reg.names)[series]
    assert (names[iid == 100] == "ESH4").all() and (names[iid == 200] == "ESM4").all()
    assert dbnfile.describe(p).symbols == ("ESH4", "ESM4")
    reg = SeriesRegistry()
    list(dbnfile.iter_batches(p, reg, instrument_symbols={100: "A", 200: "B"}))
    assert sorted(reg.names) == ["A", "B"]


def test_plain_dbn_and_describe(tmp_path: Path) -> None:
    recs = make_ohlcv(100, T0, 5000, schema="ohlcv-1m", seed=4)
    p = _write(tmp_path / "plain.dbn", _md("ohlcv-1m", ["ES.c.0"], {}), recs, zstd=False)
    info = dbnfile.describe(p)
    assert (info.schema, info.version, info.compressed, info.symbols) == ("ohlcv-1m", 3, False, ("ES.c.0",))
    assert info.start_ns == T0 and info.end_ns == T0 + 40 * 86400 * NS
    assert dbnfile.scan(p).records == 5000
    bs = list(dbnfile.iter_batches(p, SeriesRegistry(), expected_schema="ohlcv-1m"))
    assert sum(len(b) for b in bs) == 5000 and bs[0].kind == "ohlcv-1m"
    with pytest.raises(SourceError, match="ohlcv-1s was asked for"):
        list(dbnfile.iter_batches(p, SeriesRegistry(), expected_schema="ohlcv-1s"))


def test_empty_file_of_a_valid_schema_has_no_batches(tmp_path: Path) -> None:
    p = _write(tmp_path / "empty.dbn.zst", _md("ohlcv-1s", ["ES.c.0"], {}), make_ohlcv(1, T0, 0))
    assert list(dbnfile.iter_batches(p, SeriesRegistry())) == []
    assert dbnfile.scan(p).records == 0


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    recs = make_ohlcv(100, T0, 200_000, seed=9)
    return _write(tmp_path / "big.dbn.zst", _md("ohlcv-1s", ["ES.c.0"], {}), recs, frames=3), recs


def test_truncated_zstd_is_an_error_naming_the_file(tmp_path: Path, big_file: tuple[Path, np.ndarray]) -> None:
    p, recs = big_file
    data = p.read_bytes()
    cut = tmp_path / "cut.dbn.zst"
    cut.write_bytes(data[: len(data) - 1000])
    # DBNStore reads a cut zstd stream as a shorter file without a word; dbnfile refuses it
    assert len(db.DBNStore.from_file(cut).to_ndarray()) < len(recs)
    with pytest.raises(SourceError, match=r"cut.dbn.zst.*truncated"):
        dbnfile.scan(cut)
    # records before the damage were handed on before the error (documented behaviour)
    seen = 0
    with pytest.raises(SourceError):
        for b in dbnfile.iter_batches(cut, SeriesRegistry(), chunk_records=10_000):
            seen += len(b)
    assert 0 < seen < len(recs)


def test_record_cut_in_half_is_an_error(tmp_path: Path) -> None:
    recs = make_trades(100, T0, 3000)
    body = bytes(_md("trades", ["ES.c.0"], {})) + recs.tobytes()
    p = tmp_path / "half.dbn"
    p.write_bytes(body[:-20])
    with pytest.raises(SourceError, match="record 2999 is cut off"):
        dbnfile.scan(p)


def test_garbage_record_is_an_error_with_its_number(tmp_path: Path) -> None:
    recs = make_ohlcv(100, T0, 3000)
    recs["rtype"][1234] = 0x99
    p = _write(tmp_path / "bad.dbn.zst", _md("ohlcv-1s", ["ES.c.0"], {}), recs)
    with pytest.raises(SourceError, match="corrupt record 1234"):
        dbnfile.scan(p)


def test_corrupt_zstd_and_non_dbn_files(tmp_path: Path, big_file: tuple[Path, np.ndarray]) -> None:
    p, _ = big_file
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    bad = tmp_path / "flipped.dbn.zst"
    bad.write_bytes(bytes(b))
    with pytest.raises(SourceError, match="flipped.dbn.zst"):
        dbnfile.scan(bad)
    junk = tmp_path / "junk.dbn"
    junk.write_bytes(b"hello world, not DBN at all")
    with pytest.raises(SourceError, match="junk.dbn"):
        dbnfile.describe(junk)
    with pytest.raises(SourceError, match="no such file"):
        dbnfile.describe(tmp_path / "missing.dbn")
    header_only = tmp_path / "header.dbn"
    header_only.write_bytes(bytes(_md("ohlcv-1s", ["ES.c.0"], {}))[:30])
    with pytest.raises(SourceError, match="Metadata"):
        dbnfile.describe(header_only)

"""HistoricalSource: the real databento.Historical client against the fake HTTPS gateway."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import databento as db
import numpy as np
import pytest

from streambars import archive
from streambars.errors import AuthenticationError, SourceError
from streambars.records import SeriesRegistry
from streambars.sources import dbnfile
from streambars.sources.historical import DownloadError, HistoricalSource, UnknownSymbolError
from tests.fakes import NS, api_key, fake_historical, make_ohlcv, make_trades  # noqa: F401
from tests.fakes.historical import FakeHistorical

DS = "GLBX.MDP3"
JAN, FEB, MAR, APR = (datetime(2024, m, 1, tzinfo=UTC) for m in (1, 2, 3, 4))


def _ns(d: datetime) -> int:
    return int(d.timestamp()) * NS


@pytest.fixture
def hist(fake_historical: FakeHistorical) -> FakeHistorical:  # noqa: F811
    """ES.c.0 rolls from ESH4 (100) to ESM4 (200) on 2024-01-15; NQH4 (300) is a raw symbol;
    ~7 weeks of 1s bars for each instrument from 2024-01-01 (none in March), trades too."""
    f = fake_historical
    f.add_instrument(DS, 100, "ESH4", date(2023, 12, 1), date(2024, 3, 16), parent="ES.FUT")
    f.add_instrument(DS, 200, "ESM4", date(2024, 1, 1), date(2024, 6, 21), parent="ES.FUT")
    f.add_instrument(DS, 300, "NQH4", date(2023, 12, 1), date(2024, 3, 16), parent="NQ.FUT")
    f.add_continuous(DS, "ES.c.0", [(date(2023, 12, 1), date(2024, 1, 15), 100),
                                    (date(2024, 1, 15), date(2024, 6, 21), 200)])
    for iid, seed in ((100, 1), (200, 2), (300, 3)):
        f.add_records(DS, "ohlcv-1s", make_ohlcv(iid, _ns(JAN), 60_000, seed=seed, fill=0.015))
    f.add_records(DS, "trades", make_trades(300, _ns(JAN), 50_000, seed=4, mean_gap_ns=60 * NS))
    return f


@pytest.fixture
def src(hist: FakeHistorical, api_key: str) -> HistoricalSource:  # noqa: F811
    return HistoricalSource(api_key, gateway=hist.url, retries=3, backoff_min=0.001, backoff_max=0.01)


def _expected(f: FakeHistorical, schema: str, stype: str, symbol: str, a: datetime, b: datetime) -> np.ndarray:
    ivs = f.resolve(DS, stype, symbol, _ns(a), _ns(b))
    return f._select(DS, schema, ivs, _ns(a), _ns(b))


def test_cost(src: HistoricalSource, hist: FakeHistorical) -> None:
    n = len(_expected(hist, "ohlcv-1s", "continuous", "ES.c.0", JAN, MAR))
    cost = src.get_cost(DS, ["ES.c.0"], "ohlcv-1s", "continuous", JAN, MAR)
    assert cost == pytest.approx(n * hist.cost_per_record) and cost > 0
    both = src.get_cost(DS, ["ES.c.0", "NQH4"], "ohlcv-1s", "raw_symbol", JAN, MAR)
    assert both == pytest.approx(len(_expected(hist, "ohlcv-1s", "raw_symbol", "NQH4", JAN, MAR))
                                 * hist.cost_per_record)  # ES.c.0 is not a raw symbol: ignored (206)
    with pytest.raises(UnknownSymbolError, match="NOPE"):
        src.get_cost(DS, ["NOPE"], "ohlcv-1s", "raw_symbol", JAN, MAR)


def test_months_of_a_rolling_continuous_contract(src: HistoricalSource, hist: FakeHistorical, tmp_path: Path) -> None:
    total = 0
    for a, b in ((JAN, FEB), (FEB, MAR)):
        dest = archive.path(tmp_path, DS, "ES.c.0", a)
        res = src.download_month(DS, "ES.c.0", "ohlcv-1s", "continuous", a, b, dest)
        want = _expected(hist, "ohlcv-1s", "continuous", "ES.c.0", a, b)
        assert res.records == len(want) > 1000 and res.attempts == 1 and dest.is_file()
        store = db.DBNStore.from_file(dest)  # the archive holds the response as received
        assert (store.to_ndarray() == want).all()
        assert store.metadata.stype_in == db.SType.CONTINUOUS and store.metadata.symbols == ["ES.c.0"]
        reg = SeriesRegistry()
        batches = list(dbnfile.iter_batches(dest, reg, expected_schema="ohlcv-1s", symbol="ES.c.0"))
        assert reg.names == ["ES.c.0"] and sum(len(x) for x in batches) == len(want)
        total += len(want)
    jan = db.DBNStore.from_file(archive.path(tmp_path, DS, "ES.c.0", JAN))
    iids = [iv["symbol"] for iv in jan.metadata.mappings["ES.c.0"]]
    assert iids == ["100", "200"]  # the roll, as the symbology in the response says
    assert set(np.unique(jan.to_ndarray()["instrument_id"]).tolist()) == {100, 200}
    assert hist.count("ES.c.0", "2024-01") == 1 and hist.count("ES.c.0", "2024-02") == 1
    assert hist.count() == 2 and total > 0


def test_server_errors_are_retried_with_backoff(src: HistoricalSource, hist: FakeHistorical, tmp_path: Path) -> None:
    sleeps: list[float] = []
    src._sleep = sleeps.append
    hist.fail_next(2, 503)
    dest = archive.path(tmp_path, DS, "NQH4", JAN)
    res = src.download_month(DS, "NQH4", "ohlcv-1s", "raw_symbol", JAN, FEB, dest)
    assert res.attempts == 3 and hist.count("NQH4", "2024-01") == 3
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.9  # exponential, jittered
    assert res.records == len(_expected(hist, "ohlcv-1s", "raw_symbol", "NQH4", JAN, FEB))


def test_server_errors_that_never_stop(src: HistoricalSource, hist: FakeHistorical, tmp_path: Path) -> None:
    hist.fail_next(10, 500)
    dest = archive.path(tmp_path, DS, "NQH4", JAN)
    with pytest.raises(DownloadError, match=r"NQH4.*4 tries.*500") as e:
        src.download_month(DS, "NQH4", "ohlcv-1s", "raw_symbol", JAN, FEB, dest)
    assert isinstance(e.value, SourceError)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no temp file either
    assert hist.count("NQH4") == 4


@pytest.mark.parametrize("mode", ["truncate", "garbage", "disconnect"])
def test_corrupt_body_is_retried_and_never_archived(src: HistoricalSource, hist: FakeHistorical, tmp_path: Path,
                                                     mode: str) -> None:
    dest = archive.path(tmp_path, DS, "NQH4", JAN)
    hist.corrupt_next(1, mode)
    res = src.download_month(DS, "NQH4", "ohlcv-1s", "raw_symbol", JAN, FEB, dest)
    assert res.attempts == 2
    assert (db.DBNStore.from_file(dest).to_ndarray() == _expected(hist, "ohlcv-1s", "raw_symbol", "NQH4", JAN, FEB)).all()
    hist.corrupt_next(10, mode)
    dest2 = archive.path(tmp_path, DS, "NQH4", FEB)
    with pytest.raises(DownloadError, match="NQH4"):
        src.download_month(DS, "NQH4", "ohlcv-1s", "raw_symbol", FEB, MAR, dest2)
    assert not dest2.exists() and sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_wrong_key_fails_at_once(hist: FakeHistorical, tmp_path: Path) -> None:
    bad = "db-" + "W" * 29
    src = HistoricalSource(bad, gateway=hist.url, retries=5, backoff_min=0.001)
    with pytest.raises(AuthenticationError, match="401") as e:
        src.download_month(DS, "NQH4", "ohlcv-1s", "raw_symbol", JAN, FEB, archive.path(tmp_path, DS, "NQH4", JAN))
    assert bad not in str(e.value) and "WWWW" not in str(e.value)
    with pytest.raises(AuthenticationError):
        src.get_cost(DS, ["NQH4"], "ohlcv-1s", "raw_symbol", JAN, FEB)
    assert len(hist.requests) == 2  # one request each: no retry


def test_unknown_symbol_names_it(src: HistoricalSource, hist: FakeHistorical, tmp_path: Path) -> None:
    dest = archive.path(tmp_path, DS, "ZZZ9", JAN)
    with pytest.raises(UnknownSymbolError, match="ZZZ9") as e:
        src.download_month(DS, "ZZZ9", "ohlcv-1s", "raw_symbol", JAN, FEB, dest)
    assert e.value.symbols == ("ZZZ9",) and not dest.exists()
    assert hist.count("ZZZ9") == 1
    found, missing = src.resolve_symbols(DS, ["ES.c.0", "ZZZ9"], "continuous", JAN, APR)
    assert missing == ["ZZZ9"] and [r["s"] for r in found["ES.c.0"]] == ["100", "200"]
    assert src.resolve_symbols(DS, ["ZZZ9"], "raw_symbol", JAN, APR) == ({}, ["ZZZ9"])


def test_empty_month_is_an_empty_archive_file(src: HistoricalSource, tmp_path: Path) -> None:
    dest = archive.path(tmp_path, DS, "ES.c.0", MAR)
    res = src.download_month(DS, "ES.c.0", "ohlcv-1s", "continuous", MAR, APR, dest)
    assert res.records == 0 and dest.is_file()
    assert list(dbnfile.iter_batches(dest, SeriesRegistry())) == []
    assert dbnfile.describe(dest).symbols == ("ES.c.0",)


def test_parent_month_writes_raw_symbols_sidecar(src: HistoricalSource, hist: FakeHistorical, tmp_path: Path) -> None:
    dest = archive.path(tmp_path, DS, "ES.FUT", JAN)
    res = src.download_month(DS, "ES.FUT", "ohlcv-1s", "parent", JAN, FEB, dest)
    assert archive.read_symbols(dest) == {100: "ESH4", 200: "ESM4"}
    reg = SeriesRegistry()
    batches = list(dbnfile.iter_batches(dest, reg, symbol="ES.FUT"))
    assert sorted(reg.names) == ["ESH4", "ESM4"] and sum(len(b) for b in batches) == res.records
    assert hist.endpoint_count("/v0/symbology.resolve") == 1


def test_trades_partial_month_and_redownload(src: HistoricalSource, hist: FakeHistorical, tmp_path: Path) -> None:
    a, b = datetime(2024, 1, 10, tzinfo=UTC), datetime(2024, 1, 20, tzinfo=UTC)
    dest = archive.path(tmp_path, DS, "NQH4", "2024-01", "2024-01-10/2024-01-20")
    res = src.download_month(DS, "NQH4", "trades", "raw_symbol", a, b, dest)
    want = _expected(hist, "trades", "raw_symbol", "NQH4", a, b)
    assert res.records == len(want) > 100
    got = np.concatenate([x.ts_event for x in dbnfile.iter_batches(dest, SeriesRegistry(), expected_schema="trades")])
    assert (got == want["ts_recv"].astype(np.int64)).all()  # the trade clock (bars.trade_clock)
    inode = dest.stat().st_ino
    src.download_month(DS, "NQH4", "trades", "raw_symbol", a, b, dest)  # --force: replaced atomically
    assert dest.stat().st_ino != inode and dbnfile.scan(dest).records == len(want)


def test_plain_http_gateway(api_key: str, tmp_path: Path) -> None:  # noqa: F811
    with FakeHistorical(api_key, tls=False) as f:
        f.add_instrument(DS, 300, "NQH4", date(2024, 1, 1), date(2024, 3, 1))
        f.add_records(DS, "ohlcv-1s", make_ohlcv(300, _ns(JAN), 5000, seed=3))
        src = HistoricalSource(api_key, gateway=f.url)
        assert f.url.startswith("http://")
        res = src.download_month(DS, "NQH4", "ohlcv-1s", "raw_symbol", JAN, FEB, tmp_path / "x.dbn.zst")
        assert res.records == len(make_ohlcv(300, _ns(JAN), 5000, seed=3))


def test_slow_gateway_times_out_and_is_retried(hist: FakeHistorical, api_key: str, tmp_path: Path) -> None:  # noqa: F811
    src = HistoricalSource(api_key, gateway=hist.url, retries=1, backoff_min=0.001, timeout=0.2)
    hist.latency = 0.5
    with pytest.raises(DownloadError, match="network"):
        src.get_cost(DS, ["NQH4"], "ohlcv-1s", "raw_symbol", JAN, FEB)
    hist.latency = 0.05
    assert src.get_cost(DS, ["NQH4"], "ohlcv-1s", "raw_symbol", JAN, FEB) > 0


def test_a_local_disk_error_under_a_download_is_told_apart_from_the_network():
    import errno

    import requests
    from databento.common.error import BentoError

    from streambars.sources.historical import _local_write_error

    # What the client raises when write() fails under it (the OSError is not kept as cause).
    full = BentoError("Error streaming response: [Errno 28] No space left on device")
    assert _local_write_error(full) == "No space left on device (errno 28)"
    assert _local_write_error(OSError(errno.EFBIG, "File too large")) == "File too large (errno 27)"
    # The network failing mid-body is retried, not reported as a disk problem.
    reset = BentoError("Error streaming response: ('Connection broken: ConnectionResetError(104, "
                       "'Connection reset by peer')', ConnectionResetError(104, ...))")
    assert _local_write_error(reset) is None
    assert _local_write_error(requests.ConnectionError("refused")) is None
    assert _local_write_error(BentoError("Error streaming response: [Errno 104] Connection reset")) is None

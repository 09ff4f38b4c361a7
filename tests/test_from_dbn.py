"""`backfill --from-dbn` on every real ohlcv-1s, ohlcv-1m and trades file in shared/testdata
(DBN v1, v2 and v3), compared with the engine run directly on the decoded records."""

from __future__ import annotations

from pathlib import Path

import databento as db
import numpy as np
import pytest

from streambars.cli import main
from streambars.engine import Aggregator
from streambars.records import RecordBatch
from streambars.store import open_store
from streambars.timeframes import Session, parse_timeframes

from .conftest import SHARED_TESTDATA

FILES = sorted(
    p for pattern in ("*/test_data.ohlcv-1s*.dbn.zst", "*/test_data.ohlcv-1m*.dbn.zst", "*/test_data.trades*.dbn.zst")
    for p in SHARED_TESTDATA.glob(pattern)
) if SHARED_TESTDATA.is_dir() else []
SESSION = "17:00 America/Chicago"


def _timeframes(schema: str) -> list[str]:
    return ["1min", "5min", "1h", "1d"] if schema == "ohlcv-1m" else ["1s", "5s", "1min", "1h", "1d"]


@pytest.mark.skipif(not FILES, reason="shared/testdata not present")
@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_from_dbn_matches_engine(path: Path, tmp_path):
    store = db.DBNStore.from_file(path)
    schema = str(store.schema)
    records = store.to_ndarray()
    tfs = _timeframes(schema)
    args = ["backfill", "--store", str(tmp_path), "--from-dbn", str(path), "--timeframes", ",".join(tfs),
            "--session", SESSION, "--log-format", "json"]
    assert main(args) == 0

    # Reference: the engine alone, one series per symbol from the file's own mappings.
    id_to_symbol = {}
    for raw, intervals in store.mappings.items():
        for iv in intervals:
            id_to_symbol[int(iv["symbol"])] = raw
    symbols = sorted(set(id_to_symbol.values()))
    series = np.array([symbols.index(id_to_symbol[int(i)]) for i in records["instrument_id"]], np.int32)
    agg = Aggregator(parse_timeframes(tfs), input_kind=schema, session=Session.parse(SESSION))
    batch = (RecordBatch.from_trades(series, records) if schema == "trades"
             else RecordBatch.from_ohlcv(schema, series, records))
    end = int(store.metadata.end) if store.metadata.end else None
    bars = np.concatenate([agg.process(batch).bars, (agg.flush(end) if end else agg.finish()).bars])
    assert len(bars) > 0

    with open_store(tmp_path) as reader:
        for s, symbol in enumerate(symbols):
            for k, tf in enumerate(agg.timeframes):
                exp = bars[(bars["series"] == s) & (bars["timeframe"] == k)]
                got = reader.read(symbol, tf.name, dataset=store.dataset)
                for field in ("ts_event", "open", "high", "low", "close", "volume", "count"):
                    np.testing.assert_array_equal(got[field], exp[field], err_msg=f"{symbol} {tf} {field}")
        before = {tf.name: reader.read(symbols[0], tf.name, dataset=store.dataset) for tf in agg.timeframes}

    # Ingesting the same file again changes nothing.
    assert main(args) == 0
    with open_store(tmp_path) as again:
        for tf, rows in before.items():
            np.testing.assert_array_equal(again.read(symbols[0], tf, dataset=store.dataset), rows)


def test_mixed_schema_file_is_refused(tmp_path, capsys, testdata):
    live = testdata / "LIVE" / "test_data.live.dbn.zst"
    assert main(["backfill", "--store", str(tmp_path), "--from-dbn", str(live)]) in (1, 2)
    err = capsys.readouterr().err
    assert "test_data.live.dbn.zst" in err or "schema" in err


def test_ohlcv_1m_with_second_timeframes_is_a_clear_error(tmp_path, capsys, testdata):
    path = testdata / "GLBX.MDP3" / "test_data.ohlcv-1m.dbn.zst"
    assert main(["backfill", "--store", str(tmp_path), "--from-dbn", str(path), "--timeframes", "1s,1min"]) == 2
    assert "ohlcv-1m" in capsys.readouterr().err


def test_fail_policy_stops_naming_rule_symbol_and_time_and_keeps_earlier_bars(tmp_path, capsys):
    from datetime import UTC, datetime

    from streambars.synthetic import es_like_1s_bars, write_dbn

    start = int(datetime(2024, 3, 4, tzinfo=UTC).timestamp()) * 10**9
    records = es_like_1s_bars(start, 1, seed=3, instrument_id=7)
    bad = len(records) // 2
    records["high"][bad] = records["low"][bad] - 250_000_000  # high below low
    path = write_dbn(tmp_path / "bad.dbn.zst", records, symbols={"ESM4": 7})
    rc = main(["backfill", "--store", str(tmp_path / "store"), "--from-dbn", str(path),
               "--timeframes", "1s,1min", "--set", 'validation.rules={ohlc_relation="fail"}'])
    assert rc == 1
    err = capsys.readouterr().err
    assert "ohlc_relation" in err and "ESM4" in err and str(int(records["ts_event"][bad])) in err
    with open_store(tmp_path / "store") as reader:
        got = reader.read("ESM4", "1s")
    # Every bar closed before the bad record is stored; nothing at or after it.
    assert len(got) > 0 and got["ts_event"][-1] < records["ts_event"][bad]
    np.testing.assert_array_equal(got["ts_event"], records["ts_event"][: len(got)].astype(np.int64))

"""`streambars backfill` end to end: the real databento client against the fake Historical
gateway, the real engine, real HDF5 files; compared with the engine run directly on the
same records."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest

from streambars.cli import main
from streambars.engine import Aggregator
from streambars.records import RecordBatch
from streambars.store import open_store
from streambars.timeframes import Session, parse_timeframes

from .fakes import TEST_KEY, make_ohlcv

REPO = Path(__file__).resolve().parents[1]
DATASET = "GLBX.MDP3"
TIMEFRAMES = ["1s", "15s", "1min", "5min", "1h", "4h", "1d"]
SESSION = "17:00 America/Chicago"
START, END = "2024-01-10", "2024-03-20"
ROLL = date(2024, 2, 15)
NS = 1_000_000_000


def _ns(d: str | date) -> int:
    d = date.fromisoformat(d) if isinstance(d, str) else d
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()) * NS


def _records(instrument_id: int, seed: int, days: list[date]) -> np.ndarray:
    """Two hours a weekday across the 22:00/23:00 UTC session boundary: realistic gaps,
    ~30% empty seconds, thousands of rows per day."""
    parts = [
        make_ohlcv(instrument_id, _ns(d) + 21 * 3600 * NS + 1800 * NS, 5000, seed=seed + i, fill=0.7)
        for i, d in enumerate(days)
    ]
    return np.concatenate(parts)


def _weekdays(a: str, b: str) -> list[date]:
    out, d = [], date.fromisoformat(a)
    while d < date.fromisoformat(b):
        if d.weekday() < 5:
            out.append(d)
        d = date.fromordinal(d.toordinal() + 1)
    return out


@pytest.fixture
def market(fake_historical):
    return build_market(fake_historical)


def build_market(fake):
    """ES.c.0 rolls from instrument 101 to 102 on 2024-02-15; NQ.c.0 is 201 throughout."""
    days = _weekdays("2024-01-02", "2024-03-29")
    es_days_a = [d for d in days if d < ROLL]
    es_days_b = [d for d in days if d >= ROLL]
    far = date(2024, 6, 1)
    fake.add_instrument(DATASET, 101, "ESH4", date(2023, 12, 1), far)
    fake.add_instrument(DATASET, 102, "ESM4", date(2023, 12, 1), far)
    fake.add_instrument(DATASET, 201, "NQH4", date(2023, 12, 1), far)
    fake.add_continuous(DATASET, "ES.c.0", [(date(2023, 12, 1), ROLL, 101), (ROLL, far, 102)])
    fake.add_continuous(DATASET, "NQ.c.0", [(date(2023, 12, 1), far, 201)])
    es = np.concatenate([_records(101, 1000, es_days_a), _records(102, 2000, es_days_b)])
    nq = _records(201, 3000, days)
    # The retired contract keeps trading after the roll: the continuous symbol must not see it.
    es_old_tail = _records(101, 4000, es_days_b[:3])
    fake.add_records(DATASET, "ohlcv-1s", np.concatenate([es, nq, es_old_tail]))
    fake.expected = {"ES.c.0": es, "NQ.c.0": nq}
    return fake


def _args(store: Path, fake, *extra: str) -> list[str]:
    return [
        "backfill", "--store", str(store), "--dataset", DATASET, "--schema", "ohlcv-1s",
        "--stype-in", "continuous", "--symbols", "ES.c.0,NQ.c.0", "--start", START, "--end", END,
        "--timeframes", ",".join(TIMEFRAMES), "--session", SESSION,
        "--historical-gateway", fake.url, "--env-file", "/nonexistent", "--log-format", "json",
        *extra,
    ]


def _expected_bars(records: np.ndarray, until: int) -> dict[str, np.ndarray]:
    """The engine alone on the same records (in range), flushed at the range end."""
    sel = records[(records["ts_event"] >= _ns(START)) & (records["ts_event"] < _ns(END))]
    sel = sel[np.argsort(sel["ts_event"], kind="stable")]
    agg = Aggregator(parse_timeframes(TIMEFRAMES), input_kind="ohlcv-1s", session=Session.parse(SESSION))
    batch = RecordBatch.from_ohlcv("ohlcv-1s", np.zeros(len(sel), np.int32), sel)
    bars = np.concatenate([agg.process(batch).bars, agg.flush(until).bars])
    return {tf.name: bars[bars["timeframe"] == k] for k, tf in enumerate(agg.timeframes)}


def _assert_store_matches(store: Path, fake) -> None:
    with open_store(store) as reader:
        _assert_reader_matches(reader, fake)


def _assert_reader_matches(reader, fake) -> None:
    for symbol, records in fake.expected.items():
        expected = _expected_bars(records, _ns(END))
        for tf, exp in expected.items():
            got = reader.read(symbol, tf, dataset=DATASET)
            assert len(got) == len(exp), (symbol, tf)
            for field in ("ts_event", "open", "high", "low", "close", "volume", "count"):
                np.testing.assert_array_equal(got[field], exp[field], err_msg=f"{symbol} {tf} {field}")


def _snapshot(store: Path) -> dict[tuple[str, str], np.ndarray]:
    with open_store(store) as reader:
        return {(s, tf): reader.read(s, tf, dataset=DATASET) for s in ("ES.c.0", "NQ.c.0") for tf in TIMEFRAMES}


def test_multi_month_backfill_equals_engine_and_rerun_pays_nothing(market, tmp_path, api_key, monkeypatch, capsys):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    store = tmp_path / "store"
    assert main(_args(store, market, "--yes")) == 0
    out = capsys.readouterr().out
    assert "cost of the download" in out and "6 to download" in out
    _assert_store_matches(store, market)
    # Every month archived once, as received.
    for sym in ("ES.c.0", "NQ.c.0"):
        for month in ("2024-01", "2024-02", "2024-03"):
            assert market.count(sym, month) == 1
    raw = sorted(p.name for p in (store / DATASET / "raw").rglob("*.dbn.zst"))
    assert len(raw) == 6
    before = _snapshot(store)

    # A rerun: nothing requested (not even the cost), nothing rewritten.
    requests = len(market.requests)
    assert main(_args(store, market)) == 0
    out = capsys.readouterr().out
    assert "6 already in the store" in out
    assert len(market.requests) == requests
    after = _snapshot(store)
    for key, rows in before.items():
        np.testing.assert_array_equal(after[key], rows)


def test_rerun_from_archive_without_databento(market, tmp_path, api_key, monkeypatch, capsys):
    """Store deleted, archive kept: re-aggregated from the archive with no API key at all."""
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    store = tmp_path / "store"
    assert main(_args(store, market, "--yes")) == 0
    for h5 in (store / DATASET).glob("*.h5"):
        h5.unlink()
    monkeypatch.delenv("DATABENTO_API_KEY")
    requests = len(market.requests)
    assert main(_args(store, market)) == 0
    assert "6 from the raw archive, 0 to download" in capsys.readouterr().out
    assert len(market.requests) == requests
    _assert_store_matches(store, market)


def _spawn(args: list[str], fake) -> subprocess.Popen:
    env = {**os.environ, **fake.env, "DATABENTO_API_KEY": TEST_KEY}
    return subprocess.Popen(
        [sys.executable, "-m", "streambars", *args], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_backfill_resumes_to_the_same_store(market, tmp_path, api_key, sig):
    """Killed (or told to stop) after at least one month is archived and aggregated: the
    rerun requests only what was not archived and ends with the uninterrupted store."""
    store = tmp_path / "store"
    market.latency = 0.4  # slow downloads so the stop lands mid-run
    proc = _spawn(_args(store, market, "--yes"), market)
    deadline = time.monotonic() + 120
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if '"month done"' in line or proc.poll() is not None:
            break
    assert '"month done"' in seen, seen[-2000:]
    time.sleep(0.2)
    proc.send_signal(sig)
    rc = proc.wait(60)
    proc.stdout.close()
    proc.stderr.close()
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
    else:
        assert rc == 130, rc
    time.sleep(1.0)  # a request in flight at the stop is counted by the fake after its latency
    counts = {(s, m): market.count(s, m) for s in ("ES.c.0", "NQ.c.0") for m in ("2024-01", "2024-02", "2024-03")}
    assert any(counts.values()) and not all(counts.values()), counts
    archived = {p.stem.split(".")[0][:7] + "/" + p.parent.name for p in (store / DATASET / "raw").rglob("*.dbn.zst")}

    market.latency = 0.0
    proc = _spawn(_args(store, market, "--yes"), market)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    for (s, m), n in counts.items():
        # Months that were archived before the stop are never requested again.
        from streambars.naming import symbol_to_filename

        if f"{m}/{symbol_to_filename(s)}" in archived:
            assert market.count(s, m) == n, (s, m)
        else:
            assert market.count(s, m) == n + 1, (s, m)
    _assert_store_matches(store, market)


def test_cost_above_limit_stops_before_downloading(market, tmp_path, api_key, monkeypatch, capsys):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    market.cost_per_record = 1.0
    store = tmp_path / "store"
    assert main(_args(store, market, "--max-cost", "5")) == 1
    err = capsys.readouterr().err
    assert "above databento.max_cost" in err and "--yes" in err
    assert market.count() == 0
    assert main(_args(store, market, "--max-cost", "5", "--dry-run")) == 0
    assert market.count() == 0
    assert "cost of the download" in capsys.readouterr().out


def test_wrong_key_exits_at_once_and_store_untouched(market, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABENTO_API_KEY", "db-WrongKey0123456789abcdefghijk")
    store = tmp_path / "store"
    t0 = time.monotonic()
    assert main(_args(store, market, "--yes")) == 2  # the user must fix the key: like bad config
    err = capsys.readouterr().err
    assert "auth" in err.lower()
    assert "WrongKey" not in err
    assert time.monotonic() - t0 < 30  # no retry loop on a refused key
    assert not list((store / DATASET).rglob("*.dbn.zst")) if (store / DATASET).exists() else True


def test_missing_key_is_a_clear_usage_error(market, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DATABENTO_API_KEY", raising=False)
    assert main(_args(tmp_path / "store", market)) == 2
    assert "DATABENTO_API_KEY" in capsys.readouterr().err


def test_unknown_symbol_names_it(market, tmp_path, api_key, monkeypatch, capsys):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    args = _args(tmp_path / "store", market, "--yes")
    args[args.index("ES.c.0,NQ.c.0")] = "XX.c.0"
    assert main(args) == 2  # bad input: the user fixes the symbol
    assert "XX.c.0" in capsys.readouterr().err


def test_server_errors_are_retried_and_corrupt_body_redownloaded(market, tmp_path, api_key, monkeypatch):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    store = tmp_path / "store"
    market.fail_next(2, 503)
    assert main(_args(store, market, "--yes", "--symbols", "NQ.c.0")) == 0
    market.corrupt_next(1, "truncate")
    assert main(_args(store, market, "--yes", "--symbols", "ES.c.0")) == 0
    assert market.count("ES.c.0", "2024-01") == 2  # the truncated body was requested again
    _assert_store_matches(store, market)


def test_empty_month_is_fine(market, tmp_path, api_key, monkeypatch, capsys):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    store = tmp_path / "store"
    args = _args(store, market, "--yes")
    args[args.index(START)] = "2024-04-01"
    args[args.index(END)] = "2024-05-01"
    assert main(args) == 0
    assert "0 bars written" in capsys.readouterr().out
    assert main(args) == 0  # and it counts as done
    assert market.count(month="2024-04") == 2


def test_corrupt_dbn_file_is_refused_by_name(tmp_path, capsys, testdata):
    bad = tmp_path / "bad.dbn.zst"
    good = (testdata / "GLBX.MDP3" / "test_data.ohlcv-1s.dbn.zst").read_bytes()
    bad.write_bytes(good[: len(good) - 20])
    assert main(["backfill", "--store", str(tmp_path / "s"), "--from-dbn", str(bad)]) == 1
    assert "bad.dbn.zst" in capsys.readouterr().err


def test_symbol_listed_only_part_of_the_range(market, tmp_path, api_key, monkeypatch, capsys):
    """Known for the range but not yet listed in January: January is an empty month, not an
    'unknown symbol' error."""
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    listed = date(2024, 2, 1)
    market.add_instrument(DATASET, 301, "YMH4", listed, date(2024, 6, 1))
    market.add_continuous(DATASET, "YM.c.0", [(listed, date(2024, 6, 1), 301)])
    market.add_records(DATASET, "ohlcv-1s", _records(301, 5000, _weekdays("2024-02-01", "2024-03-29")))
    store = tmp_path / "store"
    args = _args(store, market, "--yes", "--symbols", "YM.c.0")
    assert main(args) == 0
    with open_store(store) as reader:
        bars = reader.read("YM.c.0", "1min", dataset=DATASET)
    assert len(bars) > 1000 and bars["ts_event"][0] >= _ns(listed)
    requests = market.count("YM.c.0")
    assert main(args) == 0  # January counts as done: not requested again
    assert market.count("YM.c.0") == requests

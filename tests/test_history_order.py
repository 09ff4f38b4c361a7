"""History in any order: before, between, after and overlapping what a file holds, from the
Historical API and from DBN files, ends with the bars of one in-order run over the union."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streambars.cli import main
from streambars.store import StoreWriterSet, open_store
from streambars.synthetic import dbn_bytes, write_dbn
from streambars.timeframes import Session, parse_timeframes

from .fakes import make_ohlcv, make_trades
from .test_backfill import (
    DATASET,
    START,
    _args,
    _assert_store_matches,
    _ns,
    _snapshot,
    build_market,
)

NS = 1_000_000_000
SESSION = "17:00 America/Chicago"
TFS = "1s,1min,1h,1d"


def _store_bars(store: Path, symbol: str, tfs: str = TFS, dataset: str = DATASET) -> dict[str, np.ndarray]:
    with open_store(store) as reader:
        return {tf: reader.read(symbol, tf, dataset=dataset) for tf in tfs.split(",")}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for tf in a:
        assert len(a[tf]) == len(b[tf]), tf
        np.testing.assert_array_equal(a[tf], b[tf], err_msg=tf)


# ----------------------------------------------------------------------------- Historical


@pytest.fixture
def market(fake_historical):
    return build_market(fake_historical)


def _hist(store, market, start, end, *extra):
    args = _args(store, market, "--yes", *extra)
    args[args.index("--start") + 1] = start
    args[args.index("--end") + 1] = end
    return main(args)


def test_earlier_months_after_later_ones_equal_one_run_and_are_paid_once(market, tmp_path, api_key,
                                                                           monkeypatch, capsys):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    store = tmp_path / "store"
    assert _hist(store, market, "2024-02-01", "2024-03-20") == 0
    assert _hist(store, market, START, "2024-02-01") == 0
    out = capsys.readouterr().out
    assert "rebuild with earlier history" in out
    _assert_store_matches(store, market)  # every timeframe, the 1d bars across the seam too
    for sym in ("ES.c.0", "NQ.c.0"):
        for month in ("2024-01", "2024-02", "2024-03"):
            assert market.count(sym, month) == 1
    # The whole range again: nothing to price, nothing to download, nothing rewritten.
    before, requests = _snapshot(store), len(market.requests)
    assert _hist(store, market, START, "2024-03-20") == 0
    assert len(market.requests) == requests
    assert "6 already in the store" in capsys.readouterr().out
    after = _snapshot(store)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_a_month_between_two_held_ones_is_merged(market, tmp_path, api_key, monkeypatch):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    store = tmp_path / "store"
    assert _hist(store, market, START, "2024-02-01") == 0
    assert _hist(store, market, "2024-03-01", "2024-03-20") == 0
    assert _hist(store, market, "2024-02-01", "2024-03-01") == 0
    _assert_store_matches(store, market)
    assert all(market.count(s, m) == 1 for s in ("ES.c.0", "NQ.c.0") for m in ("2024-01", "2024-02", "2024-03"))


def test_an_overlapping_range_downloads_and_counts_only_what_is_new(market, tmp_path, api_key, monkeypatch, capsys):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    store = tmp_path / "store"
    assert _hist(store, market, "2024-01-20", "2024-03-20") == 0
    capsys.readouterr()
    before = len(market.requests)
    assert _hist(store, market, START, "2024-02-10") == 0  # overlaps 2024-01-20..02-10
    made = market.requests[before:]
    assert any("get_cost" in r[0] for r in made)
    ranges = [r[1] for r in made if "get_range" in r[0]]
    # only [01-10, 01-20) of each symbol was requested, nothing it already held
    assert sorted(r["symbols"] for r in ranges) == ["ES.c.0", "NQ.c.0"]
    assert {(int(r["start"]), int(r["end"])) for r in ranges} == {(_ns("2024-01-10"), _ns("2024-01-20"))}
    _assert_store_matches(store, market)


def test_dry_run_and_a_missing_key_create_nothing(market, tmp_path, api_key, monkeypatch):
    store = tmp_path / "store"
    assert main(_args(store, market, "--yes")) == 2  # no key
    assert not list(store.rglob("*.h5"))
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    assert main(_args(store, market, "--dry-run")) == 0
    assert not list(store.rglob("*.h5")) and not list(store.rglob("*.dbn.zst"))
    bad = _args(store, market, "--yes")
    bad[bad.index("--symbols") + 1] = "ES.c.0,NQQ.c.0"
    assert main(bad) != 0
    assert not list(store.rglob("*.h5"))


# ----------------------------------------------------------------------------- DBN files


DAY0 = _ns("2024-03-04")  # a Monday; the week spans the 17:00 Chicago session boundaries


@pytest.fixture(scope="module")
def week() -> np.ndarray:
    """Two sessions' worth of sparse 1s bars, around the daily boundary (seams cross 1d bars)."""
    parts = [make_ohlcv(1, DAY0 + d * 86_400 * NS + 21 * 3600 * NS, 4000, seed=d, fill=0.6) for d in range(4)]
    return np.concatenate(parts)


def _cut_points(records: np.ndarray, k: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    lo, hi = int(records["ts_event"][0]), int(records["ts_event"][-1]) + NS
    inner = sorted({int(x) // NS * NS for x in rng.integers(lo + NS, hi - NS, k)})
    return [lo, *inner, hi]


def _piece(tmp: Path, records: np.ndarray, a: int, b: int, name: str) -> Path:
    sel = records[(records["ts_event"] >= a) & (records["ts_event"] < b)]
    return write_dbn(tmp / name, sel, symbols={"ES": 1}, start_ns=a, end_ns=b)


def _ingest(store: Path, *files: Path, extra: tuple[str, ...] = ()) -> int:
    return main(["backfill", "--store", str(store), "--from-dbn", *map(str, files), "--timeframes", TFS,
                 "--session", SESSION, "--log-format", "json", *extra])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), data=st.data())
def test_dbn_pieces_in_any_order_and_split_equal_one_run(week, tmp_path_factory, seed, k, data):
    tmp = tmp_path_factory.mktemp("order")
    cuts = _cut_points(week, k, seed)
    whole = _piece(tmp, week, cuts[0], cuts[-1], "whole.dbn.zst")
    assert _ingest(tmp / "ref", whole) == 0
    expected = _store_bars(tmp / "ref", "ES", dataset="GLBX.MDP3")

    pieces = [_piece(tmp, week, a, b, f"p{i}.dbn.zst") for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))]
    order = data.draw(st.permutations(pieces))
    # random runs of one or more files, and one piece ingested twice (overlap counts once)
    runs, i = [], 0
    while i < len(order):
        n = data.draw(st.integers(1, len(order) - i))
        runs.append(order[i:i + n])
        i += n
    runs.insert(data.draw(st.integers(0, len(runs))), [data.draw(st.sampled_from(pieces))])
    for run in runs:
        assert _ingest(tmp / "store", *run) == 0
    _assert_same(_store_bars(tmp / "store", "ES", dataset="GLBX.MDP3"), expected)


def test_a_file_ingested_twice_and_an_overlapping_file_count_once(week, tmp_path):
    cuts = _cut_points(week, 3, 7)
    whole = _piece(tmp_path, week, cuts[0], cuts[-1], "whole.dbn.zst")
    assert _ingest(tmp_path / "ref", whole) == 0
    expected = _store_bars(tmp_path / "ref", "ES", dataset="GLBX.MDP3")
    first = _piece(tmp_path, week, cuts[0], cuts[2], "first.dbn.zst")
    assert _ingest(tmp_path / "store", first) == 0
    assert _ingest(tmp_path / "store", first) == 0
    assert _ingest(tmp_path / "store", whole) == 0  # overlaps [cuts0, cuts2): adds only the rest
    _assert_same(_store_bars(tmp_path / "store", "ES", dataset="GLBX.MDP3"), expected)


def _plain(path: Path, records: np.ndarray, a: int, b: int) -> Path:
    path.write_bytes(dbn_bytes(records, symbols={"ES": 1}, start_ns=a, end_ns=b))
    return path


def test_a_plain_file_cut_at_a_record_boundary_leaves_its_bars_open(week, tmp_path):
    a, b = int(week["ts_event"][0]), int(week["ts_event"][-1]) + NS
    full = _plain(tmp_path / "full.dbn", week, a, b)
    cut = tmp_path / "cut.dbn"
    raw = full.read_bytes()
    n_keep = len(week) // 3
    cut.write_bytes(raw[: len(raw) - (len(week) - n_keep) * week.dtype.itemsize])
    assert _ingest(tmp_path / "ref", write_dbn(tmp_path / "whole.dbn.zst", week, symbols={"ES": 1},
                                                start_ns=a, end_ns=_ns("2024-03-09"))) == 0
    expected = _store_bars(tmp_path / "ref", "ES", dataset="GLBX.MDP3")
    assert _ingest(tmp_path / "store", cut) == 0
    partial = _store_bars(tmp_path / "store", "ES", dataset="GLBX.MDP3")
    last = int(week["ts_event"][n_keep - 1])
    assert partial["1d"]["ts_event"].size < expected["1d"]["ts_event"].size
    assert (partial["1s"]["ts_event"] < last).all()  # the bar of its last record is still open
    # the complete file, plain too (end unknown) but declared complete with --end
    assert _ingest(tmp_path / "store", full, extra=("--end", "2024-03-09")) == 0
    _assert_same(_store_bars(tmp_path / "store", "ES", dataset="GLBX.MDP3"), expected)


def test_trades_without_known_end_fill_the_hour_bar_across_files(tmp_path):
    """Issue repro: 6 trades at 14:00:00-14:00:50 and 6 at 14:30:00-14:30:50 in two files
    without a known end; the 1h bar holds all 12 once the hour is known to be over."""
    t0 = _ns("2024-01-10") + 14 * 3600 * NS
    first = make_trades(1, t0, 6, mean_gap_ns=10 * NS, seed=1)
    second = make_trades(1, t0 + 1800 * NS, 6, mean_gap_ns=10 * NS, seed=2)
    for arr, base in ((first, t0), (second, t0 + 1800 * NS)):
        arr["ts_event"] = base + np.arange(6) * 10 * NS
        arr["ts_recv"] = arr["ts_event"] + 100_000
    f1 = _plain(tmp_path / "a.dbn", first, t0, t0 + 60 * NS)
    f2 = _plain(tmp_path / "b.dbn", second, t0 + 1800 * NS, t0 + 1860 * NS)
    args = ("--timeframes", "1s,1min,1h")
    store = tmp_path / "store"
    assert main(["backfill", "--store", str(store), "--from-dbn", str(f1), *args, "--log-format", "json"]) == 0
    assert main(["backfill", "--store", str(store), "--from-dbn", str(f2), *args, "--log-format", "json",
                 "--end", "2024-01-11"]) == 0
    with open_store(store) as reader:
        hour = reader.read("ES", "1h", dataset="GLBX.MDP3")
        minutes = reader.read("ES", "1min", dataset="GLBX.MDP3")
    assert len(hour) == 1 and int(hour["count"][0]) == 12
    assert int(hour["volume"][0]) == int(first["size"].sum() + second["size"].sum())
    assert len(minutes) == 2


def test_a_store_of_one_schema_refuses_another(week, tmp_path, capsys):
    a, b = int(week["ts_event"][0]), int(week["ts_event"][-1]) + NS
    bars = write_dbn(tmp_path / "bars.dbn.zst", week, symbols={"ES": 1}, start_ns=a, end_ns=b)
    assert _ingest(tmp_path / "store", bars) == 0
    trades = make_trades(1, b + 3600 * NS, 50)
    tf = write_dbn(tmp_path / "t.dbn.zst", trades, symbols={"ES": 1})
    before = (tmp_path / "store" / "GLBX.MDP3" / "ES.h5").read_bytes()
    assert main(["backfill", "--store", str(tmp_path / "store"), "--from-dbn", str(tf), "--timeframes", "1s,1min",
                 "--session", SESSION, "--log-format", "json"]) == 2
    err = capsys.readouterr().err
    assert "ES.h5 was built from ohlcv-1s records" in err and "Traceback" not in err
    assert (tmp_path / "store" / "GLBX.MDP3" / "ES.h5").read_bytes() == before


# ----------------------------------------------------------------------------- the trade clock


def test_trades_are_binned_by_ts_recv_like_databentos_own_ohlcv(testdata, tmp_path):
    """The IFEU sample's trades run backwards in ts_event across the book but forwards in
    ts_recv: by ts_recv every trade counts, and the 1s bar agrees with Databento's ohlcv-1s
    of the same second (a prefix of its trades: same open, volume and range within it)."""
    import databento as db

    for ds in ("IFEU.IMPACT", "GLBX.MDP3", "NDEX.IMPACT", "XNAS.ITCH"):
        trades = testdata / ds / "test_data.trades.dbn.zst"
        store = tmp_path / ds
        assert main(["backfill", "--store", str(store), "--from-dbn", str(trades), "--timeframes", "1s",
                     "--log-format", "json"]) == 0
        theirs = db.DBNStore.from_file(testdata / ds / "test_data.ohlcv-1s.dbn.zst").to_ndarray()
        recs = db.DBNStore.from_file(trades).to_ndarray()
        symbol = next(iter(db.DBNStore.from_file(trades).symbols))
        with open_store(store) as reader:
            ours = reader.read(symbol, "1s", dataset=ds)
        first = ours[0]
        ref = theirs[theirs["ts_event"] == first["ts_event"]]
        assert len(ref) == 1, ds
        assert first["open"] == ref["open"][0], ds
        assert first["volume"] <= ref["volume"][0] and first["high"] <= ref["high"][0] and first["low"] >= ref["low"][0]
        assert int(ours["volume"].sum()) <= int(recs["size"].sum())
    # IFEU: by ts_event, three of the four trades would be late (their ts_event is earlier)
    with open_store(tmp_path / "IFEU.IMPACT") as reader:
        assert int(reader.read("BRN FMJ0024!", "1s", dataset="IFEU.IMPACT")["volume"].sum()) == 10


def test_a_store_built_by_one_trade_clock_refuses_the_other(tmp_path, capsys):
    trades = make_trades(1, _ns("2024-01-10"), 200)
    f = write_dbn(tmp_path / "t.dbn.zst", trades, symbols={"ES": 1})
    store = tmp_path / "store"
    assert main(["backfill", "--store", str(store), "--from-dbn", str(f), "--timeframes", "1s,1min",
                 "--log-format", "json"]) == 0
    later = make_trades(1, _ns("2024-01-11"), 200)
    g = write_dbn(tmp_path / "u.dbn.zst", later, symbols={"ES": 1})
    assert main(["backfill", "--store", str(store), "--from-dbn", str(g), "--timeframes", "1s,1min",
                 "--set", "bars.trade_clock=ts_event", "--log-format", "json"]) == 2
    err = capsys.readouterr().err
    assert "binned by ts_recv" in err and "Traceback" not in err


def test_zstd_helper_round_trip(tmp_path):
    """The archive keeps a plain DBN input compressed, byte-identical once decompressed."""
    from streambars.backfill import INPUTS_DIR

    a = _ns("2024-01-10")
    trades = make_trades(1, a, 100)
    plain = _plain(tmp_path / "x.dbn", trades, a, a + 3600 * NS)
    assert main(["backfill", "--store", str(tmp_path / "s"), "--from-dbn", str(plain), "--timeframes", "1s",
                 "--log-format", "json"]) == 0
    kept = list((tmp_path / "s" / "GLBX.MDP3" / "raw" / INPUTS_DIR).glob("*.dbn.zst"))
    assert len(kept) == 1
    assert zstandard.ZstdDecompressor().decompressobj().decompress(kept[0].read_bytes()) == plain.read_bytes()


# ----------------------------------------------------------------------------- beside the daemon


def test_backfilling_the_day_before_the_daemon_started(tmp_path, fake_historical, api_key, monkeypatch):
    """The daemon recorded from START_NS on; a backfill of the day before is merged under it:
    every timeframe equals one in-order run over both, and only the missing day is paid for."""
    import signal as sig

    from streambars import archive
    from streambars.config import load_settings

    from .daemon_support import (
        START_NS,
        Daemon,
        es_nq_records,
        make_gateway,
        read_bars,
        reference_bars,
        row_counts,
        wait_for,
        write_config,
    )

    live = {"ES.c.0": es_nq_records(2000)["ES.c.0"]}
    fake = make_gateway(live, rate=20000.0, heartbeat_interval=0.2)
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "c.toml", fake.gateway, store, symbols=["ES.c.0"],
                       timeframes=["1s", "1min", "1h", "1d"])
    try:
        d = Daemon(tmp_path, cfg)
        wait_for(lambda: row_counts(store, "ES.c.0").get("1s", 0) >= len(live["ES.c.0"]) - 1, 60,
                 "every live second stored", daemon=d)
        wait_for(lambda: row_counts(store, "ES.c.0").get("1h", 0) >= 1, 30, "the wall clock closing the hour",
                 daemon=d)
        d.signal(sig.SIGTERM)
        assert d.wait(30) == 0, d.log_text()[-3000:]
    finally:
        fake.stop()
    assert archive.live_path(store, "GLBX.MDP3", "ES.c.0", "2024-01").exists()

    day_before = make_ohlcv(1, START_NS - 5 * 3600 * NS, 3000, seed=9, price=4690.0)
    fake_historical.add_instrument("GLBX.MDP3", 1, "ESH4", date(2023, 12, 1), date(2024, 6, 1))
    fake_historical.add_continuous("GLBX.MDP3", "ES.c.0", [(date(2023, 12, 1), date(2024, 6, 1), 1)])
    fake_historical.add_records("GLBX.MDP3", "ohlcv-1s", day_before)
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    rc = main(["backfill", "--config", str(cfg), "--start", "2024-01-01", "--end", "2024-01-03", "--yes",
               "--historical-gateway", fake_historical.url, "--env-file", "/nonexistent", "--log-format", "json"])
    assert rc == 0
    ranges = [r for r in fake_historical.requests if "get_range" in r[0]]
    assert len(ranges) == 1  # the day before the daemon, nothing it already recorded

    # The reference ends where the daemon proved time had got to (its wall-clock flush).
    with StoreWriterSet(store, "GLBX.MDP3", "continuous", parse_timeframes(TFS.split(",")), Session.parse(SESSION)) as ws:
        flushed = json.loads(ws.writer("ES.c.0").read_meta("progress"))["live"]["flushed_until"]
    settings = load_settings(cfg)
    ref = reference_bars(settings, {"ES.c.0": np.concatenate([day_before, live["ES.c.0"]])}, ["ES.c.0"],
                         finish=False, flush_until=flushed)["ES.c.0"]
    got = read_bars(store, "ES.c.0", swmr=False)
    for tf in ("1s", "1min", "1h", "1d"):
        np.testing.assert_array_equal(got[tf], ref[tf], err_msg=tf)


_READER = """
import sys
from streambars.store import open_store
r = open_store(sys.argv[1])
def n(): return len(r.read("ES", "1s", dataset="GLBX.MDP3"))
print(n(), flush=True)
sys.stdin.readline()
print(n(), flush=True)
r.refresh()
print(n(), flush=True)
"""


def test_a_reader_holding_the_file_keeps_its_view_and_a_new_one_sees_the_merge(week, tmp_path):
    """The reader is another process (HDF5: one process holds a file to read or to write)."""
    import subprocess
    import sys

    cuts = _cut_points(week, 2, 3)
    late = _piece(tmp_path, week, cuts[1], cuts[-1], "late.dbn.zst")
    early = _piece(tmp_path, week, cuts[0], cuts[1], "early.dbn.zst")
    store = tmp_path / "store"
    assert _ingest(store, late) == 0
    proc = subprocess.Popen([sys.executable, "-c", _READER, str(store)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        before = int(proc.stdout.readline())
        assert _ingest(store, early) == 0  # rebuilt and swapped in while the reader holds it
        proc.stdin.write("go\n")
        proc.stdin.flush()
        held, refreshed = int(proc.stdout.readline()), int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert held == before  # the old file stays whole for whoever holds it open
    with open_store(store) as fresh:
        merged = len(fresh.read("ES", "1s", dataset="GLBX.MDP3"))
    assert refreshed == merged > before


# ----------------------------------------------------------------------------- publishers


OPRA_SYMBOL = "AAPL  250221C00250000"


def _opra(testdata: Path, schema: str) -> np.ndarray:
    import databento as db

    return db.DBNStore.from_file(testdata / "OPRA.PILLAR" / f"test_data.{schema}.dbn.zst").to_ndarray()


def test_per_publisher_series_keep_each_venue_apart(testdata, tmp_path):
    """bars.per_publisher: one SYMBOL@VENUE series per publisher, each equal to that
    publisher's own Databento bars; together they hold every publisher's volume."""
    from streambars.sources.dbnfile import venue

    recs = _opra(testdata, "ohlcv-1m")
    store = tmp_path / "store"
    assert main(["backfill", "--store", str(store), "--from-dbn",
                 str(testdata / "OPRA.PILLAR" / "test_data.ohlcv-1m.dbn.zst"), "--timeframes", "1min,1h",
                 "--set", "bars.per_publisher=true", "--log-format", "json"]) == 0
    with open_store(store) as reader:
        names = reader.symbols("OPRA.PILLAR")
        assert sorted(names) == sorted(f"{OPRA_SYMBOL}@{venue(p)}" for p in recs["publisher_id"])
        total = 0
        for r in recs:
            got = reader.read(f"{OPRA_SYMBOL}@{venue(r['publisher_id'])}", "1min", dataset="OPRA.PILLAR")
            assert len(got) == 1
            assert (got["open"][0], got["close"][0], got["volume"][0]) == (r["open"], r["close"], r["volume"])
            total += int(got["volume"][0])
    assert total == int(recs["volume"].sum()) == 189


def test_several_publishers_make_one_bar(testdata, tmp_path):
    """The default: the OPRA samples' publishers of one minute (one second) are one bar."""
    for schema, tfs in (("ohlcv-1m", "1min,1h"), ("ohlcv-1s", "1s,1min")):
        recs = _opra(testdata, schema)
        store = tmp_path / schema
        assert main(["backfill", "--store", str(store), "--from-dbn",
                     str(testdata / "OPRA.PILLAR" / f"test_data.{schema}.dbn.zst"), "--timeframes", tfs,
                     "--log-format", "json"]) == 0
        with open_store(store) as reader:
            coarse = reader.read(OPRA_SYMBOL, tfs.split(",")[1], dataset="OPRA.PILLAR")
            fine = reader.read(OPRA_SYMBOL, tfs.split(",")[0], dataset="OPRA.PILLAR")
        assert int(coarse["volume"].sum()) == int(recs["volume"].sum())
        assert int(fine["volume"].sum()) == int(recs["volume"].sum())
        assert int(fine["count"].sum()) == len(recs)
        for ts in np.unique(recs["ts_event"]):
            same = recs[recs["ts_event"] == ts]  # in file order: the first's open, the last's close
            bar = fine[fine["ts_event"] == ts][0]
            assert bar["open"] == same["open"][0] and bar["close"] == same["close"][-1]
            assert bar["high"] == same["high"].max() and bar["low"] == same["low"].min()
            assert bar["volume"] == same["volume"].sum() and bar["count"] == len(same)


def test_only_this_machines_dead_rebuild_folders_are_cleared(tmp_path):
    """Several machines rebuild files of one shared store: a pid names a process only on its
    own host, so another host's rebuild folder is never taken for a dead one."""
    import subprocess

    from streambars.backfill import _HOST, _rebuild_dir, _remove_dead_rebuilds

    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = proc.pid
    mine_dead = tmp_path / f".rebuild-{_HOST}-{dead}-aaaa"
    old_dead = tmp_path / f".rebuild-{dead}"  # named before hosts were
    other_host = tmp_path / f".rebuild-0123456789-{dead}-bbbb"
    for d in (mine_dead, old_dead, other_host):
        d.mkdir()
    live = _rebuild_dir(tmp_path)  # this process's, alive
    _remove_dead_rebuilds(tmp_path)
    assert not mine_dead.exists() and not old_dead.exists()
    assert other_host.exists() and live.exists()
    assert _rebuild_dir(tmp_path) != live  # two rebuilds in one process never share a folder

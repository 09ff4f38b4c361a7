"""`streambars validate` over real store files: planted defects, a clean store, exit codes."""

from __future__ import annotations

import io
import json
import shutil

import h5py
import numpy as np
import pytest

from streambars.cli import main as cli_main
from streambars.config import load_settings
from streambars.records import UNDEF_PRICE
from streambars.validate import run_validate, validate_store
from streambars.validate.calendar import calendar_for, trading_intervals

from .test_validate_fixtures import NS, all_timeframes, bars_1s, ns, seconds_in, write_store

TICK = 250_000_000


def _clean_bars(first: str, last: str, holes=(), seed: int = 7) -> dict[str, np.ndarray]:
    """Every standard timeframe from 1s bars inside CME trading hours (fill 70%)."""
    opens, closes = trading_intervals(calendar_for("auto", "GLBX.MDP3"), ns(first), ns(last))
    keep = (opens < ns(last)) & (closes > ns(first))
    opens, closes = np.maximum(opens[keep], ns(first)), np.minimum(closes[keep], ns(last))
    ts = seconds_in(opens, closes, fill=0.7, seed=seed)
    for a, b in holes:  # no bar in [a, b), but one right before and right after
        ts = np.union1d(ts[(ts < ns(a)) | (ts >= ns(b))], [ns(a) - NS, ns(b)])
    return all_timeframes(bars_1s(ts, seed=seed))


def _settings(root, **validation):
    overrides = {"store.path": str(root)}
    overrides.update({f"validation.{k}": v for k, v in validation.items()})
    return load_settings(None, overrides)


def _findings(report, symbol="ES.c.0"):
    """{(timeframe, rule): [first offending ts]} for every rule that found something."""
    out = {}
    for s in report.series:
        if s.symbol != symbol:
            continue
        for name, t in s.tallies.items():
            if t.count:
                assert t.count == len(t.first), (s.timeframe, name, t.count)
                out[(s.timeframe, name)] = t.first
    return out


def _row(ds, t: int) -> int:
    rows = np.flatnonzero(ds.fields("ts_event")[:] == t)
    assert rows.size == 1, f"no single row at {t}"
    return int(rows[0])


def _set(ds, t: int, **fields):
    i = _row(ds, t)
    row = ds[i]
    for k, v in fields.items():
        row[k] = v
    ds[i] = row
    return i


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A store of 3 CME days with one defect of each kind, planted with h5py into the file
    the store's writer made; and a second, clean symbol."""
    root = tmp_path_factory.mktemp("planted")
    bars = _clean_bars("2024-03-04T23:00:00", "2024-03-07T22:00:00",
                       holes=[("2024-03-06T15:00:00", "2024-03-06T15:10:00")])  # fmt: skip
    path = write_store(root, bars)
    write_store(root, _clean_bars("2024-03-04T23:00:00", "2024-03-06T22:00:00", seed=8), symbol="NQ.c.0")
    T = {}
    with h5py.File(path, "r+", locking=False) as f:
        b = f["bars"]
        T["ohlc"] = ns("2024-03-05T14:31:00")
        r = b["1min"][_row(b["1min"], T["ohlc"])]
        _set(b["1min"], T["ohlc"], low=max(r["open"], r["close"]) + TICK)
        T["undef"] = ns("2024-03-05T15:05:00")
        _set(b["5min"], T["undef"], close=UNDEF_PRICE)
        T["nonpos"] = ns("2024-03-05T16:00:10")
        _set(b["10s"], T["nonpos"], low=-TICK)
        T["vol0"] = ns("2024-03-05T17:00:00")
        _set(b["1h"], T["vol0"], volume=0)
        T["absurd"] = ns("2024-03-05T18:00:15")
        _set(b["15s"], T["absurd"], volume=10**12)
        # two 30s bars swapped: the second row is now earlier than the first
        ds = b["30s"]
        i = _row(ds, ns("2024-03-05T19:00:00"))
        assert i % int(ds.attrs["index_stride"]) not in (0, int(ds.attrs["index_stride"]) - 1)
        pair = ds[i : i + 2]
        ds[i : i + 2] = pair[::-1]
        T["swap"] = int(pair["ts_event"][0])
        T["misaligned"] = ns("2024-03-05T14:02:00") + NS
        _set(b["2min"], ns("2024-03-05T14:02:00"), ts_event=T["misaligned"])
        ds = b["3min"]  # the last bar written twice
        n = ds.shape[0]
        ds.resize((n + 1,))
        ds[n] = ds[n - 1]
        T["dup"] = int(ds[n]["ts_event"])
        T["count0"] = ns("2024-03-05T16:00:00")
        _set(b["4h"], T["count0"], count=0)
        T["day"] = ns("2024-03-05T23:00:00")  # the session of 2024-03-06 (17:00 CST)
        r = b["1d"][_row(b["1d"], T["day"])]
        _set(b["1d"], T["day"], high=r["high"] + TICK)
        ds = b["2h"]  # a bar missing
        T["missing"] = ns("2024-03-05T20:00:00")
        i = _row(ds, T["missing"])
        rest = ds[i + 1 :]
        ds[i : i + rest.size] = rest
        ds.resize((ds.shape[0] - 1,))
        T["jump"] = ns("2024-03-05T15:31:00")
        prev = b["1min"][_row(b["1min"], T["jump"]) - 1]
        up = (prev["close"] * 3 // 2) // TICK * TICK
        _set(b["1min"], T["jump"], open=up, high=up)
        T["outlier"] = ns("2024-03-05T16:31:00")
        r = b["1min"][_row(b["1min"], T["outlier"])]
        _set(b["1min"], T["outlier"], volume=r["volume"] * 100_000)
    return root, T


def test_each_planted_defect_is_reported_exactly(planted):
    root, T = planted
    report = validate_store(_settings(root, max_volume=10**7))
    got = _findings(report)
    assert got == {
        ("1s", "gap_in_session"): [ns("2024-03-06T15:00:00")],
        ("10s", "price_non_positive"): [T["nonpos"]],
        ("10s", "cross_timeframe"): [T["nonpos"]],
        ("15s", "volume_absurd"): [T["absurd"]],
        ("15s", "volume_outlier"): [T["absurd"]],
        ("15s", "cross_timeframe"): [T["absurd"]],
        ("30s", "ts_not_increasing"): [T["swap"]],
        ("1min", "ohlc_relation"): [T["ohlc"]],
        ("1min", "price_jump"): [T["jump"]],
        ("1min", "volume_outlier"): [T["outlier"]],
        ("1min", "cross_timeframe"): sorted([T["ohlc"], T["jump"], T["outlier"]]),
        ("2min", "ts_misaligned"): [T["misaligned"]],
        ("3min", "ts_duplicate"): [T["dup"]],
        ("5min", "price_undefined"): [T["undef"]],
        ("5min", "cross_timeframe"): [T["undef"]],
        ("1h", "volume_zero"): [T["vol0"]],
        ("1h", "cross_timeframe"): [T["vol0"]],
        ("2h", "cross_timeframe"): [T["missing"]],
        ("4h", "count_invalid"): [T["count0"]],
        ("4h", "cross_timeframe"): [T["count0"]],
        ("1d", "cross_timeframe"): [T["day"]],
    }
    assert _findings(report, "NQ.c.0") == {}
    assert report.exit_code == 1
    gap = next(s for s in report.series if s.timeframe == "1s" and s.symbol == "ES.c.0").tallies["gap_in_session"]
    assert "00:10:00" in gap.details[ns("2024-03-06T15:00:00")]
    miss = next(s for s in report.series if s.timeframe == "2h").tallies["cross_timeframe"]
    assert "missing" in miss.details[T["missing"]]


def test_reports_text_json_and_table(planted, tmp_path):
    root, T = planted
    out = io.StringIO()
    code = run_validate(_settings(root, max_volume=10**7), report_path=tmp_path / "r.txt",
                        json_path=tmp_path / "r.json", out=out)  # fmt: skip
    assert code == 1
    text = (tmp_path / "r.txt").read_text()
    assert "== GLBX.MDP3 ES.c.0 1min: " in text
    assert "ohlc_relation" in text and "2024-03-05T14:31:00Z" in text
    assert "gap_in_session" in text and "2024-03-06T15:00:00Z" in text
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["exit_code"] == 1 and doc["errors"] > 0
    s = next(x for x in doc["series"] if x["timeframe"] == "2min" and x["symbol"] == "ES.c.0")
    assert s["rules"]["ts_misaligned"]["count"] == 1
    assert s["rules"]["ts_misaligned"]["first"] == ["2024-03-05T14:02:01Z"]
    assert s["rules"]["ts_misaligned"]["first_ns"] == [T["misaligned"]]
    assert s["rules"]["gap_in_session"]["checked"] is False
    table = out.getvalue()
    assert "ohlc_relation=1" in table and "FAILED" in table and str(tmp_path / "r.txt") in table


def test_selection_of_symbol_timeframe_and_range(planted):
    root, T = planted
    r = validate_store(_settings(root), symbols=["ES.c.0"], timeframes=["1h", "4h"],
                       start="2024-03-05T16:00:00", end="2024-03-05T21:00:00")  # fmt: skip
    assert {s.timeframe for s in r.series} == {"1h", "4h"}
    got = _findings(r)
    # the 4h bar at 20:00 runs past the end (its 1s bars were not all read): not compared
    assert got == {
        ("1h", "volume_zero"): [T["vol0"]],
        ("1h", "cross_timeframe"): [T["vol0"]],
        ("4h", "count_invalid"): [T["count0"]],
        ("4h", "cross_timeframe"): [T["count0"]],
    }
    assert any("straddling" in n for n in r.notes)


def test_clean_store_of_several_days_reports_nothing(tmp_path):
    bars = _clean_bars("2024-07-01T00:00:00", "2024-07-09T00:00:00")  # across July 4th
    write_store(tmp_path, bars)
    out = io.StringIO()
    code = run_validate(_settings(tmp_path, max_volume=10**6), out=out)
    report = validate_store(_settings(tmp_path, max_volume=10**6))
    assert code == 0 and _findings(report) == {}
    assert len(report.series) == 16 and report.series[0].rows > 100_000
    logs = list((tmp_path / "logs").glob("validate-*.txt"))
    assert len(logs) == 1 and "OK: 0 error(s), 0 warning(s)" in logs[0].read_text()


def test_exit_codes_through_the_cli(planted, tmp_path, capsys):
    root, _ = planted
    store = ["--store", str(root), "--report", str(tmp_path / "r.txt")]
    assert cli_main(["validate", *store]) == 1
    # warnings only (the gap) and info: still 0
    assert cli_main(["validate", *store, "--symbol", "ES.c.0", "--timeframe", "1s"]) == 0
    assert cli_main(["validate", *store, "--symbol", "NQ.c.0"]) == 0
    assert cli_main(["validate", *store, "--start", "not-a-date"]) == 2
    assert cli_main(["validate", *store, "--start", "2024-03-06", "--end", "2024-03-05"]) == 2
    assert cli_main(["validate", *store, "--symbol", "CL.c.0"]) == 2
    assert cli_main(["validate", *store, "--timeframe", "7s"]) == 2
    assert cli_main(["validate", *store, "--timeframe", "banana"]) == 2
    assert cli_main(["validate", "--store", str(tmp_path / "nowhere")]) == 2
    bad = tmp_path / "bad" / "GLBX.MDP3"
    bad.mkdir(parents=True)
    (bad / "X.h5").write_bytes(b"not hdf5 at all" * 100)
    assert cli_main(["validate", "--store", str(tmp_path / "bad")]) == 2
    # one unreadable file among good ones: the others are checked, the exit code says 2
    shutil.copytree(root / "GLBX.MDP3", tmp_path / "mixed" / "GLBX.MDP3")
    shutil.copy(bad / "X.h5", tmp_path / "mixed" / "GLBX.MDP3" / "X.h5")
    out = io.StringIO()
    code = run_validate(_settings(tmp_path / "mixed"), symbols=["NQ.c.0"], report_path=tmp_path / "m.txt", out=out)
    assert code == 2 and "X.h5" in out.getvalue() and "UNREADABLE" in out.getvalue()
    err = capsys.readouterr().err
    assert "CL.c.0" in err and "not-a-date" in err


def _closed_by(bars: dict[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
    """What a live writer has written at wall-clock ``t``: the bars already closed."""
    from streambars.timeframes import parse_timeframe

    from .test_validate_fixtures import CME_SESSION

    out = {}
    b = CME_SESSION.boundaries()
    for name, arr in bars.items():
        tf = parse_timeframe(name)
        ts = arr["ts_event"]
        end = b[np.searchsorted(b, ts, side="right")] if tf.is_daily else ts + tf.nanos
        out[name] = arr[end <= t]
    return out


def test_a_file_being_written_validates_without_disturbing_the_writer(tmp_path):
    import subprocess
    import sys

    from streambars.store import BarFileWriter

    from .test_validate_fixtures import CME_SESSION

    bars = _clean_bars("2024-03-04T23:00:00", "2024-03-06T22:00:00")
    w = BarFileWriter(tmp_path, "GLBX.MDP3", "ES.c.0", stype="continuous", timeframes=list(bars),
                      session=CME_SESSION)  # fmt: skip
    cmd = [sys.executable, "-m", "streambars", "validate", "--store", str(tmp_path),
           "--json", str(tmp_path / "v.json"), "--report", str(tmp_path / "v.txt")]  # fmt: skip
    try:
        for now in ("2024-03-05T14:30:17", "2024-03-06T20:59:59"):
            w.append(_closed_by(bars, ns(now)))  # the open 1d, 4h, ... bars are not written yet
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            doc = json.loads((tmp_path / "v.json").read_text())
            rows = {s["timeframe"]: s["rows"] for s in doc["series"]}
            assert rows["1s"] == int((bars["1s"]["ts_event"] < ns(now)).sum())
            assert doc["errors"] == doc["warnings"] == 0
        w.append(bars)  # the writer carries on after the readers have come and gone
    finally:
        w.close()
    assert validate_store(_settings(tmp_path)).exit_code == 0

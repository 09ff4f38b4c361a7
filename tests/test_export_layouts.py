"""Export of several series (issue 12): layouts, formats from suffixes, stdout, --tz; inspect --json.

Every written file is read back with pandas/pyarrow and compared with the rows h5py reads
straight from the store files, partitioned by month with pandas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from streambars import export as export_mod
from streambars.cli import main as cli_main
from streambars.errors import UsageError
from streambars.export import export_bars
from streambars.records import BAR_DTYPE
from streambars.store import BarFileWriter, file_path, symbol_to_filename
from streambars.timeframes import UTC_MIDNIGHT, parse_timeframes

DATASET = "GLBX.MDP3"
SYMBOLS = ("ES.c.0", "BRN FMJ0024!")
NS = 1_000_000_000
START = int(pd.Timestamp("2024-01-30T20:00:00Z").value)
STOP = int(pd.Timestamp("2024-03-02T03:00:00Z").value)
NY = "America/New_York"
ROOT = Path(__file__).resolve().parent.parent


def bars_every(step_s: int, k: int) -> np.ndarray:
    ts = np.arange(START, STOP, step_s * NS)
    b = np.zeros(ts.size, BAR_DTYPE)
    i = np.arange(ts.size)
    b["ts_event"] = ts
    b["open"] = (1000 + k) * 1_000_000_000 + i * 250_000_000
    b["high"] = b["open"] + 500_000_000
    b["low"] = b["open"] - 1
    b["close"] = b["open"] + 125_000_000
    b["volume"] = i + 1 + k
    b["count"] = 1 + i % 4
    return b


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exportstore")
    for k, sym in enumerate(SYMBOLS):
        with BarFileWriter(root, DATASET, sym, stype="raw_symbol", timeframes=parse_timeframes(["1min", "1h"]),
                           session=UTC_MIDNIGHT) as w:
            w.append({"1min": bars_every(11 * 60, k), "1h": bars_every(3600, k)})
    return root


def stored(root: Path, symbol: str, tf: str) -> pd.DataFrame:
    """The independent reference: h5py rows -> a frame like the CSV's, UTC times."""
    with h5py.File(file_path(root, DATASET, symbol), "r") as f:
        rows = f[f"bars/{tf}"][:]
    df = pd.DataFrame({f: rows[f].astype(np.float64) / 1e9 for f in ("open", "high", "low", "close")})
    df.insert(0, "ts_event", pd.to_datetime(rows["ts_event"], unit="ns", utc=True))
    df["volume"], df["count"] = rows["volume"].astype(np.int64), rows["count"].astype(np.int64)
    return df


def read_csv(path: Path | str) -> pd.DataFrame:
    df = pd.read_csv(path)
    df["ts_event"] = pd.to_datetime(df["ts_event"], utc=True, format="ISO8601").astype("datetime64[ns, UTC]")
    return df


def check_month_files(files: list[tuple[Path, int]], want: pd.DataFrame, name_of, tz: str = "UTC") -> None:
    """Each file holds exactly the rows of its month (in ``tz``), under the expected name."""
    local = want["ts_event"].dt.tz_convert(tz)
    groups = {m: g for m, g in want.groupby([local.dt.year, local.dt.month])}
    by_name = {str(p): (p, n) for p, n in files}
    assert len(files) == len(groups)
    for (y, m), g in groups.items():
        path, n = by_name[str(name_of(y, m))]
        got = read_csv(path)
        assert n == len(g)
        pd.testing.assert_frame_equal(got, g.reset_index(drop=True), check_exact=True)


def test_symbol_month_layout_two_symbols_files_and_rows(store, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "BLOCK_ROWS", 500)  # months span several read blocks
    seen: list[int] = []
    written = export_bars(store, symbol=list(SYMBOLS), timeframe="1min", layout="symbol-month",
                          out=tmp_path / "raw_1s", on_rows=seen.append)
    for sym in SYMBOLS:
        stem = symbol_to_filename(sym)
        mine = [(p, n) for p, n in written if p.parent.name == stem]
        check_month_files(mine, stored(store, sym, "1min"),
                          lambda y, m, stem=stem: tmp_path / "raw_1s" / stem / f"{stem}_{y}_{m:02d}.csv")
    assert sum(seen) == sum(n for _, n in written) and max(seen) <= 500
    assert not [p for p in (tmp_path / "raw_1s").rglob(".*")]  # no temporary files left


def test_timeframe_month_layout_from_a_comma_list_and_all(store, tmp_path):
    written = export_bars(store, symbol="ES.c.0", timeframe="1min,1h", layout="timeframe-month", out=tmp_path / "agg")
    for tf in ("1min", "1h"):
        mine = [(p, n) for p, n in written if p.parent.name == tf]
        check_month_files(mine, stored(store, "ES.c.0", tf),
                          lambda y, m, tf=tf: tmp_path / "agg" / tf / f"ES.c.0_{y}_{m:02d}_{tf}.csv")
    every = export_bars(store, symbol="all", timeframe="all", layout="timeframe-month", out=tmp_path / "all")
    assert len(every) == 2 * 2 * 3  # symbols x timeframes x months (Jan, Feb, Mar)


def test_custom_template_by_day_with_parquet_suffix(store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    written = export_bars(store, symbol="ES.c.0", timeframe="1h", start="2024-02-27", end="2024-03-01T06:00Z",
                          layout="{DATASET}/{TF}/{YYYY}/{MM}/{SYMBOL}-{DD}.parquet", out=tmp_path)
    want = stored(store, "ES.c.0", "1h")
    want = want[(want["ts_event"] >= "2024-02-27") & (want["ts_event"] < "2024-03-01T06:00Z")]
    days = want.groupby(want["ts_event"].dt.strftime("%Y/%m/ES.c.0-%d"))
    assert sorted(str(p.relative_to(tmp_path)) for p, _ in written) == \
        sorted(f"GLBX.MDP3/1h/{d}.parquet" for d in days.groups)
    for p, n in written:
        t = pq.read_table(p).to_pandas()
        g = days.get_group(str(p.relative_to(tmp_path / "GLBX.MDP3/1h"))[: -len(".parquet")])
        assert n == len(g) == len(t)
        np.testing.assert_array_equal(t["ts_event"].to_numpy(), g["ts_event"].to_numpy())
        np.testing.assert_array_equal(t["close"].to_numpy(), g["close"].to_numpy())


def test_tz_cuts_months_in_that_zone_and_writes_offsets(store, tmp_path):
    written = export_bars(store, symbol="BRN FMJ0024!", timeframe="1h", layout="symbol-month", tz=NY,
                          out=tmp_path)
    stem = symbol_to_filename("BRN FMJ0024!")
    want = stored(store, "BRN FMJ0024!", "1h")
    check_month_files(written, want, lambda y, m: tmp_path / stem / f"{stem}_{y}_{m:02d}.csv", tz=NY)
    jan = read_csv(tmp_path / stem / f"{stem}_2024_01.csv")
    assert jan["ts_event"].iloc[-1] == pd.Timestamp("2024-02-01T04:00Z")  # still January in New York
    first = (tmp_path / stem / f"{stem}_2024_02.csv").read_text().splitlines()[1]
    assert first.startswith("2024-02-01T00:00:00-05:00,")


@pytest.mark.parametrize("kind", ["str", "datetime", "Timestamp", "datetime64"])
def test_naive_bounds_of_every_type_are_wall_clock_times_in_tz(store, tmp_path, kind):
    """A naive --start/--end given as a string, datetime, pandas.Timestamp or numpy datetime64
    means the same New York wall-clock time when tz is given (a datetime was read as UTC)."""
    import datetime as dt

    text = ("2024-02-10T09:00", "2024-02-10T17:00")
    as_kind = {"str": str, "datetime": dt.datetime.fromisoformat, "Timestamp": pd.Timestamp,
               "datetime64": np.datetime64}[kind]
    [(p, n)] = export_bars(store, symbol="ES.c.0", timeframe="1h", tz=NY, out=tmp_path / "x.csv",
                           start=as_kind(text[0]), end=as_kind(text[1]))
    want = stored(store, "ES.c.0", "1h")
    lo, hi = (pd.Timestamp(t, tz=NY) for t in text)
    want = want[(want["ts_event"] >= lo) & (want["ts_event"] < hi)]
    got = read_csv(p)
    assert n == len(got) == len(want) == 8
    np.testing.assert_array_equal(got["ts_event"].to_numpy(), want["ts_event"].to_numpy())
    assert got["ts_event"].iloc[0] == pd.Timestamp("2024-02-10T14:00Z")


def test_format_follows_suffix_and_gzip_round_trips(store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    [(p, n)] = export_bars(store, symbol="ES.c.0", timeframe="1h", out=tmp_path / "x.parquet")
    assert pq.read_table(p).num_rows == n == len(stored(store, "ES.c.0", "1h"))
    [(p, n)] = export_bars(store, symbol="ES.c.0", timeframe="1min", out=tmp_path / "x.csv.gz")
    assert (tmp_path / "x.csv.gz").read_bytes()[:2] == b"\x1f\x8b"
    pd.testing.assert_frame_equal(read_csv(p), stored(store, "ES.c.0", "1min"), check_exact=True)
    names = {p.name for p, _ in export_bars(store, symbol=list(SYMBOLS), timeframe="1h", out=f"{tmp_path}/dir/")}
    assert names == {"ES.c.0_1h.csv", "BRN%20FMJ0024%21_1h.csv"}


@pytest.mark.parametrize(("kw", "message"), [
    ({"out": "x.txt"}, r"the format follows the suffix \(\.csv, \.csv\.gz or \.parquet\)"),
    ({"out": "x.parquet", "fmt": "csv"}, "names parquet but --format is csv"),
    ({"out": "-", "fmt": "parquet"}, "writes plain CSV to stdout, not parquet"),
    ({"out": "x.csv", "timeframe": "1min,1h"}, r"2 series \(ES.c.0 1min, ES.c.0 1h\) cannot go to one file"),
    ({"out": "-", "symbol": list(SYMBOLS)}, "cannot go to stdout: give --layout"),
    ({"out": "d", "symbol": list(SYMBOLS), "layout": "{TF}_{YYYY}.csv"}, "has no {SYMBOL}, so 2 symbols"),
    ({"out": "d", "layout": "{SYMBOL}_{MM}.csv"}, "{MM} needs {YYYY}"),
    ({"out": "d", "layout": "{SYM}.csv"}, "unknown placeholder {SYM}"),
    ({"out": "d", "layout": "symbol-month", "split": "monthly"}, "not both"),
    ({"out": "d", "fmt": "xlsx"}, "--format 'xlsx' is not one of csv, csv.gz, parquet"),
    ({"out": "x.csv", "timeframe": "fortnight"}, "--timeframe: "),
    ({"out": "x.csv", "tz": "Nowhere/Land"}, "is not a time zone"),
])
def test_clashing_arguments_are_one_usage_error(store, tmp_path, kw, message):
    args = {"symbol": "ES.c.0", "timeframe": "1min", **kw}
    args["out"] = args["out"] if args["out"] == "-" else tmp_path / args["out"]
    with pytest.raises(UsageError, match=message):
        export_bars(store, **args)
    assert not list(tmp_path.iterdir())  # nothing written


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", "/tmp/numba")}
    return subprocess.run([sys.executable, "-m", "streambars", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_stdout_gets_the_csv_and_nothing_else(store, tmp_path):
    o = run_cli("export", "--store", str(store), "--symbol", "BRN FMJ0024!", "--timeframe", "1h",
                "--start", "2024-02-01", "--log-level", "debug", "--log-format", "json", "--out", "-")
    assert o.returncode == 0, o.stderr
    assert "Traceback" not in o.stderr and "\t" in o.stderr  # the 'path rows' summary goes to stderr
    assert o.stdout.startswith("ts_event,open,high,low,close,volume,count\n")
    want = stored(store, "BRN FMJ0024!", "1h")
    got = read_csv(__import__("io").StringIO(o.stdout))
    pd.testing.assert_frame_equal(got, want[want["ts_event"] >= "2024-02-01"].reset_index(drop=True),
                                  check_exact=True)
    assert not (ROOT / "-").exists()


def test_cli_repeated_and_comma_flags_and_mismatch_exit_2(store, tmp_path, capsys):
    assert cli_main(["export", "--store", str(store), "--symbol", "ES.c.0", "--symbol", "BRN FMJ0024!",
                     "--timeframe", "1min,1h", "--layout", "timeframe-month", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 12 and "1h/BRN%20FMJ0024%21_2024_02_1h.csv" in out
    assert cli_main(["export", "--store", str(store), "--symbol", "ES.c.0", "--timeframe", "1min",
                     "--out", str(tmp_path / "b.parquet"), "--format", "csv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("streambars: --out ")
    assert cli_main(["export", "--store", str(store), "--symbol", "ES.c.0", "--timeframe", "1h", "--out", "-",
                     "--format", "parquet"]) == 2
    o = capsys.readouterr()
    assert o.out == "" and o.err.startswith("streambars: --out - writes plain CSV to stdout")


def test_inspect_json_and_filters(store, capsys):
    assert cli_main(["inspect", "--store", str(store), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {(r["symbol"], r["timeframe"]): r for r in doc["series"]}
    assert set(rows) == {(s, tf) for s in SYMBOLS for tf in ("1min", "1h")}
    for (sym, tf), r in rows.items():
        want = stored(store, sym, tf)
        assert r["rows"] == len(want) and r["first_ns"] == want["ts_event"].iloc[0].value
        assert r["last"] == want["ts_event"].iloc[-1].strftime("%Y-%m-%dT%H:%M:%SZ")
        assert r["file_size"] == os.path.getsize(file_path(store, DATASET, sym)) and r["status"] == "ok"
    assert cli_main(["inspect", "--store", str(store), "--json", "--symbol", "BRN*", "--timeframe", "1h"]) == 0
    assert [(r["symbol"], r["timeframe"]) for r in json.loads(capsys.readouterr().out)["series"]] == \
        [("BRN FMJ0024!", "1h")]
    assert cli_main(["inspect", "--store", str(store), "--symbol", "ES.c.0,NQ*"]) == 0
    table = capsys.readouterr().out
    assert "ES.c.0" in table and "BRN" not in table
    assert cli_main(["inspect", "--store", str(store), "--symbol", "NQ*"]) == 2
    assert capsys.readouterr().err.startswith("streambars: nothing in ")


def test_help_names_the_presets_and_formats_the_code_has(capsys):
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, template in export_mod.LAYOUTS.items():
        assert f"{name} = {template}" in text
    assert "{" + ",".join(export_mod.FORMATS) + "}" in text


def test_span_is_one_series_first_and_last_bar(store, tmp_path):
    """StoreReader.span: one file's (first, last) for a timeframe, as series() reports it and
    as h5py reads it; None for a timeframe with no rows."""
    from streambars.store import StoreReader

    wants = {}
    for sym in SYMBOLS:
        for tf in ("1min", "1h"):
            rows = stored(store, sym, tf)["ts_event"]  # h5py, before the reader holds the files open
            wants[sym, tf] = (rows.iloc[0].value, rows.iloc[-1].value)
    with StoreReader(store) as r:
        for (sym, tf), want in wants.items():
            assert r.span(sym, tf) == want
            assert [(i.first, i.last) for i in r.series(raw=True) if (i.symbol, i.timeframe) == (sym, tf)] == [want]
    empty = tmp_path / "empty"
    with BarFileWriter(empty, DATASET, "ES.c.0", stype="raw_symbol", timeframes=parse_timeframes(["1min", "1h"]),
                       session=UTC_MIDNIGHT) as w:
        w.append({"1min": bars_every(11 * 60, 0)[:3]})
    with StoreReader(empty) as r:
        assert r.span("ES.c.0", "1h") is None
        assert r.span("ES.c.0", "60s")[0] == START


def test_on_total_is_the_rows_then_written(store, tmp_path):
    """on_total (the progress display's ETA basis) is told the rows of the range before any is
    written, and they are exactly the rows on_rows then reports and the files hold."""
    totals, pieces = [], []
    written = export_bars(store, symbol=list(SYMBOLS), timeframe="all", out=f"{tmp_path}/d/",
                          start="2024-02-03", end="2024-02-20T05:30",
                          on_total=totals.append, on_rows=lambda n: pieces.append((len(totals), n)))
    want = sum(((stored(store, sym, tf)["ts_event"] >= pd.Timestamp("2024-02-03", tz="UTC"))
                & (stored(store, sym, tf)["ts_event"] < pd.Timestamp("2024-02-20T05:30", tz="UTC"))).sum()
               for sym in SYMBOLS for tf in ("1min", "1h"))
    assert totals == [want] and want > 0
    assert all(told == 1 for told, _ in pieces)  # every piece after the total
    assert sum(n for _, n in pieces) == sum(n for _, n in written) == want

"""`streambars export` / `inspect` / `compact` over a real store file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streambars import export as export_mod
from streambars.cli import main as cli_main
from streambars.errors import StoreError
from streambars.export import export_bars, format_prices
from streambars.records import BAR_DTYPE
from streambars.store import BarFileWriter, open_store
from streambars.timeframes import Session, parse_timeframes

SYMBOL = "BRN FMJ0024!"
NS = 1_000_000_000
JAN = int(pd.Timestamp("2024-01-30T22:00:00Z").value)


def make_store(root: Path) -> np.ndarray:
    """1min bars every 7 minutes from Jan 30 to Mar 2 2024 (crosses two month ends)."""
    ts = np.arange(JAN, int(pd.Timestamp("2024-03-02T00:00:00Z").value), 7 * 60 * NS)
    bars = np.zeros(ts.size, BAR_DTYPE)
    bars["ts_event"] = ts
    i = np.arange(ts.size)
    bars["open"] = 80_000_000_000 + i * 10_000_000  # 80.00, 80.01, ...
    bars["high"] = bars["open"] + 250_000_000
    bars["low"] = bars["open"] - 1  # 79.999999999: all nine decimals
    bars["close"] = bars["open"] + 50_000_000
    bars["volume"] = i + 1
    bars["count"] = 1 + i % 5
    with BarFileWriter(root, "IFEU.IMPACT", SYMBOL, stype="raw_symbol",
                       timeframes=parse_timeframes(["1min", "1h"]),
                       session=Session.parse("20:00 Europe/London")) as w:
        w.append({"1min": bars})
    return bars


def test_price_decimals_are_exact_and_short():
    got = format_prices(np.array([4783_250_000_000, 1, -2_500_000_000, 0, 123_456_789_012_345_678, 80_000_000_000]))
    assert list(got) == ["4783.25", "0.000000001", "-2.5", "0.0", "123456789.012345678", "80.0"]


def test_csv_has_header_iso_utc_times_and_decimal_prices(tmp_path):
    bars = make_store(tmp_path / "store")
    out = tmp_path / "out.csv"
    [(path, rows)] = export_bars(tmp_path / "store", symbol=SYMBOL, timeframe="1min", out=out)
    assert (path, rows) == (out, bars.size)
    with open(out, newline="") as fh:
        lines = list(csv.reader(fh))
    assert lines[0] == ["ts_event", "open", "high", "low", "close", "volume", "count"]
    assert lines[1] == ["2024-01-30T22:00:00Z", "80.0", "80.25", "79.999999999", "80.05", "1", "1"]
    assert lines[2][0] == "2024-01-30T22:07:00Z" and lines[2][1] == "80.01"
    assert len(lines) == bars.size + 1
    df = pd.read_csv(out, parse_dates=["ts_event"], index_col="ts_event")
    want = open_store(tmp_path / "store").read_df(SYMBOL, "1min")
    assert (df.index == want.index).all()
    np.testing.assert_allclose(df[["open", "high", "low", "close"]], want[["open", "high", "low", "close"]], rtol=0, atol=1e-12)


def test_split_monthly_names_files_per_month_and_respects_start_end(tmp_path, monkeypatch):
    bars = make_store(tmp_path / "store")
    monkeypatch.setattr(export_mod, "BLOCK_ROWS", 1000)  # months span several read blocks
    written = export_bars(tmp_path / "store", symbol=SYMBOL, timeframe="1min", split="monthly",
                          out=tmp_path / "monthly")
    names = [p.name for p, _ in written]
    stem = "BRN%20FMJ0024%21"
    assert names == [f"{stem}_2024_01_1min.csv", f"{stem}_2024_02_1min.csv", f"{stem}_2024_03_1min.csv"]
    assert sum(r for _, r in written) == bars.size
    feb = pd.read_csv(written[1][0])
    assert feb["ts_event"].iloc[0].startswith("2024-02-01T00:0") and feb["ts_event"].iloc[-1].startswith("2024-02-29")
    part = export_bars(tmp_path / "store", symbol=SYMBOL, timeframe="1min", start="2024-02-10",
                       end="2024-02-11T00:00:00Z", out=tmp_path / "part.csv")
    want = ((bars["ts_event"] >= pd.Timestamp("2024-02-10", tz="UTC").value)
            & (bars["ts_event"] < pd.Timestamp("2024-02-11", tz="UTC").value)).sum()
    assert part[0][1] == want
    assert not list((tmp_path / "monthly").glob(".*"))  # no temporary files left behind


def test_parquet_keeps_types(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    bars = make_store(tmp_path / "store")
    [(path, rows)] = export_bars(tmp_path / "store", symbol=SYMBOL, timeframe="1min", fmt="parquet",
                                 out=tmp_path / "x.parquet")
    t = pq.read_table(path)
    assert rows == bars.size == t.num_rows
    assert str(t.schema.field("ts_event").type) == "timestamp[ns, tz=UTC]"
    df = t.to_pandas()
    assert df["close"].iloc[0] == 80.05 and df["volume"].dtype == np.uint64
    monthly = export_bars(tmp_path / "store", symbol=SYMBOL, timeframe="1min", fmt="parquet",
                          split="monthly", out=tmp_path / "pm")
    assert [p.name for p, _ in monthly][0] == "BRN%20FMJ0024%21_2024_01_1min.parquet"


def test_empty_or_unknown_selections_are_clear_errors(tmp_path):
    make_store(tmp_path / "store")
    with pytest.raises(StoreError, match=r"no BRN FMJ0024! 1min bars in \[2030-01-01.*holds 2024-01-30T22:00:00Z"):
        export_bars(tmp_path / "store", symbol=SYMBOL, timeframe="1min", start="2030-01-01", out=tmp_path / "a.csv")
    with pytest.raises(StoreError, match="no symbol 'ES.c.0'"):
        export_bars(tmp_path / "store", symbol="ES.c.0", timeframe="1min", out=tmp_path / "a.csv")
    assert not (tmp_path / "a.csv").exists()


def test_cli_inspect_export_and_compact(tmp_path, capsys):
    store = tmp_path / "store"
    bars = make_store(store)
    assert cli_main(["inspect", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "IFEU.IMPACT" in out and SYMBOL in out and "2024-01-30T22:00:00Z" in out and str(bars.size) in out
    assert cli_main(["export", "--store", str(store), "--symbol", SYMBOL, "--timeframe", "1min",
                     "--split", "monthly", "--out", str(tmp_path / "m")]) == 0
    assert "_2024_02_1min.csv" in capsys.readouterr().out
    assert cli_main(["export", "--store", str(store), "--symbol", "NOPE", "--timeframe", "1min",
                     "--out", str(tmp_path / "n.csv")]) == 1
    assert "no symbol 'NOPE'" in capsys.readouterr().err
    assert cli_main(["compact", "--store", str(store)]) == 0
    assert "->" in capsys.readouterr().out
    np.testing.assert_array_equal(open_store(store).read(SYMBOL, "1min"), bars)

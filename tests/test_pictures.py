"""`streambars plot` and `validate --html`: the PNG decoded, the HTML parsed (and rendered by
headless Chromium when it is installed), checked against the bars written (numpy/pandas)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from zoneinfo import ZoneInfo

import h5py
import numpy as np
import pandas as pd
import pytest

from streambars.cli import main as cli_main
from streambars.plot import DENSE, DENSE_COLOR, DOWN, UP, Candles, coarsen, title_for
from streambars.records import FIXED_PRICE_SCALE
from streambars.timeframes import parse_timeframe
from streambars.validate.checks import Tally
from streambars.validate.html import render
from streambars.validate.report import Report, SeriesResult

from .test_validate_fixtures import NS, all_timeframes, bars_1s, ns, write_store

mpimg = pytest.importorskip("matplotlib.image", reason="the plot extra (matplotlib) is not installed")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TICK = 250_000_000
FIRST, LAST = "2024-03-05T00:00:00", "2024-03-07T00:00:00"  # two days of 1min bars


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """1min/5min/1h bars of two days (a 30-minute hole), with a planted OHLC defect and a
    price jump in the 1min bars; the bars as written, for reference."""
    root = tmp_path_factory.mktemp("pictures")
    ts = np.arange(ns(FIRST), ns(LAST), 60 * NS)
    ts = ts[(ts < ns("2024-03-05T15:00:00")) | (ts >= ns("2024-03-05T15:30:00"))]
    bars = all_timeframes(bars_1s(ts, seed=3), names=("1min", "5min", "1h"))
    path = write_store(root, bars)
    defects = {"ohlc": ns("2024-03-05T14:31:00"), "jump": ns("2024-03-06T10:00:00")}
    with h5py.File(path, "r+", locking=False) as f:
        b = f["bars/1min"]
        rows = b.fields("ts_event")[:]
        i = int(np.flatnonzero(rows == defects["ohlc"])[0])
        r = b[i]
        r["low"] = max(r["open"], r["close"]) + TICK  # low above the body
        b[i] = r
        i = int(np.flatnonzero(rows == defects["jump"])[0])
        r = b[i]
        up = (int(b[i - 1]["close"]) * 3 // 2) // TICK * TICK
        r["open"], r["high"] = up, up
        b[i] = r
        written = {tf: f[f"bars/{tf}"][:] for tf in ("1min", "5min", "1h")}
    return root, written, defects


def _pixels(path_or_bytes) -> np.ndarray:
    """RGB(A) floats 0..1 of a PNG (matplotlib's own decoder, independent of how it was drawn)."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return mpimg.imread(src, format="png")


def _share_like(img: np.ndarray, hex_color: str, tol: float = 0.06) -> float:
    want = np.array([int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return float(np.mean(np.all(np.abs(img[..., :3] - want) < tol, axis=-1)))


def _in_range(b: np.ndarray, start: str, end: str) -> np.ndarray:
    return b[(b["ts_event"] >= ns(start)) & (b["ts_event"] < ns(end))]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- plot


def test_plot_writes_a_png_with_candles_and_volume(store, tmp_path, capsys):
    root, written, _ = store
    out = tmp_path / "es.png"
    code, stdout, err = _run(["plot", "--store", str(root), "--symbol", "ES.c.0", "--timeframe", "1min",
                              "--start", "2024-03-05T13:00", "--end", "2024-03-05T17:00", "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    want = _in_range(written["1min"], "2024-03-05T13:00:00", "2024-03-05T17:00:00").size
    assert want == 4 * 60 - 30  # the hole
    assert f"{want:,} bars, {want:,} candles (1min)" in stdout
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    img = _pixels(data)
    assert img.shape[:2] == (800, 1600)
    assert np.mean(np.all(img[..., :3] > 0.97, axis=-1)) < 0.97  # not blank
    assert _share_like(img, UP) > 0.002 and _share_like(img, DOWN) > 0.002  # both candle colours


def test_plot_draws_long_ranges_with_fewer_candles(store, tmp_path, capsys):
    root, written, _ = store
    out = tmp_path / "all.png"
    code, stdout, _ = _run(["plot", "--store", str(root), "--symbol", "ES.c.0", "--timeframe", "1min",
                            "--out", str(out)], capsys)  # fmt: skip
    assert code == 0
    # 2,850 1min bars > 600: the finest stored timeframe that fits is the 5min one
    n5 = written["5min"].size
    assert n5 <= 600 < DENSE < written["1min"].size
    assert f"{written['1min'].size:,} bars, {n5:,} candles (1min bars shown as stored 5min bars)" in stdout
    code, stdout, _ = _run(["plot", "--store", str(root), "--symbol", "ES.c.0", "--timeframe", "1min",
                            "--max-candles", "0", "--out", str(out)], capsys)  # fmt: skip
    assert code == 0 and f"{written['1min'].size:,} candles (1min)" in stdout
    # more candles than pixel columns: high-low lines in one neutral colour, no candle colours
    img = _pixels(out.read_bytes())
    grey = _share_like(img, DENSE_COLOR, tol=0.15)
    assert grey > 0.0005 and grey > 10 * (_share_like(img, UP) + _share_like(img, DOWN))


def test_merged_candles_match_pandas_resample(store):
    _, written, _ = store
    b = written["1min"]
    c = coarsen(Candles.from_bars(b, 60 * NS, "1min"), parse_timeframe("1min"), max_candles=100)
    assert len(c) <= 100 and "shown as 30min candles" in c.label
    df = pd.DataFrame({f: b[f] / FIXED_PRICE_SCALE for f in ("open", "high", "low", "close")},
                      index=pd.to_datetime(b["ts_event"], utc=True))  # fmt: skip
    df["volume"] = b["volume"].astype(float)
    ref = df.resample("30min").agg({"open": "first", "high": "max", "low": "min", "close": "last",
                                    "volume": "sum"}).dropna()  # fmt: skip
    assert np.array_equal(c.ts, ref.index.as_unit("ns").asi8)
    for f in ("open", "high", "low", "close", "volume"):
        np.testing.assert_array_equal(getattr(c, f), ref[f].to_numpy())
    # beyond the ladder: k consecutive candles each
    k = coarsen(Candles.from_bars(written["1h"], 3600 * NS, "1h"), parse_timeframe("1h"), max_candles=3)
    assert len(k) <= 3 and float(k.volume.sum()) == float(written["1h"]["volume"].sum())


def test_title_shows_the_range_in_the_time_zone_asked(store):
    _, written, _ = store
    b = _in_range(written["5min"], "2024-03-05T14:00:00", "2024-03-05T16:00:00")
    c = Candles.from_bars(b, 300 * NS, "5min")
    title = title_for("ES.c.0", c, ZoneInfo("America/New_York"))
    first = pd.Timestamp(int(b["ts_event"][0]), tz="UTC").tz_convert("America/New_York")
    end = pd.Timestamp(int(b["ts_event"][-1]) + 300 * NS, tz="UTC").tz_convert("America/New_York")
    assert f"{first:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} America/New_York" in title
    assert f"({b.size} bars, {b.size} candles)" in title


@pytest.mark.parametrize(
    "args, words",
    [
        (["--symbol", "CL.c.0", "--timeframe", "1min"], ["CL.c.0", "ES.c.0"]),
        (["--symbol", "ES.c.0", "--timeframe", "banana"], ["--timeframe", "banana"]),
        (["--symbol", "ES.c.0", "--timeframe", "2min"], ["2min", "stored: 1min, 5min, 1h"]),
        (["--symbol", "ES.c.0", "--timeframe", "1min", "--start", "2025-01-01"], ["no ES.c.0 1min bars", "2024-03-05"]),
        (["--symbol", "ES.c.0", "--timeframe", "1min", "--tz", "Mars/Olympus"], ["--tz", "Mars/Olympus"]),
        (["--symbol", "ES.c.0", "--timeframe", "1min", "--start", "2024-03-06", "--end", "2024-03-05"], ["--end"]),
    ],
)
def test_plot_refusals_are_one_line_exit_2(store, tmp_path, capsys, args, words):
    root, _, _ = store
    out = tmp_path / "x.png"
    code, _, err = _run(["plot", "--store", str(root), *args, "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("streambars: "), err
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


@pytest.mark.parametrize("out", ["missing-dir/x.png", "x.gif", "."])
def test_plot_unwritable_out_is_refused_before_drawing(store, tmp_path, capsys, out):
    root, _, _ = store
    code, _, err = _run(["plot", "--store", str(root), "--symbol", "ES.c.0", "--timeframe", "1h",
                         "--out", str(tmp_path / out)], capsys)  # fmt: skip
    assert code == 2 and err.startswith("streambars: --out ") and err.count("\n") == 1, err


def test_the_real_command_lists_plot_and_refuses_in_one_line(store, tmp_path):
    """Through `python -m streambars` (the console entry point): help, and no traceback."""
    from streambars.cli import build_parser

    assert "plot" in build_parser().format_help()
    root, _, _ = store
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "streambars", "plot", "--store", str(root), "--symbol", "NOPE",
                           "--timeframe", "1min", "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"streambars: --symbol 'NOPE' is not in {root} (it has: ES.c.0)"]


def test_without_matplotlib_the_commands_name_the_extra(store, tmp_path, capsys, monkeypatch):
    root, _, _ = store
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = _run(["plot", "--store", str(root), "--symbol", "ES.c.0", "--timeframe", "1h",
                         "--out", str(tmp_path / "x.png")], capsys)  # fmt: skip
    assert code == 2 and "[plot]" in err and err.count("\n") == 1
    code, out, err = _run(["validate", "--store", str(root), "--report", str(tmp_path / "r.txt"),
                           "--html", str(tmp_path / "r.html")], capsys)  # fmt: skip
    assert code == 2 and "[plot]" in err and out == ""  # refused before validating


# --------------------------------------------------------------------------- validate --html


class _Page(HTMLParser):
    """Tables (id -> body rows of cell texts), images, every URL-bearing attribute, tags seen."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self._table: str | None = None
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href", "action", "data", "poster") and v is not None]
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._in_body:
            self._cell = []
        elif tag == "img":
            self.images.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    p.close()
    return p


@pytest.fixture(scope="module")
def html_report(store, tmp_path_factory):
    root, _, _ = store
    d = tmp_path_factory.mktemp("html")
    argv = ["validate", "--store", str(root), "--report", str(d / "r.txt"), "--json", str(d / "r.json"),
            "--html", str(d / "r.html")]  # fmt: skip
    code = cli_main(argv)
    return code, d / "r.html", json.loads((d / "r.json").read_text())


def _expected_findings(js: dict) -> list[tuple[str, str, int, list[str]]]:
    """(rule, tf, count, first offenders) from the JSON report of the same run."""
    out = []
    for s in js["series"]:
        for rule, r in s["rules"].items():
            if r.get("checked") and r["count"]:
                out.append((rule, s["timeframe"], r["count"], r["first"]))
    return out


def test_html_page_has_the_findings_table_and_one_chart_per_failing_rule(store, html_report):
    _, _, defects = store
    code, path, js = html_report
    assert code == 1  # the planted OHLC defect is an error
    page = _parse(path.read_text(encoding="utf-8"))
    want = _expected_findings(js)
    assert {(r, tf) for r, tf, _, _ in want} >= {("ohlc_relation", "1min"), ("price_jump", "1min")}
    rows = page.tables["findings"]
    assert len(rows) == len(want)
    got = {(row[0], row[4]): row for row in rows}
    for rule, tf, count, first in want:
        row = got[(rule, tf)]
        assert row[5] == f"{count:,}"
        assert all(t in row[6] for t in first)  # every first offender listed
    ohlc = got[("ohlc_relation", "1min")]
    assert datetime.fromtimestamp(defects["ohlc"] / NS, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") in ohlc[6]
    assert len(page.tables["series"]) == len(js["series"])
    # one chart per finding, each a PNG data URI that decodes to candles
    assert len(page.images) == len(want)
    for img in page.images:
        head, _, data = img["src"].partition(",")
        assert head == "data:image/png;base64"
        png = base64.b64decode(data, validate=True)
        assert png[:8] == PNG_SIGNATURE
        pixels = _pixels(png)
        assert pixels.shape[0] > 300 and _share_like(pixels, UP) > 0.001
        assert "offender" in img["alt"]
    # self-contained: nothing to fetch, no script
    assert all(u.startswith(("data:", "#")) for u in page.urls), page.urls
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}


def test_html_escapes_everything_it_inserts(tmp_path):
    evil = '<script>alert("x")</script>&amp;'
    s = SeriesResult("GLBX.MDP3", f"ES{evil}", "1min", path=str(tmp_path), rows=3, first_ts=0, last_ts=60 * NS)
    t = Tally("ohlc_relation")
    t.add(np.array([60 * NS]), details=[f"detail {evil}"])
    s.tallies["ohlc_relation"] = t
    report = Report(f"/store/{evil}", datetime(2024, 3, 5, tzinfo=UTC), notes=[f"note {evil}"],
                    parameters={"gap": evil})  # fmt: skip
    report.series.append(s)
    text = render(report, charts=False)
    page = _parse(text)
    assert "script" not in page.tags and "<script>" not in text
    plain = "".join(page.text)
    for what in (f"ES{evil}", f"detail {evil}", f"note {evil}", f"/store/{evil}"):
        assert what in plain  # shown as text, exactly
    assert page.tables["findings"][0][3] == f"ES{evil}"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no headless Chromium installed (Debian: apt-get install chromium); the HTML was parsed only")


def _chromium_run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]  # fmt: skip
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_html_page_renders_in_headless_chromium(html_report, tmp_path):
    _, path, js = html_report
    want = _expected_findings(js)
    shot = tmp_path / "shot.png"
    size = "--window-size=1280,1800"
    dom = _chromium_run(["--dump-dom", f"--screenshot={shot}", size, path.as_uri()], tmp_path)  # one launch
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _parse(dom.stdout)  # the DOM the browser built, not our text
    assert len(page.tables["findings"]) == len(want)
    assert len(page.images) == len(want)
    if not shot.exists():  # a Chromium that does one thing per launch
        run = _chromium_run([f"--screenshot={shot}", size, path.as_uri()], tmp_path)
        assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = _pixels(shot.read_bytes())
    # the browser decoded the embedded charts: candle colours are on screen
    assert _share_like(pixels, UP, tol=0.08) > 0.001 and _share_like(pixels, DOWN, tol=0.08) > 0.001


def test_html_chart_window_is_the_bars_around_the_finding_however_sparse(tmp_path):
    """The bars a chart shows around a finding: the AROUND stored bars before it (sparse ones
    too, no further back than LOOKBACK intervals) and AROUND + 1 from it on, as numpy picks
    them from the bars written."""
    from streambars.store import StoreReader
    from streambars.validate.html import AROUND, LOOKBACK, _window

    rng = np.random.default_rng(11)
    # 1min bars: dense hours, then days of a few bars each, a season's hole, dense again
    dense = np.arange(ns("2024-01-02T00:00:00"), ns("2024-01-02T06:00:00"), 60 * NS)
    sparse = np.sort(rng.choice(np.arange(ns("2024-01-03"), ns("2024-01-20"), 60 * NS), 25, replace=False))
    late = np.arange(ns("2024-06-03T00:00:00"), ns("2024-06-03T03:00:00"), 60 * NS)
    ts = np.concatenate([dense, sparse, late])
    bars = {"1min": bars_1s(ts, seed=5)}
    write_store(tmp_path, bars)
    s = SeriesResult("GLBX.MDP3", "ES.c.0", "1min", rows=ts.size, first_ts=int(ts[0]), last_ts=int(ts[-1]))
    with StoreReader(tmp_path) as reader:
        for first in (int(sparse[-3]), int(sparse[2]), int(late[0]), int(late[5]), int(dense[10])):
            got = _window(reader, s, first)
            lo = first - LOOKBACK * 60 * NS
            before = ts[(ts >= lo) & (ts < first)][-AROUND:]
            after = ts[ts >= first][: AROUND + 1]
            np.testing.assert_array_equal(got["ts_event"], np.concatenate([before, after]))
            np.testing.assert_array_equal(got, bars["1min"][np.isin(ts, got["ts_event"])])
    # the season's hole is beyond the lookback: the first bar after it shows no bars before
    assert int(late[0]) - int(sparse[-1]) > LOOKBACK * 60 * NS

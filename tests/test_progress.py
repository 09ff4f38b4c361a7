"""Progress on the long commands: right counts at every step, a rich bar on a terminal that
log lines never garble, JSON ``progress`` events off a terminal.

The terminal runs are real pseudo-terminals (``pty.fork``): the child runs ``cli.main`` in a
fork of this process (no interpreter start, the compiled kernel already loaded) with stdout
and stderr on the pty, as a user's shell would have them. Reference counts come from
databento_dbn (records in a file), pandas (rows in a CSV) and the store read back whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import databento_dbn
import pandas as pd
import pytest
import structlog
import zstandard

from streambars.cli import main
from streambars.errors import EXIT_INTERRUPTED
from streambars.observe import Progress, ProgressDisplay
from streambars.store import open_store

DATA = Path(__file__).resolve().parents[1] / "streambars" / "data"
SAMPLE = DATA / "sample-es-1s.dbn.zst"  # ESM4, 175,351 records: three decode batches
SMALL = DATA / "GLBX.MDP3-ESH1.ohlcv-1s.dbn.zst"  # ESH1, real records
TIMEFRAMES = ["--timeframes", "1s,1min,1h"]  # few: keeps the store and the tests small
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z \[(debug|info|warning|error)\s*\] \S")


def dbn_records(path: Path) -> int:
    """Records in a DBN file, counted by databento_dbn's own decoder."""
    decoder = databento_dbn.DBNDecoder()
    decoder.write(zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read())
    return sum(1 for r in decoder.decode() if not isinstance(r, databento_dbn.Metadata))


@pytest.fixture(scope="module")
def expected() -> dict[str, int]:
    return {p.name: dbn_records(p) for p in (SAMPLE, SMALL)}


# ------------------------------------------------------------------ a pseudo-terminal run


def _child(args: list[str], slow: float) -> None:
    """In the forked child: stdio on the pty, then the CLI (``slow``: seconds per decode
    batch of 8,192 records, so a signal can land while the bar is drawn)."""
    code = 99
    try:
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        for name in ("COLUMNS", "LINES"):  # set by pytest-xdist's workers (80): rich would obey them
            os.environ.pop(name, None)
        sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8")  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8")  # noqa: SIM115
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if slow:
            from streambars.sources import dbnfile

            real = dbnfile.iter_batches

            def slowed(*a, **kw):
                for batch in real(*a, **{**kw, "chunk_records": 8192}):
                    time.sleep(slow)
                    yield batch

            dbnfile.iter_batches = slowed
        code = main(args)
    except BaseException:  # noqa: BLE001 - shown to the parent, which fails the test
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_in_pty(args: list[str], slow: float = 0.0, stop_when: str | None = None,
               timeout: float = 60) -> tuple[int, str]:
    """(exit code, everything the terminal received); ``stop_when``: SIGINT the child once
    this pattern has appeared on the terminal."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        _child(args, slow)
    out = b""
    deadline = time.monotonic() + timeout
    sent = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
            if stop_when and not sent and re.search(stop_when, ANSI.sub("", out.decode(errors="replace"))):
                os.kill(pid, signal.SIGINT)
                sent = True
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def screen_lines(raw: str) -> list[str]:
    """What the terminal got, cut where the cursor went back to the line start (rich redraws
    the bar after a carriage return; a log line printed above it ends with a newline)."""
    return [s.strip() for s in re.split(r"\r\n|\r|\n", ANSI.sub("", raw)) if s.strip()]


def assert_whole_log_lines(lines: list[str], bar: str) -> list[str]:
    """Every log line starts at a line start and has no progress text in it; returns them."""
    logs = [s for s in lines if re.search(r"\[(debug|info|warning|error)\s*\]", s)]
    for s in logs:
        assert LOG_LINE.match(s), f"log line garbled: {s!r}"
        assert f"{bar} " not in s and "/s," not in s, f"progress text spliced into: {s!r}"
    return logs


def final_bar(lines: list[str], bar: str) -> str:
    frames = [s for s in lines if s.startswith(f"{bar} ")]
    assert frames, f"no {bar} progress bar drawn: {lines[-10:]}"
    return frames[-1]


def _figure(text: str, noun: str) -> int:
    m = re.search(rf"([\d,]+) {noun}\b", text)
    assert m, f"no '{noun}' figure in {text!r}"
    return int(m.group(1).replace(",", ""))


# ------------------------------------------------------------------ the figures themselves


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_eta_basis_prefers_input_bytes_then_records_then_units():
    clock = FakeClock()
    p = Progress(total_records=1000, units_total=4, input_total=400, clock=clock, started=clock.now)
    clock.now += 30  # start-up: not work, left out of the rate
    p.input_bytes = 40
    p.add(records=100)  # the first records counted: the rate is measured from here
    clock.now += 10
    p.add(records=400)
    p.input_bytes = 100
    p.units_done = 1
    assert p.fraction == 0.25
    assert p.eta_seconds == pytest.approx(10 / (0.25 - 0.1) * 0.75)  # 15% of the bytes in 10 s
    p.input_total = None
    assert p.fraction == 0.5
    assert p.eta_seconds == pytest.approx(10 / (0.5 - 0.1) * 0.5)  # 40% of the records in 10 s
    p.total_records = None
    assert p.fraction == 0.25
    assert p.eta_seconds == pytest.approx(40 * 3)  # a unit took 40 s (downloads count): 3 to go
    p.units_total = None
    assert p.fraction is None and p.eta_seconds is None and "ETA" not in p.line()
    assert p.fields()["records_per_s"] == round(500 / 40)


def test_figures_name_what_they_count():
    p = Progress(noun="rows", units_noun="files", units_total=3, count_bars=False)
    p.add(records=1234, nbytes=2_500_000)
    p.units_done = 1
    f = p.fields()
    assert f["rows"] == 1234 and f["mb"] == 2.5 and f["done"] == "1/3" and "bars" not in f
    assert p.line().startswith("[1/3 files] 1,234 rows, 2.5 MB")


def test_off_a_terminal_progress_events_then_a_final_one(capsys):
    """No bar off a terminal: a ``progress`` event when due (every=0: each update) and a
    final one carrying the final figures."""
    p = Progress(noun="rows", count_bars=False, total_records=30)
    with structlog.testing.capture_logs() as events, ProgressDisplay(p, "export", every=0.0) as d:
        assert not d.terminal
        for _ in range(3):
            p.add(records=10)
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["rows"] for e in progress] == [10, 20, 30, 30]
    assert progress[-1]["final"] is True and progress[-1]["percent"] == 100.0
    assert all(e["what"] == "export" for e in progress)
    assert "\x1b" not in capsys.readouterr().err  # no terminal codes where there is no terminal


def test_rate_limited_events_off_a_terminal():
    p = Progress()
    with structlog.testing.capture_logs() as events, ProgressDisplay(p, "backfill", every=3600.0):
        for _ in range(100):
            p.add(records=1)
    assert [e.get("final") for e in events if e["event"] == "progress"] == [True]


# ------------------------------------------------------------------ off a terminal: JSON


def _json_lines(err: str) -> list[dict]:
    events = []
    for line in err.splitlines():
        assert "Traceback" not in line
        events.append(json.loads(line))  # every stderr line is one JSON object
    return events


@pytest.fixture(scope="module")
def ingest(tmp_path_factory) -> tuple[Path, str, str]:
    """A store from both sample files, by an in-process backfill off a terminal:
    (store, stdout, stderr)."""
    store = tmp_path_factory.mktemp("store")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["backfill", "--store", str(store), "--from-dbn", str(SAMPLE), str(SMALL),
                   *TIMEFRAMES, "--log-format", "json"])
    assert rc == 0, err.getvalue()[-2000:]
    return store, out.getvalue(), err.getvalue()


@pytest.fixture
def ingested(ingest, tmp_path) -> Path:
    """A copy of the ingested store of one test's own."""
    return Path(shutil.copytree(ingest[0], tmp_path / "store"))


def test_backfill_counts_json(ingest, expected):
    """Per-file ``file done`` counts equal the records in each file (they lagged by the
    batches still queued in the pipeline), the final event the sum of them."""
    _, out, err = ingest
    events = _json_lines(err)
    done = [e for e in events if e["event"] == "file done"]
    assert {e["file"]: e["records"] for e in done} == expected
    assert [e["done"] for e in done] == ["1/2", "2/2"]
    # the running total at each step is the sum of the files done so far
    assert [e["total_records"] for e in done] == [expected[done[0]["file"]], sum(expected.values())]
    # beside a file's own records, the run's figures say they are the run's
    assert all("bars" not in e and "mb" not in e for e in done), done
    assert 0 < done[0]["total_bars"] <= done[1]["total_bars"] and done[0]["total_mb"] <= done[1]["total_mb"]
    final = [e for e in events if e["event"] == "progress"]
    assert final and final[-1]["final"] is True and final[-1]["what"] == "backfill"
    assert final[-1]["records"] == sum(expected.values()) and final[-1]["percent"] == 100.0
    assert f"done: {sum(expected.values()):,} records in" in out


CHECKED = ("1min", "1h")  # validate these (the 1s rows would take most of the time)


def _store_rows(store: Path, timeframes: tuple[str, ...] = ("1s", *CHECKED)) -> int:
    """Rows of these timeframes in the store, read back whole."""
    with open_store(store) as r:
        return sum(len(r.read(s.symbol, s.timeframe, dataset=s.dataset)) for s in r.series()
                   if s.timeframe in timeframes)


def test_export_validate_compact_totals_json(ingested, tmp_path, capsys):
    """Each command's final ``progress`` event says what it processed: export the rows in
    the CSV, validate every stored row, compact every file and the bytes it wrote."""
    assert main(["export", "--store", str(ingested), "--symbol", "ESM4", "--timeframe", "1min",
                 "--out", str(tmp_path / "es.csv"), "--log-format", "json"]) == 0
    final = [e for e in _json_lines(capsys.readouterr().err) if e["event"] == "progress"][-1]
    assert final["what"] == "export" and final["final"] is True
    assert final["rows"] == len(pd.read_csv(tmp_path / "es.csv"))
    assert final["percent"] == 100.0

    rows = _store_rows(ingested, CHECKED)
    rc = main(["validate", "--store", str(ingested), "--timeframe", ",".join(CHECKED), "--report", str(tmp_path / "r.txt"),
               "--json", str(tmp_path / "r.json"), "--log-format", "json"])
    assert rc in (0, 1)
    final = [e for e in _json_lines(capsys.readouterr().err) if e["event"] == "progress"][-1]
    assert final["what"] == "validate" and final["rows"] == rows and final["done"] == "2/2"

    files = sorted(ingested.rglob("*.h5"))
    assert main(["compact", "--store", str(ingested), "--log-format", "json"]) == 0
    final = [e for e in _json_lines(capsys.readouterr().err) if e["event"] == "progress"][-1]
    assert final["what"] == "compact" and final["files"] == len(files) == 2
    assert final["mb"] == round(sum(f.stat().st_size for f in files) / 1e6, 1)
    assert final["percent"] == 100.0
    assert _store_rows(ingested, CHECKED) == rows


# ------------------------------------------------------------------ on a terminal


def test_backfill_on_a_terminal_logs_above_the_bar(tmp_path, expected):
    """Console logs and the bar share one terminal: every log line arrives whole (the issue
    saw '...2024-01 ES.c.02026-11-25T21:13:43Z [info] month done'), the per-file counts are
    right, and the bar ends on the total."""
    rc, raw = run_in_pty(["backfill", "--store", str(tmp_path / "s"), "--from-dbn", str(SAMPLE), str(SMALL),
                          *TIMEFRAMES], slow=0.06)
    lines = screen_lines(raw)
    assert "Traceback" not in raw
    assert rc == 0, raw[-3000:]
    logs = assert_whole_log_lines(lines, "backfill")
    done = {m.group(1): int(m.group(2)) for s in logs if " file done " in s
            for m in [re.search(r"file=(\S+).* records=(\d+)", s)]}
    assert done == expected
    bar = final_bar(lines, "backfill")
    assert _figure(bar, "records") == sum(expected.values()) and "[2/2 files]" in bar
    # mid-run frames carry an ETA (from the input bytes read of the files' sizes)
    frames = [s for s in lines if s.startswith("backfill ")]
    assert any("ETA" in s and 0 < _figure(s, "records") < sum(expected.values()) for s in frames), frames
    assert "\x1b[?25h" in raw  # the cursor is shown again


def test_export_validate_compact_on_a_terminal(ingested, tmp_path):
    rows = _store_rows(ingested, CHECKED)
    rc, raw = run_in_pty(["export", "--store", str(ingested), "--symbol", "ESM4", "--timeframe", "1min",
                          "--out", str(tmp_path / "es.csv")])
    assert rc == 0 and "Traceback" not in raw, raw[-2000:]
    lines = screen_lines(raw)
    assert _figure(final_bar(lines, "export"), "rows") == len(pd.read_csv(tmp_path / "es.csv"))
    assert any(s.endswith("rows") and "es.csv" in s for s in lines)  # stdout's line, whole

    rc, raw = run_in_pty(["validate", "--store", str(ingested), "--timeframe", ",".join(CHECKED),
                          "--report", str(tmp_path / "r.txt")])
    assert rc in (0, 1) and "Traceback" not in raw, raw[-2000:]
    lines = screen_lines(raw)
    assert_whole_log_lines(lines, "validate")
    bar = final_bar(lines, "validate")
    assert _figure(bar, "rows") == rows and "[2/2 files]" in bar

    rc, raw = run_in_pty(["compact", "--store", str(ingested), "--compression", "lzf"])
    assert rc == 0 and "Traceback" not in raw, raw[-2000:]
    lines = screen_lines(raw)
    assert _figure(final_bar(lines, "compact"), "files") == 2
    # what it prints to stdout (the same terminal) while the bar is drawn arrives whole, above it
    printed = [s for s in lines if " bytes" in s and not s.startswith("compact ")]
    assert len(printed) == 2 and all(re.fullmatch(r"\S+\.h5\s+[\d,]+ -> [\d,]+ bytes", s) for s in printed)
    assert _store_rows(ingested, CHECKED) == rows


def test_sigint_while_the_bar_is_drawn(tmp_path):
    """Ctrl-C mid-run with rich's refresh thread drawing: exit 130, one 'streambars:' line,
    no traceback, no hang (the signal handler writes nothing; the bar is stopped first)."""
    rc, raw = run_in_pty(["backfill", "--store", str(tmp_path / "s"), "--from-dbn", str(SAMPLE), *TIMEFRAMES],
                         slow=0.1, stop_when=r"\] [1-9][\d,]* records")
    lines = screen_lines(raw)
    assert rc == EXIT_INTERRUPTED, raw[-3000:]
    assert "Traceback" not in raw
    said = [s for s in lines if s.startswith("streambars:")]
    assert len(said) == 1 and "SIGINT" in said[0], lines[-10:]
    assert_whole_log_lines(lines, "backfill")
    assert any("stopping" in s for s in lines)
    # the bar was stopped before the error line: nothing is drawn after it
    assert lines[-1] == said[0]

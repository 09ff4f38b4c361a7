"""The fault suite through the CLI: every failure a user can meet, run as a real subprocess.

Each case asserts the documented exit code (2 bad input, configuration, refused key or
dataset; 1 the work failed; 130 SIGINT/SIGTERM of a one-shot command), exactly one
``streambars: ...`` line on stderr (the JSON log lines around it are not ``streambars:``
lines), and fails on any ``Traceback`` anywhere in stderr. The figures — exit code, time to
the first stderr line and to the ``streambars:`` line — are printed (``-s``) and written to
``<tmp>/fault-timings.json`` for the report; nothing is asserted about them.

Small data: one continuous symbol, a few days a month, on the fake Historical gateway
(module scope) and the fake Live gateway; every case takes a few seconds.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import h5py
import numpy as np
import pytest

from .fakes import NS, TEST_KEY, make_ohlcv

REPO = Path(__file__).resolve().parents[1]
DATASET = "GLBX.MDP3"
SAMPLE = REPO / "streambars" / "data" / "sample-es-1s.dbn.zst"
USAGE, FAILED, INTERRUPTED = 2, 1, 130
TIMINGS: list[dict] = []


# ------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    first_line_s: float | None  # first line of any kind on stderr
    message_s: float | None  # the `streambars:` line

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("streambars:")]

    @property
    def message(self) -> str:
        return self.lines[0] if self.lines else ""


def _limit_file_size(limit: int) -> Callable[[], None]:
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return pre


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, fsize: int | None = None,
            stop: tuple[int, str] | None = None, timeout: float = 120) -> Outcome:
    """``python -m streambars ARGS``; with ``stop=(signal, text)``, the signal is sent as soon
    as ``text`` appears on stderr (a log event of the stage to interrupt)."""
    full_env = {k: v for k, v in os.environ.items() if k != "DATABENTO_API_KEY"}
    full_env.update({"PYTHONPATH": str(REPO), **(env or {})})
    full_env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streambars", *args], cwd=cwd, env=full_env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=_limit_file_size(fsize) if fsize else None,
    )
    first: list[float] = []
    message: list[float] = []
    err: list[str] = []
    out: list[str] = []
    sent = threading.Event()

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            now = time.monotonic() - t0
            if not first:
                first.append(now)
            if line.startswith("streambars:") and not message:
                message.append(now)
            err.append(line)
            if stop is not None and not sent.is_set() and stop[1] in line:
                sent.set()
                proc.send_signal(stop[0])

    def read_out() -> None:
        assert proc.stdout is not None
        out.append(proc.stdout.read())

    threads = [threading.Thread(target=read_err), threading.Thread(target=read_out)]
    for t in threads:
        t.start()
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        for t in threads:
            t.join(10)
    if stop is not None:
        assert sent.is_set(), f"never saw {stop[1]!r} to send the signal at:\n{''.join(err)[-3000:]}"
    return Outcome(rc, "".join(out), "".join(err), first[0] if first else None,
                   message[0] if message else None)


def check(case: str, o: Outcome, code: int, *must: str, line: bool = True) -> None:
    """The contract: exit ``code``, one `streambars:` line containing every ``must`` (when
    ``line``), no traceback; the figures are recorded."""
    TIMINGS.append({"case": case, "exit_code": o.rc, "first_stderr_line_s": o.first_line_s,
                    "streambars_line_s": o.message_s})
    assert "Traceback" not in o.stderr, o.stderr[-4000:]
    assert "Exception ignored" not in o.stderr, o.stderr[-4000:]
    assert o.rc == code, (o.rc, o.stderr[-3000:])
    if line:
        assert len(o.lines) == 1, o.stderr[-3000:]
        for text in must:
            assert text.lower() in o.message.lower(), (text, o.message)
    assert TEST_KEY not in o.stderr and TEST_KEY not in o.stdout


@pytest.fixture(scope="module", autouse=True)
def _report_timings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    path = tmp_path_factory.getbasetemp() / "fault-timings.json"
    path.write_text(json.dumps(TIMINGS, indent=1))
    print(f"\nfault suite: {len(TIMINGS)} runs (figures in {path})")
    for t in TIMINGS:
        first = "-" if t["first_stderr_line_s"] is None else f"{t['first_stderr_line_s']:.2f}s"
        msg = "-" if t["streambars_line_s"] is None else f"{t['streambars_line_s']:.2f}s"
        print(f"  {t['case']:<44} exit {t['exit_code']:>3}  first line {first:>7}  streambars: {msg:>7}")


# ------------------------------------------------------------------------------ data


def _day_ns(d: date) -> int:
    return (d - date(1970, 1, 1)).days * 86_400 * NS


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """ES.c.0 (instrument 101): 2 h of 1 s bars on three days of each month Jan..Apr 2024."""
    from .fakes.historical import FakeHistorical

    fake = FakeHistorical(TEST_KEY)
    far = date(2025, 1, 1)
    fake.add_instrument(DATASET, 101, "ESH4", date(2023, 12, 1), far)
    fake.add_continuous(DATASET, "ES.c.0", [(date(2023, 12, 1), far, 101)])
    parts = [make_ohlcv(101, _day_ns(date(2024, m, d)) + 14 * 3600 * NS, 7200, seed=m * 40 + d)
             for m in range(1, 5) for d in (3, 10, 17)]
    fake.add_records(DATASET, "ohlcv-1s", np.concatenate(parts))
    fake.start(cert_dir=tmp_path_factory.mktemp("fault-ca"))
    try:
        yield fake
    finally:
        fake.stop()


def _backfill(store: Path, fake, *extra: str, symbols: str = "ES.c.0", start: str = "2024-01",
              end: str = "2024-04") -> list[str]:
    return ["backfill", "--store", str(store), "--dataset", DATASET, "--schema", "ohlcv-1s",
            "--stype-in", "continuous", "--symbols", symbols, "--start", start, "--end", end,
            "--timeframes", "1s,1min,1h,1d", "--historical-gateway", fake.url, "--env-file",
            "/nonexistent", "--log-format", "json", "--yes", *extra]


def _env(fake, key: str | None = TEST_KEY) -> dict[str, str]:
    return {**fake.env, **({"DATABENTO_API_KEY": key} if key else {})}


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample (ESM4, 3 days) ingested once: the store export/validate run on."""
    root = tmp_path_factory.mktemp("sample")
    o = run_cli("backfill", "--store", str(root / "store"), "--from-dbn", str(SAMPLE),
                "--timeframes", "1s,1min,5min,1h", "--log-format", "json", cwd=root)
    assert o.rc == 0, o.stderr[-3000:]
    return root / "store"


# ------------------------------------------------------------------------------ input and config


def test_malformed_config(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[databento\nsymbols = [\n")
    check("malformed config (TOML syntax)", run_cli("inspect", "--config", str(cfg), cwd=tmp_path),
          USAGE, "bad.toml")
    cfg.write_text("[live]\nclose_grace_s = -1\n")
    check("malformed config (bad value)", run_cli("inspect", "--config", str(cfg), cwd=tmp_path),
          USAGE, "live.close_grace_s")


def test_missing_key(gateway, tmp_path):
    o = run_cli(*_backfill(tmp_path / "store", gateway), cwd=tmp_path, env=_env(gateway, key=None))
    check("missing API key", o, USAGE, "DATABENTO_API_KEY")


def test_wrong_key(gateway, tmp_path):
    wrong = "db-" + "WrongKey0123456789abcdefghij" + "Q"
    o = run_cli(*_backfill(tmp_path / "store", gateway), cwd=tmp_path, env=_env(gateway, key=wrong))
    check("wrong API key", o, USAGE, "refused the API key")
    assert wrong not in o.stderr and wrong[-10:] not in o.stderr


def test_unknown_symbol(gateway, tmp_path):
    o = run_cli(*_backfill(tmp_path / "store", gateway, symbols="XX.c.0"), cwd=tmp_path, env=_env(gateway))
    check("unknown symbol", o, USAGE, "XX.c.0")


def test_wrong_dataset_is_not_a_refused_key(gateway, tmp_path):
    args = _backfill(tmp_path / "store", gateway)
    args[args.index(DATASET)] = "NOPE.DATA"
    o = run_cli(*args, cwd=tmp_path, env=_env(gateway))
    check("wrong dataset", o, USAGE, "NOPE.DATA", "does not serve this dataset")
    assert "API key" not in o.message


@pytest.mark.parametrize(("flag", "value", "what"), [
    ("--start", "0001-01-01", "between 1970-01-01"),
    ("--end", "9999-12-31", "between 1970-01-01"),
    ("--start", "garbage", "not a date"),
])
def test_bad_backfill_dates(gateway, tmp_path, flag, value, what):
    args = _backfill(tmp_path / "store", gateway)
    args[args.index(flag) + 1] = value
    check(f"backfill {flag} {value}", run_cli(*args, cwd=tmp_path, env=_env(gateway)), USAGE, value, what)


def test_export_and_validate_dates_beyond_nanoseconds_mean_no_bound(sample_store, tmp_path):
    out = tmp_path / "all.csv"
    o = run_cli("export", "--store", str(sample_store), "--symbol", "ESM4", "--timeframe", "1h",
                "--start", "0001-01-01", "--end", "9999-12-31", "--out", str(out), cwd=tmp_path)
    check("export --start 0001 --end 9999", o, 0, line=False)
    assert len(out.read_text().splitlines()) > 10
    o = run_cli("export", "--store", str(sample_store), "--symbol", "ESM4", "--timeframe", "1h",
                "--start", "9999-12-31", "--out", str(out), cwd=tmp_path)
    check("export --start 9999 (nothing there)", o, FAILED, "no ESM4 1h bars in [9999-12-31")
    o = run_cli("export", "--store", str(sample_store), "--symbol", "ESM4", "--timeframe", "1h",
                "--start", "garbage", "--out", str(out), cwd=tmp_path)
    check("export --start garbage", o, USAGE, "garbage")
    o = run_cli("validate", "--store", str(sample_store), "--start", "0001-01-01", "--end", "9999-12-31",
                "--report", str(tmp_path / "r.txt"), cwd=tmp_path)
    check("validate --start 0001 --end 9999", o, 0, line=False)
    assert "0 error(s)" in o.stdout


def test_nul_in_a_symbol(gateway, tmp_path):
    # argv cannot carry a NUL (the shell's $'ES\x00' passes "ES"): it arrives through TOML.
    bad = 'databento.symbols=["ES\\u0000"]'
    o = run_cli(*_backfill(tmp_path / "store", gateway), "--set", bad, cwd=tmp_path, env=_env(gateway))
    check("NUL in a symbol (backfill)", o, USAGE, "databento.symbols", "control characters")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[databento]\nsymbols = ["ES\\u0000x"]\n')
    for cmd in ("inspect", "validate"):
        o = run_cli(cmd, "--config", str(cfg), "--store", str(tmp_path / "store"), cwd=tmp_path)
        check(f"NUL in a symbol ({cmd})", o, USAGE, "databento.symbols")


def test_from_dbn_directory(tmp_path):
    d = tmp_path / "dbn"
    d.mkdir()
    o = run_cli("backfill", "--store", str(tmp_path / "s"), "--from-dbn", str(d), cwd=tmp_path)
    check("--from-dbn empty directory", o, USAGE, str(d), "directory without .dbn")
    (d / "sample.dbn.zst").write_bytes(SAMPLE.read_bytes())
    (d / "notes.txt").write_text("not DBN")
    o = run_cli("backfill", "--store", str(tmp_path / "s"), "--from-dbn", str(d), "--timeframes", "1min",
                cwd=tmp_path)
    check("--from-dbn directory of DBN files", o, 0, line=False)
    assert "ingesting 1 DBN file(s)" in o.stdout


def test_corrupt_dbn_file(tmp_path):
    bad = tmp_path / "bad.dbn.zst"
    raw = SAMPLE.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    o = run_cli("backfill", "--store", str(tmp_path / "s"), "--from-dbn", str(bad), cwd=tmp_path)
    check("corrupt DBN file", o, FAILED, "bad.dbn.zst")


def test_export_bad_timeframe_and_tz(sample_store, tmp_path):
    o = run_cli("export", "--store", str(sample_store), "--symbol", "ESM4", "--timeframe", "abc",
                "--out", str(tmp_path / "x.csv"), cwd=tmp_path)
    check("export --timeframe abc", o, USAGE, "abc")
    o = run_cli("export", "--store", str(sample_store), "--symbol", "ESM4", "--timeframe", "1h",
                "--tz", "Mars/Olympus", "--out", str(tmp_path / "x.csv"), cwd=tmp_path)
    check("export --tz Mars/Olympus", o, USAGE, "--tz 'Mars/Olympus' is not a time zone")


@pytest.mark.parametrize("ts", [-1, 2**63 - 1, -(2**63)])
def test_validate_and_export_survive_a_bad_ts_event_row(sample_store, tmp_path, ts):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(sample_store, store)
    with h5py.File(store / DATASET / "ESM4.h5", "r+") as f:
        for tf, row in (("1min", 5), ("1h", -1), ("5min", 0)):
            ds = f["bars"][tf]
            r = ds[row]
            r["ts_event"] = ts
            ds[row] = r
    # A bar at an impossible time is not a bar: the file is damaged (named, isolated, exit 2).
    o = run_cli("validate", "--store", str(store), "--report", str(tmp_path / "r.txt"), cwd=tmp_path)
    check(f"validate, a row with ts_event {ts}", o, USAGE, "ESM4.h5", "damaged")
    o = run_cli("inspect", "--store", str(store), cwd=tmp_path)
    check(f"inspect, a row with ts_event {ts}", o, USAGE, "cannot be read")
    assert "ESM4" in o.stdout and "damaged" in o.stdout  # its row in the table says why
    o = run_cli("export", "--store", str(store), "--symbol", "ESM4", "--timeframe", "1min",
                "--out", str(tmp_path / "x.csv"), cwd=tmp_path)
    check(f"export, a row with ts_event {ts}", o, USAGE, "ESM4.h5", "damaged")


# ------------------------------------------------------------------------------ runtime failures


def test_disk_full_during_download(gateway, tmp_path):
    store = tmp_path / "store"
    o = run_cli(*_backfill(store, gateway), cwd=tmp_path, env=_env(gateway), fsize=40_000)
    check("disk full during download", o, FAILED, "2024-01", "File too large", str(store / DATASET / "raw"))
    raw = store / DATASET / "raw"
    assert not [p for p in raw.rglob("*") if p.is_file()], "a partial download was left behind"


def test_stale_part_file_of_an_interrupted_download_is_removed(gateway, tmp_path):
    store = tmp_path / "store"
    raw = store / DATASET / "raw" / "ES.c.0"
    raw.mkdir(parents=True)
    stale = raw / ".2024-01.dbn.zst.999999999.deadbeef.part"  # a pid that does not exist
    stale.write_bytes(b"half a download")
    o = run_cli(*_backfill(store, gateway, end="2024-02"), cwd=tmp_path, env=_env(gateway))
    check("rerun after an interrupted download", o, 0, line=False)
    assert not stale.exists()
    assert (raw / "2024-01.dbn.zst").is_file()


def test_daemon_disk_full(tmp_path):
    """The Live daemon on a full disk: one JSON error event, one line, exit 1 (systemd
    restarts), and every file still reads back with strictly increasing timestamps."""
    from streambars.store import open_store

    from .daemon_support import es_nq_records, make_gateway, write_config

    fake = make_gateway(es_nq_records(20_000), rate=20_000.0)
    try:
        store = tmp_path / "store"
        cfg = write_config(tmp_path / "c.toml", fake.gateway, store, timeframes=["1s", "1min", "1h"])
        o = run_cli("run", "--config", str(cfg), "--env-file", "/nonexistent", cwd=tmp_path,
                    env={"DATABENTO_API_KEY": TEST_KEY}, fsize=150_000, timeout=90)
    finally:
        fake.stop()
    check("daemon: disk full", o, FAILED, "File too large")
    events = [json.loads(ln) for ln in o.stderr.splitlines() if ln.startswith("{")]
    errors = [e for e in events if e.get("level") == "error"]
    assert errors and "File too large" in errors[-1]["error"], o.stderr[-3000:]
    with open_store(store) as reader:
        for s in reader.series():
            bars = reader.read(s.symbol, s.timeframe, dataset=s.dataset)
            assert (np.diff(bars["ts_event"]) > 0).all(), (s.symbol, s.timeframe)
    o = run_cli("inspect", "--store", str(store), cwd=tmp_path)
    check("inspect after the daemon's disk full", o, 0, line=False)


def test_daemon_wrong_dataset_is_not_a_refused_key(tmp_path):
    from .daemon_support import es_nq_records, make_gateway, write_config

    fake = make_gateway(es_nq_records(10))
    try:
        cfg = write_config(tmp_path / "c.toml", fake.gateway, tmp_path / "store")
        cfg.write_text(cfg.read_text().replace('dataset = "GLBX.MDP3"', 'dataset = "XNAS.ITCH"'))
        o = run_cli("run", "--config", str(cfg), "--env-file", "/nonexistent", cwd=tmp_path,
                    env={"DATABENTO_API_KEY": TEST_KEY}, timeout=60)
    finally:
        fake.stop()
    check("daemon: wrong dataset", o, USAGE, "XNAS.ITCH", "does not serve")
    assert "refused the API key" not in o.stderr


# ------------------------------------------------------------------------------ stop signals


@pytest.mark.parametrize(("sig", "moment", "text"), [
    (signal.SIGTERM, "planning", '"store.created"'),
    (signal.SIGTERM, "download", '"downloading"'),
    (signal.SIGTERM, "decode", '"downloaded"'),
    (signal.SIGTERM, "write", '"month done"'),
    (signal.SIGINT, "planning", '"store.created"'),
    (signal.SIGINT, "download", '"downloading"'),
    (signal.SIGINT, "write", '"month done"'),
])
def test_stop_signal_of_a_backfill(gateway, tmp_path, sig, moment, text):
    gateway.latency = 0.2  # requests in flight long enough for the signal to land in them
    try:
        o = run_cli(*_backfill(tmp_path / "store", gateway), cwd=tmp_path, env=_env(gateway),
                    stop=(sig, text))
    finally:
        gateway.latency = 0.0
    check(f"backfill {signal.Signals(sig).name} at {moment}", o, INTERRUPTED,
          signal.Signals(sig).name, "rerun")


def test_stop_signal_of_an_ingest(tmp_path):
    o = run_cli("backfill", "--store", str(tmp_path / "s"), "--from-dbn", str(SAMPLE),
                "--log-format", "json", cwd=tmp_path, stop=(signal.SIGTERM, '"store.created"'))
    check("ingest SIGTERM at start", o, INTERRUPTED, "SIGTERM")


def test_corrupt_download_after_the_retries(gateway, tmp_path, monkeypatch, capsys):
    """Every answer corrupt: after the retries (shortened here), one line naming the month,
    exit 1, nothing archived. In-process: the retry schedule is not a CLI option."""
    from streambars.cli import main
    from streambars.sources import historical

    init = historical.HistoricalSource.__init__

    def quick(self, *a, **kw):
        init(self, *a, **{**kw, "retries": 1, "backoff_min": 0.01, "backoff_max": 0.02})

    monkeypatch.setattr(historical.HistoricalSource, "__init__", quick)
    for k, v in _env(gateway).items():
        monkeypatch.setenv(k, v)
    gateway.corrupt_next(4, "garbage")
    store = tmp_path / "store"
    try:
        rc = main(_backfill(store, gateway, end="2024-02"))
    finally:
        with gateway._lock:
            gateway._corrupt.clear()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("streambars:")]
    TIMINGS.append({"case": "corrupt download (in-process)", "exit_code": rc,
                    "first_stderr_line_s": None, "streambars_line_s": None})
    assert rc == FAILED and len(lines) == 1, err[-3000:]
    assert "ES.c.0" in lines[0] and "2024-01" in lines[0] and "still failing after 2 tries" in lines[0]
    assert not list((store / DATASET / "raw").rglob("*.dbn.zst"))

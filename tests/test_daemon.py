"""`streambars run` as a real subprocess against the fake Live gateway.

The notify protocol is read from a real unix datagram socket; the store is read through SWMR
while the daemon writes; the exit codes are the process's own.
"""

from __future__ import annotations

import signal
import socket
import time

import h5py
import numpy as np
import pytest

from streambars import archive
from tests.daemon_support import (
    Daemon,
    NotifySocket,
    es_nq_records,
    make_gateway,
    read_bars,
    row_counts,
    store_file,
    wait_for,
    write_config,
)
from tests.fakes import TEST_KEY

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")


@pytest.fixture
def notify(tmp_path):
    n = NotifySocket(tmp_path)
    yield n
    n.close()


def test_notify_protocol_and_sigterm_flushes_and_exits_0(tmp_path, notify):
    records = es_nq_records(3000)
    fake = make_gateway(records, rate=3000.0, heartbeat_interval=0.2)
    try:
        store = tmp_path / "store"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            mport = s.getsockname()[1]
        cfg = write_config(tmp_path / "c.toml", fake.gateway, store, metrics_port=mport)
        d = Daemon(tmp_path, cfg, notify=notify, watchdog_usec=1_000_000)
        wait_for(lambda: notify.lines("READY=1"), 30, "READY=1", daemon=d)
        wait_for(lambda: notify.lines("WATCHDOG=1"), 10, "WATCHDOG=1", daemon=d)
        wait_for(lambda: row_counts(store, "ES.c.0").get("1min", 0) > 5, 20, "bars in the store", daemon=d)
        wait_for(lambda: [s for s in notify.lines("STATUS=") if "rec/s" in s], 15, "STATUS=", daemon=d)
        metrics = _scrape(f"http://127.0.0.1:{mport}/metrics")
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        rc = d.wait(20)
        stop_s = time.monotonic() - t0
    finally:
        fake.stop()
    assert rc == 0, d.log_text()[-3000:]
    assert stop_s < 10
    assert notify.lines("STOPPING=1")
    assert notify.times("READY=1")[0] < notify.times("STOPPING=1")[0]
    status = notify.lines("STATUS=")
    assert any("rec/s" in s and "lag" in s and "reconnects" in s for s in status), status
    assert any(ln.startswith("MAINPID=") for ln in notify.lines())
    # Cleanly closed: an ordinary (non-SWMR) read-only open works, and the bars are there.
    for sym in ("ES.c.0", "NQ.c.0"):
        with h5py.File(store_file(store, sym), "r") as f:
            assert f["bars"]["1s"].shape[0] > 100
            assert np.all(np.diff(f["bars"]["1s"]["ts_event"][:]) > 0)
        live = archive.live_path(store, "GLBX.MDP3", sym, "2024-01")
        contents = archive.read_live_file(live)
        assert not contents.truncated_tail
    assert TEST_KEY not in d.log_text()
    assert d.has_event("stopped")
    assert metrics["streambars_records_total"] > 0
    assert metrics["streambars_records_aggregated_total"] > 0
    assert metrics['streambars_bars_written_total{timeframe="1min"}'] > 0
    assert metrics['streambars_last_bar_timestamp_seconds{symbol="ES.c.0",timeframe="1s"}'] > 1.7e9
    assert metrics["streambars_connected"] == 1
    assert 'streambars_queue_depth{queue="writer"}' in metrics


def _scrape(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_wrong_key_exits_nonzero_at_once(tmp_path):
    fake = make_gateway(es_nq_records(10))
    try:
        cfg = write_config(tmp_path / "c.toml", fake.gateway, tmp_path / "store")
        wrong = "db-" + "WrongKey0123456789abcdefghij" + "Q"
        d = Daemon(tmp_path, cfg, key=wrong)
        rc = d.wait(30)
        sessions = len(fake.sessions)
    finally:
        fake.stop()
    assert rc == 2, d.log_text()
    assert sessions == 1  # tried once, no retry loop
    text = d.log_text()
    assert "refused the API key" in text
    assert wrong not in text and wrong[-10:] not in text


def test_unreachable_gateway_retries_with_backoff_and_says_so(tmp_path, notify):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    cfg = write_config(tmp_path / "c.toml", f"127.0.0.1:{port}", tmp_path / "store",
                       reconnect_min_s=0.1, reconnect_max_s=0.4)
    d = Daemon(tmp_path, cfg, notify=notify)
    wait_for(lambda: sum(e.get("event") == "cannot reach the Live gateway; retrying"
                         for e in d.events()) >= 3, 30, "three retries", daemon=d)
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    retries = [e for e in d.events() if e.get("event") == "cannot reach the Live gateway; retrying"]
    assert all("retry_in_s" in e and "attempt" in e for e in retries)
    assert [e["attempt"] for e in retries[:3]] == [1, 2, 3]
    assert any("cannot reach" in s for s in notify.lines("STATUS="))
    assert not notify.lines("READY=1")


def _refused(tmp_path, store, **live) -> tuple[int, str, int]:
    """Run the daemon against a gateway it must never contact: (exit code, log, sessions)."""
    fake = make_gateway(es_nq_records(10))
    try:
        d = Daemon(tmp_path, write_config(tmp_path / "c.toml", fake.gateway, store, **live))
        rc = d.wait(30)
        return rc, d.log_text(), len(fake.sessions)
    finally:
        fake.stop()


def test_malformed_config_refused_before_connecting(tmp_path):
    rc, text, sessions = _refused(tmp_path, tmp_path / "store", close_grace_s=-1)
    assert (rc, sessions) == (2, 0)
    assert "live.close_grace_s" in text


def test_unwritable_store_refused_at_start(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store directory should be")
    rc, text, sessions = _refused(tmp_path, blocker / "store")
    assert (rc, sessions) == (1, 0)
    assert "not writable" in text


def test_sighup_reopens_the_log_file_and_reloads_the_symbol_list(tmp_path):
    from streambars.config import load_settings
    from tests.daemon_support import reference_bars

    records = es_nq_records(3000)
    fake = make_gateway(records, rate=800.0, heartbeat_interval=0.2)
    store, log_file = tmp_path / "store", tmp_path / "logs" / "daemon.jsonl"
    cfg = tmp_path / "c.toml"
    try:
        write_config(cfg, fake.gateway, store, symbols=["ES.c.0"], log_file=log_file)
        d = Daemon(tmp_path, cfg)
        wait_for(lambda: row_counts(store, "ES.c.0").get("1s", 0) > 50, 30, "ES bars", daemon=d)
        rotated = log_file.with_suffix(".jsonl.1")
        log_file.rename(rotated)  # what logrotate does before its postrotate SIGHUP
        write_config(cfg, fake.gateway, store, symbols=["ES.c.0", "NQ.c.0"], log_file=log_file)
        d.signal(signal.SIGHUP)
        wait_for(lambda: row_counts(store, "NQ.c.0").get("1s", 0) > 50, 30, "NQ bars after SIGHUP", daemon=d)
        settings = load_settings(cfg)
        ref = reference_bars(settings, {"ES.c.0": records["ES.c.0"]}, ["ES.c.0"])["ES.c.0"]
        want = {tf: len(rows) for tf, rows in ref.items()}
        wait_for(lambda: row_counts(store, "ES.c.0") == want, 40, "every ES bar", every=0.2, daemon=d)
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
    finally:
        fake.stop()
    new_lines = log_file.read_text()
    assert "SIGHUP: log file reopened" in new_lines
    assert "symbol list changed" in new_lines
    assert "SIGHUP" not in rotated.read_text()
    # The epoch switch lost nothing and duplicated nothing for the symbol that streamed on.
    got = read_bars(store, "ES.c.0", swmr=False)
    for tf, rows in ref.items():
        np.testing.assert_array_equal(got[tf], rows, err_msg=tf)


def test_quiet_market_bars_close_on_the_wall_clock(tmp_path):
    """No later record and no END_OF_INTERVAL: the last bars close once the wall clock is past
    their end by the input interval plus the grace, and nothing before them is made late."""
    from tests.fakes import NS as _NS
    from tests.fakes import make_ohlcv
    from tests.fakes.live import FakeLive

    n = 6
    t0 = (time.time_ns() // _NS + 6) * _NS  # records stamped in real time, one a second
    recs = make_ohlcv(1, t0, n, seed=3, fill=1.0)

    fake = FakeLive(TEST_KEY, rate=1.0, heartbeat_interval=0.3, end_of_interval=False)
    fake.add_instrument(1, "ESH4")
    fake.add_continuous("ES.c.0", [(0, 1)])
    fake.add_records("ohlcv-1s", recs)
    fake.start()
    store = tmp_path / "store"
    try:
        cfg = write_config(tmp_path / "c.toml", fake.gateway, store, symbols=["ES.c.0"], close_grace_s=3.0,
                           timeframes=["1s", "5s"])
        d = Daemon(tmp_path, cfg)
        last = int(recs["ts_event"][-1])
        wait_for(lambda: row_counts(store, "ES.c.0").get("1s", 0) == n, 40, "the last 1s bar", daemon=d)
        seen_at = time.time_ns()
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
    finally:
        fake.stop()
    got = read_bars(store, "ES.c.0", swmr=False)
    np.testing.assert_array_equal(got["1s"]["ts_event"], recs["ts_event"])
    # Closed by the clock: end + 1 s interval + 3 s grace, give or take the daemon's tick.
    delay = (seen_at - (last + _NS)) / 1e9
    assert 3.5 < delay < 20, delay


def test_unresolved_symbol_log_hints_at_the_stype_it_looks_like(tmp_path):
    """A parent symbol (ES.FUT) in a continuous subscription does not resolve: the daemon goes
    on with the others and its error line says which --stype-in the symbol looks like."""
    records = es_nq_records(300)
    fake = make_gateway(records, rate=3000.0, heartbeat_interval=0.2)
    store = tmp_path / "store"
    try:
        cfg = write_config(tmp_path / "c.toml", fake.gateway, store, symbols=["ES.c.0", "ES.FUT"])
        d = Daemon(tmp_path, cfg)
        event = "the gateway could not resolve a symbol; going on with the others"
        wait_for(lambda: d.has_event(event), 30, "the unresolved-symbol error", daemon=d)
        wait_for(lambda: row_counts(store, "ES.c.0").get("1s", 0) > 0, 20, "ES.c.0 bars", daemon=d)
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
    finally:
        fake.stop()
    [err] = [e for e in d.events() if e.get("event") == event]
    assert err["symbol"] == "ES.FUT"
    assert "ES.FUT is a parent symbol: add --stype-in parent" in err["hint"]
    assert "Traceback" not in d.log_text()

"""The acceptance test of the live daemon: kill -9, dropped connections and gateway errors
lose no bar and duplicate none.

Hours of 1s bars for two symbols stream from the fake Live gateway at high speed. The daemon
(a real subprocess) is SIGKILLed at random moments and restarted, the gateway drops one
connection and ends another with an ErrorMsg, and a third configured symbol never resolves
(an ErrorMsg per session). At the end every timeframe in the store must equal, row for row,
one uninterrupted engine run over the same records; the raw archive must hold every record
exactly once; and no replayed duplicate may have been counted as a validation violation.

``STREAMBARS_KILL_SEED`` replays a given run's kill moments.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time

import numpy as np
import pytest

from streambars import archive
from streambars.config import load_settings
from tests.daemon_support import (
    Daemon,
    engine_counts,
    es_nq_records,
    make_gateway,
    read_bars,
    reference_bars,
    row_counts,
    wait_for,
    write_config,
)
from tests.fakes import TEST_KEY

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")]

RECORDS_PER_SYMBOL = 8000  # ~2.8 hours of 1s bars each (80% of seconds traded)
RATE = 1000.0  # records/s the fake market "happens" at: ~16 s of stream
KILLS = 3


def _ready_count(d: Daemon) -> int:
    return sum(e.get("event") == "ready" for e in d.events())


def test_kill9_drop_and_error_leave_the_store_identical_to_one_run(tmp_path):
    seed = int(os.environ.get("STREAMBARS_KILL_SEED", time.time_ns() % 2**31))
    print(f"kill seed {seed} (STREAMBARS_KILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    records = es_nq_records(RECORDS_PER_SYMBOL)
    symbols = ["ES.c.0", "NQ.c.0", "ZZ.c.0"]  # ZZ.c.0 never resolves
    fake = make_gateway(records, rate=RATE, heartbeat_interval=0.2)
    fake.drop_next(rng.randint(1000, 3000))  # the first session is cut mid-stream
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "c.toml", fake.gateway, store, symbols=symbols,
                       heartbeat_timeout_s=2.0)
    settings = load_settings(cfg)
    ref = reference_bars(settings, records, symbols)
    logs: list[Daemon] = []
    try:
        d = Daemon(tmp_path, cfg)
        logs.append(d)
        # Once the first session has been dropped, the next one ends with an ErrorMsg.
        wait_for(lambda: fake.sessions and fake.sessions[0].ended, 60, "the first drop", daemon=d)
        fake.error_next(rng.randint(100, 600), "Internal error: gateway restarting")
        wait_for(lambda: any(s.ended.startswith("error sent") for s in fake.sessions), 30,
                 "the ErrorMsg", daemon=d)
        for k in range(KILLS):
            wait_for(lambda d=d: _ready_count(d) >= 1, 60, f"daemon {k} ready", daemon=d)
            time.sleep(rng.uniform(0.2, 2.5))
            d.kill()
            d = Daemon(tmp_path, cfg)
            logs.append(d)
        want = {s: {tf: len(rows) for tf, rows in ref[s].items()} for s in ("ES.c.0", "NQ.c.0")}
        wait_for(lambda: all(row_counts(store, s) == want[s] for s in want), 90,
                 "every bar of the reference in the store", every=0.2, daemon=d)
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0, d.log_text()[-3000:]
        sessions = list(fake.sessions)
    finally:
        for x in logs:
            x.signal(signal.SIGKILL)
        fake.stop()

    # 1. Every timeframe identical to one uninterrupted run, row for row.
    for sym in ("ES.c.0", "NQ.c.0"):
        got = read_bars(store, sym, swmr=False)
        for tf, rows in ref[sym].items():
            assert len(rows) > 0
            np.testing.assert_array_equal(got[tf], rows, err_msg=f"{sym} {tf} (seed {seed})")
    assert all(len(v) == 0 for v in read_bars(store, "ZZ.c.0", swmr=False).values())

    # 2. The raw archive holds every record received exactly once, in order.
    for sym, src in records.items():
        got = archive.read_live_file(archive.live_path(store, "GLBX.MDP3", sym, "2024-01"))
        arr = np.frombuffer(got.records, dtype=src.dtype)
        np.testing.assert_array_equal(arr["ts_event"], src["ts_event"], err_msg=f"archive {sym}")
        for f in ("open", "high", "low", "close", "volume"):
            np.testing.assert_array_equal(arr[f], src[f])

    # 3. Replayed duplicates were dropped before the engine, never counted as violations.
    for sym in ("ES.c.0", "NQ.c.0"):
        assert engine_counts(store, settings, sym)["ts_not_increasing"] == 0

    # 4. What happened was said: reconnects with their reason and the gap's length.
    events = [e for x in logs for e in x.events()]
    lost = [e for e in events if e.get("event") == "live connection lost; reconnecting with replay"]
    assert any("disconnect" in e["reason"] for e in lost), lost
    assert any(e.get("event") == "live gateway error" and e.get("code") == "internal_error" for e in events)
    gaps = [e for e in events if e.get("event") == "reconnected; the gap is being replayed"]
    assert gaps and all("outage_s" in e and "replay_from" in e for e in gaps)
    assert any(e.get("event") == "the gateway could not resolve a symbol; going on with the others"
               for e in events)
    assert sum(1 for e in events if e.get("event") == "stopped") == 1  # the others were killed
    assert len(sessions) >= 2 + KILLS
    assert sum(1 for s in sessions if any(sub.get("start") for sub in s.subscriptions)) >= 1 + KILLS


def test_parent_subscription_resumes_each_instrument_after_kill9(tmp_path):
    """stype_in=parent: instruments come from the stream; after kill -9 each one's state and
    marks are found again in its file, so the store still equals one uninterrupted run."""
    from tests.fakes import make_ohlcv
    from tests.fakes.live import FakeLive

    from .daemon_support import START_NS

    records = {"ESH4": make_ohlcv(11, START_NS, 3000, seed=5),
               "ESM4": make_ohlcv(12, START_NS, 3000, seed=6, price=4750.0)}
    fake = FakeLive(TEST_KEY, rate=1000.0, heartbeat_interval=0.2)
    fake.add_instrument(11, "ESH4", parent="ES.FUT")
    fake.add_instrument(12, "ESM4", parent="ES.FUT")
    fake.add_records("ohlcv-1s", np.concatenate(list(records.values())))
    fake.start()
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "c.toml", fake.gateway, store, symbols=["ES.FUT"])
    cfg.write_text(cfg.read_text().replace('stype_in = "continuous"', 'stype_in = "parent"'))
    settings = load_settings(cfg)
    ref = reference_bars(settings, records, ["ESH4", "ESM4"])
    try:
        d = Daemon(tmp_path, cfg)
        wait_for(lambda: row_counts(store, "ESM4").get("1s", 0) > 500, 60, "bars before the kill", daemon=d)
        time.sleep(0.3)  # past a checkpoint
        d.kill()
        d = Daemon(tmp_path, cfg)
        want = {s: {tf: len(rows) for tf, rows in ref[s].items()} for s in ref}
        wait_for(lambda: all(row_counts(store, s) == want[s] for s in want), 60, "every bar", every=0.2,
                 daemon=d)
        resumed = next(e for e in d.events() if e.get("event") == "resuming")
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
    finally:
        d.signal(signal.SIGKILL)
        fake.stop()
    assert set(resumed["symbols"]) == {"ESH4", "ESM4"}
    assert not (store / "GLBX.MDP3" / "ES.FUT.h5").exists()  # no file for the parent itself
    assert resumed["archive_marks"]["ESM4"] != "-"  # found again even if never checkpointed
    for sym in ref:
        got = read_bars(store, sym, swmr=False)
        for tf, rows in ref[sym].items():
            np.testing.assert_array_equal(got[tf], rows, err_msg=f"{sym} {tf}")
        assert engine_counts(store, settings, sym)["ts_not_increasing"] == 0

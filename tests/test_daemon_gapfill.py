"""An outage longer than the replay window is filled from the Historical API.

Run 1 streams the first ten minutes of 2024 data from the fake Live gateway and stops. Run 2
resumes from a mark far older than ``live.replay_window_h``: it must ask the fake Historical
gateway for the cost, download the rest per symbol, feed it through de-duplication, the
archive and the engine, and subscribe live from the edge of the window. The store must end
identical to one uninterrupted engine run over all the records.
"""

from __future__ import annotations

import signal
import socket
from datetime import date

import numpy as np
import pytest

from streambars import archive
from streambars.config import load_settings
from tests.daemon_support import (
    Daemon,
    es_nq_records,
    make_gateway,
    read_bars,
    reference_bars,
    row_counts,
    wait_for,
    write_config,
)
from tests.fakes import TEST_KEY

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")


def test_outage_beyond_the_replay_window_is_filled_from_historical(tmp_path):
    from tests.fakes.historical import FakeHistorical

    records = es_nq_records(1200)  # 2 x ~25 min of 1s bars from 2024-01-02
    t_cut = int(records["ES.c.0"]["ts_event"][600])
    cut = {s: r[r["ts_event"] < t_cut] for s, r in records.items()}  # what run 1 sees live
    hist = FakeHistorical(TEST_KEY, tls=False).start()
    for iid, (sym, raw) in enumerate((("ES.c.0", "ESH4"), ("NQ.c.0", "NQH4")), start=1):
        hist.add_instrument("GLBX.MDP3", iid, raw, date(2024, 1, 1), date(2024, 2, 1))
        hist.add_continuous("GLBX.MDP3", sym, [(date(2024, 1, 1), date(2024, 2, 1), iid)])
    hist.add_records("GLBX.MDP3", "ohlcv-1s", np.concatenate(list(records.values())))
    fake = make_gateway(cut, heartbeat_interval=0.2)
    store = tmp_path / "store"
    # A grace of ~30 years: nothing closes on the wall clock, only on records, END_OF_INTERVAL
    # and the flush after the Historical fill (so run 1 leaves its last bars open, as a live
    # daemon stopped mid-session does).
    try:
        cfg1 = write_config(tmp_path / "c1.toml", fake.gateway, store, close_grace_s=1e9)
        d1 = Daemon(tmp_path, cfg1)
        n1 = {s: len(r) for s, r in cut.items()}
        wait_for(lambda: all(_archived(store, s) == n1[s] for s in n1), 60, "run 1 archived its records",
                 daemon=d1)
        d1.signal(signal.SIGTERM)
        assert d1.wait(20) == 0

        cfg2 = write_config(tmp_path / "c2.toml", fake.gateway, store, replay_window_h=24.0,
                            close_grace_s=1e9)
        _set_historical(cfg2, hist.url)
        settings = load_settings(cfg2)
        ref = reference_bars(settings, records, ["ES.c.0", "NQ.c.0"])
        want = {s: {tf: len(rows) for tf, rows in ref[s].items()} for s in ref}
        d2 = Daemon(tmp_path, cfg2)
        wait_for(lambda: all(row_counts(store, s) == want[s] for s in want), 90,
                 "every bar after the fill", every=0.2, daemon=d2)
        d2.signal(signal.SIGTERM)
        assert d2.wait(20) == 0
    finally:
        fake.stop()
        hist.stop()
    for sym in ref:
        got = read_bars(store, sym, swmr=False)
        for tf, rows in ref[sym].items():
            np.testing.assert_array_equal(got[tf], rows, err_msg=f"{sym} {tf}")
        assert _archived(store, sym) == len(records[sym])  # every record archived exactly once
    assert any(e.endswith("metadata.get_cost") for e, _ in hist.requests)  # cost asked first
    assert hist.count("ES.c.0") >= 1 and hist.count("NQ.c.0") >= 1
    events = [e.get("event") for e in d2.events()]
    assert "outage longer than the replay window: filling it from the Historical API" in events
    assert "gap filled from Historical" in events
    fill = next(e for e in d2.events() if e.get("event", "").startswith("outage longer"))
    assert fill["gap_s"] > 24 * 3600  # the gap's length is said


def _archived(store, symbol: str) -> int:
    p = archive.live_path(store, "GLBX.MDP3", symbol, "2024-01")
    if not p.exists():
        return 0
    try:
        return len(archive.read_live_file(p).records) // 56
    except Exception:
        return 0


def _set_historical(cfg, url: str) -> None:
    text = cfg.read_text().replace("[databento]\n", f'[databento]\nhistorical_gateway = "{url}"\n', 1)
    cfg.write_text(text)

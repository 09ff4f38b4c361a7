"""Replay de-duplication, backoff and the wall-clock close rule of the live daemon."""

from __future__ import annotations

import random

import numpy as np
import pytest

from streambars.daemon.resume import NS, Backoff, WallClockCloser, Watermarks, record_ts


def _run(w: Watermarks, series, ts):
    series = np.asarray(series, np.int32)
    ts = np.asarray(ts, np.int64)
    keep = w.filter(series, ts)
    return ts.tolist() if keep is None else ts[keep].tolist()


def test_first_pass_keeps_everything_and_tracks_marks():
    w = Watermarks()
    assert _run(w, [0, 1, 0, 0], [10, 5, 11, 11]) == [10, 5, 11, 11]
    assert w.to_note(0) == {"last_ts": 11, "n_at_last": 2}
    assert w.to_note(1) == {"last_ts": 5, "n_at_last": 1}
    assert w.resume_ts() == 5
    assert w.to_note(7) == {}


def test_replay_after_reconnect_drops_exactly_what_was_held():
    w = Watermarks()
    _run(w, [0, 0, 0], [10, 11, 11])  # two trades share ns 11; a third at 11 was not yet seen
    w.arm()
    # The gateway replays from start=11 inclusive: 11, 11, 11(new), 12.
    assert _run(w, [0, 0, 0, 0], [11, 11, 11, 12]) == [11, 12]
    assert w.dropped == 2
    assert w.to_note(0) == {"last_ts": 12, "n_at_last": 1}


def test_replay_split_across_batches_and_series():
    w = Watermarks()
    _run(w, [0, 1], [100, 50])
    w.arm()
    # Series 1 is further behind: replay starts at 50 and re-sends series 0's 60..100 too.
    assert _run(w, [1, 0], [50, 60]) == []
    assert _run(w, [0, 1, 0], [100, 51, 101]) == [51, 101]
    assert w.dropped == 3


def test_disarmed_series_lets_late_records_reach_the_engine():
    w = Watermarks()
    _run(w, [0], [10])
    w.arm()
    assert _run(w, [0, 0], [11, 9]) == [11, 9]  # 9 is late, not a replay: validation counts it
    assert w.to_note(0) == {"last_ts": 11, "n_at_last": 1}


def test_filter_is_batch_size_independent():
    rng = np.random.default_rng(1)
    ts = np.sort(rng.integers(0, 50, 400))
    series = rng.integers(0, 3, 400).astype(np.int32)
    # Per series ts must be non-decreasing for a replay to be meaningful: sort within series.
    w_ref = Watermarks()
    _run(w_ref, series[:200], ts[:200])
    w_ref.arm()
    ref = _run(w_ref, series[150:], ts[150:])
    for size in (1, 7, 64):
        w = Watermarks()
        for i in range(0, 200, size):
            _run(w, series[i : min(i + size, 200)], ts[i : min(i + size, 200)])
        w.arm()
        got = []
        for i in range(150, 400, size):
            got += _run(w, series[i : i + size], ts[i : i + size])
        assert got == ref == ts[200:].tolist()


def test_backoff_grows_with_jitter_and_resets():
    b = Backoff(1.0, 8.0, rng=random.Random(3))
    delays = [b.next() for _ in range(8)]
    assert all(1.0 <= d <= 8.0 for d in delays)
    caps = [min(8.0, 2.0**k) for k in range(8)]
    assert all(d <= c for d, c in zip(delays, caps, strict=True))
    assert len(set(delays)) > 4
    b.reset()
    assert b.next() == 1.0


class _Clock:
    def __init__(self):
        self.t = 1_700_000_000.0

    def __call__(self):
        return self.t


def test_wall_clock_close_only_when_live_and_caught_up():
    clock = _Clock()
    c = WallClockCloser(2.0, hold_s=5.0, clock=clock, mono=clock)
    assert c.until() is None  # not connected
    c.subscribed(replay=True)
    assert c.until() is None  # replay not caught up
    c.records(int((clock.t - 3600) * NS))  # an old, replayed record
    assert c.until() is None
    c.caught_up()
    assert c.until() is None  # a stale record arrived less than hold_s ago
    clock.t += 6
    assert c.until() == int((clock.t - 2.0) * NS)
    assert c.until() is None  # nothing new to close
    clock.t += 1
    c.records(int((clock.t - 0.1) * NS))  # a fresh record
    assert c.until() == int((clock.t - 2.0) * NS)
    c.disconnected()
    clock.t += 10
    assert c.until() is None


def test_even_without_replay_the_feed_must_prove_it_is_real_time():
    clock = _Clock()
    c = WallClockCloser(2.0, hold_s=5.0, clock=clock, mono=clock)
    c.subscribed(replay=False)
    assert c.until() is None  # nothing seen yet: a feed of old data must not be flushed away
    c.caught_up()  # a heartbeat
    assert c.until() is not None


def test_the_wall_clock_flush_stays_an_input_interval_behind():
    clock = _Clock()
    c = WallClockCloser(2.0, hold_s=5.0, interval_ns=60 * NS, clock=clock, mono=clock)
    c.subscribed()
    c.caught_up()
    # An ohlcv-1m record stamped with its minute's open arrives after the minute: the flush
    # must not have made it late.
    assert c.until() == int((clock.t - 2.0 - 60) * NS)


def test_a_fresh_record_ends_catching_up():
    clock = _Clock()
    c = WallClockCloser(2.0, hold_s=5.0, clock=clock, mono=clock)
    c.subscribed(replay=True)
    c.records(int(clock.t * NS))
    assert c.until() is not None


@pytest.mark.parametrize("mixed", [False, True])
def test_record_ts_reads_dbn_headers(mixed):
    import databento_dbn as dbn

    recs = [
        dbn.OHLCVMsg(dbn.RType.OHLCV_1S, 1, 7, 1_000 + i, 1, 2, 0, 1, 5) for i in range(3)
    ]
    raw = b"".join(bytes(r) for r in recs)
    if mixed:
        raw += bytes(dbn.SymbolMappingMsg(1, 7, 2_000, dbn.SType.RAW_SYMBOL, "ES", dbn.SType.RAW_SYMBOL, "ESH4", 0, 1))
    want = [1000, 1001, 1002] + ([2000] if mixed else [])
    assert record_ts(raw).tolist() == want

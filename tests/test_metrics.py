"""The metrics endpoint, scraped over real HTTP on 127.0.0.1."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streambars.daemon.metrics import DaemonMetrics


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def metrics():
    m = DaemonMetrics("GLBX.MDP3")
    yield m
    m.close()


def test_endpoint_over_http(metrics):
    host, port = metrics.serve(0, "127.0.0.1")
    assert host == "127.0.0.1" and port > 0
    metrics.observe_records(100, last_end_ns=1_700_000_000 * 10**9, now=1_700_000_002.5)
    metrics.observe_records(50, last_end_ns=None)
    metrics.observe_bars(("1s", "1min"), np.array([0, 0, 1, 0], dtype=np.int32))
    metrics.reconnects.labels("disconnect").inc()
    metrics.gaps.labels("replay").inc()
    metrics.gap_seconds.labels("replay").inc(4.5)
    metrics.duplicates.inc(7)
    metrics.snapshots.queue_depths = lambda: {"engine": 3, "writer": 0}
    metrics.snapshots.validation_counts = lambda: [("ES.c.0", "ohlc_relation", 2)]
    metrics.snapshots.last_bars = lambda: [("ES.c.0", "1min", 1_700_000_040 * 10**9)]
    metrics.snapshots.aggregated = lambda: 149

    got = _scrape(f"http://{host}:{port}/metrics")
    assert got[("streambars_records_total", ())] == 150
    assert got[("streambars_records_aggregated_total", ())] == 149
    assert got[("streambars_lag_seconds", ())] == pytest.approx(2.5)
    assert got[("streambars_last_record_timestamp_seconds", ())] == 1_700_000_000
    assert got[("streambars_bars_written_total", (("timeframe", "1s"),))] == 3
    assert got[("streambars_bars_written_total", (("timeframe", "1min"),))] == 1
    assert got[("streambars_reconnects_total", (("reason", "disconnect"),))] == 1
    assert got[("streambars_gaps_total", (("filled_by", "replay"),))] == 1
    assert got[("streambars_gap_seconds_total", (("filled_by", "replay"),))] == 4.5
    assert got[("streambars_replay_duplicates_total", ())] == 7
    assert got[("streambars_queue_depth", (("queue", "engine"),))] == 3
    key = ("streambars_validation_violations_total", (("rule", "ohlc_relation"), ("symbol", "ES.c.0")))
    assert got[key] == 2
    last = ("streambars_last_bar_timestamp_seconds", (("symbol", "ES.c.0"), ("timeframe", "1min")))
    assert got[last] == 1_700_000_040


def test_a_failing_snapshot_does_not_break_the_scrape(metrics):
    def boom():
        raise RuntimeError("racing")

    metrics.snapshots.queue_depths = boom
    assert "streambars_records_total" in metrics.text()


def test_bound_to_loopback_only(metrics):
    host, port = metrics.serve(0)
    assert host == "127.0.0.1"

"""Prometheus metrics for the live daemon (``prometheus-client``).

Off by default (``live.metrics_port = 0``); when on, ``/metrics`` is served from its own
thread on ``live.metrics_host`` (127.0.0.1 unless the operator chooses otherwise). Every
metric lives in a private :class:`~prometheus_client.CollectorRegistry`, so tests and
several daemons in one process never collide, and nothing of the process's default
registry leaks out.

Rates are counters (``rate(streambars_records_total[1m])`` is records/s); values the daemon
only knows as a snapshot (queue depths, the engine's validation counts, the last bar of
each series) are read at scrape time through callables, so the data path never pays for
them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..observe import get_logger
from ..timeutil import NS

log = get_logger("streambars.metrics")


class _SnapshotCollector(Collector):
    """Metrics computed at scrape time from callables the daemon registers."""

    def __init__(self) -> None:
        self.queue_depths: Callable[[], Mapping[str, int]] | None = None
        self.validation_counts: Callable[[], Iterable[tuple[str, str, int]]] | None = None
        self.last_bars: Callable[[], Iterable[tuple[str, str, int]]] | None = None
        self.aggregated: Callable[[], int] | None = None

    def collect(self) -> Iterable[Any]:
        if self.aggregated is not None:
            yield CounterMetricFamily(
                "streambars_records_aggregated",
                "Records the engine stage has aggregated (end of the pipeline's first hop)",
                value=_safe(self.aggregated, 0),
            )
        if self.queue_depths is not None:
            g = GaugeMetricFamily(
                "streambars_queue_depth", "Items waiting in each pipeline queue", labels=["queue"]
            )
            for name, depth in _safe(self.queue_depths, {}).items():
                g.add_metric([name], depth)
            yield g
        if self.validation_counts is not None:
            c = CounterMetricFamily(
                "streambars_validation_violations",
                "Input records that broke a per-record validation rule",
                labels=["symbol", "rule"],
            )
            for symbol, rule, n in _safe(self.validation_counts, ()):
                c.add_metric([symbol, rule], n)
            yield c
        if self.last_bars is not None:
            g = GaugeMetricFamily(
                "streambars_last_bar_timestamp_seconds",
                "Open time (UNIX seconds) of the last bar written, per symbol and timeframe",
                labels=["symbol", "timeframe"],
            )
            for symbol, tf, ts in _safe(self.last_bars, ()):
                g.add_metric([symbol, tf], ts / NS)
            yield g


def _safe(fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # a scrape must never break on a racing snapshot
        log.debug("metrics snapshot failed", error=str(e))
        return default


class DaemonMetrics:
    """The daemon's metrics; cheap to update from the data path (a lock per call)."""

    def __init__(self, dataset: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.records = Counter("streambars_records", "Records received and aggregated", registry=r)
        self.bars = Counter(
            "streambars_bars_written", "Bars written to the store", ["timeframe"], registry=r
        )
        self.duplicates = Counter(
            "streambars_replay_duplicates",
            "Records replayed after a reconnect that were already held, dropped before the archive",
            registry=r,
        )
        self.reconnects = Counter(
            "streambars_reconnects", "Reconnects to the Live gateway", ["reason"], registry=r
        )
        self.gaps = Counter(
            "streambars_gaps", "Interruptions of the live stream", ["filled_by"], registry=r
        )
        self.gap_seconds = Counter(
            "streambars_gap_seconds", "Total length of the interruptions", ["filled_by"], registry=r
        )
        self.lag = Gauge(
            "streambars_lag_seconds",
            "Wall clock minus the exchange time of the end of the last record",
            registry=r,
        )
        self.last_record = Gauge(
            "streambars_last_record_timestamp_seconds",
            "Exchange time (ts_event, UNIX seconds) of the last record received",
            registry=r,
        )
        self.connected = Gauge(
            "streambars_connected", "1 while subscribed to the Live gateway", registry=r
        )
        self.ready = Gauge("streambars_ready", "1 once READY=1 was sent", registry=r)
        self.symbol_errors = Counter(
            "streambars_symbol_errors", "Symbols the gateway could not resolve", registry=r
        )
        self.started = Gauge(
            "streambars_start_time_seconds", "When the daemon started (UNIX seconds)", registry=r
        )
        self.started.set(time.time())
        self.snapshots = _SnapshotCollector()
        r.register(self.snapshots)
        self._server: Any = None
        self._thread: Any = None
        self.address: tuple[str, int] | None = None

    # -- data path ---------------------------------------------------------------------

    def observe_records(self, n: int, last_end_ns: int | None, now: float | None = None) -> None:
        """``n`` records received; ``last_end_ns`` the exchange time their last one ended."""
        self.records.inc(n)
        if last_end_ns is not None:
            now = time.time() if now is None else now
            self.last_record.set(last_end_ns / NS)
            self.lag.set(max(now - last_end_ns / NS, 0.0))

    def observe_bars(self, tf_names: tuple[str, ...], timeframe_idx: np.ndarray) -> None:
        """Count written bars by timeframe (``timeframe_idx`` indexes ``tf_names``)."""
        if len(timeframe_idx) == 0:
            return
        counts = np.bincount(timeframe_idx, minlength=len(tf_names))
        for i in np.flatnonzero(counts):
            self.bars.labels(tf_names[i]).inc(int(counts[i]))

    # -- the HTTP endpoint -------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """Start /metrics on host:port (port 0 here picks a free one); returns the address."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.address = self._server.server_address[:2]
        log.info("metrics endpoint listening", url=f"http://{self.address[0]}:{self.address[1]}/metrics")
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def text(self) -> str:
        """The exposition text, as a scrape would see it."""
        return generate_latest(self.registry).decode()

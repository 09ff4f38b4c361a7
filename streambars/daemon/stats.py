"""The daemon's numbers, written once: :class:`DaemonStats` is the one sink the epoch
reports to; it keeps the :class:`Counters` behind ``STATUS=`` and the log summaries and
the Prometheus :class:`~streambars.daemon.metrics.DaemonMetrics` in step."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..timeutil import NS
from .metrics import DaemonMetrics


@dataclass
class Counters:
    """What STATUS= and the log summaries say."""

    records: int = 0
    bars_written: int = 0
    duplicates: int = 0
    reconnects: int = 0
    gaps: int = 0
    gap_seconds: float = 0.0
    lag_s: float | None = None
    last_bar: str = ""
    state: str = "starting"
    _rate_t: float = 0.0
    _rate_n: int = 0
    rate: float = 0.0

    def tick_rate(self, now: float) -> None:
        if self._rate_t:
            dt = now - self._rate_t
            if dt > 0:
                self.rate = (self.records - self._rate_n) / dt
        self._rate_t, self._rate_n = now, self.records

    def line(self) -> str:
        lag = "-" if self.lag_s is None else f"{self.lag_s:.1f}s"
        parts = [
            self.state,
            f"{self.rate:,.0f} rec/s",
            f"lag {lag}",
            f"{self.bars_written:,} bars",
            f"last bar {self.last_bar or '-'}",
            f"reconnects {self.reconnects}",
        ]
        if self.gaps:
            parts.append(f"gaps {self.gaps} ({self.gap_seconds:.0f}s)")
        return ", ".join(parts)


class DaemonStats:
    """Every event the epoch counts, once; it feeds both the counters and the metrics."""

    def __init__(self, metrics: DaemonMetrics, counters: Counters | None = None):
        self.metrics = metrics
        self.counters = counters or Counters()
        self.snapshots = metrics.snapshots  # scrape-time callables the epoch registers

    def state(self, state: str) -> None:
        self.counters.state = state

    def connected(self, up: bool) -> None:
        self.metrics.connected.set(1 if up else 0)

    def records(self, n: int, last_end_ns: int, now: float) -> None:
        self.counters.records += n
        self.counters.lag_s = max(now - last_end_ns / NS, 0.0)
        self.metrics.observe_records(n, last_end_ns, now)

    def duplicates(self, n: int) -> None:
        self.counters.duplicates += n
        self.metrics.duplicates.inc(n)

    def reconnect(self, reason: str) -> None:
        self.counters.state = "reconnecting"
        self.counters.reconnects += 1
        self.metrics.reconnects.labels(reason).inc()

    def gap(self, filled_by: str, seconds: float) -> None:
        self.counters.gaps += 1
        self.counters.gap_seconds += seconds
        self.metrics.gaps.labels(filled_by).inc()
        self.metrics.gap_seconds.labels(filled_by).inc(seconds)

    def bars(self, written: int, tf_names: tuple[str, ...], timeframe_idx: np.ndarray, last_bar: str) -> None:
        self.counters.bars_written += written
        self.metrics.observe_bars(tf_names, timeframe_idx)
        self.counters.last_bar = last_bar

    def symbol_error(self) -> None:
        self.metrics.symbol_errors.inc()

    def status_line(self) -> str:
        self.counters.tick_rate(time.monotonic())
        return self.counters.line()

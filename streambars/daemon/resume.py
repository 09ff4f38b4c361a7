"""The live daemon's bookkeeping for never losing a bar and never counting one twice.

* :class:`Watermarks` — per series, the last ``ts_event`` held and how many records at that
  nanosecond. After a reconnect the gateway replays from ``start=`` that timestamp
  (inclusive), so the first records it sends are ones already held; they are dropped
  *before* the archive and the engine and counted as replay duplicates, never as the
  ``ts_not_increasing`` violation (which stays for records the exchange sent out of order).
  Counting records at the last nanosecond makes this exact for trades, several of which can
  share one ``ts_event``. A series' filter disarms at the first record past its watermark,
  so a genuinely late record afterwards still reaches the engine's validation.
* :class:`Backoff` — exponential reconnect delays with full jitter.
* :class:`WallClockCloser` — when it is safe to close bars because the wall clock is past
  their end by the grace: never while disconnected, never while a replay is catching up,
  and never while records keep arriving older than the grace (a feed behind real time:
  closing by the wall clock then would make its records late).

(:func:`~streambars.archive.live_archive_tail`, the last record each symbol's live archive
holds, so records replayed after a ``kill -9`` are not archived twice, lives in the archive.)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..archive import record_ts
from ..observe import get_logger
from ..timeutil import NS

log = get_logger("streambars.resume")

# NS and record_ts live in timeutil and archive; named here for older imports.
__all__ = ["NS", "Backoff", "WallClockCloser", "Watermarks", "record_ts"]


class Watermarks:
    """Per-series high-water marks of what has been passed on, with replay de-duplication."""

    def __init__(self) -> None:
        self.last_ts = np.full(0, -1, dtype=np.int64)  # -1: nothing held
        self.n_at_last = np.zeros(0, dtype=np.int64)
        self.armed = np.zeros(0, dtype=bool)  # drop replayed records at/below last_ts
        self.to_skip = np.zeros(0, dtype=np.int64)  # replayed records at last_ts still to drop
        self.dropped = 0

    def _grow(self, n: int) -> None:
        if n <= len(self.last_ts):
            return
        extra = n - len(self.last_ts)
        self.last_ts = np.concatenate([self.last_ts, np.full(extra, -1, np.int64)])
        self.n_at_last = np.concatenate([self.n_at_last, np.zeros(extra, np.int64)])
        self.armed = np.concatenate([self.armed, np.zeros(extra, bool)])
        self.to_skip = np.concatenate([self.to_skip, np.zeros(extra, np.int64)])

    def set(self, series: int, last_ts: int, n_at_last: int = 1) -> None:
        self._grow(series + 1)
        self.last_ts[series] = last_ts
        self.n_at_last[series] = n_at_last

    def arm(self) -> None:
        """A (re)subscription with replay starts: drop what is already held."""
        self.armed[:] = self.last_ts >= 0
        self.to_skip[:] = self.n_at_last

    def filter(self, series: np.ndarray, ts: np.ndarray) -> np.ndarray | None:
        """Update the marks with a batch (arrival order); return a keep-mask, or None = all."""
        if len(ts) == 0:
            return None
        top = int(series.max()) + 1
        self._grow(top)
        keep: np.ndarray | None = None
        if self.armed[:top].any():
            keep = self._drop_replayed(series, ts, top)
            if keep is not None:
                series, ts = series[keep], ts[keep]
                if len(ts) == 0:
                    return keep
        # The marks, vectorised (this runs for every live batch).
        newmax = np.full(top, -1, np.int64)
        np.maximum.at(newmax, series, ts)
        at_max = np.bincount(series, weights=ts == newmax[series], minlength=top).astype(np.int64)
        old = self.last_ts[:top]
        up = newmax > old
        same = (newmax == old) & (newmax >= 0)
        self.armed[:top] &= ~up
        self.last_ts[:top] = np.where(up, newmax, old)
        self.n_at_last[:top] = np.where(up, at_max, self.n_at_last[:top] + np.where(same, at_max, 0))
        return keep

    def _drop_replayed(self, series: np.ndarray, ts: np.ndarray, top: int) -> np.ndarray | None:
        """The keep-mask after dropping replays of what armed series already hold."""
        keep: np.ndarray | None = None
        for s in np.flatnonzero(self.armed[:top] & (np.bincount(series, minlength=top) > 0)):
            rows = np.flatnonzero(series == s)
            ts_s = ts[rows]
            h = int(self.last_ts[s])
            dup = self._replayed(ts_s, h, int(self.to_skip[s]))
            if dup is None:
                continue
            self.to_skip[s] -= int((ts_s[dup] == h).sum())
            if keep is None:
                keep = np.ones(len(ts), dtype=bool)
            keep[rows[dup]] = False
            self.dropped += int(dup.sum())
        return keep

    @staticmethod
    def _replayed(ts_s: np.ndarray, h: int, skip: int) -> np.ndarray | None:
        """Rows (before the first record past ``h``) that are replays of what is held:
        everything before ``h`` and the first ``skip`` records at ``h``."""
        past = np.flatnonzero(ts_s > h)
        stop = int(past[0]) if len(past) else len(ts_s)
        head = ts_s[:stop]
        dup = head < h
        at = np.flatnonzero(head == h)
        if len(at):
            dup[at[:skip]] = True
        if not dup.any():
            return None
        full = np.zeros(len(ts_s), dtype=bool)
        full[:stop] = dup
        return full

    def resume_ts(self) -> int | None:
        """Where a replay must start so nothing held is missed: the oldest series' mark."""
        held = self.last_ts[self.last_ts >= 0]
        return int(held.min()) if len(held) else None

    def to_note(self, series: int) -> dict[str, int]:
        if series >= len(self.last_ts) or self.last_ts[series] < 0:
            return {}
        return {"last_ts": int(self.last_ts[series]), "n_at_last": int(self.n_at_last[series])}


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt k waits U(min, min(max, min*2^k))."""

    minimum: float = 1.0
    maximum: float = 60.0
    attempt: int = 0
    rng: random.Random | None = None

    def next(self) -> float:
        cap = min(self.maximum, self.minimum * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        rng = self.rng or random
        return self.minimum + rng.random() * max(cap - self.minimum, 0.0)

    def reset(self) -> None:
        self.attempt = 0


class WallClockCloser:
    """Decides when bars may close on the wall clock alone.

    ``until()`` is ``now - grace - input interval``: a record stamped ``ts_event`` (the open of
    its interval, for OHLCV inputs) is published only after its interval ends, so the flush
    that makes earlier records late must stay an interval behind (for ohlcv-1m input,
    ``now - grace`` alone would drop the 1-minute record still on its way). A bar therefore
    closes at ``end + interval + grace`` if nothing closed it before.

    Allowed only while connected, once the subscription has shown it is real-time
    (REPLAY_COMPLETED, a heartbeat, or a record no older than the grace), and when no record
    older than the grace has arrived within ``hold_s``. ``until()`` returns the ns timestamp
    to flush to, or None.
    """

    def __init__(self, grace_s: float, hold_s: float | None = None, interval_ns: int = 0,
                 clock: Any = time.time, mono: Any = time.monotonic):
        self.grace_ns = int(grace_s * NS)
        self.interval_ns = int(interval_ns)
        self.hold_s = hold_s if hold_s is not None else max(2 * grace_s, 2.0)
        self.clock, self.mono = clock, mono
        self.connected = False
        self.catching_up = False
        self.last_stale = -1e18
        self.flushed_until = 0

    def subscribed(self, replay: bool = True) -> None:
        """A new subscription: until it proves to be real-time (a fresh record, a heartbeat,
        REPLAY_COMPLETED) nothing closes on the wall clock. Even without ``start=`` the feed
        may be behind real time (a test gateway, a slow start)."""
        self.connected = True
        self.catching_up = True

    def disconnected(self) -> None:
        self.connected = False

    def caught_up(self) -> None:
        self.catching_up = False

    def records(self, last_end_ns: int) -> None:
        """The newest record of a batch ends at ``last_end_ns`` (exchange time)."""
        now_ns = int(self.clock() * NS)
        if now_ns - last_end_ns > self.grace_ns:
            self.last_stale = self.mono()
        else:
            self.catching_up = False

    def until(self) -> int | None:
        if not self.connected or self.catching_up:
            return None
        if self.mono() - self.last_stale < self.hold_s:
            return None
        u = int(self.clock() * NS) - self.grace_ns - self.interval_ns
        if u <= self.flushed_until:
            return None
        self.flushed_until = u
        return u

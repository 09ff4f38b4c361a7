"""All single-series rules for one (symbol, timeframe), fed slice by slice in time order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..rules import RECORD_RULES
from ..timeframes import Timeframe
from .checks import (
    count_invalid_rows,
    duplicate_rows,
    fmt_duration,
    fmt_price,
    gaps_in_session,
    price_jump_rows,
    record_rule_hits,
    volume_outlier_rows,
)
from .report import SeriesResult, iso

NS = 1_000_000_000


@dataclass(frozen=True)
class Params:
    """The thresholds, from ValidationSettings."""

    max_volume: int = 0
    price_jump: float = 0.10
    gap_ns: int = 300 * NS
    volume_sigma: float = 8.0
    max_inputs: int = 0  # count above this is count_invalid (0: unknown input, only count == 0)


def _bar_text(bars: np.ndarray, r: int) -> str:
    b = bars[r]
    return (
        f"o={fmt_price(int(b['open']))} h={fmt_price(int(b['high']))} l={fmt_price(int(b['low']))} "
        f"c={fmt_price(int(b['close']))} v={int(b['volume'])} n={int(b['count'])}"
    )


def _month(ts: np.ndarray) -> np.ndarray:
    return ts.astype("datetime64[ns]").astype("datetime64[M]").astype(np.int64)


class SeriesCheck:
    """Per-record rules (through rules.record_violations), duplicates, count, price jumps,
    volume outliers (robust statistics per UTC calendar month) and, when given trading
    hours, gaps in session."""

    def __init__(
        self,
        result: SeriesResult,
        tf: Timeframe,
        params: Params,
        boundaries: np.ndarray | None = None,
        sessions: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.r = result
        self.tf = tf
        self.p = params
        self.boundaries = boundaries if tf.is_daily else None
        self.sessions = sessions
        self.prev_ts = -1
        self.prev_dup_ts = -1
        self.prev_close = -1
        self.prev_end = -1
        self._vol_month: int | None = None
        self._vol: list[np.ndarray] = []
        self._vol_ts: list[np.ndarray] = []
        for rule in RECORD_RULES:
            result.tally(rule.name)
        for name in ("ts_duplicate", "count_invalid", "price_jump", "volume_outlier"):
            result.tally(name)
        if sessions is not None:
            result.tally("gap_in_session")

    def feed(self, bars: np.ndarray) -> None:
        n = bars.shape[0]
        if n == 0:
            return
        r = self.r
        ts = bars["ts_event"]
        r.rows += n
        lo, hi = int(ts.min()), int(ts.max())
        r.first_ts = lo if r.first_ts is None else min(r.first_ts, lo)
        r.last_ts = hi if r.last_ts is None else max(r.last_ts, hi)

        hits, self.prev_ts = record_rule_hits(
            bars, 0 if self.tf.is_daily else self.tf.nanos, self.boundaries, self.p.max_volume, self.prev_ts
        )
        for name, (count, rows) in hits.items():
            details = []
            for i in rows.tolist():
                if name == "ts_not_increasing":
                    prev = int(ts[i - 1]) if i > 0 else None
                    details.append(f"after {iso(prev)}" if prev is not None else "before the previous slice's last bar")
                elif name == "ts_misaligned":
                    details.append("not on a session boundary" if self.tf.is_daily else f"not a multiple of {self.tf.name}")
                else:
                    details.append(_bar_text(bars, i))
            r.tally(name).add(ts[rows], details, count=count)

        dup = duplicate_rows(ts, self.prev_dup_ts)
        self.prev_dup_ts = int(ts[-1])
        r.tally("ts_duplicate").add(ts[dup], ["timestamp already stored"] * min(dup.size, 40))

        bad = count_invalid_rows(bars["count"], self.p.max_inputs)
        r.tally("count_invalid").add(ts[bad], [f"count={int(bars['count'][i])}" for i in bad[:40].tolist()])

        jumps, self.prev_close = price_jump_rows(bars["open"], bars["close"], self.p.price_jump, self.prev_close)
        if jumps.size:
            details = []
            for i in jumps[:40].tolist():
                details.append(f"open {fmt_price(int(bars['open'][i]))} close {fmt_price(int(bars['close'][i]))}")
            r.tally("price_jump").add(ts[jumps], details)

        self._feed_volume(ts, bars["volume"])

        if self.sessions is not None:
            starts, lengths, self.prev_end = gaps_in_session(
                ts, self._ends(ts), *self.sessions,
                self.p.gap_ns, self.prev_end,
            )  # fmt: skip
            r.tally("gap_in_session").add(
                starts, [f"no bar for {fmt_duration(x)} of trading time" for x in lengths[:40].tolist()]
            )

    def _ends(self, ts: np.ndarray) -> np.ndarray:
        if self.boundaries is None:
            return ts + self.tf.nanos
        j = np.minimum(np.searchsorted(self.boundaries, ts, side="right"), self.boundaries.size - 1)
        return np.maximum(self.boundaries[j], ts + 1)

    def _feed_volume(self, ts: np.ndarray, volume: np.ndarray) -> None:
        months = _month(ts)
        if months[0] == months[-1] and (self._vol_month is None or months[0] == self._vol_month):
            self._vol_month = int(months[0])
            self._vol.append(np.asarray(volume))
            self._vol_ts.append(np.asarray(ts))
            return
        cuts = np.flatnonzero(np.diff(months)) + 1
        for part in np.split(np.arange(ts.shape[0]), cuts):
            m = int(months[part[0]])
            if self._vol_month is not None and m != self._vol_month:
                self._flush_volume()
            self._vol_month = m
            self._vol.append(np.asarray(volume)[part])
            self._vol_ts.append(np.asarray(ts)[part])

    def _flush_volume(self) -> None:
        if not self._vol:
            return
        v = np.concatenate(self._vol)
        t = np.concatenate(self._vol_ts)
        self._vol, self._vol_ts = [], []
        rows, limit = volume_outlier_rows(v, self.p.volume_sigma)
        if rows.size:
            self.r.tally("volume_outlier").add(
                t[rows], [f"volume {int(v[i])} > {limit:,.0f} (this month's robust limit)" for i in rows[:40].tolist()]
            )

    def finish(self) -> None:
        self._flush_volume()

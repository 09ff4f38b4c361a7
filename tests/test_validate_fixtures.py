"""Helpers for the validate tests: clean bars at every timeframe, built independently.

The aggregation here is deliberately plain numpy (group by interval key, reduceat), not
the validator's numba cascade, so a bug in one cannot hide the same bug in the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streambars.records import BAR_DTYPE
from streambars.timeframes import STANDARD_TIMEFRAMES, Session, Timeframe, parse_timeframe

NS = 1_000_000_000
CME_SESSION = Session.parse("17:00 America/Chicago")


def ns(text: str) -> int:
    """'2024-07-03T16:00:00' (UTC) -> ns."""
    return int(np.datetime64(text, "ns").astype(np.int64))


def bars_1s(ts: np.ndarray, seed: int = 1, price: float = 5000.0) -> np.ndarray:
    """Clean 1s bars at the given timestamps: a gentle random walk on a 0.25 tick."""
    rng = np.random.default_rng(seed)
    n = ts.size
    tick = 250_000_000
    close = int(price * NS / tick) + np.cumsum(rng.choice([-1, 0, 0, 1], n))
    open_ = np.r_[close[:1], close[:-1]]
    high = np.maximum(open_, close) + rng.integers(0, 2, n)
    low = np.minimum(open_, close) - rng.integers(0, 2, n)
    out = np.empty(n, BAR_DTYPE)
    out["ts_event"] = ts
    out["open"], out["high"], out["low"], out["close"] = open_ * tick, high * tick, low * tick, close * tick
    out["volume"] = rng.integers(1, 60, n).astype(np.uint64)
    out["count"] = 1
    return out


def seconds_in(opens: np.ndarray, closes: np.ndarray, fill: float = 0.7, seed: int = 2) -> np.ndarray:
    """Whole seconds inside the given intervals, a random ``fill`` share of them kept."""
    rng = np.random.default_rng(seed)
    parts = [np.arange(o, c, NS, dtype=np.int64) for o, c in zip(opens.tolist(), closes.tolist(), strict=True)]
    ts = np.concatenate(parts) if parts else np.empty(0, np.int64)
    return ts[rng.random(ts.size) < fill]


def aggregate(fine: np.ndarray, tf: Timeframe, session: Session = CME_SESSION) -> np.ndarray:
    """Bars of ``tf`` from finer bars (sorted), the plain-numpy way."""
    ts = fine["ts_event"]
    if tf.is_daily:
        b = session.boundaries()
        key = b[np.searchsorted(b, ts, side="right") - 1]
    else:
        key = ts - ts % tf.nanos
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], ts.size] - 1
    out = np.empty(starts.size, BAR_DTYPE)
    out["ts_event"] = key[starts]
    out["open"] = fine["open"][starts]
    out["close"] = fine["close"][ends]
    out["high"] = np.maximum.reduceat(fine["high"], starts)
    out["low"] = np.minimum.reduceat(fine["low"], starts)
    out["volume"] = np.add.reduceat(fine["volume"], starts)
    out["count"] = np.add.reduceat(fine["count"].astype(np.uint64), starts)
    return out


def all_timeframes(fine: np.ndarray, names=STANDARD_TIMEFRAMES, session: Session = CME_SESSION) -> dict[str, np.ndarray]:
    tfs = [parse_timeframe(n) for n in names]
    return {tf.name: (fine.copy() if tf.seconds == 1 else aggregate(fine, tf, session)) for tf in tfs}


@dataclass
class ArrayView:
    """A store file in memory (the walk's FileView), reading by binary search like the store."""

    bars: dict[str, np.ndarray]
    dataset: str = "GLBX.MDP3"
    symbol: str = "ES.c.0"
    stype: str = "continuous"
    path: str = "<memory>"
    session: Session = CME_SESSION
    timeframes: list[Timeframe] = field(default_factory=list)

    def __post_init__(self):
        self.timeframes = sorted(parse_timeframe(n) for n in self.bars)

    def extent(self, tf: Timeframe) -> tuple[int, int, int]:
        b = self.bars[tf.name]
        if b.size == 0:
            return 0, 0, 0
        return int(b.size), int(b["ts_event"].min()), int(b["ts_event"].max())

    def read(self, tf: Timeframe, start: int, end: int) -> np.ndarray:
        b = self.bars[tf.name]
        ts = b["ts_event"]
        i, j = np.searchsorted(ts, [start, end])
        return b[i:j].copy()


def test_fixture_aggregation_is_consistent():
    ts = seconds_in(np.array([ns("2024-03-04T00:00:00")]), np.array([ns("2024-03-04T02:00:00")]))
    f = bars_1s(ts)
    bars = all_timeframes(f, ["1s", "1min", "1h"])
    assert bars["1h"]["volume"].sum() == f["volume"].sum()
    assert bars["1h"].size == 2 and bars["1min"].size == 120


def write_store(root, bars: dict[str, np.ndarray], dataset: str = "GLBX.MDP3", symbol: str = "ES.c.0",
                session: Session = CME_SESSION, batches: int = 3):
    """Write bars through the store's own writer (in a few appends, as the pipeline does)."""
    from streambars.store import BarFileWriter

    w = BarFileWriter(root, dataset, symbol, stype="continuous", timeframes=list(bars), session=session)
    try:
        fine = min(bars, key=lambda n: parse_timeframe(n).seconds)
        ts = bars[fine]["ts_event"]
        cuts = [int(ts[0]) + (int(ts[-1]) - int(ts[0])) * k // batches for k in range(batches + 1)]
        cuts[0], cuts[-1] = np.iinfo(np.int64).min, np.iinfo(np.int64).max
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            part = {}
            for name, arr in bars.items():
                t = arr["ts_event"]
                part[name] = arr[(t >= a) & (t < b)]
            w.append(part)
    finally:
        w.close()
    return w.path

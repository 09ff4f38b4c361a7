"""An independent reference aggregation in pandas, for checking the engine's bars.

It shares nothing with the engine but the bar contract: sub-day bars by ``resample`` with
``origin="epoch"``; daily bars by the session day computed with pandas' own time-zone
conversion (the local wall-clock time minus the session's time of day, floored to a date).
Only clean records should be given to it: it knows nothing about validation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from streambars.records import TAGGED_BAR_DTYPE
from streambars.timeframes import Session, Timeframe


def _frame(ts, o, h, lo, c, v) -> pd.DataFrame:
    return pd.DataFrame(
        {"open": o, "high": h, "low": lo, "close": c, "volume": np.asarray(v, np.uint64)},
        index=pd.DatetimeIndex(np.asarray(ts, np.int64).view("datetime64[ns]"), tz="UTC"),
    )


_AGG = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum", "count": "size"}


def _subday(df: pd.DataFrame, seconds: int) -> pd.DataFrame:
    freq = f"{seconds}s"
    if len(df) and (df.index[-1] - df.index[0]).total_seconds() / seconds > 200_000:
        # sparse data over weeks: resample would materialise millions of empty bins
        return df.assign(count=1).groupby(df.index.floor(freq)).agg(_AGG)
    out = df.assign(count=1).resample(freq, origin="epoch", label="left", closed="left").agg(_AGG)
    return out[out["count"] > 0]


def _daily(df: pd.DataFrame, session: Session) -> pd.DataFrame:
    tod = pd.Timedelta(
        hours=session.time_of_day.hour, minutes=session.time_of_day.minute, seconds=session.time_of_day.second
    )
    wall = df.index.tz_convert(session.tz).tz_localize(None)
    day = (wall - tod).normalize()
    out = df.assign(count=1).groupby(day).agg(_AGG)
    start = (out.index + tod).tz_localize(session.tz).tz_convert("UTC")
    out.index = start
    return out


def reference_bars(
    series: np.ndarray,
    ts: np.ndarray,
    o: np.ndarray,
    h: np.ndarray,
    lo: np.ndarray,
    c: np.ndarray,
    v: np.ndarray,
    timeframes: tuple[Timeframe, ...],
    session: Session,
) -> np.ndarray:
    """Every bar of every (series, timeframe) as TAGGED_BAR_DTYPE, sorted by series, timeframe, ts."""
    parts = []
    series = np.asarray(series)
    for s in np.unique(series):
        m = series == s
        df = _frame(ts[m], o[m], h[m], lo[m], c[m], v[m])
        for k, tf in enumerate(timeframes):
            bars = _daily(df, session) if tf.is_daily else _subday(df, tf.seconds)
            rows = np.zeros(len(bars), TAGGED_BAR_DTYPE)
            rows["series"] = s
            rows["timeframe"] = k
            rows["ts_event"] = bars.index.as_unit("ns").asi8
            for f in ("open", "high", "low", "close"):
                rows[f] = bars[f].to_numpy(np.int64)
            rows["volume"] = bars["volume"].to_numpy(np.uint64)
            rows["count"] = bars["count"].to_numpy(np.uint32)
            parts.append(rows)
    if not parts:
        return np.zeros(0, TAGGED_BAR_DTYPE)
    return sort_bars(np.concatenate(parts))


def sort_bars(bars: np.ndarray) -> np.ndarray:
    """Bars ordered by series, timeframe, ts_event (the engine promises time order per
    series and timeframe only)."""
    return bars[np.lexsort((bars["ts_event"], bars["timeframe"], bars["series"]))]


def by_key(bars: np.ndarray) -> np.ndarray:
    """Bars grouped by (series, timeframe), each group in the order given (a stable sort, so
    a group out of time order stays out of order): how two runs of the engine compare, as it
    promises time order per (series, timeframe), not across timeframes."""
    return bars[np.lexsort((bars["timeframe"], bars["series"]))]


def diff_bars(got: np.ndarray, want: np.ndarray, names=None) -> str:
    """A short description of the first difference, for assertion messages ('' if equal)."""
    got, want = sort_bars(got), sort_bars(want)
    if len(got) != len(want):
        for k in np.union1d(np.unique(got["timeframe"]), np.unique(want["timeframe"])):
            g, w = got[got["timeframe"] == k], want[want["timeframe"] == k]
            if len(g) != len(w):
                return f"timeframe {names[k] if names else k}: {len(g)} bars, reference has {len(w)}"
        return f"{len(got)} bars, reference has {len(want)}"
    bad = np.flatnonzero(got != want)
    if bad.size:
        i = bad[0]
        return f"{bad.size} bars differ; first: got {got[i]}, reference {want[i]}"
    return ""

"""Stored bar rows -> analysis frames (pandas or polars) and times, in UTC or a chosen zone.

The store keeps UTC nanoseconds and 1e-9 fixed-point prices; analysis code wants datetimes
and floats. This is the one place that converts, so ``read_df``, ``tail`` and ``series``
agree: prices / 1e9 as float64, ``volume`` uint64, ``count`` uint32, ``ts_event`` tz-aware
(UTC unless ``tz`` names an IANA zone). polars is optional (the ``polars`` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import UsageError
from ..records import FIXED_PRICE_SCALE
from ..timeutil import check_tz

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

PRICE_FIELDS = ("open", "high", "low", "close")
Engine = Literal["pandas", "polars"]
ENGINES = ("pandas", "polars")


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")


def polars_module() -> Any:
    """polars, or one line saying how to install it (it is an optional extra)."""
    try:
        import polars as pl
    except ImportError:
        raise UsageError("polars frames need polars: pip install '.[polars]' in a checkout of streambars") from None
    return pl


def bars_to_frame(bars: np.ndarray, tz: str | None = None, engine: Engine = "pandas") -> Any:
    """BAR_DTYPE rows -> a frame with float prices (price / 1e9).

    pandas: a tz-aware DatetimeIndex ``ts_event`` (UTC, or ``tz``). polars: the same data
    with ``ts_event`` as the first column, ``Datetime('ns', tz)`` (polars has no index)."""
    check_engine(engine)
    zone = check_tz(tz)
    if engine == "polars":
        return _polars_frame(bars, zone)
    import pandas as pd

    index = pd.DatetimeIndex(bars["ts_event"].astype("datetime64[ns]"), name="ts_event").tz_localize("UTC")
    if zone != "UTC":
        index = index.tz_convert(zone)
    cols: dict[str, np.ndarray] = {f: bars[f] / FIXED_PRICE_SCALE for f in PRICE_FIELDS}
    cols["volume"] = bars["volume"].copy()
    cols["count"] = bars["count"].copy()
    return pd.DataFrame(cols, index=index)


def _polars_frame(bars: np.ndarray, zone: str) -> Any:
    pl = polars_module()
    ts = pl.Series("ts_event", bars["ts_event"].astype("datetime64[ns]")).dt.replace_time_zone("UTC")
    if zone != "UTC":
        ts = ts.dt.convert_time_zone(zone)
    cols = [ts]
    cols += [pl.Series(f, bars[f] / FIXED_PRICE_SCALE, dtype=pl.Float64) for f in PRICE_FIELDS]
    cols += [pl.Series("volume", bars["volume"], dtype=pl.UInt64), pl.Series("count", bars["count"], dtype=pl.UInt32)]
    return pl.DataFrame(cols)


def ns_to_time(ns: int | None, tz: str | None = None) -> pd.Timestamp | None:
    """int ns UTC -> tz-aware pandas.Timestamp (UTC, or ``tz``); None stays None."""
    if ns is None:
        return None
    import pandas as pd

    return pd.Timestamp(int(ns), tz="UTC").tz_convert(check_tz(tz))

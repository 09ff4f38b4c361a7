"""`--reference`: our 1min/1h/1d bars against Databento's own ohlcv-1m/1h/1d.

The comparison is a pure function over two arrays (ours: BAR_DTYPE; theirs: anything with
ts_event/open/high/low/close/volume, e.g. ``DBNStore.to_ndarray()``). Fetching is
pluggable: :data:`Fetcher` takes (dataset, symbol, schema, start_ns, end_ns) and returns
the reference records; the default goes through ``streambars.sources.historical``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .checks import fmt_price

#: Our timeframe -> Databento's schema with the same bars.
REFERENCE_SCHEMAS: dict[str, str] = {"1min": "ohlcv-1m", "1h": "ohlcv-1h", "1d": "ohlcv-1d"}
PRICE_FIELDS = ("open", "high", "low", "close")

Fetcher = Callable[[str, str, str, int, int], np.ndarray]


class ReferenceUnavailable(Exception):
    """The reference bars cannot be fetched (no historical source, no API key, ...)."""


def compare_reference(ours: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Timestamps where our bars and the reference differ, with what differs.

    A bar only we have, a bar only they have, or any of open/high/low/close/volume unequal
    (Databento's OHLCV has no trade count) is a mismatch.
    """
    ts_o = np.asarray(ours["ts_event"], np.int64)
    ts_r = np.asarray(ref["ts_event"]).astype(np.int64)
    if ts_r.size and not (np.diff(ts_r) > 0).all():
        order = np.argsort(ts_r, kind="stable")
        ref, ts_r = ref[order], ts_r[order]
    both, io, ir = np.intersect1d(ts_o, ts_r, assume_unique=False, return_indices=True)
    only_o = np.setdiff1d(ts_o, ts_r)
    only_r = np.setdiff1d(ts_r, ts_o)
    diff = np.zeros(both.size, bool)
    for f in (*PRICE_FIELDS, "volume"):
        diff |= np.asarray(ours[f])[io].astype(np.int64) != np.asarray(ref[f])[ir].astype(np.int64)
    bad = both[diff]
    ts = np.concatenate([bad, only_o, only_r])
    order = np.argsort(ts, kind="stable")
    ts = ts[order]
    kinds = np.concatenate([np.zeros(bad.size, np.int8), np.ones(only_o.size, np.int8), np.full(only_r.size, 2, np.int8)])[order]
    pos = {int(t): int(k) for t, k in zip(both[diff][:64].tolist(), np.flatnonzero(diff)[:64].tolist(), strict=True)}
    details = []
    for t, kind in zip(ts[:40].tolist(), kinds[:40].tolist(), strict=True):
        if kind == 1:
            details.append("only in our store")
        elif kind == 2:
            details.append("only in Databento's bars")
        elif t in pos:
            k = pos[t]
            parts = []
            for f in (*PRICE_FIELDS, "volume"):
                a, b = int(ours[f][io[k]]), int(ref[f][ir[k]])
                if a != b:
                    parts.append(f"{f} {a if f == 'volume' else fmt_price(a)} != {b if f == 'volume' else fmt_price(b)}")
            details.append("; ".join(parts) + " (ours != Databento)")
        else:
            details.append("differs")
    return ts, details


def default_fetcher(settings, env_file: str | None) -> Fetcher:
    """The Historical source's fetch function, or raise ReferenceUnavailable saying why."""
    try:
        from ..sources import historical  # noqa: F401
    except ImportError as e:
        raise ReferenceUnavailable(
            f"the Databento Historical source is not available in this build ({e})"
        ) from None
    fetch = getattr(historical, "fetch_reference_bars", None)
    if fetch is None:
        raise ReferenceUnavailable(
            "streambars.sources.historical has no fetch_reference_bars(): reference bars cannot be fetched"
        )

    def _fetch(dataset: str, symbol: str, schema: str, start_ns: int, end_ns: int) -> np.ndarray:
        return fetch(settings, dataset=dataset, symbol=symbol, schema=schema, start=start_ns,
                     end=end_ns, env_file=env_file)  # fmt: skip

    return _fetch

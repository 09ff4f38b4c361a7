"""`--reference`: our 1min/1h/1d bars against Databento's own ohlcv-1m/1h/1d.

The comparison is a pure function over two arrays (ours: BAR_DTYPE; theirs: anything with
ts_event/open/high/low/close/volume, e.g. ``DBNStore.to_ndarray()``). Fetching is
pluggable: :data:`Fetcher` takes (dataset, symbol, stype_in, schema, start_ns, end_ns) and
returns the reference records; :func:`historical_fetcher` goes through
``streambars.sources.historical`` and caches whole past months in the raw archive, beside
the input months: ``<store>/<dataset>/raw/<symbol>/<schema>/<YYYY-MM>.dbn.zst``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .checks import fmt_price

#: Our timeframe -> Databento's schema with the same bars.
REFERENCE_SCHEMAS: dict[str, str] = {"1min": "ohlcv-1m", "1h": "ohlcv-1h", "1d": "ohlcv-1d"}
PRICE_FIELDS = ("open", "high", "low", "close")

#: (dataset, symbol, stype_in, schema, start_ns, end_ns) -> reference records
Fetcher = Callable[[str, str, str, str, int, int], np.ndarray]


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


def reference_path(root, dataset: str, symbol: str, schema: str, month: str) -> Path:
    """Where a month of Databento's own bars is cached (beside the raw input months)."""
    from .. import archive

    return archive.raw_dir(root, dataset, symbol) / schema / f"{month}{archive.SUFFIX}"


def _months(start: int, end: int) -> list[tuple[str, int, int]]:
    first = np.datetime64(start, "ns").astype("datetime64[M]")
    last = np.datetime64(end - 1, "ns").astype("datetime64[M]")
    out = []
    for m in np.arange(first, last + 1, dtype="datetime64[M]"):
        a = int(m.astype("datetime64[ns]").astype(np.int64))
        b = int((m + 1).astype("datetime64[ns]").astype(np.int64))
        out.append((str(m), a, b))
    return out


def historical_fetcher(settings, env_file: str | None, now_ns: int | None = None) -> Fetcher:
    """Databento's OHLCV bars through the Historical source; raise ReferenceUnavailable if not.

    Whole months are fetched (and cached when the month is over, so a second run costs
    nothing); the month in progress is fetched up to now and not cached. Stops before
    downloading when the cost is above ``databento.max_cost``.
    """
    import time

    from ..config import load_api_key

    try:
        from ..sources.historical import HistoricalSource
    except ImportError as e:
        raise ReferenceUnavailable(f"the Databento Historical source is not available ({e})") from None
    key = load_api_key(env_file, required=False)
    if not key:
        raise ReferenceUnavailable("no Databento API key (DATABENTO_API_KEY in the environment or .env)")
    src = HistoricalSource(key, settings.databento.historical_gateway or None)
    root = Path(settings.store.path)
    max_cost = float(settings.databento.max_cost)

    def fetch(dataset: str, symbol: str, stype_in: str, schema: str, start: int, end: int) -> np.ndarray:
        from .. import archive

        now = now_ns if now_ns is not None else time.time_ns()
        todo = []
        for month, a, b in _months(start, min(end, now)):
            dest = reference_path(root, dataset, symbol, schema, month)
            if not (b <= now and dest.is_file()):
                todo.append((month, a, min(b, now), dest, b <= now))
        if todo:
            cost = sum(src.get_cost(dataset, [symbol], schema, stype_in, a, b) for _, a, b, _, _ in todo)
            if cost > max_cost:
                raise ReferenceUnavailable(
                    f"Databento's {schema} for {symbol} would cost ${cost:.2f}, above databento.max_cost "
                    f"(${max_cost:.2f}); raise it with --set databento.max_cost=..."
                )
        parts = []
        tmp_dir = None
        for month, _, _ in _months(start, min(end, now)):
            dest = reference_path(root, dataset, symbol, schema, month)
            job = next((t for t in todo if t[0] == month), None)
            if job is not None:
                if not job[4]:  # the month is not over: fetch, do not cache
                    import tempfile

                    tmp_dir = tmp_dir or Path(tempfile.mkdtemp(prefix="streambars-ref-"))
                    dest = tmp_dir / dest.name
                _download(src, archive, dataset, symbol, stype_in, schema, job[1], job[2], dest)
            parts.append(_read_dbn(dest))
        if tmp_dir is not None:
            import shutil

            shutil.rmtree(tmp_dir, ignore_errors=True)
        if not parts:
            return np.empty(0, [("ts_event", "u8"), *((f, "i8") for f in PRICE_FIELDS), ("volume", "u8")])
        arr = np.concatenate(parts)
        ts = arr["ts_event"].astype(np.int64)
        return arr[(ts >= start) & (ts < end)]

    return fetch


def _download(src, archive, dataset, symbol, stype_in, schema, a, b, dest: Path) -> None:
    # HistoricalSource.download_month checks the file against the *input* schemas only
    # (ohlcv-1s/1m, trades), so the 1h/1d references go through its client and retry loop.
    client = getattr(src, "_client", None)
    retry = getattr(src, "_with_retries", None)
    if client is None or retry is None:
        raise ReferenceUnavailable("this HistoricalSource cannot download arbitrary OHLCV schemas")
    dest.parent.mkdir(parents=True, exist_ok=True)

    def call() -> None:
        with archive.atomic_path(dest) as tmp:
            client.timeseries.get_range(dataset=dataset, start=a, end=b, symbols=[symbol],
                                        schema=schema, stype_in=stype_in, path=tmp)  # fmt: skip
            _read_dbn(tmp)  # whole and decodable, or retried

    retry(f"{dataset} {schema} {symbol} reference bars", (symbol,), call)


def _read_dbn(path: Path) -> np.ndarray:
    import databento

    store = databento.DBNStore.from_file(path)
    return store.to_ndarray()

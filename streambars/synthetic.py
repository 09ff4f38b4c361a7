"""Seeded, realistic ES-like market data in Databento's own record layouts.

Used by the tests, the benchmark and the demo: nothing here touches the network. The arrays
have exactly the dtypes ``DBNStore.to_ndarray()`` gives for DBN version 3 (taken from
``databento_dbn``), so every consumer treats them like real data, and :func:`write_dbn` turns
them into a zstd DBN file with proper Metadata that ``DBNStore.from_file`` reads back.

The shape of the data follows CME Globex E-mini S&P 500 futures: sessions from 17:00 to 16:00
America/Chicago, Sunday evening to Friday afternoon (closed on weekends and for the daily hour),
a busier regular-trading-hours stretch (08:30-15:15 Chicago), prices on a 0.25 tick around
5000 points, about 30% of trading seconds without a trade, and a few random halts (gaps) of
minutes. Everything is vectorised numpy: a year of 1-second bars (~15M rows) takes seconds.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import databento_dbn
import numpy as np

from .timeutil import NS

TICK = 250_000_000  # ES: 0.25 index points, in 1e-9 fixed-point units
RTYPE_OHLCV_1S = 32
RTYPE_OHLCV_1M = 33
RTYPE_MBP_0 = 0  # trades
PUBLISHER_GLBX = 1  # GLBX.MDP3 on CME Globex

#: Databento DBN v3 record layouts, as ``DBNStore.to_ndarray()`` returns them.
OHLCV_DTYPE = np.dtype(databento_dbn.OHLCVMsg._dtypes)
TRADE_DTYPE = np.dtype(databento_dbn.TradeMsg._dtypes)

_CHICAGO = "America/Chicago"
_RTH = (8 * 3600 + 30 * 60, 15 * 3600 + 15 * 60)  # 08:30-15:15 local: the busy part of the day


def trading_sessions(start_ns: int, end_ns: int, tz: str = _CHICAGO) -> tuple[np.ndarray, np.ndarray]:
    """CME Globex sessions (open, close) in UTC ns overlapping [start_ns, end_ns), clipped.

    A session opens at 17:00 local on Sunday to Thursday and closes at 16:00 local the next
    day. DST changes fall on Sunday 02:00 local, when the market is closed, so a session's
    UTC offset is constant throughout it.
    """
    zone = ZoneInfo(tz)
    first = dt.datetime.fromtimestamp(start_ns // NS, dt.UTC).date() - dt.timedelta(days=2)
    last = dt.datetime.fromtimestamp(end_ns // NS, dt.UTC).date() + dt.timedelta(days=1)
    opens, closes = [], []
    day = first
    while day <= last:
        if day.weekday() in (6, 0, 1, 2, 3):  # Sunday..Thursday evenings
            o = dt.datetime.combine(day, dt.time(17), zone)
            c = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(16), zone)
            o_ns, c_ns = int(o.timestamp()) * NS, int(c.timestamp()) * NS
            o_ns, c_ns = max(o_ns, start_ns), min(c_ns, end_ns)
            if o_ns < c_ns:
                opens.append(o_ns)
                closes.append(c_ns)
        day += dt.timedelta(days=1)
    return np.asarray(opens, np.int64), np.asarray(closes, np.int64)


def _trading_seconds(start_ns: int, days: float, tz: str) -> tuple[np.ndarray, np.ndarray]:
    """Every trading second (UTC ns) in the window, and its local second of the day."""
    start_ns = int(start_ns) - int(start_ns) % NS
    end_ns = start_ns + int(round(days * 86_400)) * NS
    opens, closes = trading_sessions(start_ns, end_ns, tz)
    opens = opens + (-opens) % NS  # whole seconds
    lengths = (closes - opens + NS - 1) // NS
    total = int(lengths.sum())
    first_index = np.cumsum(lengths) - lengths
    secs = np.arange(total, dtype=np.int64) - np.repeat(first_index, lengths)
    ts = np.repeat(opens, lengths) + secs * NS
    zone = ZoneInfo(tz)
    offsets = np.array(
        [dt.datetime.fromtimestamp(o // NS, zone).utcoffset().total_seconds() for o in opens],
        dtype=np.int64,
    )
    local_sod = (ts // NS + np.repeat(offsets, lengths)) % 86_400
    return ts, local_sod


def _halts(rng: np.random.Generator, ts: np.ndarray, per_day: float) -> np.ndarray:
    """A mask of seconds inside random halts (2-30 minutes each, about ``per_day`` a day)."""
    if ts.size == 0 or per_day <= 0:
        return np.zeros(ts.size, bool)
    n = rng.poisson(per_day * ts.size / (23 * 3600))
    starts = rng.integers(0, ts.size, n)
    lengths = rng.integers(120, 1800, n)
    delta = np.zeros(ts.size + 1, np.int64)
    np.add.at(delta, starts, 1)
    np.add.at(delta, np.minimum(starts + lengths, ts.size), -1)
    return np.cumsum(delta[:-1]) > 0


def _walk(rng: np.random.Generator, n: int, start_price: float, busy: np.ndarray, still: float) -> np.ndarray:
    """A positive random walk in ticks: mostly still, now and then a jump of a few ticks."""
    step = rng.choice(np.array([-1, 0, 1], np.int64), size=n, p=[(1 - still) / 2, still, (1 - still) / 2])
    jumps = rng.random(n) < np.where(busy, 0.01, 0.003)
    step[jumps] *= rng.integers(2, 9, int(jumps.sum()))
    ticks = int(round(start_price * NS / TICK)) + np.cumsum(step)
    return np.maximum(ticks, 4)


def _records(dtype: np.dtype, rtype: int, publisher_id, instrument_id, ts: np.ndarray) -> np.ndarray:
    """A record array with its header filled in; the caller sets every other field."""
    out = np.empty(ts.size, dtype)
    out["length"] = dtype.itemsize // 4
    out["rtype"] = rtype
    out["publisher_id"] = publisher_id
    out["instrument_id"] = instrument_id
    out["ts_event"] = ts.astype(np.uint64)
    return out


def es_like_1s_bars(
    start_ns: int,
    days: float,
    seed: int,
    *,
    instrument_id: int = 1,
    publisher_id: int = PUBLISHER_GLBX,
    start_price: float = 5000.0,
    tz: str = _CHICAGO,
    fill_rth: float = 0.95,
    fill_overnight: float = 0.60,
    halts_per_day: float = 0.5,
) -> np.ndarray:
    """ES-like ``ohlcv-1s`` records (DBN dtype, rtype 32) for ``days`` days from ``start_ns``.

    One row per trading second that had a trade: ~95% of seconds in regular trading hours,
    ~60% overnight (about 30% of all session seconds are empty), sessions 17:00-16:00
    Chicago Sunday to Friday, plus random halts. Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    ts, sod = _trading_seconds(start_ns, days, tz)
    busy = (sod >= _RTH[0]) & (sod < _RTH[1])
    keep = (rng.random(ts.size) < np.where(busy, fill_rth, fill_overnight)) & ~_halts(rng, ts, halts_per_day)
    ts, busy = ts[keep], busy[keep]
    n = ts.size
    close = _walk(rng, n, start_price, busy, still=0.55)
    open_ = np.empty_like(close)
    open_[1:] = close[:-1]
    open_[:1] = close[:1]
    move = rng.random(n) < 0.2  # the first trade of a second is a tick away from the last close
    open_[move] += rng.choice(np.array([-1, 1], np.int64), int(move.sum()))
    open_ = np.maximum(open_, 4)
    up = rng.geometric(0.7, n) - 1
    down = rng.geometric(0.7, n) - 1
    high = np.maximum(open_, close) + up
    low = np.maximum(np.minimum(open_, close) - down, 1)
    mean_volume = np.where(busy, 40.0, 6.0)
    volume = rng.geometric(1.0 / mean_volume).astype(np.uint64)

    out = _records(OHLCV_DTYPE, RTYPE_OHLCV_1S, publisher_id, instrument_id, ts)
    out["open"] = open_ * TICK
    out["high"] = high * TICK
    out["low"] = low * TICK
    out["close"] = close * TICK
    out["volume"] = volume
    return out


def es_like_1m_bars(start_ns: int, days: float, seed: int, **kwargs) -> np.ndarray:
    """ES-like ``ohlcv-1m`` records (rtype 33): the 1-second bars of the same seed, by minute."""
    sec = es_like_1s_bars(start_ns, days, seed, **kwargs)
    if sec.size == 0:
        return np.zeros(0, OHLCV_DTYPE)
    minute = sec["ts_event"].astype(np.int64) // (60 * NS)
    first = np.flatnonzero(np.r_[True, minute[1:] != minute[:-1]])
    last = np.r_[first[1:] - 1, sec.size - 1]
    out = _records(
        OHLCV_DTYPE, RTYPE_OHLCV_1M, sec["publisher_id"][first], sec["instrument_id"][first],
        minute[first] * 60 * NS,
    )
    out["open"] = sec["open"][first]
    out["close"] = sec["close"][last]
    out["high"] = np.maximum.reduceat(sec["high"], first)
    out["low"] = np.minimum.reduceat(sec["low"], first)
    out["volume"] = np.add.reduceat(sec["volume"], first)
    return out


def es_like_trades(
    start_ns: int,
    days: float,
    seed: int,
    *,
    instrument_id: int = 1,
    publisher_id: int = PUBLISHER_GLBX,
    start_price: float = 5000.0,
    tz: str = _CHICAGO,
    rate_rth: float = 5.5,
    rate_overnight: float = 1.1,
    same_ts_share: float = 0.1,
    halts_per_day: float = 0.5,
) -> np.ndarray:
    """ES-like ``trades`` records (DBN dtype, rtype 0) for ``days`` days from ``start_ns``.

    Trades arrive at ~5.5 a second in regular hours and ~1.1 overnight (Poisson, so ~30% of
    overnight seconds are empty; ~50M trades a year). About ``same_ts_share`` of trades share
    the nanosecond of the previous one (one aggressor filling several resting orders), so
    ``ts_event`` is non-decreasing rather than strictly increasing, as in real data.
    """
    rng = np.random.default_rng(seed)
    ts_sec, sod = _trading_seconds(start_ns, days, tz)
    halted = _halts(rng, ts_sec, halts_per_day)
    busy_sec = (sod >= _RTH[0]) & (sod < _RTH[1])
    per_sec = rng.poisson(np.where(busy_sec, rate_rth, rate_overnight))
    per_sec[halted] = 0
    n = int(per_sec.sum())
    first = np.cumsum(per_sec) - per_sec
    j = np.arange(n, dtype=np.int64) - np.repeat(first, per_sec)  # index within its second
    k = np.repeat(per_sec, per_sec).astype(np.int64)
    offset = ((j + rng.random(n)) * NS / k).astype(np.int64)
    ts = np.repeat(ts_sec, per_sec) + np.minimum(offset, NS - 1)
    same = rng.random(n) < same_ts_share
    same[0] = False
    same &= j > 0  # stay inside the second
    ts[same] = ts[np.flatnonzero(same) - 1]
    ts = np.maximum.accumulate(ts)  # chains of equal ts stay non-decreasing
    busy = np.repeat(busy_sec, per_sec)
    price = _walk(rng, n, start_price, busy, still=0.8) * TICK
    size = rng.geometric(1.0 / np.where(busy, 4.0, 2.0)).astype(np.uint32)

    out = _records(TRADE_DTYPE, RTYPE_MBP_0, publisher_id, instrument_id, ts)
    out["price"] = price
    out["size"] = size
    out["action"] = b"T"
    out["side"] = np.where(rng.random(n) < 0.5, b"A", b"B")
    out["flags"] = 0x80  # F_LAST
    latency = rng.integers(150_000, 400_000, n)
    out["ts_recv"] = (ts + latency).astype(np.uint64)
    out["ts_in_delta"] = rng.integers(10_000, 30_000, n).astype(np.int32)
    out["sequence"] = (np.arange(n, dtype=np.int64) % (1 << 32)).astype(np.uint32)
    return out


def interleave(*arrays: np.ndarray) -> np.ndarray:
    """Merge record arrays of several instruments by ``ts_event`` (stable: per-instrument order kept)."""
    merged = np.concatenate(arrays)
    return merged[np.argsort(merged["ts_event"], kind="stable")]


_SCHEMA_BY_RTYPE = {
    RTYPE_OHLCV_1S: databento_dbn.Schema.OHLCV_1S,
    RTYPE_OHLCV_1M: databento_dbn.Schema.OHLCV_1M,
    RTYPE_MBP_0: databento_dbn.Schema.TRADES,
}


def dbn_bytes(
    records: np.ndarray,
    *,
    dataset: str = "GLBX.MDP3",
    symbols: dict[str, int] | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
) -> bytes:
    """Uncompressed DBN (version 3): Metadata then the records, as Databento sends them.

    ``symbols`` maps each raw symbol to its instrument_id (default: ``"ES<id>"`` for every
    instrument_id present); the Metadata maps them over every UTC day from start to end.
    """
    if records.dtype not in (OHLCV_DTYPE, TRADE_DTYPE):
        raise ValueError(f"records must have the DBN ohlcv or trades dtype, not {records.dtype}")
    if records.size == 0 and (start_ns is None or end_ns is None):
        raise ValueError("an empty record array needs start_ns and end_ns")
    rtype = int(records["rtype"][0]) if records.size else (RTYPE_MBP_0 if records.dtype == TRADE_DTYPE else RTYPE_OHLCV_1S)
    schema = _SCHEMA_BY_RTYPE.get(rtype)
    if schema is None:
        raise ValueError(f"rtype {rtype} is not ohlcv-1s, ohlcv-1m or trades")
    ts = records["ts_event"]
    start = int(start_ns if start_ns is not None else ts.min())
    end = int(end_ns if end_ns is not None else ts.max() + 1)
    if symbols is None:
        symbols = {f"ES{i}": int(i) for i in np.unique(records["instrument_id"])}
    d0 = dt.datetime.fromtimestamp(start // NS, dt.UTC).date()
    d1 = dt.datetime.fromtimestamp((end - 1) // NS, dt.UTC).date() + dt.timedelta(days=1)
    mappings = [
        SimpleNamespace(
            raw_symbol=name,
            intervals=[SimpleNamespace(start_date=d0, end_date=d1, symbol=str(iid))],
        )
        for name, iid in symbols.items()
    ]
    meta = databento_dbn.Metadata(
        dataset=dataset,
        start=start,
        stype_in=databento_dbn.SType.RAW_SYMBOL,
        stype_out=databento_dbn.SType.INSTRUMENT_ID,
        schema=schema,
        symbols=list(symbols),
        partial=[],
        not_found=[],
        mappings=mappings,
        end=end,
    )
    return bytes(meta.encode()) + np.ascontiguousarray(records).tobytes()


def write_dbn(path: str | Path, records: np.ndarray, **kwargs) -> Path:
    """Write ``records`` as a zstd-compressed DBN file (see :func:`dbn_bytes` for the options)."""
    import zstandard

    path = Path(path)
    raw = dbn_bytes(records, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3, threads=-1).compress(raw))
    return path

"""Benchmark: the streambars engine against pandas, polars, ArcticDB and a memory-bandwidth floor.

    python bench/aggregate.py            # one year of ES-like 1s bars (~15M) and ~50M trades
    python bench/aggregate.py --quick    # a month of each: under a minute

Everything runs in this one process on the same seeded data (``streambars.synthetic``):

* engine: ``Aggregator`` with all 16 standard timeframes, and with 1min/5min/15min/1h (the
  issue-13 rows), validation on, fed batches of ``--batch`` records (as the pipeline does),
  bars copied out as the pipeline receives them; polars on the same timeframe sets;
* pandas: ``resample(origin="epoch")`` per sub-day timeframe plus a session-day ``groupby``
  for 1d, first/max/min/last/sum/count, empty intervals dropped (the same bars);
* polars: ``group_by_dynamic`` per timeframe (1d with the session offset), same aggregates;
* ArcticDB: ``QueryBuilder.resample`` per timeframe on a symbol written once (untimed) to its
  LMDB store, same aggregates; ArcticDB has no time zones, so its 1d bars start at the
  session's UTC time on the first day (an hour off across DST: its 1d bar count may differ).
  Skipped, saying so, when arcticdb is not installed (it is in the ``bench`` extra);
* floor: a numba loop that reads every input field once and does nothing else;
* one-record calls: microseconds per ``process()`` of a single record (live feeding), best
  of 5 runs;
* warm start: the wall time of a fresh interpreter importing streambars, building an
  aggregator, processing one tiny batch and exiting, with the numba cache already warm;
  best of 5.

Rates are input records per second (wall clock, best of ``--repeat``). The machine may be
shared: the ratios, measured back to back, are the numbers to read.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".numba_cache"))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from streambars import synthetic as sy  # noqa: E402
from streambars.engine import Aggregator  # noqa: E402
from streambars.records import RecordBatch  # noqa: E402
from streambars.timeframes import STANDARD_TIMEFRAMES, Session, parse_timeframes  # noqa: E402

SESSION = Session.parse("17:00 America/Chicago")
TIMEFRAMES = parse_timeframes(list(STANDARD_TIMEFRAMES))
FOUR = parse_timeframes(["1min", "5min", "15min", "1h"])  # the 4-timeframe rows
START = pd.Timestamp("2024-01-01", tz="UTC").value


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


# -- the engine ------------------------------------------------------------------------------


def run_engine(batch: RecordBatch, kind: str, batch_size: int, tfs=TIMEFRAMES) -> int:
    agg = Aggregator(tfs, input_kind=kind, session=SESSION)
    n = 0
    for i in range(0, len(batch), batch_size):
        n += len(agg.process(batch.slice(i, i + batch_size)))
    n += len(agg.finish())
    # es_like_trades breaks ts_not_increasing (137,815 of 4.35M in 30 days, before this
    # branch too: a synthetic-data matter, left to its owner); 1s bars break nothing
    assert kind == "trades" or not agg.counts.any()
    return n


def per_call_us(batch: RecordBatch, kind: str, calls: int, repeat: int = 5) -> list[float]:
    """Microseconds per one-record process() call, each of ``repeat`` runs of ``calls`` calls
    on a fresh aggregator (the machine is shared: read the best, and the spread)."""
    ones = [batch.slice(i, i + 1) for i in range(calls)]
    runs = []
    for _ in range(repeat):
        agg = Aggregator(TIMEFRAMES, input_kind=kind, session=SESSION)
        agg.process(ones[0])
        t = time.perf_counter()
        for one in ones[1:]:
            agg.process(one)
        runs.append((time.perf_counter() - t) / (calls - 1) * 1e6)
    return runs


WARM_START = """
import time; t0 = time.perf_counter()
import numpy as np
from streambars.engine import Aggregator
from streambars.records import RecordBatch
from streambars.timeframes import STANDARD_TIMEFRAMES, Session
agg = Aggregator(STANDARD_TIMEFRAMES, input_kind="ohlcv-1s", session=Session.parse("17:00 America/Chicago"))
p = np.full(3, 5000 * 10**9, np.int64)
ts = 1_700_000_000 * 10**9 + np.arange(3, dtype=np.int64) * 10**9
agg.process(RecordBatch("ohlcv-1s", np.zeros(3, np.int32), ts, p, p, p, p, np.ones(3, np.uint64)))
agg.finish()
print(time.perf_counter() - t0)
"""


def warm_start_s(repeat: int) -> list[float]:
    """Wall seconds of each of ``repeat`` fresh interpreters running WARM_START (after one
    untimed run that warms numba's cache): start-up, imports, work and exit."""
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", WARM_START], check=True, env=env, capture_output=True)  # warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", WARM_START], check=True, env=env, capture_output=True)
        times.append(time.perf_counter() - t)
    return times


# -- the floor -------------------------------------------------------------------------------


@numba.njit(cache=True)
def _read_all(series, ts, o, h, lo, c, v):
    acc = np.int64(0)
    for i in range(ts.shape[0]):
        acc += series[i] + ts[i] + o[i] + h[i] + lo[i] + c[i] + np.int64(v[i])
    return acc


def run_floor(batch: RecordBatch) -> int:
    b = batch
    return int(_read_all(b.series, b.ts_event, b.open, b.high, b.low, b.close, b.volume))


# -- pandas and polars -----------------------------------------------------------------------

_PD_AGG = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum", "count": "size"}


def run_pandas(batch: RecordBatch, tfs=TIMEFRAMES) -> int:
    df = pd.DataFrame(
        {"open": batch.open, "high": batch.high, "low": batch.low, "close": batch.close,
         "volume": batch.volume, "count": np.ones(len(batch), np.int8)},
        index=pd.DatetimeIndex(batch.ts_event.view("datetime64[ns]"), tz="UTC"),
    )
    n = 0
    tod = pd.Timedelta(hours=SESSION.time_of_day.hour, minutes=SESSION.time_of_day.minute)
    for tf in tfs:
        if tf.is_daily:
            day = (df.index.tz_convert(SESSION.tz).tz_localize(None) - tod).normalize()
            bars = df.groupby(day).agg(_PD_AGG)
        else:
            bars = df.resample(f"{tf.seconds}s", origin="epoch").agg(_PD_AGG)
            bars = bars[bars["count"] > 0]
        n += len(bars)
    return n


def run_polars(batch: RecordBatch, tfs=TIMEFRAMES) -> int:
    import polars as pl

    df = pl.DataFrame(
        {"ts": batch.ts_event.view("datetime64[ns]"), "open": batch.open, "high": batch.high,
         "low": batch.low, "close": batch.close, "volume": batch.volume}
    )
    if not bool((batch.ts_event[1:] >= batch.ts_event[:-1]).all()):
        df = df.sort("ts", maintain_order=True)  # group_by_dynamic needs it (synthetic trades)
    aggs = [pl.col("open").first(), pl.col("high").max(), pl.col("low").min(), pl.col("close").last(),
            pl.col("volume").sum(), pl.len().alias("count")]
    n = 0
    for tf in tfs:
        if tf.is_daily:
            local = df.with_columns(pl.col("ts").dt.replace_time_zone("UTC").dt.convert_time_zone(SESSION.tz))
            bars = local.group_by_dynamic("ts", every="1d", offset=f"{SESSION.time_of_day.hour}h").agg(aggs)
        else:
            bars = df.group_by_dynamic("ts", every=f"{tf.seconds}s").agg(aggs)
        n += len(bars)
    return n


class Arctic:
    """One LMDB-backed ArcticDB library in a temporary folder, a symbol per input kind."""

    AGG = {"open": ("open", "first"), "high": ("high", "max"), "low": ("low", "min"),
           "close": ("close", "last"), "volume": ("volume", "sum"), "count": ("close", "count")}

    def __init__(self):
        import arcticdb

        self.adb = arcticdb
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-arcticdb-")
        self.lib = arcticdb.Arctic(f"lmdb://{self._tmp.name}").get_library("bench", create_if_missing=True)

    def write(self, symbol: str, batch: RecordBatch) -> float:
        """Store the records as one frame (resample needs a sorted index); returns seconds."""
        t = time.perf_counter()
        df = pd.DataFrame(
            {"open": batch.open, "high": batch.high, "low": batch.low, "close": batch.close, "volume": batch.volume},
            index=pd.DatetimeIndex(batch.ts_event.view("datetime64[ns]")),
        )
        if not df.index.is_monotonic_increasing:
            df = df.sort_index(kind="stable")
        self.lib.write(symbol, df)
        return time.perf_counter() - t

    def run(self, symbol: str, tfs=TIMEFRAMES) -> int:
        n = 0
        for tf in tfs:
            if tf.is_daily:
                first = pd.Timestamp(START, tz="UTC").tz_convert(SESSION.tz)
                local = first.normalize() + pd.Timedelta(hours=SESSION.time_of_day.hour, minutes=SESSION.time_of_day.minute)
                offset = local.tz_convert("UTC") - local.tz_convert("UTC").normalize()
                q = self.adb.QueryBuilder().resample("1D", offset=offset)
            else:
                q = self.adb.QueryBuilder().resample(f"{tf.seconds}s")
            n += len(self.lib.read(symbol, query_builder=q.agg(self.AGG)).data)
        return n


def arctic_or_none() -> Arctic | None:
    try:
        return Arctic()
    except ImportError:
        print("# arcticdb not installed: its rows are skipped (pip install -e '.[bench]')")
        return None


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a month of data instead of a year (under a minute)")
    ap.add_argument("--days", type=float, help="days of data (default 365, quick 30)")
    ap.add_argument("--batch", type=int, default=16_384, help="engine batch size (records)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per measurement, best kept")
    ap.add_argument("--no-trades", action="store_true", help="skip the trades input")
    args = ap.parse_args(argv)
    days = args.days or (30 if args.quick else 365)
    repeat = args.repeat or (2 if args.quick else 2)

    print(f"# streambars engine benchmark: {days:g} days of ES-like data, {len(TIMEFRAMES)} timeframes, "
          f"numba {numba.__version__}, pandas {pd.__version__}, {os.cpu_count()} cpus")
    t = time.perf_counter()
    bars_1s = sy.es_like_1s_bars(START, days, seed=1)
    inputs = {"ohlcv-1s": RecordBatch.from_ohlcv("ohlcv-1s", np.zeros(len(bars_1s), np.int32), bars_1s)}
    del bars_1s
    if not args.no_trades:
        trades = sy.es_like_trades(START, days, seed=2)
        inputs["trades"] = RecordBatch.from_trades(np.zeros(len(trades), np.int32), trades)
        del trades
    print(f"# generated in {time.perf_counter() - t:.1f} s: "
          + ", ".join(f"{len(b):,} {k}" for k, b in inputs.items()))

    arctic = arctic_or_none()
    if arctic is not None:
        for kind, batch in inputs.items():
            print(f"# arcticdb {arctic.adb.__version__}: {kind} written to LMDB in {arctic.write(kind, batch):.1f} s "
                  "(untimed below)")
    run_engine(inputs["ohlcv-1s"].slice(0, 1000), "ohlcv-1s", 100)  # JIT / cache load
    run_floor(inputs["ohlcv-1s"].slice(0, 10))
    results = {}
    # the rows: 1s bars at 16 and at 4 timeframes, trades at 4 (and at 16)
    cases = [(kind, label, tfs) for kind in inputs for label, tfs in (("16tf", TIMEFRAMES), ("4tf", FOUR))]
    for kind, label, tfs in cases:
        batch = inputs[kind]
        n = len(batch)
        rates = {}
        runs = [("engine", lambda b=batch, k=kind, t=tfs: run_engine(b, k, args.batch, t)),
                ("polars", lambda b=batch, t=tfs: run_polars(b, t))]
        if arctic is not None:
            runs += [("arcticdb", lambda k=kind, t=tfs: arctic.run(k, t))]
        if label == "16tf":
            runs += [("floor", lambda b=batch: run_floor(b))]
            if kind == "ohlcv-1s":
                runs += [("pandas", lambda b=batch, t=tfs: run_pandas(b, t))]
        for name, fn in runs:
            secs, out = best(fn, 1 if name == "pandas" and not args.quick else repeat)
            rates[name] = n / secs
            extra = f"{out:>12,} bars" if name != "floor" else ""
            print(f"{kind:9} {label:4} {name:8} {secs:8.3f} s {n / secs / 1e6:9.2f} M records/s {extra}", flush=True)
        results[kind, label] = rates
        print(f"{kind:9} {label:4} ratios: engine/polars {rates['engine'] / rates['polars']:.2f}x"
              + (f", engine/arcticdb {rates['engine'] / rates['arcticdb']:.1f}x" if "arcticdb" in rates else "")
              + (f", engine/pandas {rates['engine'] / rates['pandas']:.1f}x" if "pandas" in rates else "")
              + (f", engine/floor {rates['engine'] / rates['floor']:.3f}x" if "floor" in rates else ""), flush=True)

    calls = per_call_us(inputs["ohlcv-1s"], "ohlcv-1s", 50_000 if not args.quick else 20_000)
    us = min(calls)
    print(f"one-record process() call: {us:.2f} us best of {len(calls)} runs ({min(calls):.2f}-{max(calls):.2f})")
    starts = warm_start_s(5)
    ws = min(starts)
    print(f"warm-cache start (new interpreter: import, build, one batch, exit): {ws:.2f} s best of "
          f"{len(starts)} ({min(starts):.2f}-{max(starts):.2f})")
    r16, r4 = results["ohlcv-1s", "16tf"], results["ohlcv-1s", "4tf"]
    print("issue 13 rows (this run):")
    def vs_arctic(r: dict, fmt: str = ".1f") -> str:
        return f", {r['engine'] / r['arcticdb']:{fmt}}x arcticdb" if "arcticdb" in r else ""

    print(f"  1s -> 1min/5min/15min/1h: {r4['engine'] / 1e6:.1f} M rec/s (goal >= 100), "
          f"{r4['engine'] / r4['polars']:.2f}x polars (goal >= 2.5x){vs_arctic(r4)}")
    print(f"  1s -> 16 timeframes: {r16['engine'] / 1e6:.1f} M rec/s (goal >= 70), "
          f"{r16['engine'] / r16['polars']:.1f}x polars, {r16['engine'] / r16['pandas']:.0f}x pandas{vs_arctic(r16)}")
    if ("trades", "4tf") in results:
        t4 = results["trades", "4tf"]
        print(f"  trades -> 1min/5min/15min/1h: {t4['engine'] / 1e6:.1f} M rec/s, "
              f"{t4['engine'] / t4['polars']:.2f}x polars (goal >= 2x){vs_arctic(t4)}")
    print(f"  one-record call {us:.2f} us (<= 3), warm start {ws:.2f} s (<= 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

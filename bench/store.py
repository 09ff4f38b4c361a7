"""The HDF5 store's write and read costs, measured through streambars.store itself.

    python bench/store.py [--rows 10000000] [--single-rows 50000] [--year-days 252] [--out bench/out/store.json]

1. Appends through BarFileWriter (SWMR, one flush per append, as the daemon and backfill
   write) in batches of 1, 100 and 10,000 rows of one timeframe: rows/s and bytes on disk
   per 52-byte row. Batches of 1 run ``--single-rows`` appends (10M single appends take
   about half an hour) and the 10M time is extrapolated from their rate.
2. A day of the daemon's pattern: one 1s bar per second plus each of the 15 coarser
   standard timeframes' bar when it closes, one append (and flush) per second, 86,400
   appends. Bytes on disk per stored bar, for the chunking the store uses (rows per chunk
   scaled down for coarse timeframes) and for one chunk size for all -- the measurement
   behind the choice. Also what compression under SWMR would do (raw h5py, gzip, flush per
   row; the reason the writer never compresses).
3. A year of 1s bars (``--year-days`` trading days of 23 h): time to read one day through
   ``StoreReader.read(start, end)`` (per-chunk index, binary search) vs reading the whole
   dataset; then ``compact`` with gzip and lzf (bytes per row, time).

The machine is shared: read the figures as orders of size. The page cache is warm (files
were just written), so reads measure HDF5 + copying, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streambars.records import BAR_DTYPE  # noqa: E402
from streambars.store import BarFileWriter, compact_store, open_store  # noqa: E402
from streambars.store.layout import LIBVER  # noqa: E402
from streambars.timeframes import STANDARD_TIMEFRAMES, UTC_MIDNIGHT, parse_timeframes  # noqa: E402

SEC = 1_000_000_000
T0 = 1_704_067_200 * SEC  # 2024-01-01T00:00:00Z
ROW = BAR_DTYPE.itemsize


def bars(ts: np.ndarray) -> np.ndarray:
    """ES-like bars: a random walk in 0.25 ticks, ranges of a few ticks, noisy volume (so the
    compression figures are not flattered by constant columns)."""
    rng = np.random.default_rng(int(ts[0] // SEC) if ts.size else 0)
    tick = 250_000_000
    close = 4_800_000_000_000 + np.cumsum(rng.integers(-2, 3, ts.size)) * tick
    open_ = close + rng.integers(-2, 3, ts.size) * tick
    out = np.empty(ts.size, BAR_DTYPE)
    out["ts_event"] = ts
    out["open"], out["close"] = open_, close
    out["high"] = np.maximum(open_, close) + rng.integers(0, 3, ts.size) * tick
    out["low"] = np.minimum(open_, close) - rng.integers(0, 3, ts.size) * tick
    out["volume"] = rng.integers(1, 400, ts.size)
    out["count"] = rng.integers(1, 60, ts.size)
    return out


def on_disk(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def writer(root: Path, symbol: str, tfs, chunk_rows: int = 4096) -> BarFileWriter:
    return BarFileWriter(root, "BENCH", symbol, stype="raw_symbol", timeframes=tfs,
                         session=UTC_MIDNIGHT, chunk_rows=chunk_rows)


def bench_appends(root: Path, rows: int, single_rows: int) -> list[dict]:
    out = []
    tfs = parse_timeframes(["1s"])
    for batch in (1, 100, 10_000):
        n = min(rows, single_rows) if batch == 1 else rows
        data = bars(T0 + np.arange(n, dtype=np.int64) * SEC)
        with writer(root, f"append{batch}", tfs) as w:
            t = time.perf_counter()
            for lo in range(0, n, batch):
                w.append({"1s": data[lo : lo + batch]})
            elapsed = time.perf_counter() - t
            path = w.path
        size, alloc = on_disk(path)
        rate = n / elapsed
        row = {"batch": batch, "rows": n, "seconds": round(elapsed, 2), "rows_per_s": round(rate),
               "bytes_per_row": round(size / n, 1), "allocated_bytes_per_row": round(alloc / n, 1),
               "seconds_for_10M": round(10_000_000 / rate, 1), "extrapolated": n < 10_000_000}
        out.append(row)
        print(f"append batch={batch:>6}: {n:>10,} rows {elapsed:8.2f} s  {rate:>12,.0f} rows/s  "
              f"{size / n:6.1f} B/row on disk  (10M rows: {10_000_000 / rate:,.0f} s"
              f"{', extrapolated' if n < 10_000_000 else ''})", flush=True)
        path.unlink()
    return out


def bench_day(root: Path) -> list[dict]:
    tfs = parse_timeframes(list(STANDARD_TIMEFRAMES))
    out = []
    for label, chunk_rows, uniform in (("store default: 4096 rows for 1s, scaled down", 4096, False),
                                       ("one size: 4096 rows for every timeframe", 4096, True)):
        sym = "day-uniform" if uniform else "day"
        w = writer(root, sym, tfs, chunk_rows)
        if uniform:  # rebuild the file with one chunk size for all (layout otherwise identical)
            w.close()
            _rechunk_uniform(w.path, chunk_rows)
            w = writer(root, sym, tfs, chunk_rows)
        total = 0
        t = time.perf_counter()
        for i in range(86_400):
            batch = {"1s": bars(np.array([T0 + i * SEC]))}
            for tf in tfs[1:]:
                if (i + 1) % tf.seconds == 0:
                    batch[tf.name] = bars(np.array([T0 + (i + 1 - tf.seconds) * SEC]))
            total += sum(w.append(batch).values())
        elapsed = time.perf_counter() - t
        w.close()
        size, alloc = on_disk(w.path)
        row = {"chunking": label, "appends": 86_400, "bars": total, "seconds": round(elapsed, 1),
               "us_per_append": round(elapsed / 86_400 * 1e6), "bytes_per_bar": round(size / total, 1),
               "ratio_to_row": round(size / total / ROW, 2)}
        out.append(row)
        print(f"day, {label}: {total:,} bars, {size:,} B = {size / total:.1f} B/bar "
              f"({size / total / ROW:.2f}x the {ROW}-byte row), {elapsed / 86_400 * 1e6:.0f} us/append", flush=True)
    # What compression would do under SWMR with a flush per row (why the writer never compresses).
    import h5py

    path = root / "gzip-swmr.h5"
    n = 20_000
    with h5py.File(path, "w", libver=LIBVER) as f:
        ds = f.create_dataset("b", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=BAR_DTYPE, compression="gzip")
        f.swmr_mode = True
        data = bars(T0 + np.arange(n, dtype=np.int64) * SEC)
        for i in range(n):
            ds.resize((i + 1,))
            ds[i : i + 1] = data[i : i + 1]
            ds.flush()
    size = os.path.getsize(path)
    out.append({"chunking": "gzip under SWMR, flush per row (raw h5py)", "bars": n, "bytes_per_bar": round(size / n, 1),
                "ratio_to_row": round(size / n / ROW, 1)})
    print(f"gzip under SWMR, flush per row: {size / n:,.0f} B/bar ({size / n / ROW:.0f}x the row)", flush=True)
    return out


def _rechunk_uniform(path: Path, rows: int) -> None:
    import h5py

    with h5py.File(path, "r+", libver=LIBVER) as f:
        for name in list(f["bars"]):
            attrs = dict(f["bars"][name].attrs)
            del f["bars"][name]
            ds = f["bars"].create_dataset(name, shape=(0,), maxshape=(None,), chunks=(rows,), dtype=BAR_DTYPE)
            ds.attrs.update(attrs)
            ds.attrs["index_stride"] = rows
    tmp = path.with_suffix(".tmp")
    with h5py.File(path, "r") as src, h5py.File(tmp, "w", libver=LIBVER) as dst:
        dst.attrs.update(src.attrs)
        for key in src:
            src.copy(src[key], dst, name=key)
    os.replace(tmp, path)


def bench_year(root: Path, days: int) -> dict:
    per_day = 23 * 3600
    tfs = parse_timeframes(["1s"])
    t = time.perf_counter()
    with writer(root, "year", tfs) as w:
        for d in range(days):
            day0 = T0 + (d + d // 5 * 2) * 86_400 * SEC  # weekdays only
            w.append({"1s": bars(day0 + np.arange(per_day, dtype=np.int64) * SEC)})
        path = w.path
    write_s = time.perf_counter() - t
    n = days * per_day
    size = os.path.getsize(path)
    print(f"year: {n:,} 1s bars written in {write_s:.1f} s ({n / write_s:,.0f} rows/s, "
          f"{size / n:.1f} B/row)", flush=True)
    mid = days // 2
    day0 = T0 + (mid + mid // 5 * 2) * 86_400 * SEC
    with open_store(root / "BENCH" / path.name) as r:
        t = time.perf_counter()
        first = r.read("year", "1s", day0, day0 + 86_400 * SEC)  # first read: opens datasets, reads index
        cold_day = time.perf_counter() - t
        times = []
        for k in range(20):
            d = (k * 37) % days
            a = T0 + (d + d // 5 * 2) * 86_400 * SEC
            t = time.perf_counter()
            got = r.read("year", "1s", a, a + 86_400 * SEC)
            times.append(time.perf_counter() - t)
            assert got.size == per_day
        lookups = []
        for k in range(50):  # the binary search alone: index + one chunk per bound, no rows copied
            d = (k * 53) % days
            a = T0 + (d + d // 5 * 2) * 86_400 * SEC + 3_600 * SEC
            t = time.perf_counter()
            assert r.count("year", "1s", a, a + 86_400 * SEC) > 0
            lookups.append(time.perf_counter() - t)
        wholes = []
        for _ in range(3):  # the first pass also faults in the file's pages and the output array
            t = time.perf_counter()
            whole = r.read("year", "1s")
            wholes.append(time.perf_counter() - t)
            assert whole.size == n
            del whole
    assert first.size == per_day
    day_s, whole_s = float(np.median(times)), min(wholes)
    result = {"rows": n, "file_bytes": size, "write_seconds": round(write_s, 1),
              "read_one_day_ms_first": round(cold_day * 1e3, 2), "read_one_day_ms_median": round(day_s * 1e3, 2),
              "lookup_ms_median": round(float(np.median(lookups)) * 1e3, 3),
              "read_whole_s_first": round(wholes[0], 3), "read_whole_s_best": round(whole_s, 3),
              "whole_over_day": round(whole_s / day_s)}
    print(f"read one day ({per_day:,} rows): {day_s * 1e3:.1f} ms median ({cold_day * 1e3:.1f} ms first); "
          f"whole dataset ({n:,} rows): {whole_s:.2f} s best of 3 ({wholes[0]:.2f} s first) "
          f"-> the day costs 1/{whole_s / day_s:,.0f} of the whole; finding a range alone: "
          f"{np.median(lookups) * 1e3:.2f} ms", flush=True)
    for comp in ("lzf", "gzip"):
        work = path.with_name(f"year-{comp}.h5")
        shutil.copy(path, work)
        t = time.perf_counter()
        [(_, before, after)] = list(compact_store(root, [work], comp))
        result[f"compact_{comp}"] = {"seconds": round(time.perf_counter() - t, 1), "bytes_per_row": round(after / n, 1)}
        print(f"compact {comp}: {before / n:.1f} -> {after / n:.1f} B/row in {time.perf_counter() - t:.1f} s", flush=True)
        work.unlink()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="rows for the batched append runs")
    p.add_argument("--single-rows", type=int, default=50_000, help="rows for the batch-of-1 run")
    p.add_argument("--year-days", type=int, default=252, help="trading days of 1s bars for the read test")
    p.add_argument("--skip", nargs="*", default=[], choices=("appends", "day", "year"))
    p.add_argument("--dir", help="scratch directory (default: a temporary one, removed after)")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "store.json"))
    args = p.parse_args(argv)
    from streambars.observe import configure_logging

    configure_logging("warning", "console")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="streambars-bench-"))
    results: dict = {"row_bytes": ROW, "libver": LIBVER[0]}
    try:
        if "appends" not in args.skip:
            results["appends"] = bench_appends(root, args.rows, args.single_rows)
        if "day" not in args.skip:
            results["day"] = bench_day(root)
        if "year" not in args.skip:
            results["year"] = bench_year(root, args.year_days)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

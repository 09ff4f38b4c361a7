"""End-to-end backfill throughput: zstd DBN -> decode -> engine (16 timeframes) -> HDF5.

Beside it, in the same run and on the same file:

* decode only: databento's own ``DBNStore.to_ndarray()`` (the goal: pipeline >= 0.8x of it);
* "the pandas way": decode, ``resample`` per timeframe (session-day ``groupby`` for 1d),
  one h5py dataset per timeframe written in one go (the goal: backfill >= 6x faster);
* the store as backfill drives it: rows written per second of the write stage's CPU time
  (the goal: >= 10M rows/s), against the same rows written to a fresh file in one bulk h5py
  write per timeframe; and one day of 1s bars read back from each (goal: within 1.5x);
* peak RSS of the pipeline process (goal: < 400 MB for one symbol-year).

The pipeline runs in a subprocess (``--repeat`` times, the best kept) so its time, CPU time
and RSS are its own; a decode-only run goes before each, and the best of those is the
baseline, so both sides of the ratio meet the same machine. Then, unless ``--no-archive``, the Historical backfill itself
(``streambars backfill --symbols A,B,C``, month by month, reading the months from the raw
archive so no gateway is needed) for three symbols at 16 timeframes: its peak RSS after the
first month and after the whole range (flat with run length).

    python bench/backfill.py            # one year of ES-like 1s bars (~15M records a symbol)
    python bench/backfill.py --quick    # one month (three symbols: two months)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))


def make_file(path: Path, days: float) -> int:
    from streambars.synthetic import es_like_1s_bars, write_dbn

    start = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp()) * 10**9
    records = es_like_1s_bars(start, days, seed=7, instrument_id=5602)
    write_dbn(path, records, dataset="GLBX.MDP3", symbols={"ESH4": 5602},
              start_ns=start, end_ns=start + int(days * 86400) * 10**9)
    return len(records)


def decode_only(path: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``DBNStore.to_ndarray()`` of the whole file."""
    import databento as db

    t0, c0 = time.perf_counter(), time.process_time()
    arr = db.DBNStore.from_file(path).to_ndarray()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert len(arr) > 0
    return dt, cpu


def pipeline_in_subprocess(path: Path, store: Path, coalesce: int | None = None) -> dict:
    """``ingest_dbn_files`` of ``path`` in a fresh process: wall and CPU seconds, peak RSS, the
    write stage's rows and thread CPU time (every BarFileWriter.append, timed in the thread
    that runs it), then the same rows written again in one bulk h5py write per timeframe and
    one day of 1s bars read back from both files."""
    code = f"""
import io, json, sys, time, resource
import h5py, numpy as np
from pathlib import Path
import streambars.backfill as B
from streambars.backfill import ingest_dbn_files
from streambars.config import load_settings
from streambars.observe import configure_logging
from streambars.store import writer as W
if {coalesce!r} is not None:  # rows held back by the writers (0: one append per engine batch)
    B.COALESCE_ROWS = {coalesce!r}
spent = [0.0, 0]
_append = W.BarFileWriter.append
def timed(self, *a, **k):
    t = time.thread_time()
    out = _append(self, *a, **k)
    spent[0] += time.thread_time() - t
    spent[1] += sum(out.values())
    return out
W.BarFileWriter.append = timed
configure_logging("warning", "json")
settings = load_settings(None, {{"store.path": {str(store)!r}}})
t0, c0 = time.perf_counter(), time.process_time()
result = ingest_dbn_files(settings, [Path({str(path)!r})], out=io.StringIO())
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
# VmHWM, not ru_maxrss: the latter can carry the parent's peak across fork+exec.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
# the same rows in one bulk write per timeframe, then one day of 1s bars from each file
[src] = list(Path({str(store)!r}).rglob("*.h5"))
bulk = src.with_name("bulk.h5")
with h5py.File(src, "r", locking=False) as f:
    data = {{n: (f["bars"][n][()], f["bars"][n].chunks) for n in f["bars"]}}
t = time.perf_counter()
with h5py.File(bulk, "w", libver=("v110", "v110"), locking=False) as g:
    for n, (rows, chunks) in data.items():
        g.create_dataset(n, data=rows, chunks=chunks, maxshape=(None,))
bulk_s = time.perf_counter() - t
nrows = sum(len(r) for r, _ in data.values())
ts = data["1s"][0]["ts_event"]
del data
days = np.unique(ts // 86_400_000_000_000)[1:-1]
pick = days[np.linspace(0, len(days) - 1, min(20, len(days))).astype(int)]
spans = [(int(np.searchsorted(ts, d * 86_400_000_000_000)), int(np.searchsorted(ts, (d + 1) * 86_400_000_000_000))) for d in pick]
def day_read(p):
    with h5py.File(p, "r", locking=False) as f:
        ds = f["bars/1s"] if "bars" in f else f["1s"]
        ds[spans[0][0]:spans[0][1]]
        times = []
        for a, b in spans * 3:
            t = time.perf_counter(); ds[a:b]; times.append(time.perf_counter() - t)
    return float(np.median(times))
print(json.dumps({{"seconds": dt, "cpu": cpu, "records": result.stats.records, "bars": result.stats.bars_written,
                  "rss_mb": int(hwm) / 1024, "write_cpu": spent[0], "write_rows": spent[1],
                  "bulk_rows_per_s": nrows / bulk_s, "day_backfill_s": day_read(src), "day_bulk_s": day_read(bulk)}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        sys.exit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def pandas_way(path: Path, out: Path) -> float:
    """Decode, ``resample`` per timeframe, one h5py write per timeframe: seconds."""
    import databento as db
    import h5py
    import numpy as np
    import pandas as pd

    from streambars.timeframes import STANDARD_TIMEFRAMES, Session, parse_timeframes

    session = Session.parse("17:00 America/Chicago")
    agg = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum", "count": "size"}
    t0 = time.perf_counter()
    arr = db.DBNStore.from_file(path).to_ndarray()
    df = pd.DataFrame({k: arr[k] for k in ("open", "high", "low", "close", "volume")},
                      index=pd.DatetimeIndex(arr["ts_event"].view("datetime64[ns]"), tz="UTC"))
    df["count"] = np.ones(len(df), np.int8)
    del arr
    tod = pd.Timedelta(hours=session.time_of_day.hour, minutes=session.time_of_day.minute)
    with h5py.File(out, "w") as f:
        for tf in parse_timeframes(list(STANDARD_TIMEFRAMES)):
            if tf.is_daily:
                bars = df.groupby((df.index.tz_convert(session.tz).tz_localize(None) - tod).normalize()).agg(agg)
            else:
                bars = df.resample(f"{tf.seconds}s", origin="epoch").agg(agg)
                bars = bars[bars["count"] > 0]
            rows = np.empty(len(bars), [("ts_event", "<i8"), ("open", "<i8"), ("high", "<i8"), ("low", "<i8"),
                                        ("close", "<i8"), ("volume", "<u8"), ("count", "<u4")])
            rows["ts_event"] = bars.index.asi8
            for k in ("open", "high", "low", "close", "volume", "count"):
                rows[k] = bars[k].to_numpy()
            f.create_dataset(tf.name, data=rows)
    return time.perf_counter() - t0


THREE = {"ESH4": 5602, "NQH4": 5603, "YMH4": 5604}


def make_archive(root: Path, months: int) -> int:
    """``months`` months of three symbols' 1s bars in the raw-archive layout (as downloaded)."""
    import calendar

    from streambars import archive
    from streambars.synthetic import es_like_1s_bars, write_dbn

    n = 0
    for m in range(months):
        y, mo = 2024 + m // 12, m % 12 + 1
        start = int(datetime(y, mo, 1, tzinfo=UTC).timestamp()) * 10**9
        days = calendar.monthrange(y, mo)[1]
        for k, (sym, iid) in enumerate(THREE.items()):
            records = es_like_1s_bars(start, days, seed=100 * m + k, instrument_id=iid)
            path = archive.month_path(root, "GLBX.MDP3", sym, f"{y}-{mo:02d}")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_dbn(path, records, dataset="GLBX.MDP3", symbols={sym: iid},
                      start_ns=start, end_ns=start + days * 86400 * 10**9)
            n += len(records)
    return n


def backfill_in_subprocess(root: Path, months: int) -> dict:
    """`streambars backfill` of the first ``months`` months of the archive in ``root``, in a
    fresh process: its seconds and peak RSS (VmHWM)."""
    end = f"{2024 + months // 12}-{months % 12 + 1:02d}"
    for h5 in root.rglob("*.h5"):
        h5.unlink()
    code = f"""
import json, sys, time
from streambars.cli import main
t0 = time.perf_counter()
rc = main(["backfill", "--store", {str(root)!r}, "--symbols", {",".join(THREE)!r}, "--start", "2024-01",
           "--end", {end!r}, "--log-level", "warning", "--env-file", "/nonexistent"])
dt = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"rc": rc, "seconds": dt, "rss_mb": int(hwm) / 1024}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "DATABENTO_API_KEY"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    if p.returncode:
        sys.exit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one month instead of a year")
    ap.add_argument("--days", type=float, help="days of 1s bars for the one-file runs (default 365, quick 31)")
    ap.add_argument("--repeat", type=int, default=3, help="pipeline runs (each after a decode-only run), the best of each kept")
    ap.add_argument("--no-archive", action="store_true", help="skip the three-symbol Historical backfill")
    ap.add_argument("--no-pandas", action="store_true", help="skip the pandas-way baseline")
    ap.add_argument("--compare-coalesce", action="store_true", help="also run the pipeline with coalescing off")
    args = ap.parse_args()
    days = args.days or (31 if args.quick else 365)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "es-1s.dbn.zst"
        n = make_file(path, days)
        mb = path.stat().st_size / 1e6
        # Warm the numba cache and the page cache once, untimed; then drop that store and write
        # back what is dirty before each timed run, so no run pays for an earlier run's 1.3 GB
        # going to disk (kernel writeback competes for the two cores: measured 4.6 s against
        # 3.7 s for the same pipeline with and without an earlier store left dirty).
        pipeline_in_subprocess(path, Path(tmp) / "warm")
        shutil.rmtree(Path(tmp) / "warm", ignore_errors=True)
        os.sync()
        # Decode-only runs alternate with the pipeline runs (best of each kept): this VM's speed
        # drifts by up to 1.5x within minutes, and the ratio is only fair taken side by side.
        decodes = []
        runs = {}
        for label in ("coalesced", "per batch") if args.compare_coalesce else ("coalesced",):
            for k in range(args.repeat):
                decodes.append(decode_only(path))
                store = Path(tmp) / f"store-{label[:3]}-{k}"
                os.sync()
                got = pipeline_in_subprocess(path, store, coalesce=None if label == "coalesced" else 0)
                if label not in runs or got["seconds"] < runs[label]["seconds"]:
                    runs[label] = got
                    runs[label]["store_mb"] = sum(f.stat().st_size for f in store.rglob("*.h5") if f.name != "bulk.h5") / 1e6
                shutil.rmtree(store, ignore_errors=True)
        pandas_s = None if args.no_pandas else pandas_way(path, Path(tmp) / "pandas.h5")
        decode, decode_cpu = min(decodes)
    decode_rate = n / decode
    print(f"input: {n:,} ES-like 1s bars over {days:g} days, {mb:.1f} MB zstd DBN, 16 timeframes")
    print(f"decode only (DBNStore.to_ndarray): {decode_rate / 1e6:.2f} M records/s")
    for label, pipe in runs.items():
        rate = pipe["records"] / pipe["seconds"]
        wr = pipe["write_rows"] / pipe["write_cpu"] if pipe["write_cpu"] else float("nan")
        print(f"[{label}] pipeline: {rate / 1e6:.2f} M records/s ({pipe['seconds']:.2f} s wall, "
              f"{pipe['cpu']:.2f} s CPU = {pipe['cpu'] / pipe['seconds']:.2f} cores), {pipe['bars']:,} bars")
        print(f"[{label}]   backfill / decode-only: {rate / decode_rate:.2f}x  (goal >= 0.8x); in CPU "
              f"seconds (what a busy machine leaves comparable): {decode_cpu / pipe['cpu']:.2f}x")
        if pandas_s:
            print(f"[{label}]   backfill / the pandas way ({n / pandas_s / 1e6:.2f} M records/s): "
                  f"{rate / (n / pandas_s):.1f}x  (goal >= 6x)")
        print(f"[{label}]   store writes as backfill issues them: {wr / 1e6:.1f} M rows/s of write-stage CPU "
              f"(one bulk h5py write: {pipe['bulk_rows_per_s'] / 1e6:.1f} M rows/s)  (goal >= 10M rows/s)")
        print(f"[{label}]   one day of 1s bars: {pipe['day_backfill_s'] * 1e3:.2f} ms from the backfill's file, "
              f"{pipe['day_bulk_s'] * 1e3:.2f} ms bulk-written: {pipe['day_backfill_s'] / pipe['day_bulk_s']:.2f}x  "
              "(goal <= 1.5x)")
        print(f"[{label}]   peak RSS: {pipe['rss_mb']:.0f} MB  (goal < 400 MB)")

    if args.no_archive:
        return
    months = 2 if args.quick else 12
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        n3 = make_archive(root, months)
        first = backfill_in_subprocess(root, 1)
        whole = backfill_in_subprocess(root, months)
    print(f"backfill of {len(THREE)} symbols x {months} months ({n3:,} 1s bars) at 16 timeframes, "
          f"from the raw archive: {n3 / whole['seconds'] / 1e6:.2f} M records/s; peak RSS "
          f"{first['rss_mb']:.0f} MB after 1 month, {whole['rss_mb']:.0f} MB after {months} "
          "(flat with run length)")


if __name__ == "__main__":
    main()

"""End-to-end backfill throughput: zstd DBN -> decode -> engine (16 timeframes) -> HDF5.

Beside it, in the same run, the time merely to decode the same file to numpy with
databento's own ``DBNStore.to_ndarray()``; the figure that matters is the ratio
pipeline / decode-only (target >= 0.5x). The pipeline runs in a subprocess so its peak RSS
is measured on its own (target: a year of one symbol's 1s bars in < 500 MB).

Then the Historical backfill itself (``streambars backfill --symbols A,B,C``, month by
month, reading the months from the raw archive so no gateway is needed) for three symbols
at the 16 standard timeframes: its peak RSS after the first month and after the whole
range (target: < 500 MB for a year, and flat with run length).

    python bench/backfill.py            # one year of ES-like 1s bars (~15M records a symbol)
    python bench/backfill.py --quick    # one month (three symbols: two months)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def decode_only(path: Path) -> float:
    import databento as db

    t0 = time.perf_counter()
    arr = db.DBNStore.from_file(path).to_ndarray()
    dt = time.perf_counter() - t0
    assert len(arr) > 0
    return dt


def pipeline_in_subprocess(path: Path, store: Path) -> dict:
    code = f"""
import json, sys, time
from streambars.backfill import ingest_dbn_files
from streambars.config import load_settings
from streambars.observe import configure_logging
import io
configure_logging("warning", "json")
settings = load_settings(None, {{"store.path": {str(store)!r}}})
t0 = time.perf_counter()
result = ingest_dbn_files(settings, [__import__("pathlib").Path({str(path)!r})], out=io.StringIO())
dt = time.perf_counter() - t0
# VmHWM, not ru_maxrss: the latter can carry the parent's peak across fork+exec.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"seconds": dt, "records": result.stats.records, "bars": result.stats.bars_written,
                  "rss_mb": int(hwm) / 1024}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        sys.exit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


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
    args = ap.parse_args()
    days = 31 if args.quick else 365
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "es-1s.dbn.zst"
        n = make_file(path, days)
        mb = path.stat().st_size / 1e6
        # Warm the numba cache and the page cache once, untimed.
        pipeline_in_subprocess(path, Path(tmp) / "warm")
        decode = min(decode_only(path) for _ in range(2))
        pipe = pipeline_in_subprocess(path, Path(tmp) / "store")
        store_mb = sum(f.stat().st_size for f in (Path(tmp) / "store").rglob("*.h5")) / 1e6
    decode_rate = n / decode
    pipe_rate = pipe["records"] / pipe["seconds"]
    print(f"input: {n:,} ES-like 1s bars over {days} days, {mb:.1f} MB zstd DBN")
    print(f"decode only (DBNStore.to_ndarray): {decode_rate / 1e6:.2f} M records/s")
    print(f"pipeline (decode + 16 timeframes + validation + HDF5): {pipe_rate / 1e6:.2f} M records/s, "
          f"{pipe['bars']:,} bars written, store {store_mb:.0f} MB")
    print(f"ratio pipeline / decode-only: {pipe_rate / decode_rate:.2f}x  (target >= 0.5x)")
    print(f"pipeline peak RSS: {pipe['rss_mb']:.0f} MB  (target < 500 MB); "
          f"this process (holding the whole decoded array): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

    months = 2 if args.quick else 12
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        n3 = make_archive(root, months)
        first = backfill_in_subprocess(root, 1)
        whole = backfill_in_subprocess(root, months)
    print(f"backfill of {len(THREE)} symbols x {months} months ({n3:,} 1s bars) at 16 timeframes, "
          f"from the raw archive: {n3 / whole['seconds'] / 1e6:.2f} M records/s; peak RSS "
          f"{first['rss_mb']:.0f} MB after 1 month, {whole['rss_mb']:.0f} MB after {months} "
          "(target < 500 MB, flat with run length)")


if __name__ == "__main__":
    main()

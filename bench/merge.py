"""What taking history out of order costs: a merge against a fresh in-order backfill.

One symbol's ES-like 1s bars, one DBN file per month, all 16 timeframes, in one run:

* fresh   -- every month ingested in one in-order run (the baseline);
* append  -- the last month ingested after all the others (the fast path: no rebuild);
* merge   -- the first month ingested after all the others: the file is rebuilt from the raw
             archive (every month re-aggregated in time order, a new file swapped in).

It prints the merge's seconds per symbol-year re-aggregated and the ratios merge / fresh and
append / fresh, and checks that the merged store equals the fresh one bar for bar.

    python bench/merge.py            # a year (~15M records)
    python bench/merge.py --quick    # three months
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))

NS = 10**9


def month_files(tmp: Path, months: int) -> tuple[list[Path], int]:
    from streambars.synthetic import es_like_1s_bars, write_dbn

    start = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp()) * NS
    bounds = [int(datetime(2024 + (m // 12), m % 12 + 1, 1, tzinfo=UTC).timestamp()) * NS for m in range(months + 1)]
    records = es_like_1s_bars(start, (bounds[-1] - start) / NS / 86400, seed=7, instrument_id=5602)
    files = []
    for m in range(months):
        sel = records[(records["ts_event"] >= bounds[m]) & (records["ts_event"] < bounds[m + 1])]
        files.append(write_dbn(tmp / f"m{m:02d}.dbn.zst", sel, dataset="GLBX.MDP3", symbols={"ESH4": 5602},
                               start_ns=bounds[m], end_ns=bounds[m + 1]))
    return files, len(records)


def ingest(store: Path, files: list[Path]) -> float:
    from streambars.backfill import ingest_dbn_files
    from streambars.config import load_settings

    settings = load_settings(None, {"store.path": str(store)})
    t0 = time.perf_counter()
    ingest_dbn_files(settings, files, out=io.StringIO())
    return time.perf_counter() - t0


def bars(store: Path) -> dict[str, object]:
    from streambars.store import open_store

    with open_store(store) as r:
        return {tf: r.read("ESH4", tf, dataset="GLBX.MDP3") for tf in r.timeframes("ESH4", dataset="GLBX.MDP3")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three months instead of a year")
    args = ap.parse_args()
    months = 3 if args.quick else 12
    import numpy as np

    from streambars.observe import configure_logging

    configure_logging("warning", "json")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        files, n = month_files(tmp, months)
        ingest(tmp / "warm", files[:1])  # numba cache and page cache, untimed
        fresh = ingest(tmp / "fresh", files)
        ingest(tmp / "append", files[:-1])
        append = ingest(tmp / "append", files[-1:])
        ingest(tmp / "merge", files[1:])
        merge = ingest(tmp / "merge", files[:1])
        a, b = bars(tmp / "fresh"), bars(tmp / "merge")
        same = all(np.array_equal(a[tf], b[tf]) for tf in a)
    years = months / 12
    print(f"input: {n:,} ES-like 1s bars, {months} monthly DBN files, 16 timeframes")
    print(f"fresh in-order backfill: {fresh:.2f} s ({n / fresh / 1e6:.2f} M records/s)")
    print(f"append the last month after the rest: {append:.2f} s = {append / fresh:.2f}x the fresh run")
    print(f"merge the first month after the rest (rebuild): {merge:.2f} s = {merge / fresh:.2f}x the fresh run, "
          f"{merge / years:.1f} s per symbol-year re-aggregated")
    print(f"merged store equals the fresh one bar for bar: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()

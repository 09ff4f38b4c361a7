"""How long `streambars validate` takes on a year of 1s bars plus all 16 standard timeframes.

    NUMBA_CACHE_DIR=.numba_cache python bench/validate.py [--days 366] [--out bench/out/validate]

1. Generates ES-like ohlcv-1s records a month at a time (streambars.synthetic), aggregates
   every timeframe with the engine (streambars.engine.Aggregator) and writes the store with
   the store's writer (streambars.store.BarFileWriter): the backfill minus the download,
   timed per stage.
2. Validates the store in a fresh process (the CLI's code path, default configuration) and
   reports wall time, rows per second and peak memory (ru_maxrss) of that process; twice,
   the first run includes loading numba's cache.

The machine is shared: run it when it is quiet, and read the figures as orders of size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))


def build(out: Path, days: int) -> dict[str, float]:
    from streambars.engine import Aggregator
    from streambars.records import RecordBatch
    from streambars.store import BarFileWriter
    from streambars.synthetic import es_like_1s_bars
    from streambars.timeframes import STANDARD_TIMEFRAMES, Session, parse_timeframes

    session = Session.parse("17:00 America/Chicago")
    tfs = parse_timeframes(list(STANDARD_TIMEFRAMES))
    names = [t.name for t in tfs]
    agg = Aggregator(tfs, input_kind="ohlcv-1s", session=session)
    w = BarFileWriter(out, "GLBX.MDP3", "ES.c.0", stype="continuous", timeframes=tfs, session=session)
    t_gen = t_agg = t_write = c_agg = c_write = 0.0
    n_in = 0
    start = int(np.datetime64("2024-01-01T00:00:00", "ns").astype(np.int64))
    price = 4800.0
    day = 0
    month_days = 31
    try:
        while day < days:
            span = min(month_days, days - day)
            t0 = time.perf_counter()
            rec = es_like_1s_bars(start + day * 86_400 * 10**9, span, seed=day, start_price=price)
            t1 = time.perf_counter()
            day += span
            if rec.size == 0:
                continue
            price = float(rec["close"][-1]) / 1e9
            n_in += rec.size
            batch = RecordBatch.from_ohlcv("ohlcv-1s", np.zeros(rec.size, np.int32), rec)
            c1 = time.process_time()
            outs = [agg.process(batch).bars]
            if day >= days:
                outs.append(agg.finish().bars)
            t2, c2 = time.perf_counter(), time.process_time()
            for bars in outs:
                w.append({names[k]: bars[bars["timeframe"] == k] for k in range(len(names))})
            t3, c3 = time.perf_counter(), time.process_time()
            c_agg += c2 - c1
            c_write += c3 - c2
            t_gen += t1 - t0
            t_agg += t2 - t1
            t_write += t3 - t2
    finally:
        w.close()
    return {"records": n_in, "generate_s": t_gen, "aggregate_s": t_agg, "write_s": t_write,
            "aggregate_cpu_s": c_agg, "write_cpu_s": c_write}  # fmt: skip


def validate_once(store: Path) -> dict[str, float]:
    """In this process: validate the store, return timings and rows."""
    from streambars.config import load_settings
    from streambars.validate import validate_store

    settings = load_settings(None, {"store.path": str(store)})
    t0, c0 = time.perf_counter(), time.process_time()
    report = validate_store(settings)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = sum(s.rows for s in report.series)
    counts = {}
    for s in report.series:
        for name, t in s.tallies.items():
            if t.count:
                counts[f"{s.timeframe}:{name}"] = t.count
    return {
        "validate_s": wall,
        "cpu_s": cpu,
        "rows": rows,
        "rows_1s": next(s.rows for s in report.series if s.timeframe == "1s"),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "exit_code": report.exit_code,
        "findings": counts,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--days", type=int, default=366)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "validate")
    p.add_argument("--keep", action="store_true", help="reuse an existing store")
    p.add_argument("--validate-only", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.validate_only:
        print(json.dumps(validate_once(args.validate_only)))
        return
    store = args.out / "store"
    built = None
    if not (args.keep and store.exists()):
        shutil.rmtree(store, ignore_errors=True)
        built = build(store, args.days)
        print("build:", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in built.items()}))
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, __file__, "--validate-only", str(store)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["validate_s"])
    print("validate runs, wall (s):", [round(r["validate_s"], 2) for r in runs],
          "cpu (s):", [round(r["cpu_s"], 2) for r in runs])
    print(f"rows validated: {best['rows']:,} ({best['rows_1s']:,} 1s bars + the other 15 timeframes)")
    print(f"validate: {best['validate_s']:.2f} s wall, {best['cpu_s']:.2f} s cpu = "
          f"{best['rows'] / best['validate_s'] / 1e6:.1f}M rows/s, "
          f"peak RSS {best['maxrss_mb']:.0f} MB, exit code {best['exit_code']}")
    print("findings:", json.dumps(best["findings"]))
    if built:
        backfill = built["aggregate_s"] + built["write_s"]
        cpu = built["aggregate_cpu_s"] + built["write_cpu_s"]
        print(f"aggregate {built['aggregate_s']:.2f} s + write {built['write_s']:.2f} s = {backfill:.2f} s wall, "
              f"{cpu:.2f} s cpu (the backfill without downloading); validate / that = "
              f"{best['validate_s'] / backfill:.2f} wall, {best['cpu_s'] / cpu:.2f} cpu")


if __name__ == "__main__":
    main()

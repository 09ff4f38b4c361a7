"""Time to the first useful output of `streambars plot` and `validate --html` on a year of one symbol.

    NUMBA_CACHE_DIR=.numba_cache python bench/pictures.py [--days 366] [--out bench/out/pictures] [--keep]

1. Builds a store of ES-like ``ohlcv-1m`` input (streambars.synthetic) aggregated by the
   engine into every standard timeframe from 1min to 1d and written by the store's writer
   (the backfill minus the download), like bench/validate.py.
2. Runs each command as a user would, in a fresh process (``python -m streambars ...``),
   twice, and prints the faster wall time and the CPU time of that process: `--version`
   (the floor: interpreter and package start), `plot` of one day of 1min bars, of the whole
   year (drawn as coarser candles) and of every 1min candle of the year (``--max-candles
   0``), `validate` with and without ``--html``.

The machine is shared: read the figures as orders of size, and the CPU column when it is busy.
"""

from __future__ import annotations

import argparse
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


def build(out: Path, days: int) -> int:
    """The store of ``days`` days of 1min input and every coarser timeframe; input rows."""
    from streambars.engine import Aggregator
    from streambars.records import RecordBatch
    from streambars.store import BarFileWriter
    from streambars.synthetic import es_like_1m_bars
    from streambars.timeframes import STANDARD_TIMEFRAMES, Session, parse_timeframes

    session = Session.parse("17:00 America/Chicago")
    tfs = [t for t in parse_timeframes(list(STANDARD_TIMEFRAMES)) if t.seconds >= 60]
    names = [t.name for t in tfs]
    agg = Aggregator(tfs, input_kind="ohlcv-1m", session=session)
    w = BarFileWriter(out, "GLBX.MDP3", "ES.c.0", stype="continuous", timeframes=tfs, session=session)
    start = int(np.datetime64("2024-01-01T00:00:00", "ns").astype(np.int64))
    price, day, n = 4800.0, 0, 0
    try:
        while day < days:
            span = min(31, days - day)
            rec = es_like_1m_bars(start + day * 86_400 * 10**9, span, seed=day, start_price=price)
            day += span
            if rec.size == 0:
                continue
            price = float(rec["close"][-1]) / 1e9
            n += rec.size
            outs = [agg.process(RecordBatch.from_ohlcv("ohlcv-1m", np.zeros(rec.size, np.int32), rec)).bars]
            if day >= days:
                outs.append(agg.finish().bars)
            for bars in outs:
                w.append({names[k]: bars[bars["timeframe"] == k] for k in range(len(names))})
    finally:
        w.close()
    return n


def timed(argv: list[str]) -> tuple[float, float, str]:
    """(wall s, cpu s, last stdout line) of one fresh `python -m streambars` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "streambars", *argv], capture_output=True, text=True,
                          cwd=REPO, check=False)  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{argv}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    lines = done.stdout.strip().splitlines()
    return wall, cpu, lines[-1] if lines else ""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--days", type=int, default=366)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "pictures")
    p.add_argument("--keep", action="store_true", help="reuse an existing store")
    args = p.parse_args()
    store = args.out / "store"
    if not (args.keep and store.exists()):
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        n = build(store, args.days)
        print(f"build: {n:,} 1min input bars in {time.perf_counter() - t0:.1f} s")
    out = args.out
    s = ["--store", str(store), "--log-level", "warning"]
    cases = [
        ("start-up floor (--version)", ["--version"]),
        ("plot one day of 1min", ["plot", *s, "--symbol", "ES.c.0", "--timeframe", "1min", "--start", "2024-06-04",
                                  "--end", "2024-06-05", "--out", str(out / "day.png")]),
        ("plot the year of 1min (auto candles)", ["plot", *s, "--symbol", "ES.c.0", "--timeframe", "1min",
                                                  "--out", str(out / "year.png")]),
        ("plot the year, every 1min candle", ["plot", *s, "--symbol", "ES.c.0", "--timeframe", "1min",
                                              "--max-candles", "0", "--out", str(out / "year-all.png")]),
        ("validate", ["validate", *s, "--report", str(out / "r.txt")]),
        ("validate --html", ["validate", *s, "--report", str(out / "r.txt"), "--html", str(out / "r.html")]),
    ]  # fmt: skip
    results = {}
    print(f"{'command':<40} {'wall s':>7} {'cpu s':>7}  output")
    for name, argv in cases:
        runs = [timed(argv) for _ in range(2)]
        wall, cpu, line = min(runs)
        results[name] = (wall, cpu)
        print(f"{name:<40} {wall:>7.2f} {cpu:>7.2f}  {line[:90]}")
    v, h = results["validate"], results["validate --html"]
    print(f"validate --html / validate: {h[0] / v[0]:.2f} wall, {h[1] / v[1]:.2f} cpu; "
          f"the page adds {h[1] - v[1]:.2f} s cpu; html {(out / 'r.html').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

"""Scale-out throughput: symbol-years per second in one process, and on 1 and 2 Dask workers,
from the same synthetic ``--from-dbn`` inputs, measured in one run (ratios, not absolutes,
are what carry over to other machines; docs/cluster.md models N machines from them).

Each symbol is one zstd DBN file of ES-like 1s bars; every run ingests all of them into a
fresh store with the default 16 timeframes. Per mode it reports

* plan   -- the submitting process: each input read once to prove it whole, then copied
            into the raw archive (serial: this is the part that does not scale out);
* start  -- starting the local cluster and loading streambars + numba in each worker;
* run    -- the symbol tasks, workers already warm;

and symbol-years per second of ``run`` and of the whole (plan + start + run). The stores
are compared bar for bar with the single-process one.

    python bench/cluster.py --quick     # 4 symbols x 15 days (a minute or two on 2 cores)
    python bench/cluster.py             # 8 symbols x 60 days
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
os.environ.setdefault("PYTHONPATH", str(REPO))  # the workers import streambars from here too


def make_inputs(directory: Path, symbols: int, days: float) -> tuple[list[Path], int]:
    from streambars.synthetic import es_like_1s_bars, write_dbn

    start = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp()) * 10**9
    paths, records = [], 0
    for k in range(symbols):
        r = es_like_1s_bars(start, days, seed=k, instrument_id=1000 + k)
        paths.append(write_dbn(directory / f"S{k:03d}.dbn.zst", r, dataset="GLBX.MDP3",
                               symbols={f"S{k:03d}": 1000 + k}, start_ns=start,
                               end_ns=start + int(days * 86400) * 10**9))
        records += len(r)
    return paths, records


def settings_for(store: Path, workers: int):
    from streambars.config import load_settings

    return load_settings(None, {"store.path": str(store), "logging.level": "warning",
                                "cluster.workers": workers})


def run_single(store: Path, inputs: list[Path]) -> dict[str, float]:
    from streambars.backfill import execute, plan_dbn_files

    t0 = time.perf_counter()
    plan = plan_dbn_files(settings_for(store, 0), inputs, out=io.StringIO())
    t1, c1 = time.perf_counter(), _cpu()
    execute(plan, hooks=None)
    return {"plan": t1 - t0, "start": 0.0, "run": time.perf_counter() - t1, "cpu": _cpu() - c1}


def _cpu() -> float:
    """CPU seconds of this process so far, every thread."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_cluster(store: Path, inputs: list[Path], workers: int) -> dict[str, float]:
    import logging

    import dask
    from distributed import Client, LocalCluster

    from streambars.backfill import plan_dbn_files
    from streambars.cluster import run_on_cluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    from streambars.cluster import LOCAL_WORKER_CONFIG

    dask.config.set(LOCAL_WORKER_CONFIG if TUNED else {})  # what `--workers N` sets
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.gather([client.submit(_warm, k, workers=[w], pure=False)  # imports, cached kernels
                       for k, w in enumerate(client.scheduler_info()["workers"])])
        t1 = time.perf_counter()
        plan = plan_dbn_files(settings_for(store, workers), inputs, out=io.StringIO())
        t2, c2, w2 = time.perf_counter(), _cpu(), sum(client.run(_cpu).values())
        summary = io.StringIO()
        run_on_cluster(plan, out=summary, client=client)
        if VERBOSE:
            print(summary.getvalue())
        t3, c3, w3 = time.perf_counter(), _cpu(), sum(client.run(_cpu).values())
    return {"plan": t2 - t1, "start": t1 - t0, "run": t3 - t2, "cpu": (c3 - c2) + (w3 - w2)}


VERBOSE = os.environ.get("BENCH_VERBOSE", "0") == "1"
#: BENCH_DASK_DEFAULTS=1: Dask's default worker config (profiler on, 20 ms tick) instead.
TUNED = os.environ.get("BENCH_DASK_DEFAULTS", "0") != "1"


def _warm(_: int) -> None:
    """In each worker: one tiny ingest, so imports and numba's cached kernels are loaded
    before the clock starts (a long backfill pays this once per worker, not per symbol)."""
    from streambars.backfill import execute, plan_dbn_files

    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        d = Path(tmp)
        inputs, _ = make_inputs(d, 1, 0.05)
        execute(plan_dbn_files(settings_for(d / "store", 0), inputs, out=io.StringIO()))


def same_bars(a: Path, b: Path, names: list[str]) -> bool:
    import numpy as np

    from streambars.store import open_store

    with open_store(a) as ra, open_store(b) as rb:
        return all(np.array_equal(ra.read(s, tf), rb.read(s, tf)) for s in names for tf in ("1s", "1min", "1h", "1d"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 symbols x 15 days")
    ap.add_argument("--symbols", type=int)
    ap.add_argument("--days", type=float)
    args = ap.parse_args()
    symbols = args.symbols or (4 if args.quick else 8)
    days = args.days or (15 if args.quick else 60)
    from streambars.observe import configure_logging

    configure_logging("warning", "json")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        d = Path(tmp)
        inputs, records = make_inputs(d, symbols, days)
        size = sum(p.stat().st_size for p in inputs) / 1e6
        sym_years = symbols * days / 365.0
        print(f"{symbols} symbols x {days:g} days of ES-like 1s bars: {records:,} records, {size:.1f} MB zstd "
              f"({sym_years:.3f} symbol-years), 16 timeframes, {os.cpu_count()} cores")
        results = {"1 process": run_single(d / "single", inputs)}
        for w in (1, 2):
            results[f"{w} worker(s)"] = run_cluster(d / f"w{w}", inputs, w)
        names = [f"S{k:03d}" for k in range(symbols)]
        same = all(same_bars(d / "single", d / f"w{w}", names) for w in (1, 2))
        print(f"\n{'mode':<12} {'plan s':>7} {'start s':>8} {'run s':>7} {'run sym-yr/s':>13} "
              f"{'total sym-yr/s':>15} {'run Mrec/s':>11} {'cores busy':>11} {'cpu s/sym-yr':>13}")
        for mode, t in results.items():
            total = t["plan"] + t["start"] + t["run"]
            print(f"{mode:<12} {t['plan']:7.2f} {t['start']:8.2f} {t['run']:7.2f} {sym_years / t['run']:13.3f} "
                  f"{sym_years / total:15.3f} {records / t['run'] / 1e6:11.2f} {t['cpu'] / t['run']:11.2f} "
                  f"{t['cpu'] / sym_years:13.1f}")
        one, two, single = results["1 worker(s)"], results["2 worker(s)"], results["1 process"]
        wall = {k: v["plan"] + v["start"] + v["run"] for k, v in results.items()}
        print(f"\nratios (same run): run 2 workers / 1 worker = {one['run'] / two['run']:.2f}x, "
              f"1 worker / 1 process = {single['run'] / one['run']:.2f}x, "
              f"total 2 workers / 1 process = {wall['1 process'] / wall['2 worker(s)']:.2f}x")
        print(f"load average while it ran: {os.getloadavg()[0]:.2f} (other work on these cores skews all of it)")
        print(f"bars identical to the single-process store: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()

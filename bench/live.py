"""The live daemon measured end to end against the fake Live gateway.

    python bench/live.py [--trades 300000] [--rounds 2] [--latency-seconds 30] [--out bench/out/live.json]

1. **Throughput** (trades schema, the gateway sending as fast as it can). The fake gateway
   runs in a process of its own (``python -m tests.fakes.live``), so it shares a GIL with
   neither side. In the same run, alternately:

   * the bare client: ``databento.Live`` subscribed to the same data, ``async for record in
     live`` counting TradeMsg until all ``--trades`` arrived;
   * the daemon: ``streambars run`` (a subprocess, every standard timeframe, raw archive,
     SWMR store) against the same gateway; its ``/metrics`` endpoint is polled every 10 ms
     for ``streambars_records_aggregated_total`` (records through the engine stage).

   Each rate is records / (time from the first to the last record), median over ``--rounds``;
   the ratio daemon / bare client is the figure (target >= 0.7).

2. **Latency** (ohlcv-1s, 1 record per second per symbol, two symbols). The fake gateway runs
   in this process with its socket writes timestamped; the daemon is a subprocess; a reader
   thread here polls both symbols' ``/bars/1s`` through SWMR (``refresh()`` every 1 ms). For
   each bar: time it became readable minus the time the gateway wrote the message that closed
   it (END_OF_INTERVAL, sent together with the next interval's first record). p50/p90/p99/max.

The machine is shared with other work: read the figures as orders of size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streambars import synthetic  # noqa: E402
from tests.fakes import TEST_KEY  # noqa: E402

NS = 1_000_000_000
START = 1_704_153_600 * NS  # 2024-01-02T00:00Z
SYMBOLS = {"ESH4": 1, "NQH4": 2}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["DATABENTO_API_KEY"] = TEST_KEY
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(path: Path, store: Path, gateway: str, schema: str, symbols: list[str],
            metrics_port: int = 0) -> Path:
    path.write_text(
        "[databento]\n"
        f'dataset = "GLBX.MDP3"\nschema = "{schema}"\nstype_in = "raw_symbol"\n'
        f"symbols = {json.dumps(symbols)}\nlive_gateway = \"{gateway}\"\n"
        f'[store]\npath = "{store}"\n'
        "[live]\nreplay_window_h = 1e6\n"  # the data is from 2024; everything else: defaults
        f"metrics_port = {metrics_port}\n"
        '[logging]\nformat = "json"\nlevel = "warning"\n'
    )
    return path


def _start_daemon(tmp: Path, cfg: Path, log_name: str) -> subprocess.Popen:
    log = open(tmp / log_name, "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "streambars", "run", "--config", str(cfg), "--env-file", str(tmp / "none")],
        env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
    )


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


# ----------------------------------------------------------------------------- throughput


def _trades(n: int) -> np.ndarray:
    days = max(1.0, n / 2 / 150_000)
    parts = [synthetic.es_like_trades(START, days, seed=iid, instrument_id=iid)[: n // 2]
             for iid in SYMBOLS.values()]
    return synthetic.interleave(*parts)


async def _bare_client(port: int, n: int) -> float:
    import databento as db
    import databento_dbn as dbn

    live = db.Live(key=TEST_KEY, gateway="127.0.0.1", port=port)
    live.subscribe(dataset="GLBX.MDP3", schema="trades", symbols=list(SYMBOLS), stype_in="raw_symbol")
    got = 0
    t_first = t_last = 0.0
    async for record in live:
        if type(record) is dbn.TradeMsg:
            got += 1
            if got == 1:
                t_first = time.perf_counter()
            if got == n:
                t_last = time.perf_counter()
                break
    live.terminate()
    return (n - 1) / (t_last - t_first)


def _aggregated(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as resp:
        text = resp.read().decode()
    m = re.search(r"^streambars_records_aggregated_total (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


def _daemon_rate(tmp: Path, gateway: str, n: int, k: int) -> float:
    port = _free_port()
    cfg = _config(tmp / f"t{k}.toml", tmp / f"store-t{k}", gateway, "trades", list(SYMBOLS), port)
    proc = _start_daemon(tmp, cfg, f"throughput-{k}.log")
    url = f"http://127.0.0.1:{port}/metrics"
    first_n, t_first, t_last = 0, 0.0, 0.0
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {(tmp / f'throughput-{k}.log').read_text()[-2000:]}")
            try:
                got = _aggregated(url)
            except OSError:
                time.sleep(0.05)
                continue
            now = time.perf_counter()
            if got and not t_first:
                first_n, t_first = got, now
            if got >= n:
                t_last = now
                break
            time.sleep(0.01)
    finally:
        _stop(proc)
    if not t_last:
        raise RuntimeError("the daemon did not aggregate every record in time")
    return (n - first_n) / (t_last - t_first)


def throughput(tmp: Path, n: int, rounds: int) -> dict:
    records = _trades(n)
    n = len(records)
    dbn_path = synthetic.write_dbn(tmp / "trades.dbn.zst", records, symbols=SYMBOLS)
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.live", "--key", TEST_KEY, "--dbn", str(dbn_path),
         "--heartbeat-interval", "1"],
        env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, text=True,
    )
    try:
        line = fake.stdout.readline()
        port = int(line.strip().split("=")[1])
        gateway = f"127.0.0.1:{port}"
        bare, daemon = [], []
        for k in range(rounds):
            bare.append(asyncio.run(_bare_client(port, n)))
            daemon.append(_daemon_rate(tmp, gateway, n, k))
            print(f"  round {k + 1}: bare client {bare[-1]:,.0f} rec/s, daemon {daemon[-1]:,.0f} rec/s",
                  flush=True)
    finally:
        fake.stdin.close()
        fake.wait(10)
    b, d = float(np.median(bare)), float(np.median(daemon))
    per_round = [y / x for x, y in zip(bare, daemon, strict=True)]
    return {"records": n, "rounds": rounds, "bare_client_rec_s": b, "daemon_rec_s": d,
            "ratio": d / b, "ratio_per_round": per_round,
            "ratio_median_of_rounds": float(np.median(per_round)),
            "bare_all": bare, "daemon_all": daemon}


# ----------------------------------------------------------------------------- latency


def latency(tmp: Path, seconds: float) -> dict:
    import h5py

    from tests.fakes import live as fake_live
    from tests.fakes import make_ohlcv
    from tests.fakes.live import FakeLive

    n = int(seconds) + 30
    recs = np.concatenate([make_ohlcv(iid, START, n, seed=iid, fill=1.0) for iid in SYMBOLS.values()])
    sent: dict[int, float] = {}  # END_OF_INTERVAL ts -> when the gateway wrote it
    original_write = fake_live._Out.write

    def write(self, data: bytes) -> None:
        # A SystemMsg with code END_OF_INTERVAL: rtype 0x17, ts_event at bytes 8..16.
        if len(data) >= 16 and data[1] == 0x17 and b"End of interval" in data:
            sent.setdefault(int.from_bytes(data[8:16], "little"), time.monotonic())
        original_write(self, data)

    fake_live._Out.write = write
    fake = FakeLive(TEST_KEY, rate=2.0, heartbeat_interval=1.0)
    for raw, iid in SYMBOLS.items():
        fake.add_instrument(iid, raw)
    fake.add_records("ohlcv-1s", recs)
    fake.start()
    store = tmp / "store-latency"
    cfg = _config(tmp / "latency.toml", store, fake.gateway, "ohlcv-1s", list(SYMBOLS))
    seen: dict[tuple[str, int], float] = {}
    stop = threading.Event()

    def reader() -> None:
        files = {}
        while not stop.is_set():
            for sym in SYMBOLS:
                if sym not in files:
                    p = store / "GLBX.MDP3" / f"{sym}.h5"
                    try:
                        f = h5py.File(p, "r", swmr=True, locking=False)
                        files[sym] = (f, f["bars"]["1s"], 0)
                    except (OSError, KeyError):
                        continue
                f, ds, have = files[sym]
                ds.refresh()
                now = time.monotonic()
                m = ds.shape[0]
                if m > have:
                    for ts in ds[have:m]["ts_event"]:
                        seen.setdefault((sym, int(ts)), now)
                    files[sym] = (f, ds, m)
            time.sleep(0.001)
        for f, _, _ in files.values():
            f.close()

    proc = _start_daemon(tmp, cfg, "latency.log")
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        time.sleep(seconds + 5)
    finally:
        stop.set()
        t.join(5)
        _stop(proc)
        fake.stop()
        fake_live._Out.write = original_write
    lat = []
    for (_sym, ts), when in seen.items():
        closer = sent.get(ts + NS)
        if closer is not None:
            lat.append((when - closer) * 1000.0)
    lat = np.sort(np.asarray(lat))
    if len(lat) == 0:
        raise RuntimeError("no bar latency measured")
    return {
        "bars": int(len(lat)),
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "min_ms": float(lat.min()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trades", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latency-seconds", type=float, default=30)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "live.json"))
    args = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-live-") as d:
        tmp = Path(d)
        if not args.skip_throughput:
            print(f"throughput: {args.trades:,} trades, {args.rounds} round(s)", flush=True)
            out["throughput"] = r = throughput(tmp, args.trades, args.rounds)
            print(f"throughput: bare client {r['bare_client_rec_s']:,.0f} rec/s, daemon "
                  f"{r['daemon_rec_s']:,.0f} rec/s (medians), ratio {r['ratio']:.2f}; per round "
                  + ", ".join(f"{x:.2f}" for x in r["ratio_per_round"])
                  + f" (median {r['ratio_median_of_rounds']:.2f}; target >= 0.7)")
        if not args.skip_latency:
            print(f"latency: {args.latency_seconds:.0f} s at 1 record/s/symbol, 2 symbols", flush=True)
            out["latency"] = r = latency(tmp, args.latency_seconds)
            print(f"latency gateway -> SWMR reader: p50 {r['p50_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, "
                  f"p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms over {r['bars']} bars "
                  "(target p99 < 50 ms)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

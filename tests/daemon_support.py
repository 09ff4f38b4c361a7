"""Helpers for the daemon tests: the daemon as a real subprocess, a real notify socket, the
fake Live gateway loaded with seeded data, SWMR reads of the store, and the reference bars of
one uninterrupted engine run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tests.fakes import NS, TEST_KEY, make_ohlcv

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
START_NS = 1_704_153_600 * NS  # 2024-01-02T00:00Z, a Tuesday


# ------------------------------------------------------------------------- data + gateway


def es_nq_records(n: int, start_ns: int = START_NS, schema: str = "ohlcv-1s") -> dict[str, np.ndarray]:
    """Two symbols' seeded 1s bars (instrument 1 = ES.c.0, 2 = NQ.c.0)."""
    return {
        "ES.c.0": make_ohlcv(1, start_ns, n, seed=1, price=4700.0, schema=schema),
        "NQ.c.0": make_ohlcv(2, start_ns, n, seed=2, price=16500.0, schema=schema),
    }


def make_gateway(records: dict[str, np.ndarray], schema: str = "ohlcv-1s", **kw: Any):
    from tests.fakes.live import FakeLive

    fake = FakeLive(TEST_KEY, **kw)
    for iid, (sym, raw) in enumerate((("ES.c.0", "ESH4"), ("NQ.c.0", "NQH4")), start=1):
        fake.add_instrument(iid, raw)
        fake.add_continuous(sym, [(0, iid)])
    fake.add_records(schema, np.concatenate(list(records.values())))
    return fake.start()


# ------------------------------------------------------------------------- notify socket


class NotifySocket:
    """A real unix datagram socket collecting sd_notify messages (abstract name by default)."""

    def __init__(self, tmp: Path, abstract: bool = True):
        self.name = f"@streambars-{uuid.uuid4().hex}" if abstract else str(tmp / "notify.sock")
        addr = b"\0" + self.name[1:].encode() if abstract else self.name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(addr)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def lines(self, prefix: str = "") -> list[str]:
        return [ln for _, lines in list(self.messages) for ln in lines if ln.startswith(prefix)]

    def times(self, line: str) -> list[float]:
        return [t for t, lines in list(self.messages) if line in lines]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


# ------------------------------------------------------------------------- the daemon


def write_config(path: Path, gateway: str, store: Path, symbols: Iterable[str] = ("ES.c.0", "NQ.c.0"),
                 schema: str = "ohlcv-1s", timeframes: list[str] | None = None,
                 log_file: Path | None = None, **live: Any) -> Path:
    # The seeded data is from 2024: a replay window that reaches it (the fake has no limit).
    live = {"close_grace_s": 0.5, "heartbeat_timeout_s": 3.0, "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0, "batch_max_ms": 2.0, "replay_window_h": 1e6, **live}
    lines = [
        "[databento]",
        'dataset = "GLBX.MDP3"',
        f'schema = "{schema}"',
        'stype_in = "continuous"',
        f"symbols = {json.dumps(list(symbols))}",
        f'live_gateway = "{gateway}"',
        "[store]",
        f'path = "{store}"',
        "[live]",
        *[f"{k} = {json.dumps(v)}" for k, v in live.items()],
        "[logging]",
        'format = "json"',
        'level = "info"',
    ]
    if log_file is not None:
        lines.append(f'file = "{log_file}"')
    if timeframes is not None:
        lines += ["[bars]", f"timeframes = {json.dumps(timeframes)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """``python -m streambars run`` as a subprocess; stderr (JSON log lines) to a file."""

    def __init__(self, tmp: Path, config: Path, *, key: str = TEST_KEY, notify: NotifySocket | None = None,
                 watchdog_usec: int | None = None, extra_args: list[str] | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env["DATABENTO_API_KEY"] = key
        env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))
        env["PYTHONPATH"] = str(REPO)
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify.name
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.log_path = tmp / f"daemon-{uuid.uuid4().hex[:8]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "streambars", "run", "--config", str(config), "--env-file", str(tmp / "none.env"),
             *(extra_args or [])],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def has_event(self, event: str) -> bool:
        return any(e.get("event") == event for e in self.events())


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.05,
             daemon: Daemon | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if daemon is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({daemon.proc.returncode}) while waiting for {what}:\n"
                                 + daemon.log_text()[-4000:])
        if time.monotonic() > deadline:
            extra = ("\n" + daemon.log_text()[-4000:]) if daemon is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(every)


# ------------------------------------------------------------------------- the store


def store_file(store: Path, symbol: str, dataset: str = "GLBX.MDP3") -> Path:
    from streambars.naming import symbol_to_filename

    return store / dataset / f"{symbol_to_filename(symbol)}.h5"


def read_bars(store: Path, symbol: str, swmr: bool = True) -> dict[str, np.ndarray]:
    """Every timeframe's rows of one symbol's file (SWMR, no locking: safe while writing)."""
    path = store_file(store, symbol)
    if not path.exists():
        return {}
    kw: dict[str, Any] = {"swmr": True} if swmr else {}
    with h5py.File(path, "r", locking=False, **kw) as f:
        return {name: f["bars"][name][...] for name in f["bars"]}


def row_counts(store: Path, symbol: str) -> dict[str, int]:
    try:
        return {k: len(v) for k, v in read_bars(store, symbol).items()}
    except (OSError, KeyError):
        return {}


def reference_bars(settings: Any, records: dict[str, np.ndarray], symbols: list[str], *,
                   finish: bool = True, flush_until: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """What one uninterrupted engine run over all the records gives, per symbol and timeframe."""
    from streambars.pipeline import make_engine
    from streambars.records import BAR_DTYPE, RecordBatch

    engine = make_engine(settings)
    arr = np.concatenate([records[s] for s in symbols if s in records])
    series = np.concatenate([np.full(len(records[s]), symbols.index(s), np.int32)
                             for s in symbols if s in records])
    order = np.argsort(arr["ts_event"], kind="stable")
    arr, series = arr[order], series[order]
    if settings.databento.schema == "trades":
        batch = RecordBatch.from_trades(series, arr)
    else:
        batch = RecordBatch.from_ohlcv(settings.databento.schema, series, arr)
    parts = [engine.process(batch).bars]
    if flush_until is not None:
        parts.append(engine.flush(flush_until).bars)
    if finish:
        parts.append(engine.finish().bars)
    bars = np.concatenate(parts)
    names = [t.name for t in engine.timeframes]
    out: dict[str, dict[str, np.ndarray]] = {}
    for i, sym in enumerate(symbols):
        per = {}
        for j, tf in enumerate(names):
            sel = bars[(bars["series"] == i) & (bars["timeframe"] == j)]
            rows = np.empty(len(sel), BAR_DTYPE)
            for name in BAR_DTYPE.names:
                rows[name] = sel[name]
            per[tf] = rows
        out[sym] = per
    return out


def engine_counts(store: Path, settings: Any, symbol: str) -> dict[str, int]:
    """The validation counts in the engine state saved in a symbol's file."""
    from streambars.pipeline import decode_state, make_engine
    from streambars.rules import RECORD_RULE_NAMES

    with h5py.File(store_file(store, symbol), "r", locking=False) as f:
        from streambars.store.layout import read_blob

        _, blob = read_blob(f["meta"]["engine_state"])
    engine = make_engine(settings)
    if blob:
        engine.set_series_state(0, decode_state(blob))
    return {r: int(engine.counts[0, j]) for j, r in enumerate(RECORD_RULE_NAMES)}

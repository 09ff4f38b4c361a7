"""Subprocess helper for the store tests: real writer/reader processes to kill and race.

    python tests/store_worker.py append   ROOT STATE_FILE SEED   # append forever (to be killed)
    python tests/store_worker.py finish   ROOT ROWS              # reopen, append up to ROWS, close
    python tests/store_worker.py pulse    ROOT ROWS PERIOD_S     # one row per period, volume = ns clock
    python tests/store_worker.py hold     FILE                   # plain h5py reader, default locking
    python tests/store_worker.py diskfull ROOT                   # append until RLIMIT_FSIZE hits
    python tests/store_worker.py readonly ROOT                   # as 'nobody': try to write
    python tests/store_worker.py open     ROOT                   # open (create), append, close
    python tests/store_worker.py faults   ROOT                   # read + write a damaged store

Rows follow one deterministic sequence (:func:`expected`), so a test can check every row of
a file against it after any number of kills. Prints one JSON line per event on stdout.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streambars.records import BAR_DTYPE  # noqa: E402
from streambars.timeframes import UTC_MIDNIGHT, parse_timeframes  # noqa: E402

DATASET, SYMBOL, STYPE = "TEST.DS", "BRN FMJ0024!", "raw_symbol"
TIMEFRAMES = parse_timeframes(["1s", "1min"])
T0 = 1_704_067_200 * 1_000_000_000  # 2024-01-01T00:00:00Z
SEC = 1_000_000_000


def expected(tf_seconds: int, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of the deterministic sequence of one timeframe."""
    i = np.arange(start, stop, dtype=np.int64)
    out = np.empty(i.size, BAR_DTYPE)
    out["ts_event"] = T0 + i * tf_seconds * SEC
    base = (4000 + (i * 7919) % 997) * 250_000_000 + tf_seconds
    out["open"] = base
    out["high"] = base + 1_000_000_000
    out["low"] = base - 750_000_000
    out["close"] = base + 250_000_000
    out["volume"] = (i * 31 + tf_seconds) % 100_000 + 1
    out["count"] = 1 + i % 9
    return out


def batch(i0: int, i1: int) -> dict[str, np.ndarray]:
    """1s rows i0..i1-1 and the 1min rows whose open lies in that span."""
    j0, j1 = -(-i0 // 60), -(-i1 // 60)
    return {"1s": expected(1, i0, i1), "1min": expected(60, j0, j1)}


def open_writer(root: str):
    from streambars.store import BarFileWriter

    return BarFileWriter(
        Path(root), DATASET, SYMBOL, stype=STYPE, timeframes=TIMEFRAMES, session=UTC_MIDNIGHT,
        chunk_rows=256, owner="store_worker",
    )


def say(**event) -> None:
    print(json.dumps(event), flush=True)


def resume_point(w) -> int:
    """Where to resume, as the pipeline does: from the progress note (written after the rows
    of every timeframe), re-sending what may be partly there -- appends are idempotent."""
    note = w.read_meta("progress")
    return json.loads(note)["next"] if note else 0


def cmd_append(root: str, state_file: str, seed: str) -> None:
    """Append batches of random size forever, re-sending some overlap (idempotency).

    The state file (mmap, shared with the test) holds: appends started, appends finished,
    1s rows committed (flushed) -- so a test knows whether its SIGKILL landed inside append."""
    rng = random.Random(int(seed))
    with open(state_file, "r+b") as fh:
        state = np.frombuffer(mmap.mmap(fh.fileno(), 24), dtype=np.int64)
    w = open_writer(root)
    i = resume_point(w)
    state[2] = i
    say(event="ready", next=int(i), hwm=w.high_water_marks())
    while True:
        k = rng.choice((1, 7, 100, 500))
        lo = max(0, i - rng.choice((0, 0, 0, 5, 500)))
        rows, meta = batch(lo, i + k), {"progress": json.dumps({"next": i + k}).encode()}
        state[0] += 1  # inside append() from here ...
        w.append(rows, meta=meta)
        state[1] += 1  # ... to here
        i += k
        state[2] = i


def cmd_finish(root: str, rows: str) -> None:
    with open_writer(root) as w:
        hwm = w.high_water_marks()
        i = resume_point(w)
        got = w.append(batch(i, int(rows)), meta={"progress": json.dumps({"next": int(rows)}).encode()})
        say(event="finished", hwm_at_open=hwm, next=int(i), written=got)


def cmd_pulse(root: str, rows: str, period: str) -> None:
    with open_writer(root) as w:
        say(event="ready")
        for i in range(int(rows)):
            b = expected(1, i, i + 1)
            b["volume"] = time.time_ns()
            w.append({"1s": b})
            time.sleep(float(period))
    say(event="done")


def cmd_hold(path: str) -> None:
    import h5py

    with h5py.File(path, "r", swmr=True) as f:  # h5py defaults: HDF5 file locking ON
        say(event="holding", rows=int(f["bars/1s"].shape[0]))
        sys.stdin.read()


def cmd_diskfull(root: str) -> None:
    import resource
    import signal

    from streambars.errors import StoreError

    w = open_writer(root)
    w.append(batch(0, 5000))
    size = os.path.getsize(w.path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 64_000, resource.RLIM_INFINITY))
    try:
        w.append(batch(5000, 200_000))
        say(event="no error")
    except StoreError as e:
        say(event="store_error", message=str(e))
    try:
        w.append(batch(200_000, 200_001))
    except StoreError as e:
        say(event="refused_after_failure", message=str(e))
    try:
        w.close()
        say(event="closed")
    except StoreError as e:
        say(event="close_error", message=str(e))


def cmd_readonly(root: str) -> None:
    from streambars.errors import StoreError
    from streambars.store import BarFileWriter, open_store

    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)  # 'nobody': permissions now apply (root ignores them)
    events = {}
    try:
        open_writer(root)
        events["existing"] = "opened"
    except StoreError as e:
        events["existing"] = str(e)
    try:
        BarFileWriter(Path(root), DATASET, "NEW.SYM", stype=STYPE, timeframes=TIMEFRAMES,
                      session=UTC_MIDNIGHT)
        events["new"] = "opened"
    except StoreError as e:
        events["new"] = str(e)
    with open_store(root) as r:
        events["rows"] = int(r.read(SYMBOL, "1s").shape[0])
    say(event="readonly", **events)


def cmd_open(root: str) -> None:
    """Open (creating it if needed), append a little, close: a writer to kill at any point
    (it says 'starting' once its imports are done, just before it opens)."""
    import streambars.store  # noqa: F401 - imported before 'starting': the kill window is the open

    say(event="starting")
    w = open_writer(root)
    i = resume_point(w)
    w.append(batch(i, i + 100), meta={"progress": json.dumps({"next": i + 100}).encode()})
    w.close()
    say(event="closed")


def cmd_faults(root: str) -> None:
    """What a reader and a writer make of a store whose SYMBOL file is damaged and whose
    GOOD file is not: each outcome ('ok' or the error's class and message) and how long it
    took (s)."""
    from streambars.errors import StoreError
    from streambars.store import file_path, open_store

    out: dict[str, object] = {}
    start = time.monotonic()

    def attempt(name: str, fn) -> None:
        t = time.monotonic()
        try:
            fn()
            out[name] = "ok"
        except StoreError as e:
            out[name] = f"{type(e).__name__}: {e}"
            out.setdefault("first_error_s", round(time.monotonic() - start, 4))  # open_store included
        out[name + "_s"] = round(time.monotonic() - t, 4)

    r = open_store(root)
    out["symbols"] = r.symbols()
    attempt("series", r.series)
    attempt("read_1s", lambda: r.read(SYMBOL, "1s"))
    attempt("read_1min", lambda: r.read(SYMBOL, "1min"))
    attempt("read_df", lambda: r.read_df(SYMBOL, "1s"))
    out["good_rows"] = int(r.read("GOOD", "1s").shape[0])
    r.close()
    attempt("open_file", lambda: open_store(file_path(root, DATASET, SYMBOL)).close())
    attempt("writer", lambda: open_writer(root).close())
    say(event="faults", **out)


if __name__ == "__main__":
    from streambars.observe import configure_logging

    configure_logging("info", "json", stream=sys.stderr)  # stdout carries the JSON events
    cmd, *args = sys.argv[1:]
    globals()[f"cmd_{cmd}"](*args)

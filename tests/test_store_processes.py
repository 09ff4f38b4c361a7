"""The store with real processes: SWMR readers, SIGKILLed writers, full disks, read-only dirs.

Every writer here is a separate Python process (tests/store_worker.py) and every kill is a
real SIGKILL, so what is checked is what the kernel and HDF5 leave on disk.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from streambars.store import file_path, open_store
from streambars.store.layout import read_blob
from streambars.store.recovery import read_superblock

from .store_worker import DATASET, SEC, SYMBOL, T0, expected

WORKER = Path(__file__).with_name("store_worker.py")


def start(*args: str, stdin: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stdin=stdin, text=True,
    )


def event(proc: subprocess.Popen, timeout: float = 30) -> dict:
    """The next JSON line the worker prints (fails the test if it dies or stalls)."""
    deadline = time.monotonic() + timeout
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if sel.select(timeout=0.1):
            line = proc.stdout.readline()
            if line:
                return json.loads(line)
            pytest.fail(f"worker exited ({proc.wait()}) without the expected event")
    proc.kill()
    pytest.fail("worker did not report in time")


def run(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def progress_note(path: Path) -> int:
    """The writer's progress blob ('next' 1s row), read as any SWMR reader would."""
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        note = read_blob(f["meta/progress"])[1]
    return json.loads(note)["next"] if note else 0


def check_rows(path: Path, at_least: int = 0, complete: bool = False) -> int:
    """Every row of both timeframes equals the expected sequence, and the progress note is
    never ahead of the rows of any timeframe; returns the 1s row count."""
    with open_store(path) as r:
        s = r.read(SYMBOL, "1s")
        m = r.read(SYMBOL, "1min")
    assert s.shape[0] >= at_least, f"{s.shape[0]} rows on disk, {at_least} were flushed"
    np.testing.assert_array_equal(s, expected(1, 0, s.shape[0]))
    np.testing.assert_array_equal(m, expected(60, 0, m.shape[0]))
    note = progress_note(path)
    assert note <= s.shape[0] and -(-note // 60) <= m.shape[0], "meta ran ahead of the rows"
    # A kill between the flushes of two timeframes leaves 1min behind 1s; resuming from the
    # note fills it. After a clean close they agree exactly.
    assert m.shape[0] <= -(-s.shape[0] // 60)
    if complete:
        assert m.shape[0] == -(-s.shape[0] // 60)
    return int(s.shape[0])


def test_swmr_reader_in_another_process_sees_rows_within_a_second(tmp_path):
    writer = start("pulse", str(tmp_path), "60", "0.02")
    assert event(writer)["event"] == "ready"
    path = file_path(tmp_path, DATASET, SYMBOL)
    latencies, seen_while_running = [], 0
    with open_store(tmp_path) as reader:
        seen = 0
        deadline = time.monotonic() + 20
        while seen < 60 and time.monotonic() < deadline:
            rows = reader.read(SYMBOL, "1s", start=T0 + seen * SEC)
            now = time.time_ns()
            for r in rows:
                latencies.append((now - int(r["volume"])) / 1e9)  # volume = writer's clock before append
            seen += rows.shape[0]
            if rows.shape[0] and writer.poll() is None:
                seen_while_running += rows.shape[0]
            time.sleep(0.005)
    assert event(writer)["event"] == "done"
    assert writer.wait(10) == 0
    assert seen == 60
    assert seen_while_running >= 50, "the reader should see rows while the writer is still appending"
    assert max(latencies) < 1.0, f"slowest row became visible after {max(latencies):.3f} s"
    assert path.exists()


def test_sigkill_at_random_moments_never_loses_a_flushed_row(tmp_path):
    rng = random.Random(20240101)
    state_file = tmp_path / "state"
    state_file.write_bytes(b"\0" * 24)
    path = file_path(tmp_path, DATASET, SYMBOL)
    kills = inside = 0
    # A plain h5py reader (HDF5 file locking on, as h5py defaults) and our reader hold the file
    # open through every restart: neither may stop the writer from reopening it.
    holder = None
    own_reader = None
    try:
        for k in range(22):
            with open(state_file, "r+b") as fh:
                state = np.frombuffer(mmap.mmap(fh.fileno(), 24), dtype=np.int64)
                state[:] = 0
                proc = start("append", str(tmp_path), str(state_file), str(k))
                ready = event(proc)
                assert ready["event"] == "ready"
                if k == 0:
                    holder = start("hold", str(path), stdin=subprocess.PIPE)
                    assert event(holder)["event"] == "holding"
                    own_reader = open_store(tmp_path)
                # Let it run a random while, then kill it wherever it is.
                time.sleep(rng.uniform(0.01, 0.15) if k % 4 else rng.uniform(0, 0.01))
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                started, finished, committed = (int(x) for x in state)
            kills += 1
            inside += started != finished
            # Every flushed row is there, every row is right; our reader sees them too.
            n = check_rows(path, at_least=committed)
            assert own_reader.read(SYMBOL, "1s").shape[0] == n
            assert read_superblock(path).open_for_write  # a killed writer leaves the mark
        assert kills >= 20
        assert inside >= 1, "no kill landed inside append(); the test proved less than it claims"
        # Reopen once more: recovery, marks consistent with the rows, and appending works.
        final = run("finish", str(tmp_path), str(n + 5000))[-1]
        assert final["hwm_at_open"]["1s"] == T0 + (n - 1) * SEC  # marks recomputed from rows
        assert n - 500 <= final["next"] <= n  # resumed from the note: at most one batch back
        assert check_rows(path, complete=True) == n + 5000
        assert not read_superblock(path).open_for_write
        own_reader.close()  # (one process may not mix HDF5 locking modes on one file)
        with h5py.File(path, "r") as f:  # a plain, non-SWMR open works after a clean close
            assert f["bars/1s"].shape == (n + 5000,)
    finally:
        if holder is not None:
            holder.stdin.close()
            holder.wait(10)
        if own_reader is not None:
            own_reader.close()
    print(f"{kills} kills, {inside} inside append(), {n} rows before the last run")


def test_second_writer_is_refused_with_the_holders_name(tmp_path):
    state_file = tmp_path / "state"
    state_file.write_bytes(b"\0" * 24)
    proc = start("append", str(tmp_path), str(state_file), "1")
    try:
        assert event(proc)["event"] == "ready"
        out = subprocess.run([sys.executable, str(WORKER), "finish", str(tmp_path), "10"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "StoreLockedError" in out.stderr
        assert f"pid {proc.pid}" in out.stderr and "store_worker" in out.stderr
    finally:
        proc.kill()
        proc.wait()
    # The lock died with the process: the next writer just works.
    assert run("finish", str(tmp_path), "100")[-1]["event"] == "finished"


def test_disk_full_is_a_clear_error_and_loses_nothing_written(tmp_path):
    events = {e["event"]: e for e in run("diskfull", str(tmp_path))}
    path = file_path(tmp_path, DATASET, SYMBOL)
    assert "store_error" in events, events
    assert str(path) in events["store_error"]["message"]
    assert "File too large" in events["store_error"]["message"]  # EFBIG, as ENOSPC would read
    assert "refused_after_failure" in events
    # Only whole appends are visible: the 5000 rows before the failure, none of the failed batch.
    assert check_rows(path) == 5000
    # The next writer repairs whatever the failed one left and carries on.
    assert run("finish", str(tmp_path), "6000")[-1]["hwm_at_open"]["1s"] == T0 + 4999 * SEC
    assert check_rows(path, complete=True) == 6000


def test_read_only_store_directory_is_a_clear_error_and_stays_readable():
    # As root, chmod does not stop writes: the worker drops to 'nobody' first, so the
    # permissions below are really enforced by the kernel (EACCES), not simulated.
    root = Path(tempfile.mkdtemp(prefix="sb-ro-"))
    try:
        run("finish", str(root), "100")
        ds_dir = root / DATASET
        os.chmod(root, 0o755)
        if os.geteuid() != 0:
            os.chmod(ds_dir, 0o555)
        ev = run("readonly", str(root))[-1]
        path = file_path(root, DATASET, SYMBOL)
        assert "lock file" in ev["existing"] and str(path) in ev["existing"]
        assert "Permission denied" in ev["existing"]
        assert "NEW.SYM" in ev["new"] and "Permission denied" in ev["new"]
        assert ev["rows"] == 100
    finally:
        os.chmod(root / DATASET, 0o755)
        import shutil

        shutil.rmtree(root)

"""fsio.SyncBehind: a big file's pages are sent to disk while it is written (one fdatasync in
flight at a time, every ``every`` bytes), the bytes written are exactly the ones given."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from streambars import fsio


def test_syncs_behind_the_writes_and_keeps_the_bytes(tmp_path: Path, monkeypatch) -> None:
    synced: list[int] = []
    gate, started = threading.Event(), threading.Event()

    def fake_sync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)  # what had reached the file when it started
        started.set()
        gate.wait(5)

    monkeypatch.setattr(fsio.os, "fdatasync", fake_sync)
    chunks = [bytes([i]) * 1000 for i in range(10)]
    path = tmp_path / "f"
    with open(path, "wb") as f:
        out = fsio.SyncBehind(f, every=2500)
        for c in chunks[:3]:
            out.write(c)
        assert started.wait(5)
        assert synced == [3000]  # flushed first, so the sync covers what was written
        for c in chunks[3:6]:  # past `every` again, but the first sync is still running
            out.write(c)
        assert synced == [3000]
        gate.set()
        out.wait()
        out.write(chunks[6])  # 4000 bytes since the last sync, none running: the next one
        out.wait()
        assert synced == [3000, 7000]
        for c in chunks[7:]:
            out.write(c)
        out.wait()
    assert synced == [3000, 7000, 10000]
    assert path.read_bytes() == b"".join(chunks)


def test_small_file_is_never_synced_early(tmp_path: Path, monkeypatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(fsio.os, "fdatasync", synced.append)
    with open(tmp_path / "f", "wb") as f:
        out = fsio.SyncBehind(f, every=1 << 20)
        out.write(b"x" * 1000)
        out.wait()
    assert synced == []

"""StoreWriterSet.hold: the pipeline's event loop queues a batch itself when queueing is all a
write would do, and hands real writes to a thread; the store is the same either way."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from streambars.records import TAGGED_BAR_DTYPE, BarBatch
from streambars.store import writer as W
from streambars.timeframes import Session

TFS = ["1s", "1min"]
SESSION = Session.parse("17:00 America/Chicago")


def _batches(n: int, size: int) -> list[BarBatch]:
    rows = np.zeros(n * size, TAGGED_BAR_DTYPE)
    rows["timeframe"] = np.arange(n * size) % 7 == 6  # some 1min bars among the 1s
    rows["ts_event"] = np.arange(n * size) * 10**9 + 1
    rows["close"] = np.arange(n * size) * 3
    return [BarBatch(rows[i * size:(i + 1) * size].copy()) for i in range(n)]


def _bars(root: Path) -> dict[str, bytes]:
    [path] = root.rglob("*.h5")
    with h5py.File(path, "r", locking=False) as f:
        return {n: f["bars"][n][()].tobytes() for n in f["bars"]} | {"hwm": f["meta/high_water_marks"][()].tobytes()}


def test_hold_queues_only_what_write_would_queue(tmp_path: Path) -> None:
    batches = _batches(7, 1000)
    held = []
    with W.StoreWriterSet(tmp_path / "a", "GLBX.MDP3", "raw_symbol", TFS, SESSION, coalesce_rows=2500) as ws:
        for b in batches:
            ok = ws.hold(b, ["ESH4"])
            held.append(ok)
            if not ok:
                ws.write(b, ["ESH4"])
        ws.flush()
    # 1000, 2000 held; the third would reach 2500: written with the two before it; and so on
    assert held == [True, True, False, True, True, False, True]
    with W.StoreWriterSet(tmp_path / "b", "GLBX.MDP3", "raw_symbol", TFS, SESSION, coalesce_rows=2500) as ws:
        for b in batches:
            ws.write(b, ["ESH4"])
        ws.flush()
    assert _bars(tmp_path / "a") == _bars(tmp_path / "b")


def test_hold_declines_without_coalescing_or_for_a_strided_array(tmp_path: Path) -> None:
    [b] = _batches(1, 100)
    with W.StoreWriterSet(tmp_path / "a", "GLBX.MDP3", "raw_symbol", TFS, SESSION) as ws:
        assert not ws.hold(b, ["ESH4"])
    with W.StoreWriterSet(tmp_path / "b", "GLBX.MDP3", "raw_symbol", TFS, SESSION, coalesce_rows=2500) as ws:
        assert not ws.hold(BarBatch(b.bars[::2]), ["ESH4"])
        assert ws.hold(b, ["ESH4"])

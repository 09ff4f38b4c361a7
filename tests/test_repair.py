"""`streambars repair FILE`: a damaged file is rebuilt from the raw archive, bar for bar."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streambars.cli import main
from streambars.store import open_store
from streambars.synthetic import write_dbn

from .fakes import make_ohlcv
from .test_backfill import DATASET, _args, _ns, _snapshot, build_market

NS = 1_000_000_000
TFS = "1s,1min,1h,1d"


@pytest.fixture(scope="module")
def days() -> np.ndarray:
    d0 = _ns("2024-03-04")
    return np.concatenate([make_ohlcv(1, d0 + d * 86_400 * NS + 21 * 3600 * NS, 3000, seed=d, fill=0.6)
                           for d in range(3)])


def _bars(store: Path) -> dict[str, np.ndarray]:
    with open_store(store) as r:
        return {tf: r.read("ES", tf, dataset="GLBX.MDP3") for tf in TFS.split(",")}


def _store_from_pieces(tmp: Path, recs: np.ndarray) -> Path:
    """Two DBN files ingested later one first: the file holds a ledger of both."""
    ts = recs["ts_event"]
    cut = int(ts[len(ts) // 2]) // NS * NS
    a, b = int(ts[0]), int(ts[-1]) + NS
    early = write_dbn(tmp / "early.dbn.zst", recs[ts < cut], symbols={"ES": 1}, start_ns=a, end_ns=cut)
    late = write_dbn(tmp / "late.dbn.zst", recs[ts >= cut], symbols={"ES": 1}, start_ns=cut, end_ns=b)
    store = tmp / "store"
    for f in (late, early):
        assert main(["backfill", "--store", str(store), "--from-dbn", str(f), "--timeframes", TFS,
                     "--log-format", "json"]) == 0
    return store


def _repair(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streambars", "repair", str(path), "--log-format", "json", *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("keep", [0.5, 0.02], ids=["half", "header-only"])
def test_a_truncated_file_is_rebuilt_from_the_archive(days, tmp_path, keep):
    store = _store_from_pieces(tmp_path, days)
    before = _bars(store)
    path = store / "GLBX.MDP3" / "ES.h5"
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    # header-only: nothing of the file reads, so its contract comes from the configuration
    p = _repair(path, *(("--timeframes", TFS) if keep < 0.1 else ()))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert list(path.parent.glob("ES.h5.damaged-*")), "the damaged file is kept for inspection"
    after = _bars(store)
    for tf in before:
        np.testing.assert_array_equal(after[tf], before[tf], err_msg=tf)
    # and it is a working file again: a later input appends to it
    later = write_dbn(tmp_path / "more.dbn.zst", make_ohlcv(1, _ns("2024-03-08") + 21 * 3600 * NS, 500, seed=9),
                      symbols={"ES": 1}, start_ns=_ns("2024-03-08"), end_ns=_ns("2024-03-09"))
    assert main(["backfill", "--store", str(store), "--from-dbn", str(later), "--timeframes", TFS,
                 "--log-format", "json"]) == 0


def test_a_historical_store_is_repaired_from_its_archived_months(fake_historical, tmp_path, api_key, monkeypatch):
    market = build_market(fake_historical)
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    store = tmp_path / "store"
    assert main(_args(store, market, "--yes")) == 0
    before = _snapshot(store)
    path = store / DATASET / "ES.c.0.h5"
    path.write_bytes(path.read_bytes()[:4096])  # nothing of the ledger survives
    requests = len(market.requests)
    p = subprocess.run([sys.executable, "-m", "streambars", "repair", str(path), "--timeframes",
                        "1s,15s,1min,5min,1h,4h,1d", "--session", "17:00 America/Chicago",
                        "--set", 'databento.stype_in="continuous"', "--log-format", "json"],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ})
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(market.requests) == requests  # from the archive: nothing requested, nothing paid
    after = _snapshot(store)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))


def test_repair_refuses_what_is_not_a_store_file(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    p = _repair(tmp_path / "x.txt")
    assert p.returncode == 2 and p.stderr.startswith("streambars: ") and "Traceback" not in p.stderr
    p = _repair(tmp_path / "GLBX.MDP3" / "ES.h5")
    assert p.returncode == 2 and "Traceback" not in p.stderr

"""The raw archive: layout, atomic month files, the live appender and its crash tolerance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import databento as db
import numpy as np
import pytest

from streambars import archive
from streambars.errors import StoreError
from streambars.naming import filename_to_symbol, symbol_to_filename
from streambars.records import SeriesRegistry
from streambars.sources import dbnfile
from tests.fakes import NS, make_ohlcv, make_trades

REPO = Path(__file__).resolve().parents[1]
T0 = 1_706_659_200 * NS  # 2024-01-31 00:00 UTC: a day before a month boundary


@pytest.mark.parametrize(
    "symbol",
    ["ES.c.0", "ESH4", "BRN FMJ0024!", "AAPL  250221C00250000", "ESM5-ESU5", "a/b", ".hidden", "..", "%41",
     "ÉS€", "ES.FUT"],
)
def test_symbol_escaping_is_reversible_and_safe(symbol: str) -> None:
    name = symbol_to_filename(symbol)
    assert "/" not in name and not name.startswith(".") and name not in ("", ".", "..")
    assert filename_to_symbol(name) == symbol


def test_escaping_keeps_plain_symbols_and_is_injective() -> None:
    assert symbol_to_filename("ES.c.0") == "ES.c.0"
    assert symbol_to_filename("BRN FMJ0024!") == "BRN%20FMJ0024%21"
    names = {symbol_to_filename(s) for s in ["a b", "a%20b", "a_b", "a-b", "A b"]}
    assert len(names) == 5
    with pytest.raises(ValueError):
        filename_to_symbol("a b")


def test_layout(tmp_path: Path) -> None:
    p = archive.path(tmp_path, "GLBX.MDP3", "BRN FMJ0024!", "2024-01")
    assert p == tmp_path / "GLBX.MDP3" / "raw" / "BRN%20FMJ0024%21" / "2024-01.dbn.zst"
    assert archive.month_path(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-01", "2024-01") == \
        tmp_path / "GLBX.MDP3" / "raw" / "ES.c.0" / "2024-01.dbn.zst"
    part = archive.path(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-01", "2024-01-10/2024-01-20")
    assert part.name == "2024-01-10_2024-01-20.dbn.zst"
    assert archive.live_path(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-01").name == "2024-01.live.dbn.zst"
    assert archive.symbols_path(p).name == "2024-01.symbols.json"
    with pytest.raises(ValueError):
        archive.path(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-1")
    with pytest.raises(ValueError):
        archive.path(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-01", "2024-02-01/2024-02-10")
    assert not archive.exists(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-01")
    archive.write_atomic(archive.path(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-01"), b"x")
    assert archive.exists(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-01")
    # a live file of the same month is not a complete Historical month
    assert not archive.exists(tmp_path, "GLBX.MDP3", "NQ.c.0", "2024-01")


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    dest = tmp_path / "d" / "2024-01.dbn.zst"
    archive.write_atomic(dest, b"old" * 1000)

    def chunks():
        yield b"new" * 1000
        raise OSError("disk on fire")

    with pytest.raises(OSError):
        archive.write_atomic(dest, chunks())
    assert dest.read_bytes() == b"old" * 1000
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temp file left
    archive.write_atomic(dest, [b"a", b"b"])
    assert dest.read_bytes() == b"ab"
    with open(dest, "rb") as f:
        archive.write_atomic(tmp_path / "copy", f)
    assert (tmp_path / "copy").read_bytes() == b"ab"


def test_atomic_path_requires_the_writer_to_write(tmp_path: Path) -> None:
    with pytest.raises(StoreError), archive.atomic_path(tmp_path / "x.dbn.zst"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".2024-01.dbn.zst.{dead_pid}.abcd1234.part"
    mine = tmp_path / f".2024-02.dbn.zst.{os.getpid()}.abcd1234.part"
    stale.write_bytes(b"half")
    mine.write_bytes(b"busy")
    assert archive.remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and mine.exists()


def test_sigkill_during_write_leaves_old_file_or_new_file(tmp_path: Path) -> None:
    dest = tmp_path / "raw" / "2024-01.dbn.zst"
    archive.write_atomic(dest, b"OLD" * 100_000)
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from streambars import archive
        def chunks():
            for i in range(1000):
                yield b"NEW" * 10_000
                time.sleep(0.01)
        archive.write_atomic({str(dest)!r}, chunks())
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while not list(dest.parent.glob(".*.part")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert dest.read_bytes() == b"OLD" * 100_000
    archive.write_atomic(dest, b"NEW")  # the next writer cleans the dead one's temp file
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_symbols_sidecar_roundtrip(tmp_path: Path) -> None:
    p = archive.path(tmp_path, "GLBX.MDP3", "ES.FUT", "2024-01")
    assert archive.read_symbols(p) is None
    archive.write_symbols(p, {100: "ESH4", 200: "ESM4"})
    assert archive.read_symbols(p) == {100: "ESH4", 200: "ESM4"}


def _bars() -> tuple[np.ndarray, np.ndarray]:
    a = make_ohlcv(100, T0, 120_000, seed=1)  # ~1.7 days of 1s bars: crosses into February
    b = make_ohlcv(200, T0, 120_000, seed=2)
    return a, b


def test_live_archive_appends_per_symbol_and_month(tmp_path: Path) -> None:
    a, b = _bars()
    reg = SeriesRegistry(["ES.c.0", "NQ.c.0"])
    with archive.LiveArchive(tmp_path, "GLBX.MDP3", "ohlcv-1s", "continuous") as arc:
        for i in range(0, len(a), 5000):  # one batch = both symbols interleaved
            recs = np.concatenate([a[i:i + 5000], b[i:i + 5000]])
            series = np.repeat(np.array([0, 1], np.int32), [len(a[i:i + 5000]), len(b[i:i + 5000])])
            arc.append_batch(recs, series, reg.names)
        assert arc.records_written == len(a) + len(b)
    for sym, ref in (("ES.c.0", a), ("NQ.c.0", b)):
        months = ref["ts_event"].astype("datetime64[ns]").astype("datetime64[M]")
        got = []
        for m in ("2024-01", "2024-02"):
            p = archive.live_path(tmp_path, "GLBX.MDP3", sym, m)
            content = archive.read_live_file(p)
            assert not content.truncated_tail
            assert content.metadata.symbols == [sym] and str(content.metadata.schema) == "ohlcv-1s"
            part = np.frombuffer(content.records, dtype=a.dtype)
            assert (part == ref[months == np.datetime64(m)]).all()
            got.append(part)
            # the databento client and dbnfile read the multi-frame file as ordinary DBN
            assert (db.DBNStore.from_file(p).to_ndarray() == part).all()
            r = SeriesRegistry()
            batches = list(dbnfile.iter_batches(p, r))
            assert r.names == [sym] and sum(len(x) for x in batches) == len(part)
        assert sum(len(g) for g in got) == len(ref)


def test_live_archive_parent_files_are_raw_symbol_files(tmp_path: Path) -> None:
    t = make_trades(7, T0, 2000, seed=3)
    with archive.LiveArchive(tmp_path, "GLBX.MDP3", "trades", "parent") as arc:
        arc.append("ESH4", t)
    p = archive.live_path(tmp_path, "GLBX.MDP3", "ESH4", "2024-01")
    info = dbnfile.describe(p)
    assert info.stype_in == "raw_symbol" and info.symbols == ("ESH4",) and info.schema == "trades"


def test_truncated_last_frame_is_tolerated_and_repaired(tmp_path: Path) -> None:
    a, _ = _bars()
    jan = a[a["ts_event"] < 1_706_745_600 * NS][:20_000]
    with archive.LiveArchive(tmp_path, "GLBX.MDP3", "ohlcv-1s", "continuous") as arc:
        for i in range(0, len(jan), 1000):
            arc.append("ES.c.0", jan[i:i + 1000])
    p = archive.live_path(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-01")
    size = p.stat().st_size
    with open(p, "r+b") as f:  # a crash in the middle of writing the last frame
        f.truncate(size - 37)
    content = archive.read_live_file(p)
    assert content.truncated_tail
    got = np.frombuffer(content.records, dtype=a.dtype)
    assert len(got) == 19_000 and (got == jan[:19_000]).all()
    with pytest.raises(Exception, match="truncated"):
        list(dbnfile.iter_batches(p, SeriesRegistry()))  # the strict reader says so
    # reopening for append cuts the partial frame away, then appends cleanly
    with archive.LiveArchive(tmp_path, "GLBX.MDP3", "ohlcv-1s", "continuous") as arc:
        arc.append("ES.c.0", jan[19_000:])
    content = archive.read_live_file(p)
    assert not content.truncated_tail
    assert (np.frombuffer(content.records, dtype=a.dtype) == jan).all()
    assert sum(len(x) for x in dbnfile.iter_batches(p, SeriesRegistry())) == len(jan)


def test_file_cut_inside_its_metadata_frame_starts_afresh(tmp_path: Path) -> None:
    a, _ = _bars()
    p = archive.live_path(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-01")
    with archive.LiveArchive(tmp_path, "GLBX.MDP3", "ohlcv-1s", "continuous") as arc:
        arc.append("ES.c.0", a[:10])
    with open(p, "r+b") as f:
        f.truncate(20)
    with pytest.raises(StoreError):
        archive.read_live_file(p)
    with archive.LiveArchive(tmp_path, "GLBX.MDP3", "ohlcv-1s", "continuous") as arc:
        arc.append("ES.c.0", a[10:20])
    got = np.frombuffer(archive.read_live_file(p).records, dtype=a.dtype)
    assert (got == a[10:20]).all()


def test_sigkill_while_appending_keeps_every_flushed_batch(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from streambars import archive
        from tests.fakes import make_ohlcv
        a = make_ohlcv(100, {T0}, 400_000, seed=5)
        arc = archive.LiveArchive({str(tmp_path)!r}, "GLBX.MDP3", "ohlcv-1s", "continuous")
        for i in range(0, len(a), 500):
            arc.append("ES.c.0", a[i:i + 500])
            print(i + len(a[i:i + 500]), flush=True)
            time.sleep(0.002)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    acked = 0
    for line in proc.stdout:
        acked = int(line)
        if acked >= 30_000:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ref = make_ohlcv(100, T0, 400_000, seed=5)
    p = archive.live_path(tmp_path, "GLBX.MDP3", "ES.c.0", "2024-01")
    got = np.frombuffer(archive.read_live_file(p).records, dtype=ref.dtype)
    # everything acknowledged (appended and flushed) survived, and only whole batches
    assert len(got) >= acked and len(got) % 500 == 0
    assert (got == ref[: len(got)]).all()
    with archive.LiveArchive(tmp_path, "GLBX.MDP3", "ohlcv-1s", "continuous") as arc:
        arc.append("ES.c.0", ref[len(got): len(got) + 500])
    got2 = np.frombuffer(archive.read_live_file(p).records, dtype=ref.dtype)
    assert (got2 == ref[: len(got) + 500]).all()

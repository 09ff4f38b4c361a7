"""`backfill --from-dbn` plans from one read of each input: hashed (and copied into the raw
archive beside it) in that read, decoded in it only when the file's end must be proven; the
copy is finished beside the run, and no ledger names it before it is on disk."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import zstandard

import streambars.backfill as B
import streambars.inputs as inputs_mod
from streambars.config import load_settings
from streambars.errors import SourceError, StoreError
from streambars.inputs import wait_archived
from streambars.sources import dbnfile
from streambars.synthetic import dbn_bytes, es_like_1s_bars, write_dbn

NS = 1_000_000_000
START = int(datetime(2024, 3, 4, tzinfo=UTC).timestamp()) * NS
END = START + 86_400 * NS
OPTS = {"dataset": "GLBX.MDP3", "symbols": {"ESH4": 5602}, "start_ns": START, "end_ns": END}


@pytest.fixture(scope="module")
def records() -> np.ndarray:
    return es_like_1s_bars(START, 0.25, seed=3, instrument_id=5602)


def _decodes(monkeypatch) -> list[Path]:
    seen: list[Path] = []
    real = dbnfile.iter_records

    def counted(path, **kw):
        seen.append(Path(path))
        return real(path, **kw)

    monkeypatch.setattr(dbnfile, "iter_records", counted)
    return seen


def _settings(tmp_path: Path):
    return load_settings(None, {"store.path": str(tmp_path / "store")})


def _temps(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "store").rglob("*") if p.name.endswith(".part")]


def test_compressed_file_with_an_end_is_not_decoded_while_planning(tmp_path, monkeypatch, records):
    path = write_dbn(tmp_path / "in.dbn.zst", records, **OPTS)
    seen = _decodes(monkeypatch)
    plan = B.plan_dbn_files(_settings(tmp_path), [path], out=io.StringIO())
    assert seen == []
    [item] = plan.items
    assert item.spans == {"ESH4": ((START, END),)} and item.end_known
    data = path.read_bytes()
    assert item.source == f"_inputs/in-{hashlib.sha256(data).hexdigest()[:16]}.dbn.zst"
    assert item.read_from == path  # this run reads the user's file while the copy finishes
    wait_archived([item.path])
    assert item.path.read_bytes() == data
    assert _temps(tmp_path) == []
    B.execute(plan)
    assert [p for p in seen if p == path]  # the pipeline decodes it


def test_plain_file_is_decoded_once_to_prove_its_end(tmp_path, monkeypatch, records):
    raw = dbn_bytes(records, **OPTS)
    path = tmp_path / "in.dbn"
    path.write_bytes(raw)
    seen = _decodes(monkeypatch)
    plan = B.plan_dbn_files(_settings(tmp_path), [path], out=io.StringIO())
    assert seen == [path]
    [item] = plan.items
    last = int(records["ts_event"].max())
    assert item.spans == {"ESH4": ((START, last + 1),)} and not item.end_known
    assert item.source == f"_inputs/in-{hashlib.sha256(raw).hexdigest()[:16]}.dbn.zst"
    wait_archived([item.path])
    assert zstandard.ZstdDecompressor().decompressobj().decompress(item.path.read_bytes()) == raw
    assert _temps(tmp_path) == []


def test_input_already_in_the_store_leaves_no_copy(tmp_path, records):
    path = write_dbn(tmp_path / "in.dbn.zst", records, **OPTS)
    settings = _settings(tmp_path)
    B.execute(B.plan_dbn_files(settings, [path], out=io.StringIO()))
    inputs = sorted((tmp_path / "store" / "GLBX.MDP3" / "raw" / "_inputs").iterdir())
    again = B.plan_dbn_files(settings, [path], out=io.StringIO())
    assert again.items == () and again.chunks_skipped == 1
    assert sorted((tmp_path / "store" / "GLBX.MDP3" / "raw" / "_inputs").iterdir()) == inputs
    assert _temps(tmp_path) == []


def test_damaged_file_with_an_end_stops_the_run_before_its_checkpoint(tmp_path, records):
    good = write_dbn(tmp_path / "good.dbn.zst", records, **OPTS).read_bytes()
    bad = tmp_path / "bad.dbn.zst"
    bad.write_bytes(good[: len(good) * 2 // 3])
    settings = _settings(tmp_path)
    with pytest.raises(SourceError, match="bad.dbn.zst"):
        B.ingest_dbn_files(settings, [bad], out=io.StringIO())
    assert _temps(tmp_path) == []
    # nothing counts it as ingested: the whole file is planned again
    plan = B.plan_dbn_files(settings, [tmp_path / "good.dbn.zst"], out=io.StringIO())
    assert [i.spans for i in plan.items] == [{"ESH4": ((START, END),)}]


def test_a_copy_that_cannot_be_kept_fails_the_run_before_its_input_counts(tmp_path, monkeypatch, records):
    """The archive copy is finished beside the run; when it fails (a full disk), the run stops
    with a message naming the archive, before the input's checkpoint: no ledger names a
    source that is not on disk, and a rerun plans the whole input again."""
    path = write_dbn(tmp_path / "in.dbn.zst", records, **OPTS)
    settings = _settings(tmp_path)

    def full_disk(src, dst_fd, stop=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inputs_mod, "copy_bytes", full_disk)
    with pytest.raises(StoreError, match=r"raw archive .*_inputs/in-.*No space left on device"):
        B.ingest_dbn_files(settings, [path], out=io.StringIO())
    assert _temps(tmp_path) == []
    assert not list((tmp_path / "store" / "GLBX.MDP3" / "raw" / "_inputs").glob("*.dbn.zst"))
    monkeypatch.undo()
    plan = B.plan_dbn_files(settings, [path], out=io.StringIO())
    assert [i.spans for i in plan.items] == [{"ESH4": ((START, END),)}]
    B.execute(plan)
    [item] = plan.items
    assert item.path.read_bytes() == path.read_bytes()
    writers = B.make_writers(settings, "GLBX.MDP3", "raw_symbol")
    try:
        states = B.read_file_states(settings, writers, "GLBX.MDP3", ["ESH4"])
    finally:
        writers.close_all()
    assert [s.source for s in states["ESH4"].ledger.spans] == [item.source]

"""`backfill --from-dbn` plans without reading an input whose Metadata gives its end: it is
hashed and copied into the raw archive beside the run; a file whose end must be proven is
decoded, hashed and copied in one read while planning. No ledger names a copy before it is
on disk under its hash's name."""

from __future__ import annotations

import hashlib
import io
import threading
import types
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
    assert item.read_from == path  # this run reads the user's file while the copy finishes
    assert item.source == inputs_mod.UNNAMED and item.path is None  # hashed beside the run
    wait_archived([path])
    item = B.archived(item, plan.settings, plan.dataset)
    data = path.read_bytes()
    assert item.source == f"_inputs/in-{hashlib.sha256(data).hexdigest()[:16]}.dbn.zst"
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
    wait_archived([path])
    item = B.archived(item, plan.settings, plan.dataset)
    assert item.source == f"_inputs/in-{hashlib.sha256(raw).hexdigest()[:16]}.dbn.zst"
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
    # its copy is not kept either: a repair rebuilding from the archive would read it back
    assert not list((tmp_path / "store" / "GLBX.MDP3" / "raw" / "_inputs").glob("*.dbn.zst"))
    # nothing counts it as ingested: the whole file is planned again
    plan = B.plan_dbn_files(settings, [tmp_path / "good.dbn.zst"], out=io.StringIO())
    assert [i.spans for i in plan.items] == [{"ESH4": ((START, END),)}]


def _ledger_sources(settings) -> list[str]:
    writers = B.make_writers(settings, "GLBX.MDP3", "raw_symbol")
    try:
        states = B.read_file_states(settings, writers, "GLBX.MDP3", ["ESH4"])
    finally:
        writers.close_all()
    return [s.source for s in states["ESH4"].ledger.spans]


def _full_disk(monkeypatch) -> None:
    def full_disk(src, dst_fd, stop=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inputs_mod, "copy_bytes", full_disk)


def _unreadable(monkeypatch) -> None:
    class Unreadable:  # the hash, beside the run, meets a read error
        def update(self, chunk):
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(inputs_mod, "hashlib", types.SimpleNamespace(sha256=Unreadable))


@pytest.mark.parametrize("fault, message", [
    (_full_disk, r"raw archive \(.*_inputs/in-.*\): No space left on device"),
    (_unreadable, r"raw archive \(for .*in\.dbn\.zst\): Input/output error"),
], ids=["full-disk", "unreadable"])
def test_an_input_whose_copy_cannot_be_kept_fails_the_run_before_it_counts(
        tmp_path, monkeypatch, records, fault, message):
    """The archive copy is finished beside the run; when it fails (a full disk, a read error
    while hashing), the run stops with a message naming the archive or the file, before the
    input's checkpoint: no ledger names a source that is not on disk, and a rerun plans the
    whole input again."""
    path = write_dbn(tmp_path / "in.dbn.zst", records, **OPTS)
    settings = _settings(tmp_path)
    fault(monkeypatch)
    with pytest.raises(StoreError, match=message):
        B.ingest_dbn_files(settings, [path], out=io.StringIO())
    assert _temps(tmp_path) == []
    assert not list((tmp_path / "store" / "GLBX.MDP3" / "raw" / "_inputs").glob("*.dbn.zst"))
    monkeypatch.undo()
    plan = B.plan_dbn_files(settings, [path], out=io.StringIO())
    assert [i.spans for i in plan.items] == [{"ESH4": ((START, END),)}]
    B.execute(plan)
    item = B.archived(plan.items[0], plan.settings, plan.dataset)
    assert item.path.read_bytes() == path.read_bytes()
    assert _ledger_sources(settings) == [item.source]

def test_planning_does_not_wait_for_the_hash_and_no_ledger_names_the_input_before_it(
        tmp_path, monkeypatch, records):
    """The hash runs beside the run: planning returns while it is held back, the pipeline
    decodes meanwhile, and the input's checkpoint waits for its name."""
    path = write_dbn(tmp_path / "in.dbn.zst", records, **OPTS)
    settings = _settings(tmp_path)
    release = threading.Event()
    real = inputs_mod.InputCopy._hash

    def held(self):
        assert release.wait(60)
        real(self)

    monkeypatch.setattr(inputs_mod.InputCopy, "_hash", held)
    decoded: list[int] = []
    real_batches = dbnfile.iter_batches

    def counted(*a, **kw):
        for batch in real_batches(*a, **kw):
            decoded.append(len(batch))
            if sum(decoded) >= len(records):
                release.set()  # every record decoded before the name exists
            yield batch

    monkeypatch.setattr(dbnfile, "iter_batches", counted)
    plan = B.plan_dbn_files(settings, [path], out=io.StringIO())
    assert not release.is_set()
    B.execute(plan)
    assert sum(decoded) == len(records)
    name = f"_inputs/in-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}.dbn.zst"
    assert _ledger_sources(settings) == [name]
    assert (tmp_path / "store" / "GLBX.MDP3" / "raw" / name).read_bytes() == path.read_bytes()



def test_an_input_rewritten_during_the_run_fails_it_before_it_counts(tmp_path, records):
    """The run reads the user's file beside its hash and copy: a file rewritten after planning
    (another size or time) stops the run at the input's checkpoint, naming it; no ledger
    counts it."""
    path = write_dbn(tmp_path / "in.dbn.zst", records, **OPTS)
    settings = _settings(tmp_path)
    plan = B.plan_dbn_files(settings, [path], out=io.StringIO())
    wait_archived([path])  # the copy and hash of what planning found
    write_dbn(path, records[: len(records) // 2], **OPTS)  # rewritten in place
    with pytest.raises(StoreError, match=r"in\.dbn\.zst changed while this run read it"):
        B.execute(plan)
    assert _ledger_sources(settings) == []

"""A SIGKILL in the middle of a flush must never leave a torn HDF5 metadata block.

Linux can cut one pwrite() short at a 4 KiB page boundary when SIGKILL arrives (it checks for
fatal signals between the pages it copies), and HDF5 rewrites its metadata blocks (object
headers, chunk-index blocks) in place on every flush. A block straddling a page boundary can
then be left half old, half new: its checksum fails and every reader reports "incorrect
metadata checksum after all read attempts" for that timeframe -- the rare failure of
test_store_processes' kill -9 test. The writer's FILE_SPACE keeps every block of up to a page
inside one page (FILE_SPACE in layout.py).

A real kill lands inside such a write about once in a few hundred kills, so the kill is
simulated exactly instead, two ways:

* HDF5's own metadata-cache log (H5Pset_mdc_log_options) of the real writer (sec2 driver,
  SWMR, a recovery reopen) names every metadata block it creates or writes, with its size:
  none of up to a page may straddle a page boundary;
* every write of the real writer goes through a recording file object (h5py's fileobj
  driver): for each write crossing a page boundary, the file a kill at that boundary leaves is
  rebuilt and read by a fresh reader, with the killed writer's marks.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import h5py._hl.files as h5py_files
import numpy as np
import pytest

import streambars.store.layout as layout
import streambars.store.writer as writer_module
from streambars.errors import DamagedFileError
from streambars.store import file_path, open_store
from streambars.store.layout import PAGE
from streambars.store.probe import check_writable
from streambars.store.recovery import FLAG_SWMR_WRITE, FLAG_WRITE, lookup3, read_superblock

from .store_worker import DATASET, SYMBOL, batch, expected, open_writer

#: Batches (1s rows) that grow each timeframe's chunk index through several blocks.
BATCHES = [1, 7, 700, 1, 500, 2000, 3, 900] * 6


class WriterFiles:
    """Stands in for the h5py module the writer uses: its h5py.File opens can go to a
    Recorder (``recorders``: the writer's read-write opens of a store file; creating a file
    and every check before the open stay on disk)."""

    def __init__(self) -> None:
        self.recorders: list[Recorder] | None = None
        for name in dir(h5py):
            if not name.startswith("__") and name != "File":
                setattr(self, name, getattr(h5py, name))

    def File(self, name, mode="r", **kw):  # noqa: ANN001, ANN003, ANN201, N802
        if mode == "r+" and self.recorders is not None and str(name).endswith(".h5"):
            self.recorders.append(Recorder(Path(name).read_bytes()))
            return h5py.File(self.recorders[-1], mode, **kw)
        return h5py.File(name, mode, **kw)


@pytest.fixture
def files(monkeypatch) -> WriterFiles:
    shim = WriterFiles()
    monkeypatch.setattr(writer_module, "h5py", shim)
    return shim


@pytest.fixture
def small_chunks(monkeypatch):
    """Writers with small chunks (a store's are 1024 rows or more), so the chunk index grows
    through its blocks quickly: 128 rows for 1s (6.5 kB: row writes cross a page boundary),
    64 for 1min (its 411 rows in 7 chunks, more than the 4 the index block holds itself, so
    its index gets data blocks too)."""
    init = writer_module.BarFileWriter.__init__

    def wrapped(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        kw["chunk_rows"] = 128
        init(self, *args, **kw)

    monkeypatch.setattr(writer_module.BarFileWriter, "__init__", wrapped)
    monkeypatch.setattr(layout, "MIN_CHUNK_ROWS", 64)


@pytest.fixture
def default_placement(monkeypatch):
    """HDF5's default placement everywhere: what the writer did before this fix."""
    monkeypatch.setattr(writer_module, "FILE_SPACE", {})
    monkeypatch.setattr(layout, "FILE_SPACE", {})


def append_all(w, start: int, batches: list[int], done=None) -> int:  # noqa: ANN001
    """Append ``batches`` 1s rows (and their 1min rows) from row ``start``, with a progress
    note each (``done(rows)`` after each); returns the rows appended so far."""
    i = start
    for k in batches:
        w.append(batch(i, i + k), meta={"progress": json.dumps({"next": i + k}).encode()})
        i += k
        if done is not None:
            done(i)
    return i


def as_killed(path: Path, image: bytes) -> Path:
    """Write ``image`` as the store file ``path``, marked as a killed SWMR writer leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image)
    sb = read_superblock(path)
    raw = bytearray(sb.raw)
    raw[11] = FLAG_WRITE | FLAG_SWMR_WRITE
    raw[-4:] = lookup3(bytes(raw[:-4])).to_bytes(4, "little")
    with open(path, "r+b") as fh:
        fh.seek(sb.offset)
        fh.write(raw)
    return path


def read_all(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open_store(path) as r:
        return r.read(SYMBOL, "1s"), r.read(SYMBOL, "1min")


# -- HDF5's metadata cache log ------------------------------------------------------------


def _set_mdc_log():  # noqa: ANN202
    with open("/proc/self/maps") as maps:
        libs = {ln.split()[-1] for ln in maps if "/libhdf5" in ln and "hdf5_hl" not in ln}
    for lib in sorted(libs):
        fn = getattr(ctypes.CDLL(lib), "H5Pset_mdc_log_options", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int64, ctypes.c_bool, ctypes.c_char_p, ctypes.c_bool]
            fn.restype = ctypes.c_int
            return fn
    pytest.skip("libhdf5 without H5Pset_mdc_log_options")


def _blocks(log: Path) -> dict[int, int]:
    """Every metadata block the log shows the cache create or take for writing: address -> size
    (the largest seen). HDF5's temporary addresses (above 2**60, never on disk) left out."""
    out: dict[int, int] = {}
    pattern = (r'"action":"(insert|protect)","address":0x([0-9a-f]+),"type_id":\d+,'
               r'(?:"flags":0x[0-9a-f]+|"readwrite":"(\w+)"),"size":(\d+)')
    for action, addr, rw, size in re.findall(pattern, log.read_text()):
        a = int(addr, 16)
        if a < 1 << 60 and (action == "insert" or rw == "WRITE"):
            out[a] = max(out.get(a, 0), int(size))
    for a, new in re.findall(r'"action":"resize","address":0x([0-9a-f]+),"new_size":(\d+)', log.read_text()):
        if int(a, 16) in out:
            out[int(a, 16)] = max(out[int(a, 16)], int(new))
    return out


def logged_session(tmp_path: Path, monkeypatch) -> list[dict[int, int]]:  # noqa: ANN001
    """A writer creates the file and appends; its file is taken as a kill leaves it (copied
    while it is open: every append has flushed) and a second writer recovers that copy and
    appends. Returns the metadata blocks each writer's open logged."""
    setter = _set_mdc_log()
    logs: list[Path] = []
    make_fapl = h5py_files.make_fapl

    def logging_fapl(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        fapl = make_fapl(*args, **kw)
        logs.append(tmp_path / f"mdc{len(logs)}.log")
        assert setter(fapl.id, True, str(logs[-1]).encode(), True) >= 0
        return fapl

    monkeypatch.setattr(h5py_files, "make_fapl", logging_fapl)
    w = open_writer(str(tmp_path / "first"))
    n = append_all(w, 0, BATCHES)
    killed = file_path(tmp_path / "second", DATASET, SYMBOL)
    killed.parent.mkdir(parents=True)
    shutil.copyfile(w.path, killed)
    w.close()
    w = open_writer(str(tmp_path / "second"))
    append_all(w, n, BATCHES[:12])
    w.close()
    monkeypatch.setattr(h5py_files, "make_fapl", make_fapl)
    assert len(logs) >= 3  # create, append, recover + append
    return [_blocks(log) for log in logs]


def straddling(blocks: dict[int, int]) -> list[tuple[int, int]]:
    return [(a, n) for a, n in sorted(blocks.items()) if n <= PAGE and a // PAGE != (a + n - 1) // PAGE]


def test_every_metadata_block_a_writer_writes_lies_inside_one_page(tmp_path, monkeypatch, small_chunks):
    logged = logged_session(tmp_path, monkeypatch)
    assert sum(len(b) for b in logged) > 50, "the log shows no metadata writes: the test proves nothing"
    bad = [s for blocks in logged for s in straddling(blocks)]
    assert not bad, f"metadata blocks (address, size) a kill can tear: {bad[:5]}"


def test_default_placement_lets_metadata_blocks_straddle_pages(tmp_path, monkeypatch, small_chunks,
                                                              default_placement):
    """The cause: by default HDF5 packs chunk-index blocks anywhere."""
    logged = logged_session(tmp_path, monkeypatch)
    assert any(straddling(blocks) for blocks in logged)


# -- every write cut at every page boundary ----------------------------------------------------

#: The signatures HDF5's checksummed metadata blocks start with; a bar row starts with its
#: ts_event, never with these.
SIGNATURES = {b"OHDR", b"OCHK", b"EAHD", b"EAIB", b"EASB", b"EADB", b"FAHD", b"FADB",
              b"BTHD", b"BTIN", b"BTLF", b"FRHP", b"FHDB", b"FHIB", b"FSHD", b"FSSE"}


class Recorder(io.RawIOBase):
    """A file in memory that keeps, for every write crossing a page boundary, the image a kill
    at each boundary inside it leaves (the write's pages before the boundary on disk, the rest
    not), with the rows flushed before that write began. Images are rebuilt on demand from the
    writes (a copy of the file per cut made this test slow as files grow)."""

    def __init__(self, data: bytes):
        self.base = bytes(data)
        self.img = bytearray(data)
        self.pos = 0
        self.flushed = 0
        self.ops: list[tuple[int, bytes | None]] = []  # (offset, bytes written) or (size, None): truncate
        self.cuts: list[tuple[bytes, int, int, Callable[[], bytes]]] = []  # (first 4 bytes, offset, flushed, image)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.img)}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    @staticmethod
    def _apply(img: bytearray, at: int, data: bytes | None) -> None:
        if data is None:  # truncate to ``at``
            del img[at:]
            img.extend(b"\0" * (at - len(img)))
            return
        img.extend(b"\0" * max(0, at + len(data) - len(img)))
        img[at : at + len(data)] = data

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        self.ops.append((size, None))
        self._apply(self.img, size, None)
        return size

    def readinto(self, buf) -> int:  # noqa: ANN001
        view = memoryview(buf).cast("B")
        data = self.img[self.pos : self.pos + len(view)]
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def image(self, op: int, cut: int) -> bytes:
        """The file as a kill at offset ``cut`` inside write number ``op`` leaves it."""
        img = bytearray(self.base)
        for at, data in self.ops[:op]:
            self._apply(img, at, data)
        at, data = self.ops[op]
        assert data is not None
        img.extend(b"\0" * max(0, at + len(data) - len(img)))  # the file grows first
        img[at:cut] = data[: cut - at]
        return bytes(img)

    def write(self, b) -> int:  # noqa: ANN001
        data, at, op = bytes(b), self.pos, len(self.ops)
        for cut in range((at // PAGE + 1) * PAGE, at + len(data), PAGE):
            self.cuts.append((data[:4], at, self.flushed, functools.partial(self.image, op, cut)))
        self.ops.append((at, data))
        self._apply(self.img, at, data)
        self.pos = at + len(data)
        return len(data)


@pytest.fixture
def recorded(files, small_chunks) -> list[Recorder]:
    """The writer's read-write opens go to Recorders (the list returned)."""
    files.recorders = []
    return files.recorders


def recorded_session(tmp_path: Path, recorders: list[Recorder]) -> list[tuple[bytes, int, int, Callable[[], bytes]]]:
    """Create and append, be killed; a second writer recovers the killed image and appends.
    Returns every cut write (the writers are dropped as kills drop them)."""
    w = open_writer(str(tmp_path / "first"))
    done = lambda i: setattr(recorders[-1], "flushed", i)  # noqa: E731
    n = append_all(w, 0, BATCHES, done)
    as_killed(file_path(tmp_path / "second", DATASET, SYMBOL), bytes(recorders[-1].img))
    w2 = open_writer(str(tmp_path / "second"))
    recorders[-1].flushed = n
    append_all(w2, n, BATCHES[:12], done)
    del w, w2
    return [c for r in recorders for c in r.cuts]


def test_a_kill_inside_any_write_loses_no_flushed_row(tmp_path, recorded):
    cuts = recorded_session(tmp_path, recorded)
    metadata = [(sig, at) for sig, at, _, _ in cuts if sig in SIGNATURES]
    assert not metadata, f"metadata blocks cut by a page boundary: {metadata[:5]}"
    # The raw data (rows, marks, meta blobs) is cut wherever a kill lands: every such cut (a
    # sample) reads whole, with every row flushed before the cut write began.
    assert len(cuts) > 50
    for k, (_, _, flushed, image) in enumerate(cuts[:: len(cuts) // 10]):
        path = as_killed(file_path(tmp_path / f"cut{k}", DATASET, SYMBOL), image())
        s, m = read_all(path)
        assert s.shape[0] >= flushed
        np.testing.assert_array_equal(s, expected(1, 0, s.shape[0]))
        np.testing.assert_array_equal(m, expected(60, 0, m.shape[0]))
        check_writable(path)  # and the next writer takes it up


def test_a_torn_metadata_block_is_the_unreadable_file_readers_saw(tmp_path, recorded, default_placement):
    """The failure itself, under HDF5's default placement: a chunk-index block cut at a page
    boundary, and no reader can read that timeframe (a cut where the block's changed bytes
    all lie on one side of the boundary is harmless, so not every cut breaks the file)."""
    cuts = recorded_session(tmp_path, recorded)
    torn = [image for sig, _, _, image in cuts if sig in SIGNATURES]
    assert torn, "no metadata block straddled a page: HDF5's placement changed, revisit this test"
    errors = []
    for k, image in enumerate(torn):
        path = as_killed(file_path(tmp_path / f"torn{k}", DATASET, SYMBOL), image())
        try:
            read_all(path)
        except DamagedFileError as e:
            errors.append(str(e))
            if len(errors) == 2:  # each failing read takes ~0.5 s (bounded retries)
                break
    assert errors and all("incorrect metadata checksum" in e for e in errors), errors


# -- files made before -------------------------------------------------------------------------


def chunk_offsets(path: Path) -> dict[str, list[int]]:
    """Where each 1s/1min chunk starts in the file."""
    with h5py.File(path, "r", locking=False) as f:
        return {tf: [ds.id.get_chunk_info(i).byte_offset for i in range(ds.id.get_num_chunks())]
                for tf, ds in ((tf, f["bars"][tf]) for tf in ("1s", "1min"))}


def test_a_file_made_before_is_appended_as_it_was_made(tmp_path, monkeypatch):
    """A file made before page alignment (HDF5's default placement, 64-row coarse chunks, no
    ``placement`` attribute) keeps its placement: aligning its small chunks would leave a gap
    after each. Its rows stay whole through today's writer; a new file's chunks all start on a
    page."""
    with monkeypatch.context() as old:  # the writer before this fix
        old.setattr(writer_module, "FILE_SPACE", {})
        old.setattr(layout, "MIN_CHUNK_ROWS", 64)
        w = open_writer(str(tmp_path / "old"))
        n = append_all(w, 0, BATCHES[:8])
        path = w.path
        w.close()
        with h5py.File(path, "r+", locking=False) as f:
            del f.attrs[layout.PLACEMENT]
    before = chunk_offsets(path)
    w = open_writer(str(tmp_path / "old"))  # today's writer
    n = append_all(w, n, BATCHES[8:16])
    w.close()
    s, m = read_all(path)
    np.testing.assert_array_equal(s, expected(1, 0, n))
    np.testing.assert_array_equal(m, expected(60, 0, -(-n // 60)))
    after = chunk_offsets(path)
    added = [a for tf in after for a in after[tf][len(before[tf]):]]
    assert len(added) > 10 and any(a % PAGE for a in added), "the old file's new chunks were page-aligned"
    w = open_writer(str(tmp_path / "new"))
    append_all(w, 0, BATCHES[:16])
    w.close()
    new = [a for offsets in chunk_offsets(w.path).values() for a in offsets]
    assert len(new) > 30 and not [a for a in new if a % PAGE]

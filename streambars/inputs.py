"""DBN files a user gives to ``backfill --from-dbn``: named by their content and kept in the
raw archive, where a later rebuild (history arriving out of order) reads them again.

A file's archive name (``_inputs/<stem>-<sha256 prefix>.dbn.zst``, the ledger's source) is
needed only when a ledger entry names it, after the input is aggregated; planning needs, for
a file whose Metadata does not say where it ends, its last record. So for a compressed file
with an end, :meth:`InputCopy.read` only starts two helper threads -- one hashes the file, one
copies it (in the kernel: ``copy_file_range``) -- and :meth:`InputCopy.keep` finishes the copy
(fsync, rename into the archive under the hash's name, fsync of the directory) on a third,
while the run already decodes the user's file. Measured on a year of 1s bars (161 MB zstd)
on the 2-core VM: planning took 0.34-0.7 s with the copy and its fsync done first, ~0.15-0.2 s
with the hash done first, and now starts no read of its own.

The order that makes this safe: a ledger entry naming a source is written only after
:func:`wait_archived` saw that source's copy renamed into place and fsynced, and the name is
only known from then on (:func:`archived_source`): backfill waits before each input's
checkpoint, a cluster before it hands out any task, a rebuild before it reads the archive.
A copy that fails (a full disk), a file that cannot be read to its end, or one rewritten
while the run read it (its size, time or inode not what planning saw) fails the run there,
with nothing recorded for that input. A file whose records the run finds damaged has the
copy this run made removed again (:func:`discard_archived`): a repair that rebuilds from
whatever the archive holds would read it back.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from .errors import StoreError
from .fsio import SyncBehind, replace_file, temp_beside
from .sources import dbnfile

INPUTS_DIR = "_inputs"
#: An input's ledger source until its copy is archived under its hash's name: never written
#: to a ledger (an empty source means "nothing there"; this one would be a missing file).
UNNAMED = f"{INPUTS_DIR}/(named once archived)"
_PIECE = 16 << 20  # bytes per copy_file_range call: a stop request is seen between pieces
_READ = 1 << 20


def file_span(path: Path, schema: str, clock: str,
              tee: Callable[[bytes], None] | None = None) -> tuple[int, int]:
    """(records, one past the last record's time): reads the whole file, which also proves it
    whole (a corrupt or cut-off file is refused here, before anything is written); ``tee``
    receives the file's bytes as they are read."""
    n, last = 0, -1
    field_name = clock if schema == "trades" else "ts_event"
    for _, arr in dbnfile.iter_records(path, expected_schema=schema, tee=tee):
        n += len(arr)
        if len(arr):
            last = max(last, int(arr[field_name].max()))
    return n, last + 1


def copy_bytes(src: Path, dst_fd: int, stop: threading.Event | None = None) -> None:
    """Append ``src``'s bytes to ``dst_fd``: ``copy_file_range`` (no pass through Python;
    on a filesystem that shares extents, no data copied at all), else read/write."""
    with open(src, "rb") as f:
        fd, size, off = f.fileno(), os.fstat(f.fileno()).st_size, 0
        kernel = hasattr(os, "copy_file_range")
        while off < size and not (stop is not None and stop.is_set()):
            if kernel:
                try:
                    n = os.copy_file_range(fd, dst_fd, min(_PIECE, size - off), off)
                except OSError:  # another filesystem on an old kernel, a special file...
                    kernel = False
                    continue
            else:
                data = os.pread(fd, _PIECE, off)
                n = data and os.write(dst_fd, data)
            if not n:
                break  # the file shrank under us: the hash (read separately) says what we got
            off += n


@dataclass
class InputCopy:
    """One input: its archive name (once hashed), its proven end (when it had to be decoded
    to know it), and the copy of it being made into the raw archive."""

    path: Path  # the user's file, read by this run while the copy is finished
    tmp: Path
    proven_end: int | None  # one past its last record; None: not decoded here
    size: int = 0  # bytes hashed
    _rel: str | None = None  # its ledger source, named by its content (see rel)
    _hashing: threading.Thread | None = None
    _copying: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _error: list[BaseException] = field(default_factory=list)
    _hash_error: list[BaseException] = field(default_factory=list)
    _kept: bool = False
    _seen: tuple[int, ...] | None = None  # the file as planning found it (see _signature)

    @property
    def rel(self) -> str:
        """Its ledger source, relative to the raw archive (waits for the hash)."""
        if self._hashing is not None:
            self._hashing.join()
        if self._hash_error:
            raise self._hash_error[0]
        assert self._rel is not None
        return self._rel

    def _name(self, digest: str) -> None:
        stem = self.path.name.split(".")[0] or "input"
        self._rel = f"{INPUTS_DIR}/{stem}-{digest[:16]}.dbn.zst"

    @classmethod
    def read(cls, raw: Path, info: dbnfile.DbnInfo, schema: str, clock: str, scan: bool) -> InputCopy:
        """Hash ``info.path`` and start its copy into a temp file in the archive; with ``scan``
        decode it too (the copy then rides on that one read, compressed if it is plain)."""
        path = info.path
        tmp = temp_beside(raw / INPUTS_DIR / path.name)
        got = cls(path, tmp, None, _seen=_signature(path))
        try:
            if scan:
                digest = hashlib.sha256()
                with open(tmp, "xb") as f_out:
                    out = SyncBehind(f_out)  # keep() fsyncs it: most of it is on disk by then
                    pack = None if info.compressed else zstandard.ZstdCompressor(level=3).compressobj()

                    def sink(chunk: bytes) -> None:
                        digest.update(chunk)
                        out.write(chunk if pack is None else pack.compress(chunk))

                    try:
                        got.proven_end = file_span(path, schema, clock, tee=sink)[1]
                        if pack is not None:
                            out.write(pack.flush())
                    finally:
                        out.wait()
                got._name(digest.hexdigest())
            else:  # compressed: copied as it is, and hashed, both beside the run
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                copying = threading.Thread(target=got._copy, args=(fd,), name="input-copy")
                copying.start()
                got._copying = copying  # set once started: drop() joins it
                hashing = threading.Thread(target=got._hash, name="input-hash")
                hashing.start()
                got._hashing = hashing
        except BaseException:
            got.drop()  # stops and joins what started, removes the temp file
            raise
        return got

    def _hash(self) -> None:
        """Name the file by its content (hashlib lets go of the GIL for each piece)."""
        digest = hashlib.sha256()
        try:
            with open(self.path, "rb") as f:
                while chunk := f.read(_READ):
                    if self._stop.is_set():
                        return  # dropped: a part of the file must never name it
                    digest.update(chunk)
                    self.size += len(chunk)
        except BaseException as e:  # reported by rel (the keep job, or whoever asks)
            self._hash_error.append(e)
            return
        self._name(digest.hexdigest())

    def _copy(self, fd: int) -> None:
        try:
            copy_bytes(self.path, fd, self._stop)
        except BaseException as e:  # reported by wait_archived (or dropped with the copy)
            self._error.append(e)
        finally:
            os.close(fd)

    def keep(self, raw: Path) -> None:
        """Finish the copy into the raw archive on a helper thread, under its name once the
        hash is done (a later rebuild reads it there); :func:`wait_archived` waits for it and
        :func:`archived_source` then gives its name."""
        copying = self._copying
        job = _Job(self.path)
        with _LOCK:
            _DONE.pop(self.path, None)  # an earlier plan's copy of this file is not this one's
            _SEEN[self.path] = self._seen

        def finish() -> None:
            try:
                job.dest = dest = raw / self.rel
                if dest.is_file():  # archived by an earlier run: this copy is not needed
                    self._stop.set()
                if copying is not None:
                    copying.join()
                if not dest.is_file():
                    if self._error:
                        raise self._error[0]
                    if copying is not None and self.tmp.stat().st_size != self.size:
                        raise StoreError(f"{self.path} changed while it was read")
                    replace_file(self.tmp, dest)
                    job.made = True
                job.rel = self.rel
            finally:
                if job.rel is None:  # failed (the hash too): no copy left running
                    self._stop.set()
                    if copying is not None:
                        copying.join()
                self.tmp.unlink(missing_ok=True)

        job.start(finish)
        self._copying, self._kept = None, True  # the job owns the temp file now

    def drop(self) -> None:
        """Stop and remove a copy that is not kept (after keep(): nothing to do)."""
        if self._kept:
            return
        self._stop.set()
        for thread in (self._copying, self._hashing):
            if thread is not None:
                thread.join()
        self._copying = self._hashing = None
        self.tmp.unlink(missing_ok=True)


class _Job:
    """An input's copy being finished into the archive on its own thread; its name (once
    archived) or its error kept for the waiter."""

    def __init__(self, source: Path):
        self.source = source  # the user's file
        self.dest: Path | None = None  # in the archive, once hashed
        self.rel: str | None = None  # set once archived
        self.made = False  # this job put the copy there (not an earlier run)
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self, work: Callable[[], None]) -> None:
        def run() -> None:
            try:
                work()
            except BaseException as e:
                self.error = e

        self.thread = threading.Thread(target=run, name="input-keep")
        with _LOCK:
            _PENDING[self.source] = self
        self.thread.start()


#: The user's file -> its copy's job, until a wait saw it end; then the job done (its name:
#: archived_source; its copy: discard_archived), and what planning found of the file
#: (check_unchanged)
_PENDING: dict[Path, _Job] = {}
_DONE: dict[Path, _Job] = {}
_SEEN: dict[Path, tuple[int, ...] | None] = {}
_LOCK = threading.Lock()


def wait_archived(paths: list[Path] | None = None, check: bool = True) -> None:
    """Return once the archive copies of the user's files ``paths`` (default: every copy
    this process started) are on disk under their names; raise StoreError naming the first
    that failed (unless not ``check``: a run ending anyway lets no copy outlive it, and no
    ledger names a failed one)."""
    with _LOCK:
        jobs = [j for p, j in _PENDING.items() if paths is None or p in paths]
    for job in jobs:
        assert job.thread is not None
        job.thread.join()
        with _LOCK:
            if _PENDING.get(job.source) is job:
                del _PENDING[job.source]
            _DONE[job.source] = job
        if job.error is not None and check:
            why = getattr(job.error, "strerror", None) or job.error
            where = job.dest or f"for {job.source}"
            raise StoreError(f"cannot keep a copy of the input in the raw archive ({where}): {why}")


def discard_archived(path: Path) -> None:
    """Remove the archive copy this process made of the user's file ``path``, whose run
    found its records damaged: no ledger names it, and a repair that rebuilds a file from
    whatever the archive holds (repair.from_archive) would read it back. A copy an earlier
    run archived is left alone."""
    wait_archived([path], check=False)
    with _LOCK:
        job = _DONE.pop(path, None)
    if job is not None and job.made and job.dest is not None:
        job.dest.unlink(missing_ok=True)


def discard_archived_copy(copy: Path) -> None:
    """:func:`discard_archived` named by the copy in the archive rather than by the user's
    file: a cluster's workers read the copy, and report it damaged to the submitter, the
    process that made it (a copy it did not make is left alone)."""
    copy = copy.resolve()
    with _LOCK:
        source = next((p for p, job in _DONE.items() if job.dest is not None and job.dest.resolve() == copy), None)
    if source is not None:
        discard_archived(source)


def check_unchanged(path: Path) -> None:
    """Raise StoreError if the user's file ``path`` is not the one planning read (its size,
    time or inode): the run read it beside its hash and copy, so its bars may not be the
    archived copy's. A file removed meanwhile passes: what was read stays what it was."""
    with _LOCK:
        seen = _SEEN.get(path)
    if seen is not None and _signature(path) not in (None, seen):
        raise StoreError(f"{path} changed while this run read it (its size, time or inode is not "
                         "what planning found); nothing is recorded for it: run the backfill again, "
                         "then `streambars repair FILE` on the symbol's store file if it was "
                         "rewritten in the middle of the run")


def _signature(path: Path) -> tuple[int, ...] | None:
    """What tells a rewritten file from the one planning read (None: cannot stat it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def archived_source(path: Path) -> str:
    """The ledger source of the user's file ``path``, whose copy :func:`wait_archived` saw
    archived (a programming error otherwise: no ledger may name a copy not on disk)."""
    with _LOCK:
        job = _DONE.get(path)
    rel = job.rel if job is not None else None
    if rel is None:
        raise RuntimeError(f"{path}: no archived copy to name (wait_archived first)")
    return rel

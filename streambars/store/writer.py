"""Appending bars to store files: one SWMR writer per file, idempotent, crash-safe.

The order of one :meth:`BarFileWriter.append` is what makes a crash at any moment harmless:

1. rows above each timeframe's high-water mark are written, then every touched bar dataset
   (and its chunk index) is flushed -- readers see them from here;
2. the high-water marks and meta blobs (engine state, progress) are written and flushed.

So the marks and the engine state never run ahead of the rows. After a crash the rows are
the truth: on the next open the marks are recomputed from them, and re-running the input
from the saved engine state rewrites nothing that is already there.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
from h5py import h5d, h5p, h5s

from ..errors import StoreError
from ..fsio import replace_file
from ..observe import get_logger
from ..records import BAR_DTYPE, TAGGED_BAR_DTYPE, BarBatch
from ..timeframes import Session, Timeframe, parse_timeframe
from ..version import __version__
from .gather import count_tagged, scatter_rows, scatter_tagged
from .layout import (
    BARS,
    FILE_SPACE,
    HWM,
    INDEX,
    LIBVER,
    META,
    META_BLOBS,
    check_contract,
    create_layout,
    file_path,
    file_space,
    file_timeframes,
    read_blob,
    remove_stale_temps,
    temp_path,
    timeframe_name,
    write_blob,
)
from .lock import FileLock
from .probe import check_writable
from .recovery import clear_open_flags, repair_contents
from .rowio import RowIO, write_rows

log = get_logger("streambars.store")


def as_timeframes(timeframes: Sequence[Timeframe | str]) -> tuple[Timeframe, ...]:
    """Timeframe objects in the order given (strings parsed)."""
    return tuple(tf if isinstance(tf, Timeframe) else parse_timeframe(tf) for tf in timeframes)


def _bar_offset(dtype: np.dtype) -> int | None:
    """Byte offset at which ``dtype`` holds BAR_DTYPE's fields packed exactly as BAR_DTYPE does
    (e.g. 8 in TAGGED_BAR_DTYPE), or None when it does not."""
    fields = dtype.fields
    if not fields:
        return None
    base: int | None = None
    for name, (bar_type, bar_off, *_) in BAR_DTYPE.fields.items():
        got = fields.get(name)
        if got is None or got[0] != bar_type:
            return None
        if base is None:
            base = got[1] - bar_off
        elif got[1] - bar_off != base:
            return None
    assert base is not None
    return base if base >= 0 and base + BAR_DTYPE.itemsize <= dtype.itemsize else None


def bar_bytes(arr: np.ndarray) -> np.ndarray | None:
    """The BAR_DTYPE part of each row of ``arr`` as an opaque ``V52`` array (a strided view,
    no copy), or None when ``arr``'s dtype does not hold those fields at one fixed offset.
    Copying (or ``np.take``-ing) void items is a plain memcpy per row, several times faster
    than numpy's structured-array copies; ``.view(BAR_DTYPE)`` of a contiguous result is free."""
    base = _bar_offset(arr.dtype)
    if base is None or arr.ndim != 1:
        return None
    arr = np.ascontiguousarray(arr)
    return np.ndarray(arr.shape, np.dtype((np.void, BAR_DTYPE.itemsize)), buffer=arr,
                      offset=base, strides=(arr.dtype.itemsize,))


def as_bars(arr: np.ndarray, what: str) -> np.ndarray:
    """``arr`` as a contiguous BAR_DTYPE array (fields picked by name from a wider dtype)."""
    arr = np.asarray(arr)
    if arr.dtype == BAR_DTYPE:
        return np.ascontiguousarray(arr)
    raw = bar_bytes(arr)
    if raw is not None:
        return raw.copy().view(BAR_DTYPE)
    names = arr.dtype.names or ()
    missing = [n for n in BAR_DTYPE.names if n not in names]
    if missing:
        raise StoreError(f"{what}: bars lack the fields {', '.join(missing)} (need {BAR_DTYPE.names})")
    out = np.empty(arr.shape[0], BAR_DTYPE)
    for n in BAR_DTYPE.names:
        out[n] = arr[n]
    return out


def _oserror_text(e: BaseException) -> str:
    """One short line for an HDF5/OS error: 'Can't synchronously write data: File too large (errno 27)'."""
    text = " ".join(str(e).split())
    cause = re.search(r"error message = '([^']*)'", text)
    if cause:
        number = re.search(r"errno = (\d+)", text)
        what = re.sub(r"^\[Errno \d+\]\s*", "", text.split(" (", 1)[0])
        return f"{what}: {cause.group(1)}" + (f" (errno {number.group(1)})" if number else "")
    return text if len(text) < 300 else text[:300] + "..."


def writer_chunk_cache_bytes(chunk_rows: int) -> int:
    """HDF5's chunk cache for the datasets a writer opens by default: two of the largest
    chunks (the finest timeframe's, ``chunk_rows`` bars); :func:`_with_small_cache` narrows
    it to two of each dataset's own chunks. Appends only touch the last chunk, so that is all
    a writer needs. HDF5's default (1 MiB per dataset; 32 datasets a file with 16 timeframes
    and their indexes) filled up as the coarse datasets grew: a year's backfill of three
    symbols ended ~170 MB bigger than its first month."""
    return 2 * max(int(chunk_rows), 1) * BAR_DTYPE.itemsize


def _with_small_cache(f: h5py.File, name: str, bulk: bool = False) -> h5py.Dataset:
    """``f[name]`` reopened with a chunk cache of two of its own chunks (see above), or with
    none for a ``bulk`` writer: its slabs' whole chunks then go from the caller's rows to the
    file without a copy through the cache, and the part-filled chunk a slab ends in is read
    back by the next slab (measured on a year of backfill: append CPU 1.18-1.33 s against
    1.33-1.53 s, three interleaved pairs). A writer of a few rows at a time (the daemon)
    keeps the cache: without it every append would read its chunk back."""
    ds = f[name]
    if not ds.chunks:
        return ds
    dapl = h5p.create(h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(521, 0 if bulk else 2 * ds.chunks[0] * ds.dtype.itemsize, 1.0)
    return h5py.Dataset(h5d.open(f.id, name.encode(), dapl))


class BarFileWriter:
    """The one writer of ``<root>/<dataset>/<symbol>.h5`` (created with every timeframe)."""

    def __init__(
        self,
        root: Path | str,
        dataset: str,
        symbol: str,
        *,
        stype: str,
        timeframes: Sequence[Timeframe | str],
        session: Session,
        chunk_rows: int = 4096,
        owner: str | None = None,
        bulk: bool = False,
    ):
        self.path = file_path(root, dataset, symbol)
        self.bulk = bulk  # appends of large slabs (backfill): no chunk cache, see _with_small_cache
        self.dataset, self.symbol, self.stype = dataset, symbol, stype
        self.session = session
        self.chunk_rows = int(chunk_rows)
        tfs = as_timeframes(timeframes)
        if not tfs:
            raise StoreError(f"{self.path}: no timeframes to write")
        self._requested = tuple(sorted(set(tfs)))
        self._lock = FileLock(self.path, owner)
        self._f: h5py.File | None = None
        self._failed: str | None = None
        try:
            self._open()
        except BaseException:
            self._abandon()
            raise

    # -- opening -----------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the store directory {self.path.parent}: {e.strerror}") from e
        self._lock.acquire()
        for stale in remove_stale_temps(self.path):
            log.info("store.removed_stale_temp", path=str(stale), why="left by a killed process")
        self._open_file()

    def _open_file(self) -> None:
        """Open (creating if need be) the file under the lock we hold."""
        # A file made just now under our lock is known to be whole, empty and uncompressed:
        # skipping the checks below saves ~15 ms of the ~55 ms a new file costs.
        created = not self.path.exists()
        if created:
            self._create()
        else:
            # Repair only what a crash leaves; anything else is refused before a byte changes.
            check_writable(self.path)
        clear_open_flags(self.path)
        compressed, space = (False, FILE_SPACE) if created else _existing_layout(self.path)
        if compressed:
            from .compact import rewrite_file

            log.warning("store.decompressing", path=str(self.path),
                        why="a compacted file is being appended to again; compressed chunks "
                        "flushed every batch under SWMR would leak space")
            rewrite_file(self.path, compression=None)
        if not space:
            log.info("store.made_before_page_alignment", path=str(self.path),
                     note="appended as it was made (HDF5's default placement): a kill -9 mid-flush "
                     "can tear its metadata; `streambars repair FILE` rebuilds it in today's layout")
        try:
            f = h5py.File(self.path, "r+", libver=LIBVER, locking=False,
                          rdcc_nbytes=0 if self.bulk else writer_chunk_cache_bytes(self.chunk_rows), **space)
        except OSError as e:
            hint = ""
            if "already open for read-only" in str(e):
                hint = (" (a StoreReader in this process has it open: HDF5 lets one process hold a"
                        " file either for reading or for writing; close it, or read from another process)")
            raise StoreError(f"cannot open {self.path} for writing: {_oserror_text(e)}{hint}") from e
        self._f = f
        check_contract(f, self.path, dataset=self.dataset, symbol=self.symbol, stype=self.stype,
                       timeframes=self._requested, session=self.session)
        try:
            self.timeframes = file_timeframes(f)
            self._hwm = {n: -1 for n in self.timeframes} if created else repair_contents(f, self.path)
            self._bars = {n: _with_small_cache(f, f"{BARS}/{n}", self.bulk) for n in self.timeframes}
            self._io = {n: RowIO(ds) for n, ds in self._bars.items()}
            self._rows = {n: int(ds.shape[0]) for n, ds in self._bars.items()}
            self._index = {n: _with_small_cache(f, f"{INDEX}/{n}", self.bulk) for n in self.timeframes}
            self._index_len = {n: int(ds.shape[0]) for n, ds in self._index.items()}
            self._stride = {n: int(ds.attrs["index_stride"]) for n, ds in self._bars.items()}
            self._hwm_ds = f[HWM]
            self._blobs = {n: f[f"{META}/{n}"] for n in META_BLOBS if f"{META}/{n}" in f}
            self._seq = {n: read_blob(ds)[0] for n, ds in self._blobs.items()}
            f.swmr_mode = True
        except (OSError, RuntimeError) as e:
            raise StoreError(f"cannot prepare {self.path} for appending: {_oserror_text(e)}") from e

    def _create(self) -> None:
        """Build the whole layout in a temporary file, then rename it into place: a crash
        while creating never leaves a half-made file under the real name."""
        tmp = temp_path(self.path, "creating")
        try:
            with h5py.File(tmp, "w", libver=LIBVER, locking=False, **FILE_SPACE) as f:
                create_layout(
                    f, dataset=self.dataset, symbol=self.symbol, stype=self.stype,
                    timeframes=self._requested, session=self.session,
                    chunk_rows=self.chunk_rows, created_by=f"streambars {__version__}",
                )
            replace_file(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot create {self.path}: {_oserror_text(e)}") from e
        log.info("store.created", path=str(self.path), timeframes=[t.name for t in self._requested])

    # -- writing -----------------------------------------------------------------------

    def append(
        self, bars_by_tf: Mapping[str | Timeframe, np.ndarray], meta: Mapping[str, bytes] | None = None,
        *, increasing: bool = False,
    ) -> dict[str, int]:
        """Write the rows above each timeframe's high-water mark, then the meta blobs; flush.

        Rows must be in increasing ``ts_event`` order per timeframe (``increasing``: the caller
        has checked that already, as the writer set's grouping does while it copies the rows,
        so it is not checked again here). Returns rows written per
        timeframe given. Raises StoreError (naming the file) if the write fails; the rows of
        this call are then not visible, earlier rows stay intact, and this writer refuses
        further appends (open a new one: it repairs what the failure left)."""
        self._usable()
        plan: list[tuple[str, np.ndarray]] = []
        written: dict[str, int] = {}
        for key, arr in bars_by_tf.items():
            name = key if isinstance(key, str) and key in self._bars else timeframe_name(key)
            if name not in self._bars:
                raise StoreError(f"{self.path} has no timeframe {name} (it has {', '.join(self.timeframes)})")
            rows = as_bars(arr, f"{self.path} {name}")
            ts = rows["ts_event"]
            if not increasing and ts.size > 1 and not bool(np.all(ts[1:] > ts[:-1])):
                bad = int(np.flatnonzero(ts[1:] <= ts[:-1])[0]) + 1
                raise StoreError(f"{self.path} {name}: ts_event not increasing at row {bad} ({int(ts[bad])})")
            hwm = self._hwm[name]
            # The usual case is all new; searchsorted would first copy the strided column.
            new = rows if not ts.size or ts[0] > hwm else rows[int(np.searchsorted(ts, hwm, side="right")):]
            written[name] = int(new.shape[0])
            if new.shape[0]:
                plan.append((name, new))
        blobs = self._check_meta(meta)
        if not plan and not blobs:
            return written
        old: dict[str, int] = {}
        touched_index: list[str] = []
        try:
            for name, new in plan:
                n = old[name] = self._rows[name]
                self._bars[name].id.set_extent((n + new.shape[0],))
                self._rows[name] = n + new.shape[0]
                self._io[name].write(n, new)
                if self._index_rows(name, n, new):
                    touched_index.append(name)
            for name, _ in plan:
                self._bars[name].flush()
            for name in touched_index:
                self._index[name].flush()
        except Exception as e:
            self._fail(e, old)
        for name, new in plan:
            self._hwm[name] = int(new["ts_event"][-1])
        try:
            if plan:
                marks = np.array([self._hwm[n] for n in self.timeframes], dtype="<i8")
                self._hwm_ds.id.write(h5s.ALL, h5s.ALL, marks)
                self._hwm_ds.flush()
            for name, payload in blobs.items():
                self._seq[name] += 1
                write_blob(self._blobs[name], self._seq[name], payload)
                self._blobs[name].flush()
        except Exception as e:
            self._fail(e, {})
        return written

    def _index_rows(self, name: str, n: int, new: np.ndarray) -> bool:
        """Record the ts_event of every row that starts a chunk (rows k * stride)."""
        stride = self._stride[name]
        first = -(-n // stride)
        last = (n + new.shape[0] - 1) // stride
        if last < first:
            return False
        idx = self._index[name]
        if self._index_len[name] < last + 1:
            idx.id.set_extent((last + 1,))
            self._index_len[name] = last + 1
        write_rows(idx, first, new["ts_event"][first * stride - n :: stride][: last + 1 - first])
        return True

    def _check_meta(self, meta: Mapping[str, bytes] | None) -> dict[str, bytes]:
        if not meta:
            return {}
        out = {}
        for name, payload in meta.items():
            if name not in self._blobs:
                raise StoreError(f"{self.path}: no meta blob {name!r} (have {', '.join(self._blobs)})")
            if not isinstance(payload, bytes | bytearray | memoryview):
                raise StoreError(f"{self.path}: meta {name!r} must be bytes, not {type(payload).__name__}")
            out[name] = bytes(payload)
        return out

    def _fail(self, e: Exception, old_sizes: dict[str, int]) -> None:
        """Hide the rows of the failed call again (best effort), refuse further appends."""
        for name, n in old_sizes.items():
            self._rows[name] = n
            with contextlib.suppress(Exception):
                self._bars[name].resize((n,))
                self._bars[name].flush()
        self._failed = _oserror_text(e)
        raise StoreError(
            f"writing {self.path} failed: {self._failed}. Rows written before this batch are "
            "intact and readable; open a new writer to continue (it repairs the file)."
        ) from e

    def _usable(self) -> None:
        if self._f is None:
            raise StoreError(f"the writer of {self.path} is closed")
        if self._failed is not None:
            raise StoreError(f"the writer of {self.path} failed earlier ({self._failed}); open a new one")

    # -- state -------------------------------------------------------------------------

    def high_water_marks(self) -> dict[str, int]:
        """Last ts_event written per timeframe (-1 when the timeframe has no rows)."""
        return dict(self._hwm)

    def read_meta(self, name: str) -> bytes | None:
        """The newest intact payload of meta blob ``name`` (None if never written)."""
        self._usable()
        if name not in self._blobs:
            raise StoreError(f"{self.path}: no meta blob {name!r} (have {', '.join(self._blobs)})")
        return read_blob(self._blobs[name])[1]

    def rows(self, timeframe: str | Timeframe) -> int:
        """Rows stored for a timeframe."""
        return self._rows[timeframe_name(timeframe)]

    def replace_contents(self, built: Path) -> None:
        """Make the whole file ``built`` (a finished store file for the same symbol, e.g. a
        rebuild merging earlier history) this file, atomically, without letting go of the lock.

        Readers that hold the old file open keep reading it whole; one that opens afresh sees
        the new one (``StoreReader.refresh`` follows the new inode)."""
        self._usable()
        f, self._f = self._f, None
        try:
            f.close()
            replace_file(built, self.path)
        except OSError as e:
            self._failed = _oserror_text(e)
            raise StoreError(f"cannot replace {self.path} with {built}: {self._failed}") from e
        self._open_file()

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the file (clears its open-for-write mark), release the lock."""
        f, self._f = self._f, None
        try:
            if f is not None:
                try:
                    f.close()
                except Exception as e:
                    if self._failed is None:
                        raise StoreError(f"closing {self.path} failed: {_oserror_text(e)}") from e
        finally:
            self._lock.release()

    def _abandon(self) -> None:
        with contextlib.suppress(Exception):
            if self._f is not None:
                self._f.close()
        self._f = None
        self._lock.release()

    def __enter__(self) -> BarFileWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()

    def __repr__(self) -> str:
        state = "closed" if self._f is None else ("failed" if self._failed else "open")
        return f"<BarFileWriter {self.path} {state}>"


#: StoreWriterSet keeps its gather buffer for batches up to this many rows (52 MB).
_GATHER_KEEP_ROWS = 1 << 20


class StoreWriterSet:
    """Writers for every symbol of one dataset, opened on first use; routes tagged bars."""

    def __init__(
        self,
        root: Path | str,
        dataset: str,
        stype: str,
        timeframes: Sequence[Timeframe | str],
        session: Session,
        *,
        chunk_rows: int = 4096,
        owner: str | None = None,
        coalesce_rows: int = 0,
    ):
        self.root = Path(root)
        self.dataset, self.stype, self.session = dataset, stype, session
        #: In the aggregator's order: a tagged bar's ``timeframe`` field indexes this tuple.
        self.timeframes = as_timeframes(timeframes)
        self.chunk_rows, self.owner = chunk_rows, owner
        self._writers: dict[str, BarFileWriter] = {}
        self._gather = np.empty(0, np.dtype((np.void, BAR_DTYPE.itemsize)))
        #: Bulk mode (backfill): bars are held back until this many are pending, a write
        #: carries meta (a checkpoint), or :meth:`flush` -- then every file gets one append,
        #: one slab per timeframe. 0 (the daemon): every write is appended and flushed at once.
        self.coalesce_rows = int(coalesce_rows)
        self._pending: list[np.ndarray] = []  # the queue: the callers' TAGGED_BAR_DTYPE arrays
        self._pending_counts: list[np.ndarray | None] = []  # and their BarBatch.counts
        self._pending_rows = 0
        self._pending_names: Sequence[str] = ()

    def writer(self, symbol: str) -> BarFileWriter:
        w = self._writers.get(symbol)
        if w is None:
            w = self._writers[symbol] = BarFileWriter(
                self.root, self.dataset, symbol, stype=self.stype, timeframes=self.timeframes,
                session=self.session, chunk_rows=self.chunk_rows, owner=self.owner,
                bulk=self.coalesce_rows > 0,
            )
        return w

    def existing(self, symbol: str) -> BarFileWriter | None:
        """The writer of ``symbol``'s file if that file exists (opened and locked), else None:
        planning reads what a file holds without creating one."""
        if symbol in self._writers or file_path(self.root, self.dataset, symbol).exists():
            return self.writer(symbol)
        return None

    @property
    def symbols(self) -> list[str]:
        return list(self._writers)

    def write(
        self,
        bar_batch: BarBatch | np.ndarray,
        series_names: Sequence[str],
        meta_by_symbol: Mapping[str, Mapping[str, bytes]] | None = None,
    ) -> int:
        """Append tagged bars (series, timeframe, bar...) to their files; returns rows written.

        With ``coalesce_rows`` the bars may only be queued (0 returned): the array itself is
        kept, not a copy of it (the engine hands over a fresh array per batch), so the caller
        must not modify it after. They are written, in order and before any meta, by a later
        write that fills the queue or carries meta, or by :meth:`flush`. A meta blob is thus
        never written ahead of the bars that came before it (rows -> marks -> state), and a
        crash loses at most queued bars, which the saved engine state has not counted yet."""
        bars = bar_batch.bars if isinstance(bar_batch, BarBatch) else np.asarray(bar_batch)
        counts = bar_batch.counts if isinstance(bar_batch, BarBatch) else None
        meta_by_symbol = meta_by_symbol or {}
        if self.coalesce_rows > 0:
            n = int(bars.shape[0])
            if n and (bars.dtype != TAGGED_BAR_DTYPE or n > _GATHER_KEEP_ROWS):  # not queued
                return self.flush() + self._write_now([bars], [counts], series_names, meta_by_symbol)
            self._queue(bars, counts, series_names)
            if not meta_by_symbol and self._pending_rows < self.coalesce_rows:
                return 0
            return self._write_now(*self._take_pending(), series_names, meta_by_symbol)
        return self._write_now([bars], [counts], series_names, meta_by_symbol)

    def hold(self, bar_batch: BarBatch, series_names: Sequence[str]) -> bool:
        """Queue ``bar_batch`` exactly as :meth:`write` would when queueing is all it would
        do (coalescing on, a contiguous tagged array, the queue still short of a slab): True
        when held. A few microseconds, so the pipeline's event loop does it itself and sends
        only real writes to a worker thread (a thread hop per engine batch cost the write
        stage ~0.7 s of idle gaps a symbol-year while it was the pipeline's bottleneck)."""
        bars = bar_batch.bars
        n = int(bars.shape[0])
        if (self.coalesce_rows <= 0 or bars.dtype != TAGGED_BAR_DTYPE or not bars.flags.c_contiguous
                or n > _GATHER_KEEP_ROWS or self._pending_rows + n >= self.coalesce_rows):
            return False
        self._queue(bars, bar_batch.counts, series_names)
        return True

    def _queue(self, bars: np.ndarray, counts: np.ndarray | None, series_names: Sequence[str]) -> None:
        if bars.shape[0]:
            self._pending.append(np.ascontiguousarray(bars))
            self._pending_counts.append(counts)
            self._pending_rows += int(bars.shape[0])
        self._pending_names = series_names

    def _write_now(
        self, arrays: list[np.ndarray], counts: list[np.ndarray | None], series_names: Sequence[str],
        meta_by_symbol: Mapping[str, Mapping[str, bytes]],
    ) -> int:
        """Group the bars of ``arrays`` (in order; ``counts``: their BarBatch.counts) by file
        and timeframe; one append a file."""
        grouped: dict[str, dict[str, np.ndarray]] = {}
        counts = [c for a, c in zip(arrays, counts, strict=True) if a.shape[0]]
        arrays = [a for a in arrays if a.shape[0]]
        ntf, nseries = len(self.timeframes), len(series_names)
        fast = self._group_tagged(arrays, counts, ntf, nseries) if arrays else None
        increasing = fast is not None and fast[1]
        if fast is not None:
            for k, rows in fast[0]:
                grouped.setdefault(series_names[k // ntf], {})[self.timeframes[k % ntf].name] = rows
        elif arrays:
            bars = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            # Contiguous copies of the two tags: reductions and arithmetic on strided fields of
            # a 60-byte record cost several times more than the copy.
            series = np.ascontiguousarray(bars["series"])
            tfi = np.ascontiguousarray(bars["timeframe"])
            if series.min() < 0 or series.max() >= nseries or tfi.min() < 0 or tfi.max() >= ntf:
                self._bad_tags(nseries)
            key = series.astype(np.int64) * ntf + tfi if nseries > 1 else tfi
            for k, rows in self._group_rows(bars, key, nseries * ntf):
                symbol = series_names[k // ntf]
                grouped.setdefault(symbol, {})[self.timeframes[k % ntf].name] = rows
        total = 0
        for symbol in list(grouped) + [s for s in meta_by_symbol if s not in grouped]:
            counts = self.writer(symbol).append(grouped.get(symbol, {}), meta=meta_by_symbol.get(symbol),
                                                increasing=increasing)
            total += sum(counts.values())
        return total

    def flush(self) -> int:
        """Write every bar queued by coalescing; returns rows written (0 when none)."""
        if not self._pending_rows:
            return 0
        names = self._pending_names
        return self._write_now(*self._take_pending(), names, {})

    def _take_pending(self) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """The queued arrays and their counts, in order; the queue is emptied."""
        arrays, counts = self._pending, self._pending_counts
        self._pending, self._pending_counts, self._pending_rows = [], [], 0
        return arrays, counts

    def _bad_tags(self, nseries: int) -> None:
        raise StoreError(
            f"bars tagged with series/timeframe outside the {nseries} symbols "
            f"and {len(self.timeframes)} timeframes this writer set knows"
        )

    def _group_tagged(
        self, arrays: list[np.ndarray], given: list[np.ndarray | None], ntf: int, nseries: int
    ) -> tuple[list[tuple[int, np.ndarray]], bool] | None:
        """The engine's arrays grouped by key (series * ntf + timeframe) into the reused
        gather buffer without the GIL (store.gather): ``([(key, BAR_DTYPE rows), ...] by
        ascending key, every group's ts_event increasing)``; None when the arrays are not
        contiguous TAGGED_BAR_DTYPE or too many rows to keep a buffer for (general path).
        The rows per key are the arrays' ``given`` counts when each has them (counted by the
        pipeline while the bars were in cache), else counted here."""
        if any(a.dtype != TAGGED_BAR_DTYPE or not a.flags.c_contiguous for a in arrays):
            return None
        n = sum(int(a.shape[0]) for a in arrays)
        if n > _GATHER_KEEP_ROWS:
            return None
        counts = _sum_counts(given, nseries, ntf)
        if counts is None:
            counts = count_tagged(arrays, ntf, nseries)
        if counts is None:
            self._bad_tags(nseries)
        assert counts is not None
        out = self._gather_rows(n)
        increasing = scatter_tagged(arrays, ntf, counts, out)
        return _split(out.view(BAR_DTYPE), counts, np.flatnonzero(counts)), increasing

    def _gather_rows(self, n: int) -> np.ndarray:
        """The first ``n`` items of the gather buffer reused from call to call (grown first
        if it is smaller)."""
        if self._gather.shape[0] < n:
            self._gather = np.empty(n, self._gather.dtype)
        return self._gather[:n]

    def _group_rows(self, bars: np.ndarray, key: np.ndarray, nkeys: int) -> list[tuple[int, np.ndarray]]:
        """Split ``bars`` by ``key`` (0 <= key < nkeys), keeping each group's rows in their
        order: ``[(key, contiguous BAR_DTYPE rows), ...]`` by ascending key.

        One stable argsort of the small integer key (a radix sort when it fits 16 bits), then
        one gather of every row's bar bytes into a buffer reused from call to call, so each
        group is a slice of it: no structured fancy-indexing and field-by-field conversion per
        group, no fresh pages touched per batch. The slices are valid until the next call
        (append() has written them by then)."""
        counts = np.bincount(key, minlength=nkeys)
        keys = np.flatnonzero(counts)
        if keys.size == 1:
            return [(int(keys[0]), as_bars(bars, "tagged bars"))]
        n = bars.shape[0]
        offset = _bar_offset(bars.dtype)
        if offset is not None and n <= _GATHER_KEEP_ROWS:
            out = self._gather_rows(n)
            if scatter_rows(bars, offset, key, counts, out):
                return _split(out.view(BAR_DTYPE), counts, keys)
        order = np.argsort(key.astype(np.uint16) if nkeys <= 1 << 16 else key, kind="stable")
        raw = bar_bytes(bars)
        if raw is None:
            rows = as_bars(bars, "tagged bars")[order]
        elif n > _GATHER_KEEP_ROWS:  # a rare huge batch: do not keep its buffer alive
            rows = np.take(raw, order).view(BAR_DTYPE)
        else:
            # mode="clip": with out= and the default mode numpy gathers into a temporary first.
            rows = np.take(raw, order, out=self._gather_rows(n), mode="clip").view(BAR_DTYPE)
        return _split(rows, counts, keys)

    def close_all(self) -> None:
        """Close every writer (all are attempted; the first failure is raised after)."""
        first: BaseException | None = None
        writers, self._writers = self._writers, {}
        for w in writers.values():
            try:
                w.close()
            except BaseException as e:  # noqa: BLE001 - close the others first
                first = first or e
        if first is not None:
            raise first

    close = close_all

    def __enter__(self) -> StoreWriterSet:
        return self

    def __exit__(self, *_: object) -> None:
        self.close_all()


def _split(rows: np.ndarray, counts: np.ndarray, keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``rows`` grouped by key in ascending order, ``counts[k]`` rows a key, as
    ``[(key, slice of rows), ...]`` for the ``keys`` with rows."""
    ends = np.cumsum(counts[keys])
    return [(int(k), rows[hi - counts[k] : hi]) for k, hi in zip(keys, ends, strict=True)]


def _sum_counts(given: list[np.ndarray | None], nseries: int, ntf: int) -> np.ndarray | None:
    """The arrays' rows per (series, timeframe) summed, flat by key (series * ntf +
    timeframe), or None when one lacks its counts or counts series or timeframes this writer
    set does not know (the caller then counts, and checks, the tags itself)."""
    total = np.zeros((nseries, ntf), np.int64)
    for c in given:
        if c is None or c.ndim != 2 or c.shape[1] != ntf or c.shape[0] > nseries:
            return None
        total[: c.shape[0]] += c
    return total.ravel()


def _existing_layout(path: Path) -> tuple[bool, dict[str, int]]:
    """(whether a bar dataset is compressed, the placement keywords its writers open it with)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return any(ds.compression is not None for ds in f[BARS].values()), file_space(f)
    except (OSError, KeyError):
        return False, FILE_SPACE  # the open below says what is wrong

"""Telling a damaged store file from a healthy one, quickly and without ever hanging.

Why this exists: a SWMR reader retries a metadata block whose checksum fails up to 100
times, sleeping 1 ns, 2 ns, 4 ns, ... in between -- on a truncated or corrupted file that is
minutes to hours inside one HDF5 call. So:

* every read-only open goes through :func:`open_read`, which caps those retries
  (``H5Pset_metadata_read_attempts``, reached through ctypes: h5py does not wrap it) so a
  bad block fails in about 20 ms, as a non-SWMR open fails at once;
* the superblock is checked in pure Python first (recovery.read_superblock): no signature,
  a cut inside it, a checksum mismatch, or a file *shorter* than its stored end-of-file;
* :func:`check_contents` walks every object, attribute and chunk of a file, so a chunk or
  metadata block past the end of the file, or garbage first/last rows, is named.

A writer must only repair the shapes a crash leaves (see recovery.py), so before it changes
a byte :func:`check_writable` opens the file *as the repair would leave it* -- through an
in-memory overlay of the repaired superblock, read-only -- and refuses anything else.
"""

from __future__ import annotations

import ctypes
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5f, h5p

from ..errors import DamagedFileError
from .layout import BARS, INDEX
from .recovery import Superblock, read_superblock, repaired_superblock

#: Metadata read attempts per block under SWMR (HDF5's default 100 can sleep for hours on a
#: bad block). The sleeps double from 1 ns, so 24 attempts wait ~17 ms in all: ample for a
#: block a live writer is rewriting, short enough that damage is named within a second.
READ_ATTEMPTS = 24

#: A stored bar's ts_event lies strictly between these (1970-01-01 excluded: a zeroed row).
TS_MIN, TS_MAX = 0, 4_102_444_800 * 1_000_000_000  # 2100-01-01

UNTOUCHED = "; the file was left untouched (rebuild it from the raw archive: streambars repair FILE)"

_set_attempts: Callable[[int, int], int] | None | bool = None


def _attempts_setter() -> Callable[[int, int], int] | None:
    """``H5Pset_metadata_read_attempts`` of the libhdf5 h5py is linked with, or None."""
    global _set_attempts
    if _set_attempts is None:
        _set_attempts = False
        try:
            with open("/proc/self/maps") as maps:
                libs = {ln.split()[-1] for ln in maps if "/libhdf5" in ln and "hdf5_hl" not in ln}
            for path in sorted(libs):
                fn = ctypes.CDLL(path).H5Pset_metadata_read_attempts
                fn.argtypes = [ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _set_attempts = fn
                break
        except (OSError, AttributeError):
            _set_attempts = False
    return _set_attempts or None


def _fapl() -> h5p.PropFAID:
    # As h5py's own File() sets it up (HDF5 refuses a second open of a file in one process
    # whose close degree differs), with no file locking and bounded metadata retries.
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_EARLIEST, h5f.LIBVER_LATEST)
    fapl.set_file_locking(False, True)
    setter = _attempts_setter()
    if setter is not None:
        setter(fapl.id, READ_ATTEMPTS)
    return fapl


def open_read(path: Path, swmr: bool = True) -> h5py.File:
    """Read-only h5py.File, no HDF5 file locking, bounded metadata retries (raises OSError)."""
    flags = h5f.ACC_RDONLY | (h5f.ACC_SWMR_READ if swmr else 0)
    fid = h5f.open(os.fsencode(str(path)), flags, fapl=_fapl())
    return h5py.File(fid)


def hdf5_reason(e: BaseException) -> str:
    """The useful part of an HDF5 error: 'truncated file: eof = 549789, ...'."""
    text = " ".join(str(e).split())
    if "(" in text and text.endswith(")"):
        inner = text[text.index("(") + 1 : -1]
        return inner or text
    return text or type(e).__name__


def short_text(sb: Superblock, size: int) -> str | None:
    """'truncated: ...' when the file is shorter than its stored end-of-file, else None."""
    stored = sb.base + sb.eoa
    if size >= stored:
        return None
    return f"truncated: the file is {size:,} bytes, its superblock says {stored:,} (stored end of file)"


# -- contents ---------------------------------------------------------------------------


def first_bad_row(ts: np.ndarray, before: int = TS_MIN, ordered: bool = True) -> int | None:
    """Index of the first ts_event that cannot be a stored bar's -- outside 1970..2100 (a
    zeroed or scrambled row) or, when ``ordered``, not after the previous one -- else None."""
    if ts.size == 0:
        return None
    bad_value = (ts <= TS_MIN) | (ts >= TS_MAX)
    if ordered:
        prev = np.empty_like(ts)
        prev[0] = before
        prev[1:] = ts[:-1]
        bad_value |= ts <= prev
    bad = np.flatnonzero(bad_value)
    return int(bad[0]) if bad.size else None


def unwritten_tail(ds: h5py.Dataset, n: int, stride: int, crashed: bool) -> int:
    """How many rows at the end were never written: all-zero rows (HDF5's fill value: the
    dataset was extended, the rows never reached the disk) and, in a file a writer left
    open (``crashed``), also torn rows (count 0 or ts not increasing), exactly the rows
    recovery.repair_contents trims. Anything else at the end is not the crash shape."""
    from .recovery import _valid_prefix

    keep = n
    while keep > 0:
        lo = max(0, keep - stride)
        block = ds[lo:keep]
        if crashed:
            before = int(ds[lo - 1]["ts_event"]) if lo > 0 else np.iinfo(np.int64).min
            good = _valid_prefix(block["ts_event"], block["count"], before)
        else:
            raw = block.view(np.uint8).reshape(block.shape[0], -1)
            nonzero = np.flatnonzero(raw.any(axis=1))
            good = int(nonzero[-1]) + 1 if nonzero.size else 0
        if good == keep - lo:
            break
        keep = lo + good
        if good > 0:
            break
    return n - keep


def check_contents(f: h5py.File, size: int, crashed: bool, path: Path | None = None) -> str | None:
    """What is wrong with an open store file, or None. Reads every object header, attribute
    and chunk address, and the first and last rows of each bar dataset. ``crashed``: the file
    was left open by a writer, so never-written rows at the end are the crash shape, not
    damage. ``size``: the real file size (nothing may lie past it); ``path``: re-read the
    size from it before calling a chunk past it damage (a live writer keeps appending)."""
    where = "/"
    try:
        list(f.attrs)  # names: the header holding them is checksummed on load
        if BARS not in f:
            return f"not a streambars bar file (no /{BARS} group)"
        names: list[str] = []
        f.visit(names.append)
        for name in names:
            where = name
            obj = f[name]
            list(obj.attrs)
            if isinstance(obj, h5py.Dataset):
                problem = _check_storage(obj, size)
                if problem and path is not None:
                    problem = _check_storage(obj, os.path.getsize(path))
                if problem:
                    return f"{name}: {problem}"
        for tf, ds in f[BARS].items():
            where = f"{BARS}/{tf}"
            problem = _check_rows(f, tf, ds, crashed)
            if problem:
                return f"{BARS}/{tf}: {problem}"
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        return f"unreadable {where}: {hdf5_reason(e)}"
    return None


def _check_storage(ds: h5py.Dataset, size: int) -> str | None:
    if ds.chunks is None:
        off, n = ds.id.get_offset(), ds.id.get_storage_size()
        if off is not None and off + n > size:
            return f"its data at byte {off:,} (+{n}) lies past the end of the file ({size:,} bytes)"
        ds[()]
        return None
    beyond: list[tuple[int, int]] = []

    def seen(info: Any) -> None:
        if info.byte_offset + info.size > size and not beyond:
            beyond.append((info.byte_offset, info.size))

    if ds.id.get_storage_size() or ds.shape[0]:
        if hasattr(ds.id, "chunk_iter"):
            ds.id.chunk_iter(seen)
        else:  # pragma: no cover - h5py < 3.8
            for i in range(ds.id.get_num_chunks()):
                seen(ds.id.get_chunk_info(i))
    if beyond:
        off, n = beyond[0]
        return f"a chunk at byte {off:,} (+{n}) lies past the end of the file ({size:,} bytes)"
    return None


def _check_rows(f: h5py.File, tf: str, ds: h5py.Dataset, crashed: bool) -> str | None:
    n = int(ds.shape[0])
    if n == 0:
        return None
    stride = int(ds.attrs.get("index_stride", 0)) or (ds.chunks[0] if ds.chunks else 4096)
    n -= unwritten_tail(ds, n, stride, crashed)
    if n == 0:
        return None
    # Only impossible times count as damage here: out-of-order or duplicate bars are data
    # defects that `validate` reports by rule.
    t0 = int(ds[0]["ts_event"])
    if not TS_MIN < t0 < TS_MAX:
        return f"row 0 has ts_event {t0} (not a bar time: garbage rows)"
    tail = ds[max(0, n - stride) : n]["ts_event"]
    bad = first_bad_row(tail, TS_MIN, ordered=False)
    if bad is not None:
        return f"row {max(0, n - stride) + bad} has ts_event {int(tail[bad])} (not a bar time: garbage rows)"
    idx = f.get(f"{INDEX}/{tf}")
    if idx is not None and idx.shape[0] and not crashed:  # a live writer may be mid-update
        k = min(idx.shape[0], -(-n // stride)) - 1
        got = idx[[0, k]] if k > 0 else idx[:1]
        want = [t0] + ([int(ds[k * stride]["ts_event"])] if k > 0 else [])
        if [int(x) for x in got] != want:
            return f"the chunk index does not match the rows (index {list(map(int, got))}, rows {want})"
    return None


# -- before a writer touches a file -----------------------------------------------------


class RepairedView(io.RawIOBase):
    """A read-only file object showing ``path`` as recovery.clear_open_flags would leave it:
    the superblock's open marks cleared and its EOA raised, and a file shorter than its EOA
    zero-extended. Opened with h5py's fileobj driver, so nothing is written to disk."""

    def __init__(self, path: Path, sb: Superblock, size: int):
        self._fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._size = size
        self._end = max(size, sb.base + sb.eoa)
        self._patch = repaired_superblock(sb, size) if sb.open_for_write else b""
        self._patch_at = sb.offset
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._end}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._end - self._pos))
        data = os.pread(self._fh.fileno(), n, self._pos) if self._pos < self._size else b""
        view[: len(data)] = data
        view[len(data) : n] = b"\0" * (n - len(data))
        p0, p1 = self._patch_at, self._patch_at + len(self._patch)
        lo, hi = max(p0, self._pos), min(p1, self._pos + n)
        if lo < hi:
            view[lo - self._pos : hi - self._pos] = self._patch[lo - p0 : hi - p0]
        self._pos += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def check_writable(path: Path) -> None:
    """Refuse (DamagedFileError, file untouched) unless ``path`` is healthy or in a shape
    recovery knows: left open by a killed writer (marks set, stale EOA, never-written rows at
    the end) or an interrupted close that could not extend the file to its EOA (disk full)
    with nothing it references in the missing tail. Caller holds the writer lock."""
    try:
        sb = read_superblock(path)
    except DamagedFileError as e:
        raise DamagedFileError(path, e.what, UNTOUCHED) from None
    if sb is None:
        return  # not a v2/v3 superblock: not ours to judge, the open says what it is
    size = os.path.getsize(path)
    short = short_text(sb, size)
    crashed = sb.open_for_write
    view = RepairedView(path, sb, size)
    try:
        try:
            f = h5py.File(view, "r", locking=False)
        except Exception as e:  # noqa: BLE001 - any failure to open is damage
            raise DamagedFileError(path, short or f"unreadable: {hdf5_reason(e)}", UNTOUCHED) from None
        with f:
            problem = check_contents(f, size, crashed)
    finally:
        view.close()
    if problem:
        raise DamagedFileError(path, f"{short}: {problem}" if short else problem, UNTOUCHED)

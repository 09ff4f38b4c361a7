"""Making a file whose writer died usable again, with no person and no h5clear involved.

A SWMR writer marks the superblock "open for write" and does not rewrite the superblock's
end-of-allocation (EOA) while it appends, so after a SIGKILL:

* every later open for write fails ("file is already open for write"), and
* clearing only the flags (``h5clear -s``) leaves the EOA pointing near the start of the file;
  the next writer allocates from there and truncates the file to it on close (measured: a
  700 kB file became 447 bytes).

:func:`clear_open_flags` does what ``h5clear -s -i`` does, in Python: it rewrites the
superblock (version 2/3: the ones SWMR files use) with the flags cleared and the EOA raised
to the real end of the file, then re-computes the superblock checksum (Bob Jenkins' lookup3,
as HDF5's ``H5_checksum_lookup3``). Only call it while holding the file's writer lock.

:func:`repair_contents` then makes the rows, high-water marks and chunk index agree: rows
are the truth (flushed in order before the marks), trailing rows that were never written
(count 0, or not increasing) are dropped, marks and index are recomputed from the rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import DamagedFileError, StoreError
from ..observe import get_logger
from .layout import BARS, HWM, INDEX, LIBVER, file_space_of, file_timeframes

log = get_logger("streambars.store")

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_M32 = 0xFFFFFFFF
FLAG_WRITE, FLAG_SWMR_WRITE = 0x01, 0x04


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``: HDF5's metadata checksum."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _M32
    i = 0
    while n > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _M32
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _M32
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _M32
        a = ((a - c) & _M32) ^ _rot(c, 4)
        c = (c + b) & _M32
        b = ((b - a) & _M32) ^ _rot(a, 6)
        a = (a + c) & _M32
        c = ((c - b) & _M32) ^ _rot(b, 8)
        b = (b + a) & _M32
        a = ((a - c) & _M32) ^ _rot(c, 16)
        c = (c + b) & _M32
        b = ((b - a) & _M32) ^ _rot(a, 19)
        a = (a + c) & _M32
        c = ((c - b) & _M32) ^ _rot(b, 4)
        b = (b + a) & _M32
        i += 12
        n -= 12
    if n == 0:
        return c
    tail = data[i:] + b"\0" * (12 - n)
    a = (a + int.from_bytes(tail[0:4], "little")) & _M32
    b = (b + int.from_bytes(tail[4:8], "little")) & _M32
    c = (c + int.from_bytes(tail[8:12], "little")) & _M32
    c = (((c ^ b) - _rot(b, 14)) & _M32)
    a = (((a ^ c) - _rot(c, 11)) & _M32)
    b = (((b ^ a) - _rot(a, 25)) & _M32)
    c = (((c ^ b) - _rot(b, 16)) & _M32)
    a = (((a ^ c) - _rot(c, 4)) & _M32)
    b = (((b ^ a) - _rot(a, 14)) & _M32)
    c = (((c ^ b) - _rot(b, 24)) & _M32)
    return c


@dataclass(frozen=True)
class Superblock:
    """The fields of a version 2/3 superblock that recovery reads and rewrites."""

    offset: int  # file position of the signature
    version: int
    size_of_offsets: int
    flags: int
    base: int
    eoa: int  # end-of-allocation address, relative to base
    raw: bytes  # the whole superblock, checksum included

    @property
    def open_for_write(self) -> bool:
        return bool(self.flags & (FLAG_WRITE | FLAG_SWMR_WRITE))


def read_superblock(path: Path) -> Superblock | None:
    """The superblock (searched at 0, 512, 1024, 2048, ...); None when it is version 0/1 (a
    foreign file: nothing here applies). Raises DamagedFileError when the file has no HDF5
    signature, is cut inside its superblock, or the superblock checksum fails."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise DamagedFileError(path, "empty file (0 bytes)")
        offset = 0
        while offset + 8 <= size:
            fh.seek(offset)
            head = fh.read(12)
            if head[:8] == SIGNATURE:
                if len(head) < 12:
                    raise DamagedFileError(path, f"truncated: {size} bytes, cut inside the superblock")
                version = head[8]
                if version not in (2, 3):
                    return None
                o = head[9]
                if o not in (2, 4, 8):
                    raise DamagedFileError(path, f"superblock says offsets are {o} bytes")
                raw = head + fh.read(4 * o + 4)
                if len(raw) < 12 + 4 * o + 4:
                    raise DamagedFileError(path, f"truncated: {size} bytes, cut inside the superblock")
                if lookup3(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                    raise DamagedFileError(path, "superblock checksum mismatch")
                fields = [int.from_bytes(raw[12 + k * o : 12 + (k + 1) * o], "little") for k in range(4)]
                return Superblock(offset, version, o, head[11], fields[0], fields[2], raw)
            offset = 512 if offset == 0 else offset * 2
    raise DamagedFileError(path, f"not an HDF5 file (no HDF5 signature in its {size} bytes)")


def repaired_superblock(sb: Superblock, size: int) -> bytes:
    """``sb`` as :func:`clear_open_flags` writes it: open-for-write marks cleared, the EOA
    raised to the end of a ``size``-byte file, checksum recomputed."""
    o = sb.size_of_offsets
    eoa = max(sb.eoa, size - sb.base)
    raw = bytearray(sb.raw)
    raw[11] = 0
    raw[12 + 2 * o : 12 + 3 * o] = eoa.to_bytes(o, "little")
    raw[-4:] = lookup3(bytes(raw[:-4])).to_bytes(4, "little")
    return bytes(raw)


def clear_open_flags(path: Path) -> bool:
    """Repair the superblock of a file a writer did not close; returns True when it had to.

    * Marked open for write (the writer died): clear the marks and raise the EOA to the end
      of the file (``h5clear -s -i``).
    * EOA beyond the end of the file (the writer's close could write the superblock but not
      extend the file, e.g. the disk was full): extend the file with zeros to the EOA, which
      is what that close was doing. Only after :func:`streambars.store.probe.check_writable`
      has shown that nothing the file references lies in that missing tail: a file cut
      short by anything else is damage, and is refused untouched before this is called.

    Caller holds the writer lock."""
    sb = read_superblock(path)
    if sb is None:
        return False
    size = os.path.getsize(path)
    short = sb.base + sb.eoa - size
    if not sb.open_for_write and short <= 0:
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        if sb.open_for_write:
            os.pwrite(fd, repaired_superblock(sb, size), sb.offset)
        else:
            os.ftruncate(fd, sb.base + sb.eoa)
        os.fsync(fd)
    except OSError as e:
        raise StoreError(f"cannot repair {path} (left open by a writer that died): {e.strerror}") from e
    finally:
        os.close(fd)
    log.warning(
        "store.recovered_superblock",
        path=str(path),
        flags=sb.flags,
        eoa=sb.eoa,
        file_size=size,
        note="the previous writer did not close the file cleanly (killed, crashed or disk full); repaired",
    )
    return True


def _valid_prefix(ts: np.ndarray, count: np.ndarray, before: int) -> int:
    """How many leading rows of a tail block are real bars: count >= 1 and ts increasing."""
    ok_count = count > 0
    prev = np.concatenate(([before], ts[:-1]))
    ok = ok_count & (ts > prev)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else ts.size


def repair_contents(f: h5py.File, path: Path) -> dict[str, int]:
    """Make rows, high-water marks and chunk index agree (file open r+, before SWMR).

    Returns the high-water marks (last ts_event per timeframe, -1 when empty)."""
    names = file_timeframes(f)
    stored = f[HWM][...]
    hwms: dict[str, int] = {}
    for i, name in enumerate(names):
        ds = f[f"{BARS}/{name}"]
        stride = int(ds.attrs["index_stride"])
        n = ds.shape[0]
        keep = n
        # Look at the last chunk-sized block (and earlier ones only if it is all garbage).
        while keep > 0:
            lo = max(0, keep - stride)
            block = ds[lo:keep]
            before = int(ds[lo - 1]["ts_event"]) if lo > 0 else np.iinfo(np.int64).min
            good = _valid_prefix(block["ts_event"], block["count"], before)
            if good == keep - lo:
                break
            keep = lo + good
            if good > 0:
                break
        if keep != n:
            log.warning("store.trimmed_unwritten_rows", path=str(path), timeframe=name, rows_before=n, rows_after=keep)
            ds.resize((keep,))
        hwm = int(ds[keep - 1]["ts_event"]) if keep else -1
        if hwm != int(stored[i]):
            log.info("store.high_water_mark_from_rows", path=str(path), timeframe=name, stored=int(stored[i]), rows=hwm)
        hwms[name] = hwm
        _repair_index(f[f"{INDEX}/{name}"], ds, keep, stride)
    marks = np.array([hwms[n] for n in names], dtype="<i8")
    if not np.array_equal(marks, stored):
        f[HWM][...] = marks
    return hwms


def _repair_index(idx: h5py.Dataset, ds: h5py.Dataset, n: int, stride: int) -> None:
    """Index entry k is the ts_event of row k*stride; re-check the last one, fill any missing."""
    need = -(-n // stride)
    have = min(idx.shape[0], need)
    if idx.shape[0] != need:
        idx.resize((need,))
    start = max(0, have - 1)
    if need > start:
        ts = ds.fields("ts_event")[start * stride : n : stride]
        idx[start:need] = ts


def recover_file(path: Path) -> bool:
    """Repair a file left open by a dead writer (flags, EOA, then rows/marks/index).

    Returns True when it had to. Caller holds the writer lock."""
    if not clear_open_flags(path):
        return False
    try:
        space = file_space_of(path)
        with h5py.File(path, "r+", libver=LIBVER, locking=False, **space) as f:
            repair_contents(f, path)
    except OSError as e:
        raise StoreError(f"cannot repair {path}: {e}") from e
    return True

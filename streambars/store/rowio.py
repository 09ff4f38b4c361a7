"""Fast row transfer between BAR_DTYPE arrays and bar datasets.

h5py's ``ds[a:b] = rows`` / ``read_direct`` builds a fresh HDF5 compound memory type for
every call and HDF5 then sets up a struct conversion: measured ~350 us to write one 52-byte
row. Passing the dataset's own file type as the memory type makes the transfer a plain copy
(~50 us for a write + flush, ~70 us to read a 4096-row chunk). Used only when the file type
is exactly BAR_DTYPE's layout; anything else takes h5py's general path.

Whole chunks a write covers go to the file as they are (``H5Dwrite_chunk``) when the dataset
has no filters, so a chunk's bytes are its rows' bytes: no chunk-cache slot, fill, copy,
selection or eviction per chunk (~16-24 us of HDF5 a chunk otherwise; a year of backfill at
16 timeframes writes ~30k chunks). The partial first and last chunk take the normal path.
"""

from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Callable

import h5py
import numpy as np
from h5py import h5s, h5t
from h5py._objects import phil

from ..records import BAR_DTYPE


def _same_layout(ds: h5py.Dataset) -> bool:
    return ds.dtype == BAR_DTYPE and ds.id.get_type().get_size() == BAR_DTYPE.itemsize


def write_rows(ds: h5py.Dataset, start: int, rows: np.ndarray, mtype: h5t.TypeID | None = None) -> None:
    """Write ``rows`` at [start, start + len(rows)) of a 1-d dataset already that long, through
    the low-level API (h5py's ``ds[a:b] = x`` spends ~100 us in Python building selections)."""
    n = rows.shape[0]
    fspace = ds.id.get_space()
    fspace.select_hyperslab((start,), (n,))
    ds.id.write(h5s.create_simple((n,)), fspace, np.ascontiguousarray(rows), mtype=mtype)


def _direct_chunk_rows(ds: h5py.Dataset) -> int:
    """Rows per chunk when whole chunks of ``ds`` may be written as raw bytes (1-d, chunked,
    no filters), else 0."""
    if ds.ndim != 1 or not ds.chunks:
        return 0
    return int(ds.chunks[0]) if ds.id.get_create_plist().get_nfilters() == 0 else 0


@functools.cache
def _write_chunk_nogil() -> Callable[..., int] | None:
    """``H5Dwrite_chunk`` of the libhdf5 h5py runs on, called through ctypes, which lets go
    of the GIL for the call (h5py holds it through every HDF5 call): the chunk's pwrite into
    fresh page-cache pages, most of a chunk's cost, then overlaps the pipeline's other
    Python work. None where that library cannot be found (h5py's call is used instead)."""
    try:
        with open("/proc/self/maps") as maps:
            found = [ln.split()[-1] for ln in maps if re.search(r"/libhdf5(-[0-9a-f]+)?\.so", ln)]
        fn = ctypes.CDLL(found[0]).H5Dwrite_chunk
    except (OSError, IndexError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


class RowIO:
    """Reads and writes rows [lo, hi) of one bar dataset."""

    def __init__(self, ds: h5py.Dataset):
        self.ds = ds
        self._ftype = ds.id.get_type() if _same_layout(ds) else None
        self._chunk = _direct_chunk_rows(ds) if self._ftype is not None else 0

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write rows at [start, start + len(rows)) (the dataset must already be that long)."""
        if self._ftype is None:
            self.ds[start : start + rows.shape[0]] = rows
            return
        c = self._chunk
        end = start + rows.shape[0]
        first, stop = -(-start // c) * c if c else 0, end // c * c if c else 0
        if stop <= first:  # no whole chunk in it
            write_rows(self.ds, start, rows, self._ftype)
            return
        rows = np.ascontiguousarray(rows)
        if first > start:
            write_rows(self.ds, start, rows[: first - start], self._ftype)
        self._write_chunks(rows, start, first, stop)
        if end > stop:
            write_rows(self.ds, stop, rows[stop - start :], self._ftype)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) as a new BAR_DTYPE array."""
        n = max(0, hi - lo)
        out = np.empty(n, dtype=BAR_DTYPE)
        if n == 0:
            return out
        if self._ftype is None:
            out[...] = self.ds[lo:hi]
            return out
        fspace = self.ds.id.get_space()
        fspace.select_hyperslab((lo,), (n,))
        self.ds.id.read(h5s.create_simple((n,)), fspace, out, mtype=self._ftype)
        return out

    def _write_chunks(self, rows: np.ndarray, start: int, first: int, stop: int) -> None:
        """Rows [first, stop) (whole chunks; ``rows`` starts at row ``start``) as raw chunks."""
        c, dsid = self._chunk, self.ds.id
        write = _write_chunk_nogil()
        if write is None:
            for at in range(first, stop, c):
                dsid.write_direct_chunk((at,), rows[at - start : at - start + c])
            return
        size = c * rows.dtype.itemsize
        base = rows.ctypes.data - start * rows.dtype.itemsize
        offset = ctypes.c_uint64(0)
        with phil:  # h5py's lock: no other thread enters HDF5 while the GIL is let go
            for at in range(first, stop, c):
                offset.value = at
                if write(dsid.id, 0, 0, ctypes.byref(offset), size, base + at * rows.dtype.itemsize) < 0:
                    # h5py's own call raises HDF5's error as an exception
                    dsid.write_direct_chunk((at,), rows[at - start : at - start + c])

"""RowIO writes the whole chunks an append covers as raw chunks (H5Dwrite_chunk, through ctypes
without the GIL, or h5py's call when that library is not found): the dataset must hold exactly
what h5py's ordinary slice writes give, for every split of head, whole chunks and tail, and a
SWMR reader in another process must see the rows once the dataset is flushed."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from streambars.records import BAR_DTYPE
from streambars.store import rowio
from streambars.store.layout import LIBVER

CHUNK = 64


def _rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(n, BAR_DTYPE)
    for name in BAR_DTYPE.names:
        out[name] = rng.integers(0, 1 << 30, n)
    return out


def _dataset(f: h5py.File, name: str, **kw) -> h5py.Dataset:
    return f.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(CHUNK,), dtype=BAR_DTYPE, **kw)


# appends that start mid-chunk, on a chunk boundary, cover no whole chunk, several, end on one
SIZES = [10, 54, 64, 1, 200, 63, 130, 3 * CHUNK, 5]


@pytest.mark.parametrize("nogil", [True, False])
def test_chunk_writes_equal_slice_writes(tmp_path, monkeypatch, nogil):
    if nogil:
        assert rowio._write_chunk_nogil() is not None, "libhdf5 not found in /proc/self/maps"
    else:
        monkeypatch.setattr(rowio, "_write_chunk_nogil", lambda: None)
    calls = []
    real = rowio.RowIO._write_chunks
    monkeypatch.setattr(rowio.RowIO, "_write_chunks",
                        lambda self, *a: (calls.append(a[2:]), real(self, *a))[1])
    data = _rows(sum(SIZES), 1)
    with h5py.File(tmp_path / "a.h5", "w", libver=LIBVER, locking=False) as f:
        fast, plain, gz = _dataset(f, "fast"), _dataset(f, "plain"), _dataset(f, "gz", compression="gzip")
        ios = rowio.RowIO(fast), rowio.RowIO(gz)
        n = 0
        for size in SIZES:
            for ds in (fast, plain, gz):
                ds.resize((n + size,))
            for io in ios:
                io.write(n, data[n : n + size])
            plain[n : n + size] = data[n : n + size]
            n += size
        f.flush()
        assert fast[()].tobytes() == plain[()].tobytes() == data.tobytes()
        assert gz[()].tobytes() == data.tobytes()
    # whole chunks went the raw way (the compressed dataset never did)
    assert sum((stop - first) // CHUNK for first, stop in calls) == 6
    assert all(first % CHUNK == 0 and stop % CHUNK == 0 for first, stop in calls)


def test_swmr_reader_sees_raw_chunks(tmp_path):
    path = tmp_path / "s.h5"
    data = _rows(5 * CHUNK + 7, 2)
    with h5py.File(path, "w", libver=LIBVER, locking=False) as f:
        ds = _dataset(f, "x")
        f.swmr_mode = True
        ds.resize((data.shape[0],))
        rowio.RowIO(ds).write(0, data)
        ds.flush()
        code = ("import h5py, sys; f = h5py.File(sys.argv[1], 'r', swmr=True, locking=False); "
                "sys.stdout.buffer.write(f['x'][()].tobytes())")
        got = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, check=True).stdout
    assert got == data.tobytes()

"""The HDF5 store: one file per symbol, appended under SWMR while analysis code reads it.

Modules, one job each:

* ``layout``   -- names, paths, attributes, chunking and meta blobs of a store file
* ``lock``     -- one writer per file (flock on a sidecar that names the holder)
* ``recovery`` -- repairing a file whose writer was killed (superblock, rows, marks, index)
* ``writer``   -- :class:`BarFileWriter` (one file) and :class:`StoreWriterSet` (routing)
* ``reader``   -- :func:`open_store` / :class:`StoreReader`, :func:`inspect_store`
* ``frames``   -- stored rows -> pandas / polars frames and times, UTC or a chosen zone
* ``compact``  -- :func:`compact_store`: rewrite closed files compressed, atomically
"""

from __future__ import annotations

from .compact import compact_store, rewrite_file
from .frames import bars_to_frame
from .layout import (
    FORMAT_VERSION,
    LIBVER,
    META_BLOBS,
    file_path,
    filename_to_symbol,
    symbol_to_filename,
)
from .lock import FileLock, is_locked
from .reader import (
    SeriesInfo,
    StoreReader,
    inspect_store,
    ns_to_iso,
    open_store,
    symbols_with_note,
    to_ns,
)
from .recovery import clear_open_flags, recover_file
from .writer import BarFileWriter, StoreWriterSet

__all__ = [
    "FORMAT_VERSION",
    "LIBVER",
    "META_BLOBS",
    "BarFileWriter",
    "FileLock",
    "SeriesInfo",
    "StoreReader",
    "StoreWriterSet",
    "bars_to_frame",
    "clear_open_flags",
    "compact_store",
    "file_path",
    "filename_to_symbol",
    "inspect_store",
    "is_locked",
    "ns_to_iso",
    "open_store",
    "recover_file",
    "rewrite_file",
    "symbols_with_note",
    "symbol_to_filename",
    "to_ns",
]

"""What a store file looks like: names, paths, attributes, chunking, and the meta blobs.

One file per symbol, ``<root>/<dataset>/<escaped symbol>.h5``::

    /                           attrs: the bar contract (format, format_version, dataset, symbol,
                                stype, price_scale, session, timeframes, ts_event, libver,
                                placement, ...)
    /bars/<tf>                  BAR_DTYPE rows, chunked, resizable; attrs timeframe, seconds,
                                index_stride (= rows per chunk)
    /meta/high_water_marks      int64 (n_timeframes,): last ts_event written per timeframe
                                (order in its ``timeframes`` attr), -1 when empty
    /meta/chunk_first_ts/<tf>   int64: ts_event of rows 0, stride, 2*stride, ... (the reader's
                                binary-search index: one small read, then one or two chunks)
    /meta/<blob>                uint8 (2, n): two slots, each a header + payload; the newest
                                slot whose checksum holds wins, so a crash mid-write loses at
                                most the update being written, never the previous one

Everything is created before the writer switches to SWMR: under SWMR only dataset
contents and shapes may change (attribute writes can leave the file unusable).
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from ..fsio import pid_alive
from ..naming import filename_to_symbol as _filename_to_symbol
from ..naming import symbol_to_filename as _symbol_to_filename
from ..records import BAR_DTYPE, BAR_PAGE_ROWS, FIXED_PRICE_SCALE
from ..timeframes import Session, Timeframe, parse_timeframe

FORMAT = "streambars-bars"
FORMAT_VERSION = 1
#: v110 = superblock v3: SWMR works, and HDF5 1.10 (Debian's h5dump) and 1.14 (PyTables,
#: pandas) still open the file; 'latest' under HDF5 2.0 writes objects they cannot read.
LIBVER = ("v110", "v110")
#: Where HDF5 puts what a writer allocates (h5py.File keywords, for every open that writes).
#: A SIGKILL can cut one pwrite() short at any 4 KiB page boundary (Linux checks for fatal
#: signals between the pages it copies), and HDF5 rewrites its metadata blocks (object
#: headers, chunk-index blocks) in place on every flush: a block straddling a page boundary
#: can be left half old, half new, and then no reader can open that dataset ("incorrect
#: metadata checksum"). So every allocation starts on a page and metadata is not packed into
#: shared blocks: a metadata block of up to 4 KiB lies inside one page, which a kill leaves
#: either old or new, never mixed. Chunks are whole pages (MIN_CHUNK_ROWS), so they leave no
#: gap; the cost is ~3 pages per dataset once (~0.45 MB for a new 16-timeframe file). Nothing
#: in the file format changes: readers need nothing. These are open (access) properties, so
#: they also apply to a file made before them, to what each open allocates from then on; what
#: was placed earlier stays where it is (HDF5's page strategy, fs_strategy="page", would be a
#: property of the file: h5py refuses it on an existing file). See docs/contract.md.
PAGE = 4096
FILE_SPACE: dict[str, int] = {"alignment_threshold": 1, "alignment_interval": PAGE, "meta_block_size": 0}
#: Root attribute of a file made with FILE_SPACE (and chunks of whole pages): writers keep
#: opening it so. A file without it was made before (HDF5's default placement, coarse chunks of
#: 64-512 rows): it keeps that placement, because aligning its small chunks would leave a gap
#: after each one (+5% on disk, and a long backfill into it 2-7x slower: HDF5 tracks every gap).
PLACEMENT = "placement"
PAGE_ALIGNED = "page-aligned"
SUFFIX = ".h5"
TS_CONVENTION = (
    "int64 ns since the UNIX epoch, UTC; the open of the interval [ts_event, ts_event + timeframe)"
)
PRICE_CONVENTION = "int64 fixed-point, price = value / price_scale"

BARS = "bars"
META = "meta"
HWM = "meta/high_water_marks"
INDEX = "meta/chunk_first_ts"
META_BLOBS: tuple[str, ...] = ("engine_state", "progress")

#: Coarse timeframes get smaller chunks (rows ~ chunk_rows * finest / tf), never below this:
#: whole pages (1024 rows = 13), as FILE_SPACE starts every chunk on a page. 64-row chunks
#: (3.3 kB) each left a gap of 0.8 kB, and a year's ~45k of them made a backfill 3-4x slower.
MIN_CHUNK_ROWS = BAR_PAGE_ROWS
INDEX_CHUNK = 1024
BLOB_CHUNK = 4096

_BLOB_HEADER = struct.Struct("<4sQQI")  # magic, sequence, payload length, crc32
_BLOB_MAGIC = b"SBM1"


def symbol_to_filename(symbol: str) -> str:
    """Reversible, filesystem-safe name for a symbol (no suffix): 'BRN FMJ0024!' -> 'BRN%20FMJ0024%21'."""
    return _symbol_to_filename(symbol)


def filename_to_symbol(name: str) -> str:
    """The inverse of :func:`symbol_to_filename`; a trailing '.h5' is ignored."""
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    return _filename_to_symbol(name)


def file_path(root: Path | str, dataset: str, symbol: str) -> Path:
    """``<root>/<dataset>/<escaped symbol>.h5``."""
    if not dataset or "/" in dataset or dataset.startswith("."):
        raise StoreError(f"dataset name {dataset!r} cannot be a directory name in the store")
    return Path(root) / dataset / (symbol_to_filename(symbol) + SUFFIX)


def store_files(path: Path) -> list[Path]:
    """Store files under a store root (``*/*.h5``), a dataset directory (``*.h5``) or one file."""
    if path.is_file():
        return [path]
    found = list(path.glob("*" + SUFFIX)) + list(path.glob("*/*" + SUFFIX))
    return sorted(p for p in found if not p.name.startswith(".") and p.is_file())


#: Temporary files next to a store file, ``.<name>.h5.<kind>-<pid>``: a new file being built
#: (writer) and a compacted copy (compact). A killed process leaves its own behind.
TEMP_KINDS = ("creating", "compact")


def temp_path(path: Path, kind: str) -> Path:
    """This process's temporary file of ``kind`` for ``path``."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier, failed attempt: we are not building it now
    return pid_alive(pid)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` whose process is dead (a creator or compact
    killed mid-way); returns them. Caller holds the file's writer lock."""
    import glob

    removed = []
    for kind in TEMP_KINDS:
        for p in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"):
            pid = p.name.rsplit("-", 1)[1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


def file_space(f: h5py.File) -> dict[str, int]:
    """The h5py.File keywords a writing open of this (existing) file passes: FILE_SPACE for a
    file made with it, none (HDF5's default placement, as it was made) for one made before."""
    return FILE_SPACE if f.attrs.get(PLACEMENT) == PAGE_ALIGNED else {}


def file_space_of(path: Path) -> dict[str, int]:
    """:func:`file_space` of the file at ``path`` (one read-only open)."""
    with h5py.File(path, "r", locking=False) as f:
        return file_space(f)


def chunk_rows_by_timeframe(timeframes: Sequence[Timeframe], chunk_rows: int) -> dict[str, int]:
    """Rows per chunk: ``chunk_rows`` for the finest timeframe, proportionally fewer (a power
    of two, at least MIN_CHUNK_ROWS) for coarser ones, so 1d bars do not sit in a 200 kB
    chunk. All whole pages when ``chunk_rows`` is a multiple of MIN_CHUNK_ROWS (the config
    allows nothing else; tests pass smaller ones, which every timeframe then gets)."""
    finest = min(tf.seconds for tf in timeframes)
    out = {}
    for tf in timeframes:
        rows = chunk_rows * finest // tf.seconds
        if rows < chunk_rows:
            rows = max(MIN_CHUNK_ROWS, 1 << (max(rows, 1).bit_length() - 1))
        out[tf.name] = min(rows, chunk_rows)
    return out


def create_layout(
    f: h5py.File,
    *,
    dataset: str,
    symbol: str,
    stype: str,
    timeframes: Sequence[Timeframe],
    session: Session,
    chunk_rows: int,
    created_by: str,
) -> None:
    """Every group, dataset and attribute a writer will ever need, before SWMR starts."""
    tfs = sorted(set(timeframes))
    names = [tf.name for tf in tfs]
    strs = h5py.string_dtype()
    a = f.attrs
    a["format"] = FORMAT
    a["format_version"] = FORMAT_VERSION
    a["dataset"] = dataset
    a["symbol"] = symbol
    a["stype"] = stype
    a["price_scale"] = np.int64(FIXED_PRICE_SCALE)
    a["price"] = PRICE_CONVENTION
    a["ts_event"] = TS_CONVENTION
    a["session"] = str(session)
    a["timeframes"] = np.array(names, dtype=strs)
    a["libver"] = LIBVER[0]
    a["created_by"] = created_by
    a[PLACEMENT] = PAGE_ALIGNED  # the caller opened f with FILE_SPACE
    bars = f.create_group(BARS)
    index = f.create_group(INDEX)
    chunks = chunk_rows_by_timeframe(tfs, chunk_rows)
    for tf in tfs:
        rows = chunks[tf.name]
        ds = bars.create_dataset(tf.name, shape=(0,), maxshape=(None,), chunks=(rows,), dtype=BAR_DTYPE)
        ds.attrs["timeframe"] = tf.name
        ds.attrs["seconds"] = tf.seconds
        ds.attrs["index_stride"] = rows
        index.create_dataset(tf.name, shape=(0,), maxshape=(None,), chunks=(INDEX_CHUNK,), dtype="<i8")
    hwm = f.create_dataset(HWM, data=np.full(len(tfs), -1, dtype="<i8"))
    hwm.attrs["timeframes"] = np.array(names, dtype=strs)
    for name in META_BLOBS:
        f.create_dataset(
            f"{META}/{name}", shape=(2, 0), maxshape=(2, None), chunks=(1, BLOB_CHUNK), dtype="u1"
        )


def file_timeframes(f: h5py.File) -> list[str]:
    """The timeframes a file holds, in the order of its high-water-mark dataset."""
    return [str(x) for x in f[HWM].attrs["timeframes"].astype(str)]


def check_contract(
    f: h5py.File, path: Path, *, dataset: str, symbol: str, stype: str,
    timeframes: Sequence[Timeframe], session: Session,
) -> None:
    """Refuse to append to a file whose contract differs from what the caller writes."""
    a = f.attrs
    if a.get("format") != FORMAT or BARS not in f or HWM not in f:
        raise StoreError(f"{path} is not a streambars bar file (no format={FORMAT!r} attribute)")
    version = int(a.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} has format version {version}; this streambars writes {FORMAT_VERSION}: upgrade"
        )
    for key, want in (("dataset", dataset), ("symbol", symbol), ("stype", stype), ("session", str(session))):
        have = a.get(key)
        if have != want:
            raise StoreError(f"{path}: the file holds {key}={have!r}, this writer has {key}={want!r}")
    have_tfs = file_timeframes(f)
    missing = [tf.name for tf in timeframes if tf.name not in have_tfs]
    if missing:
        raise StoreError(
            f"{path} holds timeframes {', '.join(have_tfs)}; requested {', '.join(missing)} are not "
            "in it (timeframes are fixed when a file is created: write to a new store, or drop them)"
        )


def timeframe_name(tf: str | Timeframe) -> str:
    """Canonical store name for '1min', '60s', Timeframe(...) ..."""
    if isinstance(tf, Timeframe):
        return tf.name
    try:
        return parse_timeframe(tf).name
    except ValueError as e:
        raise StoreError(str(e)) from None


# -- meta blobs: two slots, newest valid wins ------------------------------------------------


def encode_blob(seq: int, payload: bytes) -> np.ndarray:
    head = _BLOB_HEADER.pack(_BLOB_MAGIC, seq, len(payload), zlib.crc32(payload))
    return np.frombuffer(head + payload, dtype=np.uint8)


def decode_slot(row: np.ndarray) -> tuple[int, bytes] | None:
    """(sequence, payload) of one slot, or None when empty or torn."""
    raw = row.tobytes()
    if len(raw) < _BLOB_HEADER.size:
        return None
    magic, seq, length, crc = _BLOB_HEADER.unpack_from(raw)
    payload = raw[_BLOB_HEADER.size : _BLOB_HEADER.size + length]
    if magic != _BLOB_MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return seq, payload


def read_blob(ds: h5py.Dataset) -> tuple[int, bytes | None]:
    """(newest sequence or 0, payload or None) of a two-slot blob dataset."""
    if ds.shape[1] == 0:
        return 0, None
    slots = [s for s in (decode_slot(ds[i]) for i in range(2)) if s is not None]
    if not slots:
        return 0, None
    seq, payload = max(slots, key=lambda s: s[0])
    return seq, payload


def write_blob(ds: h5py.Dataset, seq: int, payload: bytes) -> None:
    """Write ``payload`` as sequence ``seq`` into slot ``seq % 2`` (the older one)."""
    data = encode_blob(seq, payload)
    if ds.shape[1] < data.size:
        ds.resize((2, data.size))
    ds[seq % 2, : data.size] = data

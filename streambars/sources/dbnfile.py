"""DBN files (v1, v2, v3; plain or zstd) -> :class:`~streambars.records.RecordBatch` chunks.

Three entry points::

    describe(path) -> DbnInfo                  # the Metadata header only: cheap
    iter_records(path, ...) -> Iterator[(DbnInfo, np.ndarray)]   # raw DBN structs, ~64k per chunk
    iter_batches(path, registry, ...) -> Iterator[RecordBatch]   # what the pipeline consumes
    scan(path) -> DbnInfo                      # read the whole file, check it, count records

Memory stays bounded: the file is decompressed as a stream and cut into chunks of
``chunk_records`` records (65,536 by default), never loaded whole.

**Why not** ``DBNStore.to_ndarray(count=N)``: it tolerates damage silently. A zstd stream cut
short decodes to fewer records without any warning, and a record cut in half only raises a
``BentoWarning``. Here the zstd frames are decompressed one by one and a frame that does not
end, a record cut in half, or a record whose ``length``/``rtype`` header does not match the
schema raises :class:`~streambars.errors.SourceError` naming the file (and the record number).
The struct layouts are the ones ``DBNStore`` uses for the file's DBN version (tests compare
the two on every file in ``shared/testdata``).

**Records before a corruption**: chunks are yielded as they are decoded, so the chunks before
the damage have already been handed on when the error is raised. The consumer must treat the
error as "this file/month failed" (not mark it done, not ``finish()`` the engine, whose open
bars then stay open); bars already closed from the good records are correct. Call
:func:`scan` first for all-or-nothing (it costs one more decompression pass);
:func:`streambars.sources.historical.HistoricalSource.download_month` does exactly that before
a download enters the archive, so archive files are whole.

**Which stored symbol (series) a record belongs to**:

* ``stype_in=parent``: each instrument is its own series, named by its raw symbol. The raw
  symbols come from ``instrument_symbols=`` or the archive sidecar
  ``<month>.symbols.json`` (written by the Historical download). Without either, the series is
  named by the instrument_id (a warning says so).
* ``symbol=`` given (an archive file is per requested symbol): every record is that symbol's,
  so a continuous contract that rolls (several instrument_ids) stays one series.
* The Metadata names one symbol: every record is that symbol's.
* Several symbols: the Metadata mappings, time-aware (the UTC date of ``ts_recv`` for trades,
  ``ts_event`` for bars, as the databento client does). An instrument that maps to one symbol
  only is that symbol's whatever the date; one that maps to several is resolved by date. An
  instrument_id the mappings do not know raises SourceError (never dropped silently).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import databento_dbn
import numpy as np
import zstandard

from .. import archive
from ..errors import SourceError
from ..observe import get_logger
from ..records import INPUT_KINDS, RecordBatch, SeriesRegistry
from ..zstdframes import MAGIC as ZSTD_MAGIC
from ..zstdframes import ends_inside_frame

log = get_logger("streambars.sources.dbnfile")

CHUNK_RECORDS = 65_536
_READ_SIZE = 1 << 17
_NS_PER_DAY = 86_400 * 1_000_000_000
_UNDEF_TS = 2**64 - 1

#: rtypes accepted per input kind (OHLCV_DEPRECATED = 0x11 appears in old DBN v1 files).
_RTYPES: dict[str, tuple[int, ...]] = {
    "ohlcv-1s": (0x20, 0x11),
    "ohlcv-1m": (0x21, 0x11),
    "trades": (0x00,),
}


@dataclass(frozen=True)
class DbnInfo:
    """What a DBN file's Metadata says (``records`` is filled in by :func:`scan` only)."""

    path: Path
    version: int
    dataset: str
    schema: str | None  # e.g. 'ohlcv-1s'; None for mixed-schema (live capture) files
    stype_in: str | None
    stype_out: str
    symbols: tuple[str, ...]  # the stored symbols the file's records map to (see module doc)
    requested: tuple[str, ...]  # Metadata.symbols as requested
    start_ns: int
    end_ns: int | None
    compressed: bool
    ts_out: bool
    metadata_length: int
    mappings: dict[str, list[dict]] = field(default_factory=dict, repr=False)
    not_found: tuple[str, ...] = ()
    records: int | None = None


def _fail(p: Path, what: str) -> SourceError:
    return SourceError(f"DBN file {p}: {what}")


# ----------------------------------------------------------------------------- byte stream


class _Tee:
    """A file whose bytes, as they are read, are also handed to ``sink`` (hash and copy a
    file in the same read that decodes it)."""

    def __init__(self, f: BinaryIO, sink: Callable[[bytes], None]):
        self._f, self._sink = f, sink

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self._sink(data)
        return data

    def readinto(self, buf: memoryview) -> int:
        n = self._f.readinto(buf)
        if n:
            self._sink(bytes(buf[:n]))
        return n

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


class _Stream:
    """Decompressed bytes of a DBN file (plain or zstd, any number of frames), strict about
    a frame cut short. ``read(n)`` returns exactly n bytes, fewer only at the end.

    zstd is decompressed by ``stream_reader.readinto`` straight into the caller's buffer, one
    call a chunk without the GIL; before, ``decompressobj`` handed out ~670 kB pieces that were
    then copied into it (~0.2 s of CPU a year of 1s bars, and ~6 GIL hand-overs a chunk on the
    thread that backfill's other stages wait for). ``stream_reader`` ends quietly where a
    truncated file ends, so at the end the frame headers are walked to tell (see zstdframes)."""

    def __init__(self, p: Path, tee: Callable[[bytes], None] | None = None):
        self.path = p
        self._f: BinaryIO = open(p, "rb")  # noqa: SIM115 - closed in close()
        head = self._f.read(4)
        self._f.seek(0)
        if tee is not None:
            self._f = _Tee(self._f, tee)  # type: ignore[assignment]
        self.compressed = head == ZSTD_MAGIC
        if not self.compressed and head[:3] != b"DBN":
            self._f.close()
            raise _fail(p, "neither zstd nor DBN (bad magic bytes)")
        self._src: Any = (zstandard.ZstdDecompressor().stream_reader(
            self._f, read_size=_READ_SIZE, read_across_frames=True, closefd=False)
            if self.compressed else self._f)
        self._eof = False

    def read_into(self, buf: memoryview) -> int:
        """Fill ``buf`` with the next bytes (fewer only at the end); how many."""
        n, got = len(buf), 0
        while got < n and not self._eof:
            try:
                k = self._src.readinto(buf[got:])
            except zstandard.ZstdError as e:
                raise _fail(self.path, f"corrupt zstd data ({e})") from None
            if not k:
                self._eof = True
                self._check_whole()
            got += k
        return got

    def _check_whole(self) -> None:
        if not self.compressed:
            return
        try:
            cut = ends_inside_frame(self.path)
        except zstandard.ZstdError as e:
            raise _fail(self.path, f"corrupt zstd data ({e})") from None
        if cut:
            raise _fail(self.path, "truncated: the last zstd frame is cut off")

    def read_view(self, n: int) -> memoryview:
        """The next ``n`` bytes (fewer only at the end), in a new buffer."""
        buf = memoryview(bytearray(n))
        return buf[: self.read_into(buf)]

    def read(self, n: int) -> bytes:
        return bytes(self.read_view(n))

    def consumed(self) -> int:
        """Bytes of the file read so far (compressed bytes for zstd): the basis of an ETA."""
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- metadata


def _read_metadata(s: _Stream) -> tuple[databento_dbn.Metadata, int]:
    head = s.read(8)
    if len(head) < 8 or head[:3] != b"DBN":
        raise _fail(s.path, "no DBN Metadata header (empty, truncated or not DBN)")
    length = int.from_bytes(head[4:8], "little")
    body = s.read(length)
    if len(body) < length:
        raise _fail(s.path, "truncated inside the Metadata header")
    try:
        md = databento_dbn.Metadata.decode(head + body, upgrade_policy=databento_dbn.VersionUpgradePolicy.AS_IS)
    except Exception as e:  # databento_dbn.DBNError
        raise _fail(s.path, f"unreadable Metadata header ({e})") from None
    return md, 8 + length


def _info(p: Path, md: databento_dbn.Metadata, mlen: int, compressed: bool,
          instrument_symbols: Mapping[int, str] | None = None, symbol: str | None = None,
          stype_in: str | None = None) -> DbnInfo:
    schema = str(md.schema) if md.schema is not None else None
    st_in = str(md.stype_in) if md.stype_in is not None else stype_in
    requested = tuple(md.symbols or ())
    mappings = dict(md.mappings or {})
    if st_in == "parent":
        names = sorted(set((instrument_symbols or {}).values())) or sorted(
            {iv["symbol"] for ivs in mappings.values() for iv in ivs if iv["symbol"]}
        )
        stored = tuple(names)
    elif symbol is not None:
        stored = (symbol,)
    else:
        stored = requested or tuple(sorted(mappings))
    end = md.end if md.end not in (None, _UNDEF_TS) else None
    return DbnInfo(
        path=p,
        version=int(md.version),
        dataset=md.dataset,
        schema=schema,
        stype_in=st_in,
        stype_out=str(md.stype_out),
        symbols=stored,
        requested=requested,
        start_ns=int(md.start),
        end_ns=int(end) if end is not None else None,
        compressed=compressed,
        ts_out=bool(md.ts_out),
        metadata_length=mlen,
        mappings=mappings,
        not_found=tuple(md.not_found or ()),
    )


def _instrument_symbols(p: Path, given: Mapping[int, str] | None) -> Mapping[int, str] | None:
    if given is not None:
        return given
    try:
        return archive.read_symbols(p)
    except Exception as e:
        raise _fail(p, str(e)) from None


def describe(path: str | os.PathLike[str], *, symbol: str | None = None, stype_in: str | None = None,
             instrument_symbols: Mapping[int, str] | None = None) -> DbnInfo:
    """Read only the Metadata header: dataset, schema, stype, symbols, time range, version."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"DBN file {p}: no such file")
    with _Stream(p) as s:
        md, mlen = _read_metadata(s)
        return _info(p, md, mlen, s.compressed, _instrument_symbols(p, instrument_symbols), symbol, stype_in)


# ----------------------------------------------------------------------------- records


#: The databento_dbn record class of each input kind (as databento's SCHEMA_STRUCT_MAP* map
#: them). Importing ``databento`` itself pulls in pandas and pyarrow: ~180 MB resident in a
#: backfill that never uses them; other schemas still go through databento's maps.
_INPUT_STRUCTS = {"ohlcv": "OHLCVMsg", "trades": "TradeMsg"}


def record_dtype(schema: str, version: int = 3, ts_out: bool = False) -> np.dtype:
    """The numpy dtype of one record of ``schema`` as stored in a DBN file of ``version``."""
    struct = _INPUT_STRUCTS.get(schema[:5] if schema.startswith("ohlcv") else schema)
    if struct is not None:  # databento's SCHEMA_STRUCT_MAP* classes, straight from databento_dbn
        module = {1: databento_dbn.v1, 2: databento_dbn.v2}.get(version, databento_dbn)
        fields = list(getattr(module, struct)._dtypes)
    else:
        from databento.common.constants import (
            SCHEMA_STRUCT_MAP,
            SCHEMA_STRUCT_MAP_V1,
            SCHEMA_STRUCT_MAP_V2,
        )

        smap = {1: SCHEMA_STRUCT_MAP_V1, 2: SCHEMA_STRUCT_MAP_V2}.get(version, SCHEMA_STRUCT_MAP)
        fields = list(smap[databento_dbn.Schema(schema)]._dtypes)
    if ts_out:
        fields.append(("ts_out", "u8"))
    return np.dtype(fields)


def iter_records(
    path: str | os.PathLike[str],
    *,
    expected_schema: str | None = None,
    chunk_records: int = CHUNK_RECORDS,
    position: Callable[[int], None] | None = None,
    tee: Callable[[bytes], None] | None = None,
    check: bool = True,
    reuse: bool = False,
) -> Iterator[tuple[DbnInfo, np.ndarray]]:
    """Yield (info, structured array of DBN structs) chunks of at most ``chunk_records``;
    ``tee`` receives every byte of the file as read (once the last chunk is out: all of it).
    ``check=False``: the caller checks each record's ``length`` and ``rtype`` itself
    (:func:`iter_batches` does, in the pass that makes its columns). ``reuse=True``: every
    chunk is a view of one buffer, valid only until the next is asked for (iter_batches
    copies what it needs out of each chunk at once).

    ``position(n)``, if given, is told the bytes of the file read so far before each chunk
    is yielded (progress: a file's size is known up front, its record count is not).

    Raises SourceError (naming the file) for: a schema other than ohlcv-1s/ohlcv-1m/trades,
    a schema other than ``expected_schema``, a truncated or corrupt file.
    """
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"DBN file {p}: no such file")
    with _Stream(p, tee) as s:
        md, mlen = _read_metadata(s)
        info = _info(p, md, mlen, s.compressed)
        schema = info.schema
        if schema not in INPUT_KINDS:
            what = "several schemas (a live capture)" if schema is None else f"schema {schema}"
            raise _fail(p, f"holds {what}; streambars reads {', '.join(INPUT_KINDS)}")
        if expected_schema is not None and schema != expected_schema:
            raise _fail(p, f"holds schema {schema}, but {expected_schema} was asked for")
        dtype = record_dtype(schema, info.version, info.ts_out)
        size = dtype.itemsize
        done = 0
        buf = memoryview(bytearray(size * chunk_records)) if reuse else None
        while True:
            raw = s.read_view(size * chunk_records) if buf is None else buf[:s.read_into(buf)]
            if not raw:
                return
            loose = len(raw) % size
            if loose:
                raise _fail(p, f"truncated: record {done + len(raw) // size} is cut off "
                               f"({loose} of {size} bytes)")
            arr = np.frombuffer(raw, dtype=dtype)
            if check:
                _check_headers(p, arr, done, schema)
            done += len(arr)
            if position is not None:
                position(s.consumed())
            yield info, arr


def _check_headers(p: Path, arr: np.ndarray, done: int, schema: str) -> None:
    """Raise for the first record whose ``length`` or ``rtype`` is not the schema's."""
    rtypes = _RTYPES[schema]
    rt = arr["rtype"]
    bad = (arr["length"] != arr.dtype.itemsize // 4) | ((rt != rtypes[0]) & (rt != rtypes[-1]))
    if bad.any():
        raise _corrupt(p, arr, done, int(np.argmax(bad)), schema)


def _corrupt(p: Path, arr: np.ndarray, done: int, i: int, schema: str) -> SourceError:
    """Record ``i`` of a chunk (``done`` records after the file's first) has a wrong header."""
    return _fail(p, f"corrupt record {done + i} (length={arr['length'][i]}, "
                    f"rtype={arr['rtype'][i]:#04x}; expected length={arr.dtype.itemsize // 4} and a "
                    f"{schema} rtype)")


def scan(path: str | os.PathLike[str], *, expected_schema: str | None = None) -> DbnInfo:
    """Decode the whole file (bounded memory) and check it; the info with ``records`` set."""
    n = 0
    last: DbnInfo | None = None
    for info, arr in iter_records(path, expected_schema=expected_schema):
        n += len(arr)
        last = info
    if last is None:  # a valid file without records (an empty month)
        last = describe(path)
    return replace(last, records=n)


class _Resolver:
    """instrument_id (and date) -> series index, vectorised."""

    def __init__(self, info: DbnInfo, registry: SeriesRegistry, symbol: str | None,
                 instrument_symbols: Mapping[int, str] | None):
        self.path = info.path
        self.registry = registry
        self.constant: int | None = None
        self.by_date = False
        self._warned_iids: set[int] = set()
        if info.stype_in == "parent":
            self.parent = True
            self.names = dict(instrument_symbols or {})
            if not self.names:
                log.warning("no raw symbols for a parent-symbology file: series named by instrument_id",
                            path=str(info.path))
            self._ids = np.empty(0, np.uint32)
            self._series = np.empty(0, np.int32)
            return
        self.parent = False
        if symbol is not None:
            self.constant = registry.index(symbol)
            return
        if len(info.requested) == 1:
            self.constant = registry.index(info.requested[0])
            return
        # Several symbols: per-instrument intervals from the Metadata mappings.
        rows: list[tuple[int, int, int, int]] = []  # (iid, start_day, end_day, series)
        order = [s for s in info.requested if s in info.mappings]
        order += sorted(set(info.mappings) - set(order))  # Metadata.mappings order is arbitrary
        for sym in order:
            for iv in info.mappings[sym]:
                if not str(iv["symbol"]).isdigit():
                    continue
                d0 = int(np.datetime64(iv["start_date"], "D").astype(np.int64))
                d1 = int(np.datetime64(iv["end_date"], "D").astype(np.int64))
                rows.append((int(iv["symbol"]), d0, d1, registry.index(sym)))
        if not rows:
            raise _fail(info.path, "names several symbols but has no symbol mappings to tell them apart")
        rows.sort()
        tab = np.array(rows, dtype=np.int64)
        self._iid, self._d0, self._d1, self._ser = tab[:, 0], tab[:, 1], tab[:, 2], tab[:, 3].astype(np.int32)
        uniq, first, counts = np.unique(self._iid, return_index=True, return_counts=True)
        single = np.array([len(set(self._ser[f:f + c].tolist())) == 1 for f, c in zip(first, counts, strict=True)])
        self._uiid = uniq
        self._useries = np.where(single, self._ser[first], -1).astype(np.int32)
        self.by_date = not bool(single.all())

    def _parent_series(self, iid: np.ndarray) -> np.ndarray:
        new = np.setdiff1d(np.unique(iid), self._ids, assume_unique=True)
        if new.size:
            ids = np.concatenate([self._ids, new.astype(np.uint32)])
            ser = np.concatenate([self._series, np.array(
                [self.registry.index(self.names.get(int(i), str(int(i)))) for i in new], dtype=np.int32)])
            order = np.argsort(ids)
            self._ids, self._series = ids[order], ser[order]
        return self._series[np.searchsorted(self._ids, iid)]

    def series(self, iid: np.ndarray, ts_day_source: np.ndarray) -> np.ndarray:
        n = iid.shape[0]
        if self.constant is not None:
            return np.full(n, self.constant, dtype=np.int32)
        if self.parent:
            return self._parent_series(iid)
        pos = np.searchsorted(self._uiid, iid)
        pos_c = np.minimum(pos, len(self._uiid) - 1)
        known = self._uiid[pos_c] == iid
        if not known.all():
            missing = int(iid[np.argmax(~known)])
            raise _fail(self.path, f"instrument_id {missing} is not in the Metadata symbol mappings")
        out = self._useries[pos_c]
        amb = out < 0
        if amb.any():
            days = (ts_day_source[amb].astype(np.int64) // _NS_PER_DAY)
            out[amb] = self._by_day(iid[amb].astype(np.int64), days)
        return out

    def _by_day(self, iid: np.ndarray, day: np.ndarray) -> np.ndarray:
        # intervals sorted by (iid, start_day): the last interval starting on/before the day
        key_tab = self._iid * (1 << 20) + self._d0
        key = iid * (1 << 20) + day
        j = np.searchsorted(key_tab, key, side="right") - 1
        j = np.clip(j, 0, len(key_tab) - 1)
        ok = (self._iid[j] == iid) & (day < self._d1[j])
        # outside every interval of its instrument: the nearest interval of that instrument
        if not ok.all():
            for k in np.flatnonzero(~ok):
                rows = np.flatnonzero(self._iid == iid[k])
                dist = np.maximum(self._d0[rows] - day[k], day[k] - self._d1[rows] + 1)
                j[k] = rows[int(np.argmin(dist))]
        return self._ser[j]


def iter_batches(
    path: str | os.PathLike[str],
    registry: SeriesRegistry,
    *,
    expected_schema: str | None = None,
    stype_in: str | None = None,
    symbol: str | None = None,
    instrument_symbols: Mapping[int, str] | None = None,
    chunk_records: int = CHUNK_RECORDS,
    trade_clock: str = "ts_recv",
    per_publisher: bool = False,
    position: Callable[[int], None] | None = None,
) -> Iterator[RecordBatch]:
    """Decode ``path`` into RecordBatch chunks with series indices from ``registry``.

    ``symbol``: the stored symbol every record belongs to (an archive file holds one requested
    symbol); ignored for ``parent``. ``stype_in``: used when the Metadata has none.
    ``instrument_symbols``: instrument_id -> raw symbol for parent files (default: the
    archive sidecar). ``trade_clock``: the timestamp a trade is binned by (records.TRADE_CLOCKS).
    ``per_publisher``: each (symbol, publisher) its own series ``SYMBOL@VENUE``.
    ``position``: as for :func:`iter_records`. Raises SourceError as :func:`iter_records` does.
    """
    from .columns import ohlcv_columns  # numba: only where batches are made (an engine runs)

    p = Path(path)
    resolver: _Resolver | None = None
    done = 0
    for info, arr in iter_records(p, expected_schema=expected_schema, chunk_records=chunk_records,
                                  position=position, check=False, reuse=True):
        if resolver is None:
            st = info.stype_in or stype_in
            if st != info.stype_in:
                info = replace(info, stype_in=st)
            names = _instrument_symbols(p, instrument_symbols) if st == "parent" else None
            resolver = _Resolver(info, registry, symbol, names)
        kind = info.schema
        assert kind is not None
        cols = None
        if kind == "trades":
            _check_headers(p, arr, done, kind)
        else:  # checked and made into columns in one pass
            bad, cols = ohlcv_columns(arr, arr.dtype.itemsize // 4, _RTYPES[kind])
            if bad >= 0:
                raise _corrupt(p, arr, done, bad, kind)
        done += len(arr)
        day_src = arr["ts_recv"] if kind == "trades" else cols[0]  # type: ignore[index]
        series = resolver.series(arr["instrument_id"], day_src)
        if per_publisher:
            series = publisher_series(series, arr["publisher_id"], registry)
        if cols is None:
            yield RecordBatch.from_trades(series, arr, trade_clock)
        else:
            yield RecordBatch(kind, np.ascontiguousarray(series, dtype=np.int32), *cols)


PUBLISHER_SEPARATOR = "@"


def venue(publisher_id: int) -> str:
    """Databento's venue code of a publisher (``GLBX``, ``XCBO``...), or its number."""
    from databento.common.publishers import Publisher

    try:
        return str(Publisher.from_int(int(publisher_id)).venue)
    except (ValueError, KeyError):
        return str(int(publisher_id))


def base_symbol(name: str) -> str:
    """The symbol a per-publisher series ``SYMBOL@VENUE`` belongs to."""
    return name.rsplit(PUBLISHER_SEPARATOR, 1)[0]


def publisher_series(series: np.ndarray, publisher_id: np.ndarray, registry: SeriesRegistry) -> np.ndarray:
    """Each record's series moved to its (symbol, publisher) series ``SYMBOL@VENUE``."""
    key = series.astype(np.int64) << 16 | publisher_id.astype(np.int64)
    uniq, inverse = np.unique(key, return_inverse=True)
    names = registry.names
    out = np.array([registry.index(f"{names[k >> 16]}{PUBLISHER_SEPARATOR}{venue(k & 0xFFFF)}")
                    for k in uniq.tolist()], np.int32)
    return out[inverse]

"""The raw archive: what Databento sent, kept as DBN before anything else touches it.

Layout (``root`` is the store directory, symbols escaped by :mod:`streambars.naming`)::

    <root>/<dataset>/raw/<symbol>/<YYYY-MM>.dbn.zst                 a Historical month, as received
    <root>/<dataset>/raw/<symbol>/<YYYY-MM-DD>_<YYYY-MM-DD>.dbn.zst  a partial month [start, end)
    <root>/<dataset>/raw/<symbol>/<YYYY-MM>.symbols.json            parent stype only: instrument_id -> raw symbol
    <root>/<dataset>/raw/<symbol>/<YYYY-MM>.live.dbn.zst            what the Live daemon received that month

Historical files are written atomically (:func:`atomic_path` / :func:`write_atomic`: a temp
file in the same directory, fsync, rename, fsync of the directory), so a file that exists is
complete: :func:`exists` is what backfill asks before paying for a month again.

Live files have their own suffix so that a month the daemon saw in part is never taken for a
complete Historical month. :class:`LiveArchive` writes the DBN Metadata once as the first zstd
frame, then each appended batch as one more zstd frame, flushed to the OS at once (so a
``kill -9`` loses nothing already appended). The reader (:func:`iter_live_frames`,
:func:`read_live_file`) stops cleanly at a last frame cut off by a crash, and reopening a
file for append cuts that partial frame away first. A live file is a valid multi-frame
``.dbn.zst``: ``DBNStore.from_file`` and :mod:`streambars.sources.dbnfile` read it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import databento_dbn
import numpy as np
import zstandard

from .errors import StoreError
from .fsio import atomic_path, fsync_path, remove_stale_temps, write_atomic
from .ledger import parse_stamp
from .naming import filename_to_symbol, symbol_to_filename
from .observe import get_logger
from .zstdframes import READ_SIZE as _READ_SIZE
from .zstdframes import FrameReader

log = get_logger("streambars.archive")

SUFFIX = ".dbn.zst"
LIVE_SUFFIX = ".live.dbn.zst"
SYMBOLS_SUFFIX = ".symbols.json"
__all__ = ["atomic_path", "remove_stale_temps", "write_atomic"]  # re-exported from fsio


# ----------------------------------------------------------------------------- paths


def raw_dir(root: str | os.PathLike[str], dataset: str, symbol: str) -> Path:
    """``<root>/<dataset>/raw/<escaped symbol>``."""
    return Path(root) / dataset / "raw" / symbol_to_filename(symbol)


def month_key(month: str | date | datetime) -> str:
    """'YYYY-MM' from a 'YYYY-MM' string, a date or a datetime."""
    if isinstance(month, (date, datetime)):
        return f"{month.year:04d}-{month.month:02d}"
    text = str(month)
    if len(text) != 7 or text[4] != "-" or not (text[:4] + text[5:]).isdigit():
        raise ValueError(f"month {month!r} is not YYYY-MM")
    return text


def _file_stem(month: str | date | datetime, key: str | None) -> str:
    m = month_key(month)
    if key is None or key == m:
        return m
    start, sep, end = key.partition("/")
    try:
        parse_stamp(start)
        parse_stamp(end)
    except ValueError:
        raise ValueError(f"archive key {key!r} is neither YYYY-MM nor START/END stamps "
                         "(YYYY-MM-DD or YYYY-MM-DDTHH-MM-SS[.nnnnnnnnn])") from None
    if not sep or not start.startswith(m):
        raise ValueError(f"archive key {key!r} does not lie in month {m}")
    return f"{start}_{end}"


def path(
    root: str | os.PathLike[str],
    dataset: str,
    symbol: str,
    month: str | date | datetime,
    key: str | None = None,
) -> Path:
    """Where a Historical month (or, with ``key='YYYY-MM-DD/YYYY-MM-DD'``, part of one) lives."""
    return raw_dir(root, dataset, symbol) / (_file_stem(month, key) + SUFFIX)


month_path = path


def exists(
    root: str | os.PathLike[str],
    dataset: str,
    symbol: str,
    month: str | date | datetime,
    key: str | None = None,
) -> bool:
    """True when that month was downloaded completely (files only ever appear complete)."""
    return path(root, dataset, symbol, month, key).is_file()


def live_path(root: str | os.PathLike[str], dataset: str, symbol: str, month: str | date | datetime) -> Path:
    """Where the daemon appends what it receives for ``symbol`` in ``month``."""
    return raw_dir(root, dataset, symbol) / (month_key(month) + LIVE_SUFFIX)


def symbols_path(archive_file: str | os.PathLike[str]) -> Path:
    """The instrument_id -> raw symbol sidecar of a Historical archive file (parent stype)."""
    p = Path(archive_file)
    name = p.name
    for suffix in (LIVE_SUFFIX, SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + SYMBOLS_SUFFIX)


def read_symbols(archive_file: str | os.PathLike[str]) -> dict[int, str] | None:
    """The sidecar's instrument_id -> raw symbol map, or None when there is none."""
    p = symbols_path(archive_file)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StoreError(f"{p}: unreadable symbol map ({e})") from None
    return {int(k): str(v) for k, v in raw.get("instrument_symbols", {}).items()}


def write_symbols(archive_file: str | os.PathLike[str], mapping: Mapping[int, str]) -> Path:
    """Write the sidecar atomically (before the DBN file itself, so a DBN file implies it)."""
    body = json.dumps(
        {"instrument_symbols": {str(k): v for k, v in sorted(mapping.items())}}, indent=1
    )
    return write_atomic(symbols_path(archive_file), body.encode())


# ----------------------------------------------------------------------------- live files


@dataclass
class LiveFileContents:
    """What a live archive file holds: its Metadata, the raw DBN records, and whether a
    partial frame (a crash mid-write) was found at its end and left out."""

    metadata: databento_dbn.Metadata
    records: bytes
    truncated_tail: bool


def iter_live_frames(p: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """(end offset, payload) of every complete frame of a live archive file."""
    with open(p, "rb") as f:
        yield from FrameReader(f, _READ_SIZE).frames()


def read_live_file(p: str | os.PathLike[str]) -> LiveFileContents:
    """Read a live archive file, tolerating a last frame cut off by a crash."""
    p = Path(p)
    size = p.stat().st_size
    end = 0
    chunks: list[bytes] = []
    for frame_end, payload in iter_live_frames(p):
        chunks.append(payload)
        end = frame_end
    if not chunks:
        raise StoreError(f"{p}: no complete DBN Metadata frame (file cut off when created?)")
    meta_len = 8 + int.from_bytes(chunks[0][4:8], "little")
    head = chunks[0]
    if head[:3] != b"DBN" or len(head) < meta_len:
        raise StoreError(f"{p}: the first frame is not a DBN Metadata header")
    metadata = databento_dbn.Metadata.decode(head[:meta_len])
    records = head[meta_len:] + b"".join(chunks[1:])
    return LiveFileContents(metadata, records, truncated_tail=end < size)


class _LiveFile:
    def __init__(self, p: Path, metadata: bytes, cctx: zstandard.ZstdCompressor):
        self.path = p
        self._cctx = cctx
        p.parent.mkdir(parents=True, exist_ok=True)
        good = self._repair(p)
        self._f = open(p, "r+b" if p.exists() else "w+b")  # noqa: SIM115 - held open
        self._f.truncate(good)
        self._f.seek(good)
        if good == 0:
            self._f.write(cctx.compress(metadata))
            self._f.flush()
            fsync_path(p.parent)

    @staticmethod
    def _repair(p: Path) -> int:
        """Offset after the last complete frame (0: start afresh). Logs what is cut away."""
        if not p.exists():
            return 0
        size = p.stat().st_size
        good = 0
        first = True
        try:
            for end, payload in iter_live_frames(p):
                if first and payload[:3] != b"DBN":
                    break
                first = False
                good = end
        except zstandard.ZstdError as e:
            log.warning("live archive corrupt after a point; keeping what precedes it",
                        path=str(p), kept_bytes=good, size=size, error=str(e))
        if good < size:
            log.warning("live archive had a partial last frame; cut away", path=str(p),
                        kept_bytes=good, dropped_bytes=size - good)
        return good

    def write(self, payload: bytes, fsync: bool) -> None:
        self._f.write(self._cctx.compress(payload))
        self._f.flush()
        if fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


class LiveArchive:
    """Appends live records to ``<symbol>/<YYYY-MM>.live.dbn.zst``, one zstd frame per call.

    ``schema`` is the live schema (``ohlcv-1s`` ...), ``stype_in`` the subscription's. Files
    are keyed by the *stored* symbol (for ``parent`` subscriptions that is each instrument's
    raw symbol, so the file's Metadata says ``stype_in=raw_symbol``). Records are DBN v3
    structs as the live client gives them (``LiveRecords.records``). Each append goes to the
    OS before it returns (``fsync=True`` also fsyncs it); :meth:`close` fsyncs everything.
    Not thread-safe: one task appends.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        dataset: str,
        schema: str,
        stype_in: str,
        *,
        fsync: bool = False,
        level: int = 3,
        max_open: int = 64,
    ):
        self.root, self.dataset, self.schema = Path(root), dataset, schema
        self.file_stype = "raw_symbol" if stype_in == "parent" else stype_in
        self.fsync = fsync
        self.max_open = max_open
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._files: OrderedDict[tuple[str, str], _LiveFile] = OrderedDict()
        self.records_written = 0

    def _metadata(self, symbol: str, month: str) -> bytes:
        start = int(np.datetime64(month + "-01", "ns").astype(np.int64))
        md = databento_dbn.Metadata(
            dataset=self.dataset,
            start=start,
            stype_in=databento_dbn.SType(self.file_stype),
            stype_out=databento_dbn.SType.INSTRUMENT_ID,
            schema=databento_dbn.Schema(self.schema),
            symbols=[symbol],
        )
        return bytes(md)

    def _file(self, symbol: str, month: str) -> _LiveFile:
        key = (symbol, month)
        f = self._files.get(key)
        if f is None:
            f = _LiveFile(live_path(self.root, self.dataset, symbol, month), self._metadata(symbol, month), self._cctx)
            self._files[key] = f
            while len(self._files) > self.max_open:
                _, old = self._files.popitem(last=False)
                old.close()
        else:
            self._files.move_to_end(key)
        return f

    def append(self, symbol: str, records: np.ndarray) -> int:
        """Append one symbol's records (a structured array of DBN structs); split by month."""
        n = int(records.shape[0])
        if n == 0:
            return 0
        ts = records["ts_event"].astype(np.int64, copy=False).view("datetime64[ns]")
        months = ts.astype("datetime64[M]")
        if months[0] == months[-1] and (n < 3 or bool((months == months[0]).all())):
            self._file(symbol, str(months[0])).write(np.ascontiguousarray(records).tobytes(), self.fsync)
        else:
            for m in np.unique(months):
                part = records[months == m]
                self._file(symbol, str(m)).write(np.ascontiguousarray(part).tobytes(), self.fsync)
        self.records_written += n
        return n

    def append_batch(self, records: np.ndarray, series: np.ndarray, names: Sequence[str]) -> int:
        """Append a mixed batch: ``series[i]`` indexes ``names`` (a SeriesRegistry's names)."""
        if records.shape[0] == 0:
            return 0
        first = series[0]
        if bool((series == first).all()):
            return self.append(names[int(first)], records)
        total = 0
        for s in np.unique(series):
            total += self.append(names[int(s)], records[series == s])
        return total

    def flush(self) -> None:
        for f in self._files.values():
            f._f.flush()

    def close(self) -> None:
        while self._files:
            _, f = self._files.popitem()
            f.close()

    def __enter__(self) -> LiveArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- where the daemon left off


def live_symbols(root: str | os.PathLike[str], dataset: str) -> list[str]:
    """Symbols with a live archive file (ones a daemon received), in directory order."""
    out = []
    raw = Path(root) / dataset / "raw"
    if raw.is_dir():
        for d in sorted(raw.iterdir()):
            if any(d.glob("*" + LIVE_SUFFIX)):
                try:
                    out.append(filename_to_symbol(d.name))
                except ValueError:
                    continue
    return out


def live_archive_tail(root: str | os.PathLike[str], dataset: str, symbol: str) -> tuple[int, int] | None:
    """(last ts_event, records at it) in the newest live archive file of ``symbol``, or None.

    Reads only the newest month's file (decompressing it, ~0.2 s for a month of 1s bars);
    records are scanned by their DBN header length, whatever the schema.
    """
    d = raw_dir(root, dataset, symbol)
    files = sorted(d.glob("*" + LIVE_SUFFIX)) if d.is_dir() else []
    for p in reversed(files):
        try:
            contents = read_live_file(p)
        except Exception as e:  # an unreadable archive must not stop the daemon
            log.warning("could not read the live archive tail", path=str(p), error=str(e))
            return None
        ts = record_ts(contents.records)
        if len(ts):
            last = int(ts[-1])
            return last, int((ts == last).sum())
    return None


def live_archive_head(root: str | os.PathLike[str], dataset: str, symbol: str) -> int | None:
    """The first ts_event in the oldest live archive file of ``symbol`` (reads one frame)."""
    d = raw_dir(root, dataset, symbol)
    files = sorted(d.glob("*" + LIVE_SUFFIX)) if d.is_dir() else []
    for p in files:
        try:
            first = True
            for _, payload in iter_live_frames(p):
                if first:  # the Metadata frame (records may follow in it)
                    first = False
                    payload = payload[8 + int.from_bytes(payload[4:8], "little"):]
                ts = record_ts(payload)
                if len(ts):
                    return int(ts.min())
        except Exception as e:
            log.warning("could not read the live archive head", path=str(p), error=str(e))
            return None
    return None


def record_ts(raw: bytes) -> np.ndarray:
    """ts_event of every DBN record in ``raw`` (concatenated records of any rtype)."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    if len(buf) == 0:
        return np.empty(0, np.int64)
    first = int(buf[0]) * 4
    if first and len(buf) % first == 0 and bool((buf[::first] == buf[0]).all()):
        # One record size throughout (one schema): a strided view, no Python loop.
        n = len(buf) // first
        return np.frombuffer(raw, dtype=np.uint64, count=n * first // 8).reshape(n, first // 8)[:, 1].astype(np.int64)
    out = []
    off = 0
    while off + 16 <= len(buf):
        size = int(buf[off]) * 4
        if size < 16:
            break
        out.append(int.from_bytes(raw[off + 8 : off + 16], "little"))
        off += size
    return np.array(out, dtype=np.int64)

"""Reading the store while a writer appends: SWMR, no file locking, binary search by time.

Files are opened with ``swmr=True, locking=False`` (a reader must never stop the writer from
restarting) and every read refreshes the dataset first, so new rows show up without
reopening. A time range is found through the per-chunk index ``/meta/chunk_first_ts/<tf>``
(one small read) and then only the one or two chunks at each end are searched; the rows in
between are read in one go. Nothing reads a whole column to find a range.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from ..errors import DamagedFileError, FileBusyError, StoreError, UsageError
from ..fsio import file_size
from ..timeframes import Timeframe
from ..timeutil import iso, to_ns
from .frames import Engine, bars_to_frame, check_engine, check_tz, ns_to_time
from .layout import BARS, INDEX, filename_to_symbol, store_files, timeframe_name
from .lock import is_locked
from .probe import (
    TS_MAX,
    TS_MIN,
    check_contents,
    first_bad_row,
    hdf5_reason,
    open_read,
    short_text,
    unwritten_tail,
)
from .recovery import FLAG_SWMR_WRITE, read_superblock
from .rowio import RowIO

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

TimeLike = str | int | datetime | date | np.datetime64 | None

#: How long a read waits for a file a writer is creating or opening (not yet in SWMR mode).
BUSY_WAIT_S = 2.0
_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, IndexError, TypeError)


def ns_to_iso(ns: int | None) -> str:
    """ISO-8601 UTC with a 'Z' (seconds precision when whole); '' for None."""
    return iso(ns, "auto", missing="")


@dataclass(frozen=True)
class SeriesInfo:
    """One (dataset, symbol, timeframe) in the store. ``first``/``last``: ts_event of the
    first and last bar as a tz-aware pandas.Timestamp (None without rows), or int ns from
    ``series(raw=True)``."""

    dataset: str
    symbol: str
    timeframe: str
    rows: int
    first: Any  # pd.Timestamp | int | None
    last: Any
    file_size: int
    path: Path

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _File:
    """One open store file, shared by every StoreReader of this process (see :func:`_acquire`)."""

    def __init__(self, path: Path):
        self.path = path
        self.users = 0
        self.key: tuple[str, int] = ("", 0)
        sb = read_superblock(path)  # DamagedFileError: no signature, cut, bad checksum
        size = file_size(path)
        if sb is not None and sb.open_for_write and not sb.flags & FLAG_SWMR_WRITE:
            raise _busy_error(path)
        short = short_text(sb, size) if sb is not None else None
        try:
            self.f = open_read(path, swmr=True)
        except OSError as e:
            if sb is not None:
                now = read_superblock(path)  # a writer may have opened it since
                if now is not None and now.open_for_write and not now.flags & FLAG_SWMR_WRITE:
                    raise _busy_error(path) from None
                raise DamagedFileError(path, short or f"cannot be opened: {hdf5_reason(e)}") from None
            try:  # not SWMR-capable (an old or foreign file): a plain read-only open
                self.f = open_read(path, swmr=False)
            except OSError as e2:
                raise StoreError(f"cannot open {path} for reading: {hdf5_reason(e2)}") from None
        if short:
            # Shorter than its stored end of file: damage, unless nothing it references lies
            # in the missing tail (a close that could not extend the file, e.g. disk full).
            problem = check_contents(self.f, size, crashed=bool(sb and sb.open_for_write))
            if problem:
                self.f.close()
                raise DamagedFileError(path, f"{short}: {problem}")
        try:
            a = self.f.attrs
            if BARS not in self.f:
                raise StoreError(f"{path} is not a streambars bar file (no /{BARS} group)")
            self.dataset = str(a.get("dataset", path.parent.name))
            self.symbol = str(a.get("symbol", filename_to_symbol(path.name)))
        except StoreError:
            self.f.close()
            raise
        except _READ_ERRORS as e:
            self.f.close()
            raise DamagedFileError(path, f"unreadable root group: {hdf5_reason(e)}") from None
        self.swmr = bool(self.f.swmr_mode)
        self._ds: dict[str, h5py.Dataset] = {}
        self.stride: dict[str, int] = {}
        self._io: dict[str, RowIO] = {}
        self._idx: dict[str, h5py.Dataset | None] = {}
        self._valid: dict[str, tuple[int, int]] = {}
        self._verified = False

    def verify(self) -> None:
        """Check the whole file once (every object header and attribute, chunk addresses,
        first and last rows): a read must not succeed on a file whose other parts are
        garbage, and a damaged object must be named before anything else trips on it."""
        if self._verified:
            return
        for attempt in _LIVE_RETRIES:
            problem = _deep_problem(self)
            if problem is None:
                self._verified = True
                return
            if not _writer_may_be_mid_write(self.path, attempt):
                raise problem
        raise problem

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """HDF5 failures while reading become a DamagedFileError naming the file and object."""
        try:
            yield
        except StoreError:
            raise
        except _READ_ERRORS as e:
            raise DamagedFileError(self.path, f"unreadable {what}: {hdf5_reason(e)}") from None

    def rows(self, tf: str) -> int:
        """Rows of ``tf`` that hold bars: a writer that is appending (or was killed) may have
        extended the dataset before its rows reached the disk; those rows are not shown. In
        a file no writer has open, a garbage last row is damage."""
        with self.guard(f"{BARS}/{tf}"):
            ds = self.bars(tf)
            n = int(ds.shape[0])
            if n == 0:
                return 0
            cached = self._valid.get(tf)
            if cached is not None and cached[0] == n:
                return cached[1]
            last = self._io[tf].read(n - 1, n)
            ts, count = int(last["ts_event"][0]), int(last["count"][0])
            keep = n
            if not (TS_MIN < ts < TS_MAX and count > 0):
                sb = read_superblock(self.path)
                keep = n - unwritten_tail(ds, n, self.stride[tf], bool(sb and sb.open_for_write))
                if keep == n:
                    raise DamagedFileError(
                        self.path, f"{BARS}/{tf}: the last row ({n - 1}) has ts_event {ts}, count {count} "
                        "(not a bar: garbage rows)",
                    )
            self._valid[tf] = (n, keep)
            return keep

    def timeframes(self) -> list[str]:
        return sorted(self.f[BARS].keys(), key=_tf_seconds)

    def bars(self, tf: str) -> h5py.Dataset:
        """The bar dataset of ``tf``, refreshed (one Dataset object per timeframe: H5Drefresh
        reopens the dataset, and other open handles to it then read stale chunk locations)."""
        ds = self._ds.get(tf)
        if ds is None:
            ds = self._ds[tf] = self.f[BARS][tf]
            self._io[tf] = RowIO(ds)
            self.stride[tf] = int(ds.attrs.get("index_stride", 0)) or (ds.chunks[0] if ds.chunks else 4096)
        if self.swmr:
            ds.refresh()
        return ds

    def io(self, tf: str) -> RowIO:
        """Row reader of ``tf`` (call :meth:`bars` first to refresh)."""
        if tf not in self._io:
            self.bars(tf)
        return self._io[tf]

    def index(self, tf: str) -> h5py.Dataset | None:
        """The chunk index of ``tf``, refreshed (None in files without one)."""
        if tf not in self._idx:
            self._idx[tf] = self.f.get(f"{INDEX}/{tf}")
        idx = self._idx[tf]
        if idx is not None and self.swmr:
            idx.refresh()
        return idx

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()


# H5Drefresh closes and reopens the dataset: any *other* open handle to the same dataset in
# this process then reads stale chunk locations (seen here: rows of chunk 0 returned for
# chunk 1). So each file is opened once per process and every reader shares its handles.
_OPEN: dict[tuple[str, int], _File] = {}
_OPEN_LOCK = threading.Lock()


#: A file a writer has open may show a half-written block for a moment (a bounded SWMR
#: retry can give up on it): such an error is retried after these pauses (s) before the file
#: is called damaged. A file no writer has open is judged at once.
_LIVE_RETRIES = (0.05, 0.2, 0.5, None)


def _writer_may_be_mid_write(path: Path, pause: float | None) -> bool:
    """True (after sleeping ``pause``) when ``path`` is marked open for write, so an error
    reading it is worth one more try; False when it is not, or no tries are left."""
    if pause is None:
        return False
    try:
        sb = read_superblock(path)
    except StoreError:
        return False
    if sb is None or not sb.open_for_write:
        return False
    time.sleep(pause)
    return True


def _busy_error(path: Path) -> FileBusyError:
    holder = is_locked(path)
    if holder:
        err = FileBusyError(
            f"{path} is being opened by a writer (pid {holder.get('pid')}) and cannot be read until "
            "it has switched to SWMR mode; try again in a moment"
        )
    else:
        err = FileBusyError(
            f"{path} was left open by a killed writer before it switched to SWMR mode; "
            "the next writer repairs it (until then it cannot be read)"
        )
    err.writer_alive = bool(holder)  # type: ignore[attr-defined]
    return err


def _acquire(path: Path) -> _File:
    try:
        key = (os.path.realpath(path), os.stat(path).st_ino)  # a compacted file is a new inode
    except OSError as e:
        raise StoreError(f"cannot open {path} for reading: {e.strerror}") from e
    with _OPEN_LOCK:
        fh = _OPEN.get(key)
        if fh is None:
            fh = _OPEN[key] = _File(path)
        fh.users += 1
        fh.key = key
        return fh


def _release(fh: _File) -> None:
    with _OPEN_LOCK:
        fh.users -= 1
        if fh.users <= 0:
            _OPEN.pop(fh.key, None)
            fh.close()


def _chunk_starts(fh: _File, ds: h5py.Dataset, tf: str, n: int) -> tuple[np.ndarray, int]:
    """(ts_event of rows 0, s, 2s, ... below n; stride s) -- from the stored index, with any
    entries the writer has not flushed yet read from the rows themselves."""
    stride = fh.stride[tf]
    need = -(-n // stride)
    idx = fh.index(tf) if need else None
    have = 0
    starts = np.empty(need, dtype=np.int64)
    if idx is not None:
        have = min(idx.shape[0], need)
        if have:
            starts[:have] = idx[:have]
    if need > have:
        starts[have:] = ds.fields("ts_event")[have * stride : n : stride]
    return starts, stride


def _position(io: RowIO, starts: np.ndarray, stride: int, n: int, t: int) -> int:
    """The first row with ts_event >= t (n if none): the index, then one chunk."""
    c = int(np.searchsorted(starts, t, side="right")) - 1
    if c < 0:
        return 0
    lo, hi = c * stride, min((c + 1) * stride, n)
    ts = io.read(lo, hi)["ts_event"]
    return lo + int(np.searchsorted(ts, t, side="left"))


class StoreReader:
    """Read-only view of a store root, a dataset directory or one file. Safe while writing.

    Every ``.h5`` file is listed by its name, whether or not it can be opened right now:
    a file a writer is opening, or a damaged one, is never silently left out. Reading it
    waits briefly for the writer, or raises a StoreError naming the file and the cause."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}")
        self._files: dict[Path, _File] = {}
        self._problems: dict[Path, StoreError] = {}
        #: Rows out of time order are damage (the default), or data for `validate` to report
        #: by rule (it sets False): bars at impossible times are damage either way.
        self.strict_order = True
        self.refresh()

    def refresh(self) -> None:
        """Pick up files created since opening, and files replaced by ``compact`` (a new
        inode under the same name). New rows of open files need no call: every read
        refreshes its dataset. Files that could not be opened are tried again."""
        present = store_files(self.path)
        for gone in set(self._problems) - set(present):
            del self._problems[gone]
        for p in present:
            self._refresh_one(p)

    def _refresh_one(self, p: Path) -> None:
        fh = self._files.get(p)
        if fh is not None:
            try:
                if os.stat(p).st_ino == fh.key[1]:
                    return
            except OSError:
                return
            _release(self._files.pop(p))
        try:
            fh = self._files[p] = _acquire(p)
            self._problems.pop(p, None)
            if self.path.is_file():  # open_store(one file): say now if it is damaged
                fh.verify()
        except StoreError as e:
            self._problems[p] = e
            if self.path.is_file() and not isinstance(e, FileBusyError):
                raise

    def problems(self) -> dict[Path, StoreError]:
        """Files that cannot be read now, each with the error a read of it raises."""
        return dict(self._problems)

    def check(self) -> dict[Path, StoreError]:
        """Check every file whole (object headers, attributes, chunk addresses, first and
        last rows, index), after waiting briefly for files a writer is opening; damaged ones
        join :meth:`problems`, which is returned. For `inspect` and `validate`: a read only
        notices damage in what it reads."""
        self.refresh()
        self._wait_busy(list(self._problems))
        for fh in list(self._files.values()):
            try:
                fh.verify()
            except StoreError as e:
                self._problems[fh.path] = e
        return self.problems()

    # -- what is there -------------------------------------------------------------------

    def series(self, skip_unreadable: bool = False, *, raw: bool = False, tz: str | None = None) -> list[SeriesInfo]:
        """Every (dataset, symbol, timeframe) with rows, first and last bar, file size.

        ``first``/``last`` are tz-aware pandas Timestamps in UTC (or ``tz``), comparable
        with ``read_df``'s index; ``raw=True`` gives int ns as stored (what the tools use).
        Raises the StoreError of the first file that cannot be read (after waiting briefly
        for a writer that is opening one), unless ``skip_unreadable``: then see
        :meth:`problems`."""
        if not raw:
            check_tz(tz)
            infos = self.series(skip_unreadable, raw=True)
            return [replace(s, first=ns_to_time(s.first, tz), last=ns_to_time(s.last, tz)) for s in infos]
        self.refresh()
        if self._problems and not skip_unreadable:
            self._wait_busy(list(self._problems))
            if self._problems:
                raise next(iter(self._problems.values()))
        out = []
        for p, fh in list(self._files.items()):
            try:
                out += _file_series(fh)
            except StoreError as e:
                if not skip_unreadable:
                    raise
                self._problems[p] = e
        return sorted(out, key=lambda s: (s.dataset, s.symbol, _tf_seconds(s.timeframe)))

    def _names(self) -> list[tuple[str, str]]:
        """(dataset, symbol) of every file, open or not."""
        out = [(fh.dataset, fh.symbol) for fh in self._files.values()]
        out += [_name_of(p) for p in self._problems]
        return out

    def symbols(self, dataset: str | None = None) -> list[str]:
        """Every symbol with a file, including files that cannot be opened right now."""
        self.refresh()
        return sorted({s for d, s in self._names() if dataset in (None, d)})

    def datasets(self) -> list[str]:
        return sorted({d for d, _ in self._names()})

    def pairs(self, dataset: str | None = None) -> list[tuple[str, str]]:
        """(dataset, symbol) of every file (of ``dataset``), including files that cannot be
        opened right now, sorted."""
        self.refresh()
        return sorted({(d, s) for d, s in self._names() if dataset in (None, d)})

    def locate(self, symbol: str, dataset: str | None = None) -> str:
        """The dataset holding ``symbol``; a StoreError naming what exists when it is absent,
        damaged, or in several datasets (then pass ``dataset``)."""
        return self._file(symbol, dataset).dataset

    def timeframes(self, symbol: str, dataset: str | None = None) -> list[str]:
        return self._file(symbol, dataset).timeframes()

    def span(self, symbol: str, timeframe: str | Timeframe, dataset: str | None = None) -> tuple[int, int] | None:
        """(first, last) ``ts_event`` (int ns) of one stored series, None when it has no rows
        or no such timeframe: what an empty read reports as "the store holds", without
        opening every other file as :meth:`series` does."""
        name = timeframe_name(timeframe)
        for info in _file_series(self._file(symbol, dataset)):
            if info.timeframe == name and info.rows:
                return info.first, info.last
        return None

    def _find(self, symbol: str, dataset: str | None) -> tuple[list[_File], list[Path]]:
        ok = [fh for fh in self._files.values() if fh.symbol == symbol and dataset in (None, fh.dataset)]
        bad = [p for p in self._problems if _name_of(p)[1] == symbol and dataset in (None, _name_of(p)[0])]
        return ok, bad

    def _wait_busy(self, paths: list[Path]) -> None:
        """Retry files a writer is creating or opening, for up to BUSY_WAIT_S."""
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            busy = [p for p in paths if getattr(self._problems.get(p), "writer_alive", False)]
            if not busy or time.monotonic() >= deadline:
                return
            time.sleep(0.02)
            for p in busy:
                if p.exists():
                    self._refresh_one(p)
                else:
                    self._problems.pop(p, None)

    def _file(self, symbol: str, dataset: str | None) -> _File:
        found, bad = self._find(symbol, dataset)
        if not found:
            self.refresh()
            found, bad = self._find(symbol, dataset)
            if not found and not bad and self._being_created(symbol, dataset):
                deadline = time.monotonic() + BUSY_WAIT_S
                while not found and not bad and time.monotonic() < deadline:
                    time.sleep(0.02)
                    self.refresh()
                    found, bad = self._find(symbol, dataset)
        if not found and bad:
            self._wait_busy(bad)
            found, bad = self._find(symbol, dataset)
            if not found:
                raise self._problems[bad[0]]
        if not found:
            where = f" in dataset {dataset}" if dataset else ""
            have = ", ".join(self.symbols(dataset)) or "none"
            raise StoreError(f"no symbol {symbol!r}{where} in {self.path} (symbols: {have})")
        if len(found) > 1:
            raise StoreError(
                f"symbol {symbol!r} is in several datasets ({', '.join(f.dataset for f in found)}): "
                "pass dataset="
            )
        found[0].verify()
        return found[0]

    def _being_created(self, symbol: str, dataset: str | None) -> bool:
        """A writer is building this symbol's file under a temporary name right now."""
        from .layout import SUFFIX, symbol_to_filename

        name = symbol_to_filename(symbol) + SUFFIX
        dirs = [self.path] if self.path.is_file() else [self.path, *self.path.iterdir()]
        for d in dirs:
            if d.is_dir() and dataset in (None, d.name) and any(d.glob(f".{name}.creating-*")):
                return True
        return False

    # -- reading -------------------------------------------------------------------------

    def read(
        self,
        symbol: str,
        timeframe: str | Timeframe,
        start: TimeLike = None,
        end: TimeLike = None,
        dataset: str | None = None,
        limit: int | None = None,
        tz: str | None = None,
    ) -> np.ndarray:
        """Bars with start <= ts_event < end as a BAR_DTYPE array (prices int64, 1e-9 units,
        ts_event int ns UTC). ``limit=N``: only the first N of them; ``limit=-N``: only the
        last N (as ``rows[-N:]``, reading only those rows). ``tz``: the zone of naive
        ``start``/``end`` (default UTC)."""
        if tz is not None:
            check_tz(tz)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | np.integer)):
            raise UsageError(f"limit {limit!r} is not a whole number (N: the first N bars, -N: the last N)")
        for attempt in _LIVE_RETRIES:
            try:
                fh, tf, t0, t1, lo, hi, io = self._range(symbol, timeframe, start, end, dataset, tz)
                if limit is not None and limit >= 0:
                    hi = min(hi, lo + int(limit))
                elif limit is not None:
                    lo = max(lo, hi + int(limit))
                with fh.guard(f"{BARS}/{tf} rows {lo}..{hi}"):
                    rows = io.read(lo, hi)
                _check_read(fh, tf, rows, lo, t0, t1, self.strict_order)
                return rows
            except DamagedFileError as e:
                if not _writer_may_be_mid_write(Path(str(e.path)), attempt):
                    raise
                for open_file in self._files.values():
                    open_file._valid.clear()
        raise AssertionError("unreachable")  # pragma: no cover

    def _range(
        self, symbol: str, timeframe: str | Timeframe, start: TimeLike, end: TimeLike, dataset: str | None,
        tz: str | None = None,
    ) -> tuple[_File, str, int | None, int | None, int, int, RowIO]:
        t0, t1 = to_ns(start, "start", tz), to_ns(end, "end", tz)
        fh = self._file(symbol, dataset)
        tf = timeframe_name(timeframe)
        with fh.guard(f"/{BARS}"):
            if tf not in fh.f[BARS]:
                raise StoreError(f"{fh.path} has no timeframe {tf} (it has {', '.join(fh.timeframes())})")
        n = fh.rows(tf)
        io = fh.io(tf)
        if n == 0 or (t0 is not None and t1 is not None and t1 <= t0):
            return fh, tf, t0, t1, 0, 0, io
        with fh.guard(f"{BARS}/{tf} (index)"):
            ds = fh.bars(tf)
            starts, stride = _chunk_starts(fh, ds, tf, n)
            lo = 0 if t0 is None else _position(io, starts, stride, n, t0)
            hi = n if t1 is None else _position(io, starts, stride, n, t1)
        return fh, tf, t0, t1, lo, max(lo, hi), io

    def count(self, symbol: str, timeframe: str | Timeframe, start: TimeLike = None,
              end: TimeLike = None, dataset: str | None = None, tz: str | None = None) -> int:
        """How many bars :meth:`read` would return (without reading them)."""
        _, _, _, _, lo, hi, _ = self._range(symbol, timeframe, start, end, dataset, tz)
        return hi - lo

    def read_df(
        self,
        symbol: str,
        timeframe: str | Timeframe,
        start: TimeLike = None,
        end: TimeLike = None,
        dataset: str | None = None,
        limit: int | None = None,
        tz: str | None = None,
        engine: Engine = "pandas",
    ) -> pd.DataFrame | Any:
        """The same bars as a frame with float prices. pandas (default): a tz-aware
        DatetimeIndex ``ts_event`` in UTC, or in ``tz`` (which is also the zone of naive
        ``start``/``end``). ``engine="polars"``: a polars DataFrame, ``ts_event`` a column."""
        check_engine(engine)
        return bars_to_frame(self.read(symbol, timeframe, start, end, dataset, limit, tz), tz, engine)

    def tail(
        self,
        symbol: str,
        timeframe: str | Timeframe,
        n: int = 10,
        dataset: str | None = None,
        *,
        end: TimeLike = None,
        tz: str | None = None,
        engine: Engine = "pandas",
        raw: bool = False,
    ) -> pd.DataFrame | Any:
        """The last ``n`` bars (before ``end`` when given) as :meth:`read_df` gives them, or
        the stored rows with ``raw=True``. Reads only those rows, so it is cheap to poll
        while a writer appends (each call sees the rows flushed so far)."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise UsageError(f"tail n {n!r} is not a whole number >= 0")
        check_engine(engine)
        rows = self.read(symbol, timeframe, None, end, dataset, limit=-int(n), tz=tz)
        return rows if raw else bars_to_frame(rows, tz, engine)

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        for fh in self._files.values():
            _release(fh)
        self._files.clear()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<StoreReader {self.path}: {len(self._files)} files>"


def _name_of(path: Path) -> tuple[str, str]:
    """(dataset, symbol) from a file's place and name (for files that cannot be opened)."""
    return path.parent.name, filename_to_symbol(path.name)


def _file_series(fh: _File) -> list[SeriesInfo]:
    """The SeriesInfo of each timeframe of one open file; DamagedFileError for garbage."""
    fh.verify()
    size = file_size(fh.path)
    out = []
    with fh.guard(f"/{BARS}"):
        tfs = fh.timeframes()
    for tf in tfs:
        n = fh.rows(tf)
        first = last = None
        if n:
            with fh.guard(f"{BARS}/{tf}"):
                io = fh.io(tf)
                first = int(io.read(0, 1)["ts_event"][0])
                last = int(io.read(n - 1, n)["ts_event"][0])
            if not (TS_MIN < first < TS_MAX and TS_MIN < last < TS_MAX):
                raise DamagedFileError(
                    fh.path, f"{BARS}/{tf}: first bar ts_event {first}, last {last} (garbage rows)"
                )
        out.append(SeriesInfo(fh.dataset, fh.symbol, tf, n, first, last, size, fh.path))
    return out


def _check_read(
    fh: _File, tf: str, rows: np.ndarray, lo: int, t0: int | None, t1: int | None, ordered: bool
) -> None:
    """Rows read must be bars (1970 < ts_event < 2100) and, when ``ordered``, ascending and
    inside the range asked: else the rows or the chunk index are garbage, and the caller must
    not get 1970 bars."""
    if rows.shape[0] == 0:
        return
    ts = rows["ts_event"]
    bad = first_bad_row(ts, TS_MIN, ordered)
    if bad is not None:
        prev = f" after {int(ts[bad - 1])}" if bad else ""
        raise DamagedFileError(
            fh.path, f"{BARS}/{tf}: row {lo + bad} has ts_event {int(ts[bad])}{prev} (garbage rows)"
        )
    if ordered and ((t0 is not None and int(ts[0]) < t0) or (t1 is not None and int(ts[-1]) >= t1)):
        raise DamagedFileError(fh.path, f"{BARS}/{tf}: the chunk index does not match the rows")


def open_store(path: Path | str) -> StoreReader:
    """Open a store root, a dataset directory or one ``.h5`` file for reading."""
    return StoreReader(path)


def inspect_store(
    root: Path | str,
    symbols: Sequence[str] | None = None,
    timeframes: Sequence[str] | None = None,
    machine: bool = False,
) -> list[dict[str, Any]]:
    """One row per (dataset, symbol, timeframe): rows, first and last bar, file size, writer,
    status. Every file is checked whole (every object header, chunk address, first and last
    rows): a file that cannot be read gets one row whose status says why ("damaged: ..."),
    and the rest of the store is listed as usual.

    ``symbols``/``timeframes``: keep only rows matching one of these glob patterns
    (case-sensitive, ``ES*``); a file that cannot be read is kept when its symbol matches.
    ``machine``: values for JSON (int rows and bytes, first/last ISO and ns, None for
    unknown) instead of the table's text."""
    with StoreReader(root) as reader:
        reader.check()
        infos = reader.series(skip_unreadable=True, raw=True)
        out = []
        for s in infos:
            if s.path in reader._problems or not _selected(s.symbol, s.timeframe, symbols, timeframes):
                continue
            holder = is_locked(s.path)
            row: dict[str, Any] = {
                "dataset": s.dataset,
                "symbol": s.symbol,
                "timeframe": s.timeframe,
                "rows": s.rows,
                "first": ns_to_iso(s.first),
                "last": ns_to_iso(s.last),
                "file_size": _human(s.file_size),
                "writer": f"pid {holder.get('pid')}" if holder else "-",
                "status": "ok",
            }
            if machine:
                row.update(first=ns_to_iso(s.first) or None, last=ns_to_iso(s.last) or None,
                           first_ns=s.first, last_ns=s.last, file_size=s.file_size,
                           writer=holder.get("pid") if holder else None, path=str(s.path))
            out.append(row)
        for path, err in sorted(reader.problems().items()):
            dataset, symbol = _name_of(path)
            if not _selected(symbol, None, symbols, timeframes):
                continue
            holder = is_locked(path)
            row = {
                "dataset": dataset, "symbol": symbol, "timeframe": "-", "rows": "-", "first": "-",
                "last": "-", "file_size": _human(file_size(path)),
                "writer": f"pid {holder.get('pid')}" if holder else "-",
                "status": problem_text(err),
            }  # fmt: skip
            if machine:
                row.update(timeframe=None, rows=None, first=None, last=None, first_ns=None, last_ns=None,
                           file_size=file_size(path), writer=holder.get("pid") if holder else None, path=str(path))
            out.append(row)
        return sorted(out, key=lambda r: (r["dataset"], r["symbol"], _tf_seconds(str(r["timeframe"]))))


def _selected(symbol: str, tf: str | None, symbols: Sequence[str] | None, timeframes: Sequence[str] | None) -> bool:
    """``symbol``/``tf`` match one of the glob patterns (no patterns: everything; tf None:
    a file that cannot be read, whose timeframes are unknown)."""
    from fnmatch import fnmatchcase

    if symbols and not any(fnmatchcase(symbol, p) for p in symbols):
        return False
    return not (timeframes and tf is not None and not any(fnmatchcase(tf, p) for p in timeframes))


def problem_text(err: StoreError) -> str:
    """'damaged: <what>' for a damaged file, 'busy: ...' / 'unreadable: ...' otherwise."""
    if isinstance(err, DamagedFileError):
        return f"damaged: {err.what}"
    if isinstance(err, FileBusyError):
        return f"busy: {err}"
    return f"unreadable: {err}"


def _deep_problem(fh: _File) -> DamagedFileError | None:
    """check_contents on an open file, as a DamagedFileError (None when healthy)."""
    try:
        sb = read_superblock(fh.path)
    except DamagedFileError as e:
        return e
    problem = check_contents(fh.f, file_size(fh.path), crashed=bool(sb and sb.open_for_write), path=fh.path)
    return DamagedFileError(fh.path, problem) if problem else None



def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _tf_seconds(name: str) -> int:
    from ..timeframes import parse_timeframe

    try:
        return parse_timeframe(name).seconds
    except ValueError:
        return 0




def symbols_with_note(root: str | os.PathLike[str], dataset: str, note: str) -> list[str]:
    """Stored symbols of ``dataset`` whose file's progress blob has the key ``note`` (the
    daemon's ``live`` watermarks: files a daemon wrote), in file-name order. Files that
    cannot be read are logged and skipped."""
    import json

    from ..observe import get_logger
    from .layout import read_blob

    out = []
    for path in sorted((Path(root) / dataset).glob("*.h5")):
        try:
            name = filename_to_symbol(path.stem)
            with h5py.File(path, "r", swmr=True, locking=False) as f:
                _, blob = read_blob(f["meta"]["progress"])
            if blob and note in json.loads(blob):
                out.append(name)
        except (OSError, KeyError, ValueError) as e:
            get_logger("streambars.store").warning("skipping a store file while listing parent instruments", path=str(path),
                        error=str(e))
    return out

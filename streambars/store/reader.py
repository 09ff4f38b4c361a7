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
from dataclasses import asdict, dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from ..errors import StoreError, UsageError
from ..records import FIXED_PRICE_SCALE
from ..timeframes import Timeframe
from .layout import BARS, INDEX, store_files, timeframe_name
from .lock import is_locked
from .rowio import RowIO

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

TimeLike = str | int | datetime | date | np.datetime64 | None
PRICE_FIELDS = ("open", "high", "low", "close")


def to_ns(value: Any, what: str = "time") -> int | None:
    """ISO string / datetime / date / pandas.Timestamp / numpy datetime64 / int ns -> int ns UTC.

    Naive times are UTC. None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(f"{what} {value!r} is not a time")
    if isinstance(value, int | np.integer):
        return int(value)
    import pandas as pd

    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError) as e:
        raise UsageError(
            f"{what} {value!r} is not a time: give ISO-8601 (2024-03-01, 2024-03-01T14:30:00Z), "
            "a datetime, a pandas.Timestamp or int nanoseconds since the epoch"
        ) from e
    if ts is pd.NaT:
        raise UsageError(f"{what} {value!r} is not a time")
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.value)


def ns_to_iso(ns: int | None) -> str:
    """ISO-8601 UTC with a 'Z' (seconds precision when whole)."""
    if ns is None:
        return ""
    unit = "s" if ns % 1_000_000_000 == 0 else "ns"
    return str(np.datetime_as_string(np.datetime64(int(ns), "ns"), unit=unit, timezone="UTC"))


@dataclass(frozen=True)
class SeriesInfo:
    """One (dataset, symbol, timeframe) in the store."""

    dataset: str
    symbol: str
    timeframe: str
    rows: int
    first: int | None  # ts_event of the first bar, ns
    last: int | None
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
        try:
            self.f = h5py.File(path, "r", swmr=True, locking=False)
        except OSError:
            try:  # not SWMR-capable (an old or foreign file): a plain read-only open
                self.f = h5py.File(path, "r", locking=False)
            except OSError as e:
                raise StoreError(f"cannot open {path} for reading: {e}") from e
        a = self.f.attrs
        if BARS not in self.f:
            self.f.close()
            raise StoreError(f"{path} is not a streambars bar file (no /{BARS} group)")
        self.dataset = str(a.get("dataset", path.parent.name))
        self.symbol = str(a.get("symbol", path.stem))
        self.swmr = bool(self.f.swmr_mode)
        self._ds: dict[str, h5py.Dataset] = {}
        self.stride: dict[str, int] = {}
        self._io: dict[str, RowIO] = {}
        self._idx: dict[str, h5py.Dataset | None] = {}

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
    """Read-only view of a store root, a dataset directory or one file. Safe while writing."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}")
        self._files: dict[Path, _File] = {}
        self.refresh()

    def refresh(self) -> None:
        """Pick up files created since opening, and files replaced by ``compact`` (a new
        inode under the same name). New rows of open files need no call: every read
        refreshes its dataset."""
        for p in store_files(self.path):
            fh = self._files.get(p)
            if fh is not None:
                try:
                    if os.stat(p).st_ino == fh.key[1]:
                        continue
                except OSError:
                    continue
                _release(self._files.pop(p))
            try:
                self._files[p] = _acquire(p)
            except StoreError:
                if self.path.is_file():
                    raise

    # -- what is there -------------------------------------------------------------------

    def series(self) -> list[SeriesInfo]:
        """Every (dataset, symbol, timeframe) with rows, first and last bar, file size."""
        self.refresh()
        out = []
        for fh in self._files.values():
            size = _size(fh.path)
            for tf in fh.timeframes():
                ds = fh.bars(tf)
                n = int(ds.shape[0])
                first = int(ds[0]["ts_event"]) if n else None
                last = int(ds[n - 1]["ts_event"]) if n else None
                out.append(SeriesInfo(fh.dataset, fh.symbol, tf, n, first, last, size, fh.path))
        return sorted(out, key=lambda s: (s.dataset, s.symbol, _tf_seconds(s.timeframe)))

    def symbols(self, dataset: str | None = None) -> list[str]:
        return sorted({fh.symbol for fh in self._files.values() if dataset in (None, fh.dataset)})

    def datasets(self) -> list[str]:
        return sorted({fh.dataset for fh in self._files.values()})

    def timeframes(self, symbol: str, dataset: str | None = None) -> list[str]:
        return self._file(symbol, dataset).timeframes()

    def _file(self, symbol: str, dataset: str | None) -> _File:
        found = [fh for fh in self._files.values() if fh.symbol == symbol and dataset in (None, fh.dataset)]
        if not found:
            self.refresh()
            found = [fh for fh in self._files.values() if fh.symbol == symbol and dataset in (None, fh.dataset)]
        if not found:
            where = f" in dataset {dataset}" if dataset else ""
            have = ", ".join(self.symbols(dataset)) or "none"
            raise StoreError(f"no symbol {symbol!r}{where} in {self.path} (symbols: {have})")
        if len(found) > 1:
            raise StoreError(
                f"symbol {symbol!r} is in several datasets ({', '.join(f.dataset for f in found)}): "
                "pass dataset="
            )
        return found[0]

    # -- reading -------------------------------------------------------------------------

    def read(
        self,
        symbol: str,
        timeframe: str | Timeframe,
        start: TimeLike = None,
        end: TimeLike = None,
        dataset: str | None = None,
        limit: int | None = None,
    ) -> np.ndarray:
        """Bars with start <= ts_event < end as a BAR_DTYPE array (prices int64, 1e-9 units);
        at most ``limit`` rows (the first ones) when given."""
        lo, hi, io = self._range(symbol, timeframe, start, end, dataset)
        if limit is not None:
            hi = min(hi, lo + max(0, int(limit)))
        return io.read(lo, hi)

    def _range(
        self, symbol: str, timeframe: str | Timeframe, start: TimeLike, end: TimeLike, dataset: str | None
    ) -> tuple[int, int, RowIO]:
        t0, t1 = to_ns(start, "start"), to_ns(end, "end")
        fh = self._file(symbol, dataset)
        tf = timeframe_name(timeframe)
        if tf not in fh.f[BARS]:
            raise StoreError(f"{fh.path} has no timeframe {tf} (it has {', '.join(fh.timeframes())})")
        ds = fh.bars(tf)
        io = fh.io(tf)
        n = int(ds.shape[0])
        if n == 0 or (t0 is not None and t1 is not None and t1 <= t0):
            return 0, 0, io
        starts, stride = _chunk_starts(fh, ds, tf, n)
        lo = 0 if t0 is None else _position(io, starts, stride, n, t0)
        hi = n if t1 is None else _position(io, starts, stride, n, t1)
        return lo, max(lo, hi), io

    def count(self, symbol: str, timeframe: str | Timeframe, start: TimeLike = None,
              end: TimeLike = None, dataset: str | None = None) -> int:
        """How many bars :meth:`read` would return (without reading them)."""
        lo, hi, _ = self._range(symbol, timeframe, start, end, dataset)
        return hi - lo

    def read_df(
        self,
        symbol: str,
        timeframe: str | Timeframe,
        start: TimeLike = None,
        end: TimeLike = None,
        dataset: str | None = None,
    ) -> pd.DataFrame:
        """The same bars as a DataFrame: UTC DatetimeIndex ``ts_event``, float prices."""
        return bars_to_frame(self.read(symbol, timeframe, start, end, dataset))

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


def bars_to_frame(bars: np.ndarray) -> pd.DataFrame:
    """BAR_DTYPE rows -> DataFrame with a UTC DatetimeIndex and prices / 1e9 as float64."""
    import pandas as pd

    index = pd.DatetimeIndex(bars["ts_event"].astype("datetime64[ns]"), name="ts_event").tz_localize("UTC")
    cols: dict[str, np.ndarray] = {f: bars[f] / FIXED_PRICE_SCALE for f in PRICE_FIELDS}
    cols["volume"] = bars["volume"].copy()
    cols["count"] = bars["count"].copy()
    return pd.DataFrame(cols, index=index)


def open_store(path: Path | str) -> StoreReader:
    """Open a store root, a dataset directory or one ``.h5`` file for reading."""
    return StoreReader(path)


def inspect_store(root: Path | str) -> list[dict[str, Any]]:
    """One row per (dataset, symbol, timeframe): rows, first and last bar, file size, writer."""
    with StoreReader(root) as reader:
        out = []
        for s in reader.series():
            holder = is_locked(s.path)
            out.append({
                "dataset": s.dataset,
                "symbol": s.symbol,
                "timeframe": s.timeframe,
                "rows": s.rows,
                "first": ns_to_iso(s.first),
                "last": ns_to_iso(s.last),
                "file_size": _human(s.file_size),
                "writer": f"pid {holder.get('pid')}" if holder else "-",
            })
        return out


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


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



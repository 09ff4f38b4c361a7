"""Exporting one symbol's bars of one timeframe to CSV or Parquet.

CSV is what users of CSV-per-month pipelines expect: a header, ISO-8601 UTC timestamps
(``2024-03-01T14:30:00Z``, the bar's open), prices as exact decimals made from the stored
fixed-point integers (``4783.25``, never a float rounding artefact), volume and count as
integers. ``split="monthly"`` writes ``<SYMBOL>_<YYYY>_<MM>_<tf>.csv`` (symbol escaped as in
the store) into the ``out`` directory. Parquet keeps the types: ``ts_event`` as a UTC
timestamp, prices as float64 (price / 1e9, like ``read_df``), volume uint64, count uint32.

Rows are read and written in blocks, so memory stays bounded for any range; every output
file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError, UsageError
from .records import FIXED_PRICE_SCALE
from .store import StoreReader, ns_to_iso, symbol_to_filename, to_ns
from .timeframes import TimeframeError, parse_timeframe

CSV_HEADER = "ts_event,open,high,low,close,volume,count\n"
PRICE_FIELDS = ("open", "high", "low", "close")
BLOCK_ROWS = 500_000
FORMATS = ("csv", "parquet")
SPLITS = ("none", "monthly")


def format_prices(values: np.ndarray) -> np.ndarray:
    """int64 fixed-point (1e-9) -> exact decimal strings, shortest form: 4783250000000 -> '4783.25'."""
    values = np.asarray(values, dtype=np.int64)
    uniq, inverse = np.unique(values, return_inverse=True)  # bar prices repeat a lot: format once
    out = []
    for v in uniq.tolist():
        q, r = divmod(abs(v), FIXED_PRICE_SCALE)
        frac = f"{r:09d}".rstrip("0") or "0"
        out.append(f"{'-' if v < 0 else ''}{q}.{frac}")
    return np.array(out, dtype=object)[inverse.reshape(values.shape)]


def format_times(ts: np.ndarray) -> np.ndarray:
    """int64 ns -> ISO-8601 UTC with 'Z' (whole seconds unless a value has a fraction)."""
    unit = "s" if not np.any(ts % 1_000_000_000) else "ns"
    return np.datetime_as_string(ts.astype("datetime64[ns]"), unit=unit, timezone="UTC")


def csv_lines(bars: np.ndarray) -> str:
    """CSV body (no header) for BAR_DTYPE rows."""
    if bars.shape[0] == 0:
        return ""
    prices = format_prices(np.stack([bars[f] for f in PRICE_FIELDS]))
    cols = [format_times(bars["ts_event"]).tolist()]
    cols += [prices[i].tolist() for i in range(len(PRICE_FIELDS))]
    cols += [bars["volume"].tolist(), bars["count"].tolist()]
    return "".join(f"{t},{o},{h},{lo},{c},{v},{n}\n" for t, o, h, lo, c, v, n in zip(*cols, strict=True))


class _Sink:
    """One output file written under a temporary name, renamed into place on close."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt, self.rows = path, fmt, 0
        self.tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "csv":
                self._fh = open(self.tmp, "w", encoding="ascii", newline="")  # noqa: SIM115
                self._fh.write(CSV_HEADER)
            else:
                pq = _pyarrow()[1]
                self._fh = pq.ParquetWriter(str(self.tmp), _arrow_schema(), compression="zstd")
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e.strerror or e}") from e

    def write(self, bars: np.ndarray) -> None:
        try:
            if self.fmt == "csv":
                self._fh.write(csv_lines(bars))
            else:
                self._fh.write_table(_arrow_table(bars))
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot write {self.path}: {e.strerror or e}") from e
        self.rows += int(bars.shape[0])

    def close(self) -> tuple[Path, int]:
        try:
            self._fh.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot write {self.path}: {e.strerror or e}") from e
        return self.path, self.rows

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._fh.close()
        self.tmp.unlink(missing_ok=True)


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("Parquet export needs pyarrow: pip install 'streambars[parquet]'") from None
    return pa, pq


def _arrow_schema() -> Any:
    pa = _pyarrow()[0]
    fields = [pa.field("ts_event", pa.timestamp("ns", tz="UTC"))]
    fields += [pa.field(f, pa.float64()) for f in PRICE_FIELDS]
    fields += [pa.field("volume", pa.uint64()), pa.field("count", pa.uint32())]
    return pa.schema(fields)


def _arrow_table(bars: np.ndarray) -> Any:
    pa = _pyarrow()[0]
    cols = [pa.array(bars["ts_event"].astype("datetime64[ns]"), type=pa.timestamp("ns", tz="UTC"))]
    cols += [pa.array(bars[f] / FIXED_PRICE_SCALE) for f in PRICE_FIELDS]
    cols += [pa.array(bars["volume"]), pa.array(bars["count"])]
    return pa.Table.from_arrays(cols, schema=_arrow_schema())


def time_bound(value: Any, what: str) -> int | None:
    """A --start/--end as int ns, where a date beyond what int64 nanoseconds can hold
    (before 1677-09-22 or after 2262-04-11, e.g. 0001-01-01 or 9999-12-31) means "no bound"
    on that side rather than an overflow: every stored bar lies inside that range. A start
    after it (or an end before it) selects nothing, as it says."""
    if value is None or isinstance(value, int | np.integer) or value == "":
        return None if value == "" else value
    import pandas as pd

    try:
        return to_ns(value, what)
    except (OverflowError, pd.errors.OutOfBoundsDatetime):
        pass
    try:
        year = pd.Timestamp(value).year
    except (ValueError, TypeError, OverflowError):
        raise UsageError(f"--{what} {value!r} is not a date or time (ISO-8601, e.g. 2024-03-01)") from None
    low_side = year < 1970
    if (what == "start") == low_side:
        return None  # a start before every bar, an end after every bar: no bound
    return np.iinfo(np.int64).min + 1 if low_side else np.iinfo(np.int64).max


def _blocks(reader: StoreReader, symbol: str, tf: str, start: Any, end: Any, dataset: str | None) -> Iterator[np.ndarray]:
    """The range in blocks of BLOCK_ROWS rows (each found by the reader's binary search)."""
    t0, t1 = to_ns(start, "start"), to_ns(end, "end")
    while True:
        block = reader.read(symbol, tf, t0, t1, dataset=dataset, limit=BLOCK_ROWS)
        if block.shape[0] == 0:
            return
        yield block
        if block.shape[0] < BLOCK_ROWS:
            return
        t0 = int(block["ts_event"][-1]) + 1


def export_bars(
    root: Path | str,
    *,
    symbol: str,
    timeframe: str,
    dataset: str | None = None,
    start: Any = None,
    end: Any = None,
    fmt: str = "csv",
    split: str = "none",
    out: Path | str,
) -> list[tuple[Path, int]]:
    """Write the bars of [start, end) to ``out``; returns (path, rows) per file written.

    ``split="none"``: ``out`` is the file (or an existing directory, which then gets
    ``<SYMBOL>_<tf>.<ext>``). ``split="monthly"``: ``out`` is a directory and gets one
    ``<SYMBOL>_<YYYY>_<MM>_<tf>.<ext>`` per calendar month (UTC) that has bars."""
    if fmt not in FORMATS:
        raise UsageError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise UsageError(f"export split {split!r} is not one of {', '.join(SPLITS)}")
    if fmt == "parquet":
        _pyarrow()
    try:
        tf = parse_timeframe(timeframe).name
    except TimeframeError as e:
        raise UsageError(f"--timeframe: {e}") from None
    t0, t1 = time_bound(start, "start"), time_bound(end, "end")
    out = Path(out)
    ext = "csv" if fmt == "csv" else "parquet"
    stem = symbol_to_filename(symbol)
    written: list[tuple[Path, int]] = []
    with StoreReader(root) as reader:
        sink: _Sink | None = None
        month: np.datetime64 | None = None
        try:
            for block in _blocks(reader, symbol, tf, t0, t1, dataset):
                if split == "none":
                    if sink is None:
                        target = out / f"{stem}_{tf}.{ext}" if out.is_dir() else out
                        sink = _Sink(target, fmt)
                    sink.write(block)
                    continue
                months = block["ts_event"].astype("datetime64[ns]").astype("datetime64[M]")
                if np.isnat(months).any():  # int64's minimum is numpy's NaT: no month to file it in
                    raise StoreError(
                        f"{symbol} {tf}: a stored row has ts_event {np.iinfo(np.int64).min} (not a time), "
                        "so it has no month file; run `streambars validate` on this store")
                cuts = np.flatnonzero(months[1:] != months[:-1]) + 1
                for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, months.size], strict=True):
                    if months[lo] != month:
                        if sink is not None:
                            written.append(sink.close())
                        month = months[lo]
                        y, m = str(month).split("-")
                        sink = _Sink(out / f"{stem}_{y}_{m}_{tf}.{ext}", fmt)
                    assert sink is not None
                    sink.write(block[lo:hi])
            if sink is not None:
                written.append(sink.close())
                sink = None
        finally:
            if sink is not None:
                sink.abort()
        if not written:
            _raise_empty(reader, symbol, tf, start, end, dataset)
    return written


def _raise_empty(reader: StoreReader, symbol: str, tf: str, start: Any, end: Any, dataset: str | None) -> None:
    have = [s for s in reader.series() if s.symbol == symbol and s.timeframe == tf and dataset in (None, s.dataset)]
    if not have:
        reader.timeframes(symbol, dataset)  # raises naming what exists if the symbol is absent
        raise StoreError(f"{symbol} has no {tf} bars in {reader.path}")
    s = have[0]
    held = f"{ns_to_iso(s.first)} .. {ns_to_iso(s.last)}" if s.rows else "no rows"
    raise StoreError(
        f"no {symbol} {tf} bars in [{start or 'start'}, {end or 'end'}) (the store holds {held})"
    )

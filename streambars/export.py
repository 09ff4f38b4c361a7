"""Exporting bars -- several symbols and timeframes per call -- to CSV, gzipped CSV or Parquet.

CSV is what users of CSV-per-month pipelines expect: a header, ISO-8601 timestamps (the
bar's open; UTC ``2024-03-01T14:30:00Z``, or with the offset of ``tz``,
``2024-03-01T09:30:00-05:00``), prices as exact decimals made from the stored fixed-point
integers (``4783.25``, never a float rounding artefact), volume and count as integers.
Parquet keeps the types: ``ts_event`` a timestamp (UTC or ``tz``), prices float64
(price / 1e9, like ``read_df``), volume uint64, count uint32.

Where the rows go (:class:`Target`): one file (its suffix names the format unless ``fmt``
says otherwise), stdout (``out="-"``, CSV only), a directory (``<SYMBOL>_<tf>.<ext>`` per
series), or a ``layout``: a path template under ``out`` with ``{DATASET}``, ``{SYMBOL}``,
``{TF}``, ``{YYYY}``, ``{MM}``, ``{DD}``, one file per series and per year, month or day
(the finest time placeholder). Periods are cut in UTC, or in ``tz`` when given.

Rows are read and written in blocks (:func:`write_series`), so memory stays bounded for
any range; every output file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import string
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError, UsageError
from .records import FIXED_PRICE_SCALE
from .store import StoreReader, ns_to_iso, symbol_to_filename, to_ns
from .store.frames import PRICE_FIELDS
from .timeframes import TimeframeError, parse_timeframe
from .timeutil import check_tz

CSV_HEADER = "ts_event,open,high,low,close,volume,count\n"
BLOCK_ROWS = 500_000
FORMATS = ("csv", "csv.gz", "parquet")
SPLITS = ("none", "monthly")
#: Named layouts: the per-symbol-month CSV trees of the usual Databento scripts.
LAYOUTS = {
    "symbol-month": "{SYMBOL}/{SYMBOL}_{YYYY}_{MM}.csv",       # data/raw_1s/ES/ES_2024_01.csv
    "timeframe-month": "{TF}/{SYMBOL}_{YYYY}_{MM}_{TF}.csv",   # data/aggregated/15s/ES_2024_01_15s.csv
}
PLACEHOLDERS = ("DATASET", "SYMBOL", "TF", "YYYY", "MM", "DD")
_PERIOD_UNIT = {"DD": "D", "MM": "M", "YYYY": "Y"}
STDOUT = "-"

OnRows = Callable[[int], None]


def _no_progress(_: int) -> None:
    """The default ``on_rows``: nothing (a progress display plugs in here)."""


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


def local_ns(ts: np.ndarray, tz: str | None) -> np.ndarray:
    """int64 ns UTC -> the wall-clock time in ``tz`` as int64 ns (``ts`` itself for UTC)."""
    if tz is None or tz == "UTC":
        return ts
    import pandas as pd

    idx = pd.DatetimeIndex(ts.astype("datetime64[ns]"), tz="UTC").tz_convert(tz).tz_localize(None)
    return idx.asi8


def format_times(ts: np.ndarray, tz: str | None = None) -> np.ndarray:
    """int64 ns -> ISO-8601 (whole seconds unless a value has a fraction): UTC with 'Z', or
    the wall-clock time in ``tz`` with its UTC offset ('2024-03-08T09:30:00-05:00')."""
    unit = "s" if not np.any(ts % 1_000_000_000) else "ns"
    if tz is None or tz == "UTC":
        return np.datetime_as_string(ts.astype("datetime64[ns]"), unit=unit, timezone="UTC")
    wall = local_ns(ts, tz)
    text = np.datetime_as_string(wall.astype("datetime64[ns]"), unit=unit).astype(object)
    offsets, inverse = np.unique((wall - ts) // 60_000_000_000, return_inverse=True)  # minutes east
    names = np.array([f"{'-' if m < 0 else '+'}{abs(m) // 60:02d}:{abs(m) % 60:02d}" for m in offsets.tolist()],
                     dtype=object)
    return text + names[inverse]


def csv_lines(bars: np.ndarray, tz: str | None = None) -> str:
    """CSV body (no header) for BAR_DTYPE rows."""
    if bars.shape[0] == 0:
        return ""
    prices = format_prices(np.stack([bars[f] for f in PRICE_FIELDS]))
    cols = [format_times(bars["ts_event"], tz).tolist()]
    cols += [prices[i].tolist() for i in range(len(PRICE_FIELDS))]
    cols += [bars["volume"].tolist(), bars["count"].tolist()]
    return "".join(f"{t},{o},{h},{lo},{c},{v},{n}\n" for t, o, h, lo, c, v, n in zip(*cols, strict=True))


# -- where the rows go ------------------------------------------------------------------------


def format_of(name: str) -> str | None:
    """The format a file name's suffix names ('x.csv.gz' -> 'csv.gz'), None if none."""
    low = name.lower()
    for fmt in sorted(FORMATS, key=len, reverse=True):
        if low.endswith("." + fmt):
            return fmt
    return None


def _resolve_format(fmt: str | None, name: str, what: str) -> str:
    """The format of an output named ``name``: ``fmt`` when given (its suffix must not name
    another), else the one its suffix names (``fmt`` was checked by :func:`plan_target`)."""
    named = format_of(name)
    if fmt is None:
        if named is None:
            raise UsageError(f"{what} {name!r}: the format follows the suffix (.csv, .csv.gz or .parquet); "
                             "give one, or --format")
        return named
    if named is not None and named != fmt:
        raise UsageError(f"{what} {name!r} names {named} but --format is {fmt}: make them agree")
    return fmt


@dataclass(frozen=True)
class Target:
    """Where the rows of each series go: ``stdout``, one ``file``, a ``directory`` or a
    ``layout`` template under ``root``; ``period`` is the numpy unit ('Y', 'M', 'D') the
    template cuts files by, None for one file per series."""

    kind: str  # "stdout" | "file" | "directory" | "layout"
    fmt: str
    root: Path
    template: str = ""
    period: str | None = None

    @property
    def many(self) -> bool:
        """Can take several series (each to its own files)."""
        return self.kind in ("directory", "layout")

    def path(self, dataset: str, symbol: str, tf: str, period: np.datetime64 | None) -> Path | None:
        """The file of one series (and period); None for stdout."""
        if self.kind == "stdout":
            return None
        if self.kind == "file":
            return self.root
        stem = symbol_to_filename(symbol)
        if self.kind == "directory":
            return self.root / f"{stem}_{tf}.{self.fmt}"
        fields = {"DATASET": dataset, "SYMBOL": stem, "TF": tf, "YYYY": "", "MM": "", "DD": ""}
        if period is not None:
            day = str(period.astype("datetime64[D]"))  # YYYY-MM-DD
            fields.update(YYYY=day[:4], MM=day[5:7], DD=day[8:10])
        return self.root / self.template.format(**fields)


def plan_target(out: Path | str, fmt: str | None = None, layout: str | None = None, split: str = "none") -> Target:
    """Check ``out``/``fmt``/``layout`` and say where rows go (UsageError when they clash)."""
    if split not in SPLITS:
        raise UsageError(f"export split {split!r} is not one of {', '.join(SPLITS)}")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    text = str(out)
    if text == STDOUT:
        if layout or split != "none":
            raise UsageError("--out - (stdout) takes one series: --layout and --split need a directory --out")
        if fmt not in (None, "csv"):
            raise UsageError(f"--out - writes plain CSV to stdout, not {fmt}: give a file --out for {fmt} "
                             "(or pipe the CSV through gzip)")
        return Target("stdout", "csv", Path(STDOUT))
    root = Path(out)
    if split == "monthly" and layout is not None:
        raise UsageError("--split monthly is the layout {SYMBOL}_{YYYY}_{MM}_{TF}: give it or --layout, not both")
    if split == "monthly":
        layout = "{SYMBOL}_{YYYY}_{MM}_{TF}." + (fmt or "csv")
    if layout is not None:
        if root.exists() and not root.is_dir():
            raise UsageError(f"--layout writes a tree of files under --out, and {root} is a file")
        return _layout_target(root, layout, fmt)
    if root.is_dir() or text.endswith(("/", os.sep)):
        return Target("directory", fmt or "csv", root)
    return Target("file", _resolve_format(fmt, root.name, "--out"), root)


def _layout_target(root: Path, layout: str, fmt: str | None) -> Target:
    template = LAYOUTS.get(layout)
    if template is not None:  # a preset: its .csv is only the default format
        if fmt is not None:
            template = template[: -len(".csv")] + "." + fmt
    else:
        template = layout
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UsageError(f"--layout {layout!r}: {e} (placeholders: {{{'}, {'.join(PLACEHOLDERS)}}})") from None
    unknown = sorted({n for n in names if n not in PLACEHOLDERS})
    if unknown:
        raise UsageError(
            f"--layout {layout!r}: unknown placeholder {{{unknown[0]}}}; use {{{'}, {'.join(PLACEHOLDERS)}}} "
            f"or a preset ({', '.join(LAYOUTS)})")
    if "DD" in names and "MM" not in names or "MM" in names and "YYYY" not in names:
        raise UsageError(f"--layout {layout!r}: {{DD}} needs {{MM}} and {{MM}} needs {{YYYY}} "
                         "(else two periods share a file)")
    if Path(template).is_absolute():
        raise UsageError(f"--layout {layout!r} must be a relative path (it is placed under --out)")
    period = next((_PERIOD_UNIT[p] for p in ("DD", "MM", "YYYY") if p in names), None)
    return Target("layout", _resolve_format(fmt, template, "--layout"), root, template, period)


# -- writing ----------------------------------------------------------------------------------


class _Sink:
    """One output file written under a temporary name, renamed into place on close; or
    stdout (``path`` None), written as it comes."""

    def __init__(self, path: Path | None, fmt: str, tz: str | None):
        self.path, self.fmt, self.tz, self.rows = path, fmt, tz, 0
        self.tmp = path.with_name(f".{path.name}.partial-{os.getpid()}") if path is not None else None
        try:
            if self.tmp is None:
                self._fh: Any = sys.stdout
                self._fh.write(CSV_HEADER)
                return
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "csv":
                self._fh = open(self.tmp, "w", encoding="ascii", newline="")  # noqa: SIM115
            elif fmt == "csv.gz":
                self._fh = gzip.open(self.tmp, "wt", encoding="ascii", newline="")  # noqa: SIM115
            else:
                pq = _pyarrow()[1]
                self._fh = pq.ParquetWriter(str(self.tmp), _arrow_schema(tz), compression="zstd")
            if fmt != "parquet":
                self._fh.write(CSV_HEADER)
        except BrokenPipeError:
            raise _stdout_closed(0) from None
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e.strerror or e}") from e

    @property
    def name(self) -> str:
        return "stdout" if self.path is None else str(self.path)

    def write(self, bars: np.ndarray) -> None:
        try:
            if self.fmt == "parquet":
                self._fh.write_table(_arrow_table(bars, self.tz))
            else:
                self._fh.write(csv_lines(bars, self.tz))
        except BrokenPipeError:
            raise _stdout_closed(self.rows) from None
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot write {self.name}: {e.strerror or e}") from e
        self.rows += int(bars.shape[0])

    def close(self) -> tuple[Path | str, int]:
        try:
            if self.tmp is None:
                self._fh.flush()
                return STDOUT, self.rows
            self._fh.close()
            os.replace(self.tmp, self.path)  # type: ignore[arg-type]
        except BrokenPipeError:
            raise _stdout_closed(self.rows) from None
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot write {self.name}: {e.strerror or e}") from e
        return self.path, self.rows  # type: ignore[return-value]

    def abort(self) -> None:
        if self.tmp is None:
            return
        with contextlib.suppress(Exception):
            self._fh.close()
        self.tmp.unlink(missing_ok=True)


def _stdout_closed(rows: int) -> StoreError:
    """The reader of stdout went away (``| head``): stop, and keep Python's final flush quiet."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return StoreError(f"stdout was closed by its reader (e.g. | head) after {rows} rows were written: export stopped")


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("Parquet export needs pyarrow: pip install '.[parquet]' in a checkout of streambars") from None
    return pa, pq


def _arrow_schema(tz: str | None = None) -> Any:
    pa = _pyarrow()[0]
    fields = [pa.field("ts_event", pa.timestamp("ns", tz=tz or "UTC"))]
    fields += [pa.field(f, pa.float64()) for f in PRICE_FIELDS]
    fields += [pa.field("volume", pa.uint64()), pa.field("count", pa.uint32())]
    return pa.schema(fields)


def _arrow_table(bars: np.ndarray, tz: str | None = None) -> Any:
    pa = _pyarrow()[0]
    cols = [pa.array(bars["ts_event"].astype("datetime64[ns]"), type=pa.timestamp("ns", tz=tz or "UTC"))]
    cols += [pa.array(bars[f] / FIXED_PRICE_SCALE) for f in PRICE_FIELDS]
    cols += [pa.array(bars["volume"]), pa.array(bars["count"])]
    return pa.Table.from_arrays(cols, schema=_arrow_schema(tz))


def time_bound(value: Any, what: str, tz: str | None = None) -> int | None:
    """A --start/--end as int ns, naive times (strings, datetimes, Timestamps alike) read as
    wall-clock times in ``tz`` when given, else UTC. A date beyond what int64 nanoseconds can
    hold (before 1677-09-22 or after 2262-04-11, e.g. 0001-01-01 or 9999-12-31) means "no
    bound" on that side rather than an overflow: every stored bar lies inside that range. A
    start after it (or an end before it) selects nothing, as it says."""
    if value is None or isinstance(value, int | np.integer) or value == "":
        return None if value == "" else value
    import pandas as pd

    try:
        return to_ns(value, what, tz)
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


@dataclass(frozen=True)
class Series:
    """One (dataset, symbol, timeframe) to export."""

    dataset: str
    symbol: str
    timeframe: str


def read_blocks(reader: StoreReader, s: Series, t0: int | None, t1: int | None) -> Iterator[np.ndarray]:
    """The range in blocks of BLOCK_ROWS rows (each found by the reader's binary search)."""
    while True:
        block = reader.read(s.symbol, s.timeframe, t0, t1, dataset=s.dataset, limit=BLOCK_ROWS)
        if block.shape[0] == 0:
            return
        yield block
        if block.shape[0] < BLOCK_ROWS:
            return
        t0 = int(block["ts_event"][-1]) + 1


def write_series(
    blocks: Iterator[np.ndarray],
    s: Series,
    target: Target,
    tz: str | None = None,
    on_rows: OnRows = _no_progress,
    taken: set[Path] | None = None,
) -> list[tuple[Path | str, int]]:
    """Write one series' blocks (in time order) to ``target``: each block is cut by period
    when the target has one, each file completed before the next opens. ``on_rows(n)``
    after every piece written; ``taken``: files written earlier in this export (a second
    write to one of them is an error, never an overwrite)."""
    taken = set() if taken is None else taken
    written: list[tuple[Path | str, int]] = []
    sink: _Sink | None = None
    current: np.datetime64 | None = None
    try:
        for block in blocks:
            cuts, keys = _periods(block, s, target.period, tz)
            for lo, hi, key in zip(cuts[:-1], cuts[1:], keys, strict=True):
                if sink is None or key != current:
                    if sink is not None:
                        written.append(sink.close())
                    current = key
                    sink = _open_sink(target.path(s.dataset, s.symbol, s.timeframe, key), target.fmt, tz, taken)
                sink.write(block[lo:hi])
                on_rows(int(hi - lo))
        if sink is not None:
            written.append(sink.close())
            sink = None
    finally:
        if sink is not None:
            sink.abort()
    return written


def _open_sink(path: Path | None, fmt: str, tz: str | None, taken: set[Path]) -> _Sink:
    if path is not None:
        if path in taken:
            raise UsageError(f"two series would be written to {path}: add {{SYMBOL}}/{{TF}}/{{DATASET}} "
                             "to --layout")
        taken.add(path)
    return _Sink(path, fmt, tz)


def _periods(block: np.ndarray, s: Series, unit: str | None, tz: str | None) -> tuple[list[int], list[Any]]:
    """Row offsets where the period changes (first 0, last len) and each piece's period."""
    n = int(block.shape[0])
    if unit is None:
        return [0, n], [None]
    keys = local_ns(block["ts_event"], tz).astype("datetime64[ns]").astype(f"datetime64[{unit}]")
    if np.isnat(keys).any():  # int64's minimum is numpy's NaT: no period to file it in
        raise StoreError(
            f"{s.symbol} {s.timeframe}: a stored row has ts_event {np.iinfo(np.int64).min} (not a time), "
            "so it has no period file; run `streambars validate` on this store")
    cuts = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    starts = [0, *cuts.tolist()]
    return [*starts, n], [keys[i] for i in starts]


def _as_list(value: str | Sequence[str] | None, what: str) -> list[str]:
    """A name, a comma list or a sequence of them -> names (order kept, repeats dropped)."""
    items = [value] if isinstance(value, str) else list(value or [])
    out: list[str] = []
    for item in items:
        for part in str(item).split(",") if what == "timeframe" else [str(item)]:
            part = part.strip()
            if part and part not in out:
                out.append(part)
    if not out:
        raise UsageError(f"export needs at least one --{what}")
    return out


def select_series(reader: StoreReader, symbols: list[str], timeframes: list[str], dataset: str | None) -> list[Series]:
    """The (dataset, symbol, timeframe) to export, in order: ``all`` expands to every symbol
    (of ``dataset``) or every stored timeframe; a named symbol or timeframe must exist."""
    if "all" in symbols:
        pairs = sorted(reader.pairs(dataset), key=lambda p: (p[1], p[0]))
        if not pairs:
            raise StoreError(f"no symbols{' in dataset ' + dataset if dataset else ''} in {reader.path}")
    else:
        # locate names what exists when a symbol is absent, damaged or in several datasets
        pairs = [(reader.locate(sym, dataset), sym) for sym in symbols]
    names = []
    if "all" not in timeframes:
        for tf in timeframes:
            try:
                names.append(parse_timeframe(tf).name)
            except TimeframeError as e:
                raise UsageError(f"--timeframe: {e}") from None
    out = []
    for ds, sym in pairs:
        have = reader.timeframes(sym, ds)
        for tf in names or have:
            if tf not in have:
                raise StoreError(f"{sym} has no {tf} bars in {reader.path} (it has {', '.join(have)})")
            out.append(Series(ds, sym, tf))
    return list(dict.fromkeys(out))


def export_bars(
    root: Path | str,
    *,
    symbol: str | Sequence[str],
    timeframe: str | Sequence[str],
    dataset: str | None = None,
    start: Any = None,
    end: Any = None,
    fmt: str | None = None,
    split: str = "none",
    layout: str | None = None,
    tz: str | None = None,
    out: Path | str,
    on_rows: OnRows | None = None,
    on_total: OnRows | None = None,
) -> list[tuple[Path | str, int]]:
    """Write the bars of [start, end) of every selected series; returns (path, rows) per file
    written ('-' for stdout).

    ``symbol``/``timeframe``: a name, a list, ``"all"`` (timeframes also as a comma list
    '15s,1min'). ``out``: a file (format from its suffix unless ``fmt``), ``"-"`` (CSV to
    stdout), a directory (existing or ending in '/': ``<SYMBOL>_<tf>.<ext>`` per series), or
    the base of ``layout`` (a preset of :data:`LAYOUTS` or a template). ``split="monthly"``
    is the layout ``{SYMBOL}_{YYYY}_{MM}_{TF}``. ``tz``: the zone of the written times, of
    naive ``start``/``end`` and of the period cuts (default UTC). Series without bars in the
    range get no file; nothing at all is an error. ``on_total(n)``: the rows the range holds
    (binary searches, before anything is written: a progress display's ETA); ``on_rows(n)``
    after each piece written."""
    target = plan_target(out, fmt, layout, split)
    if target.fmt == "parquet":
        _pyarrow()
    zone = None if tz is None else check_tz(tz)
    t0, t1 = time_bound(start, "start", zone), time_bound(end, "end", zone)
    symbols, timeframes = _as_list(symbol, "symbol"), _as_list(timeframe, "timeframe")
    written: list[tuple[Path | str, int]] = []
    with StoreReader(root) as reader:
        series = select_series(reader, symbols, timeframes, dataset)
        if len(series) > 1 and not target.many:
            where = "stdout" if target.kind == "stdout" else f"one file ({target.root})"
            raise UsageError(
                f"{len(series)} series ({_names(series)}) cannot go to {where}: give --layout "
                f"(e.g. {next(iter(LAYOUTS))}) or a directory --out (existing, or ending in /)")
        if target.kind == "layout":
            _check_layout_separates(target, series)
        if on_total is not None:
            on_total(sum(reader.count(s.symbol, s.timeframe, t0, t1, dataset=s.dataset) for s in series))
        taken: set[Path] = set()
        for s in series:
            written += write_series(read_blocks(reader, s, t0, t1), s, target, zone, on_rows or _no_progress, taken)
        if not written:
            _raise_empty(reader, series[0], start, end)
    return written


def _names(series: list[Series]) -> str:
    text = ", ".join(f"{s.symbol} {s.timeframe}" for s in series[:4])
    return text + (f", ... ({len(series)} in all)" if len(series) > 4 else "")


def _check_layout_separates(target: Target, series: list[Series]) -> None:
    """Several symbols (timeframes, datasets) need {SYMBOL} ({TF}, {DATASET}) in the template."""
    for field, values in (("SYMBOL", {s.symbol for s in series}), ("TF", {s.timeframe for s in series})):
        if len(values) > 1 and "{" + field + "}" not in target.template:
            raise UsageError(f"--layout {target.template!r} has no {{{field}}}, so {len(values)} "
                             f"{'symbols' if field == 'SYMBOL' else 'timeframes'} would share its files: add it")


def _raise_empty(reader: StoreReader, s: Series, start: Any, end: Any) -> None:
    span = reader.span(s.symbol, s.timeframe, s.dataset)
    held = f"{ns_to_iso(span[0])} .. {ns_to_iso(span[1])}" if span else "no rows"
    raise StoreError(
        f"no {s.symbol} {s.timeframe} bars in [{start or 'start'}, {end or 'end'}) (the store holds {held})"
    )

"""`streambars validate`: every rule over a store, with reports people act on.

Modules, one job each:

* ``checks``    -- the rules as pure functions over numpy arrays (per-record rules through
                   ``streambars.rules.record_violations``, the engine's own definition)
* ``series``    -- all single-series rules of one (symbol, timeframe), fed a slice at a time
* ``crosstf``   -- every coarser bar against the aggregation of the finest stored bars
* ``calendar``  -- Databento dataset -> exchange calendar -> trading hours (for gaps)
* ``reference`` -- our 1min/1h/1d against Databento's own OHLCV bars (``--reference``)
* ``walk``      -- one file, a UTC month at a time, through the store reader
* ``report``    -- text, JSON and the terminal table

Exit codes: 0 clean (warnings and info allowed), 1 an error-severity rule failed, 2 bad
arguments or an unreadable store (also when one file of it cannot be read: the others are
still checked and reported).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from ..errors import StoreError, UsageError
from ..observe import Progress, ProgressDisplay
from ..timeframes import Session, Timeframe, TimeframeError, parse_timeframe
from ..timeutil import iso, parse_time
from .calendar import CalendarSpec, calendar_for
from .checks import NS, fmt_duration
from .reference import Fetcher, ReferenceUnavailable, historical_fetcher
from .report import Report, SeriesResult
from .series import Params
from .walk import FileView, validate_file

__all__ = ["Report", "SeriesResult", "UnreadableStoreError", "run_validate", "validate_store"]


class UnreadableStoreError(StoreError):
    """The store (or a file in it) cannot be read at all: exit code 2."""

    exit_code = 2


class StoreFileView:
    """The walk's view of one store file, through :class:`streambars.store.StoreReader`."""

    def __init__(self, reader, infos: list, session: Session, stype: str, progress: Progress | None = None):
        first = infos[0]
        self.progress = progress
        self.reader = reader
        self.dataset, self.symbol, self.path = first.dataset, first.symbol, str(first.path)
        self.session, self.stype = session, stype
        self._infos = {parse_timeframe(i.timeframe): i for i in infos}
        self.timeframes = sorted(self._infos)

    def extent(self, tf: Timeframe) -> tuple[int, int, int]:
        i = self._infos[tf]
        return (i.rows, i.first, i.last) if i.rows else (0, 0, 0)

    def read(self, tf: Timeframe, start: int, end: int):
        bars = self.reader.read(self.symbol, tf.name, start, end, dataset=self.dataset)
        if self.progress is not None:  # live figures; the file's total is settled from its results
            self.progress.add(records=len(bars), nbytes=bars.nbytes)
        return bars


def _file_contract(path: Path, settings) -> tuple[Session, str, str]:
    """(session, stype, note) from the file's contract attributes (read-only, SWMR, no lock)."""
    from ..store.probe import open_read

    try:  # bounded metadata retries: a damaged file must not hang here
        with open_read(Path(path), swmr=True) as f:
            attrs = {k: f.attrs.get(k) for k in ("session", "stype")}
    except (OSError, RuntimeError, KeyError, ValueError):
        attrs = {}
    stype = str(attrs.get("stype") or settings.databento.stype_in)
    text = attrs.get("session")
    if text is None:
        fallback = settings.bars.session
        return fallback, stype, f"{path}: no session attribute; daily bars checked against {fallback}"
    try:
        return Session.parse(str(text)), stype, ""
    except ValueError as e:
        raise UnreadableStoreError(f"{path}: session attribute {text!r} is not valid: {e}") from None




def params_from(settings) -> Params:
    v = settings.validation
    return Params(
        max_volume=int(v.max_volume),
        price_jump=float(v.price_jump),
        gap_ns=int(v.gap.seconds) * NS,
        volume_sigma=float(v.volume_outlier_sigma),
    )


def validate_store(
    settings,
    *,
    dataset: str | None = None,
    symbols: list[str] | None = None,
    timeframes: list[str] | None = None,
    start: str | int | None = None,
    end: str | int | None = None,
    reference: bool = False,
    fetcher: Fetcher | None = None,
    env_file: str | None = None,
    store: Path | str | None = None,
    progress: Progress | None = None,
) -> Report:
    """Validate a store; the report (``exit_code`` 0/1). Raises UsageError / UnreadableStoreError.
    ``progress`` (if given) counts the rows checked and the files done."""
    from ..store import open_store

    root = Path(store if store is not None else settings.store.path)
    t0 = start if isinstance(start, int) else parse_time(start, "start")
    t1 = end if isinstance(end, int) else parse_time(end, "end")
    if t0 is not None and t1 is not None and t1 <= t0:
        raise UsageError(f"--end {iso(t1)} is not after --start {iso(t0)}")
    selected = None
    if timeframes:
        try:
            selected = sorted({parse_timeframe(t) for t in _split(timeframes)})
        except TimeframeError as e:
            raise UsageError(f"--timeframe: {e}") from None
    wanted_symbols = _split(symbols) if symbols else None

    params = params_from(settings)
    report = Report(str(root), datetime.now(UTC), range_start=t0, range_end=t1)
    report.parameters = {
        "max_volume": params.max_volume or "off",
        "price_jump": f"open/close more than {params.price_jump:.1%} from the previous close",
        "gap": f"no bar for more than {fmt_duration(params.gap_ns)} of trading time "
        "(checked on the finest selected timeframe)",
        "volume_outlier": f"log(1+volume) more than {params.volume_sigma:g} robust sigmas "
        "(median/MAD) above the median of the bars of the same UTC month and quarter hour of the session",
    }

    if not root.exists():
        raise UnreadableStoreError(f"no store at {root} (set --store or store.path)")
    try:
        reader = open_store(root)
    except StoreError as e:
        raise UnreadableStoreError(str(e)) from None
    reader.strict_order = False  # out-of-order bars are reported by rule, not as damage
    with reader:
        try:
            reader.check()
            infos = reader.series(skip_unreadable=True, raw=True)
        except (OSError, StoreError) as e:
            raise UnreadableStoreError(f"cannot read {root}: {e}") from None
        problems = reader.problems()
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for info in infos:
            if info.path not in problems:
                groups[(info.dataset, info.symbol)].append(info)
        for path, err in sorted(problems.items()):
            _add_unreadable(report, path, err)
        if not groups:
            why = f": {'; '.join(report.unreadable)}" if report.unreadable else ""
            raise UnreadableStoreError(f"no readable bar files in {root}{why}")
        unreadable_keys = {_name_of(p) for p in problems}
        chosen = _select(groups, dataset, wanted_symbols, selected, unreadable_keys)

        fetch: Fetcher | None = None
        ref_error: str | None = None
        if reference:
            try:
                fetch = fetcher or historical_fetcher(settings, env_file)
            except ReferenceUnavailable as e:
                ref_error = f"--reference unavailable: {e}"
                report.notes.append(ref_error)

        if progress is not None:
            progress.units_total = len(chosen)
            progress.total_records = _rows_in_range(reader, groups, chosen, selected, t0, t1)
        calendars: dict[str, CalendarSpec] = {}
        for key in chosen:
            ds, sym = key
            file_infos = groups[key]
            if ds not in calendars:
                try:
                    calendars[ds] = calendar_for(settings.validation.calendar, ds)
                except ValueError as e:
                    raise UsageError(str(e)) from None
                report.notes.append(f"{ds}: trading calendar {calendars[ds]}: {calendars[ds].note}")
            session, stype, note = _file_contract(file_infos[0].path, settings)
            if note:
                report.notes.append(note)
            view: FileView = StoreFileView(reader, file_infos, session, stype, progress)
            base = progress.records if progress is not None else 0
            tfs = None
            if selected is not None:
                tfs = [tf for tf in selected if tf in view.timeframes]
            try:
                outcome = validate_file(view, tfs, params, calendars[ds], t0, t1, fetch, ref_error)
            except (OSError, StoreError) as e:  # found while reading: a row for it, go on
                err = e if isinstance(e, StoreError) else StoreError(f"cannot read {file_infos[0].path}: {e}")
                _add_unreadable(report, Path(file_infos[0].path), err)
                continue
            finally:
                if progress is not None:
                    progress.units_done += 1
            report.series += outcome.results
            report.notes += outcome.notes
            if progress is not None:  # exactly the rows the report says were checked
                progress.records = base + sum(r.rows for r in outcome.results)
    report.finished = datetime.now(UTC)
    return report


def _rows_in_range(reader, groups, chosen, selected, t0, t1) -> int | None:
    """Rows the walk will check (the ETA's basis): cheap, binary searches only."""
    try:
        return sum(
            reader.count(i.symbol, i.timeframe, t0, t1, dataset=i.dataset)
            for key in chosen for i in groups[key]
            if selected is None or parse_timeframe(i.timeframe) in selected
        )
    except (OSError, StoreError):
        return None  # said where the walk meets it; the ETA goes by files then


def _add_unreadable(report: Report, path: Path, err: StoreError) -> None:
    """A file that cannot be read: a row of the table ("damaged: ..."), a note, exit code 2."""
    from ..store.reader import problem_text

    dataset, symbol = _name_of(path)
    status = problem_text(err)
    report.unreadable.append(f"{path}: {status}")
    report.unreadable_rows.append({"dataset": dataset, "symbol": symbol, "status": status})
    report.notes.append(f"unreadable: {path}: {status}")


def _name_of(path: Path) -> tuple[str, str]:
    from ..store.reader import _name_of as name_of

    return name_of(Path(path))


def _split(values: list[str]) -> list[str]:
    out = []
    for v in values:
        out += [x.strip() for x in str(v).split(",") if x.strip()]
    return out


def _select(groups, dataset, symbols, selected, unreadable=frozenset()) -> list[tuple[str, str]]:
    """The (dataset, symbol) keys to validate. ``unreadable``: keys of files that cannot be
    read (reported as such): asking for one of them is not "not in the store"."""
    keys = sorted(groups)
    if dataset:
        have = sorted({d for d, _ in keys} | {d for d, _ in unreadable})
        keys = [k for k in keys if k[0] == dataset]
        if dataset not in have:
            raise UsageError(f"--dataset {dataset!r} is not in the store (it has: {', '.join(have)})")
    if symbols:
        have = sorted({s for _, s in keys} | {s for d, s in unreadable if dataset in (None, d)})
        missing = [s for s in symbols if s not in have]
        if missing:
            raise UsageError(
                f"--symbol {', '.join(missing)} not in the store (it has: {', '.join(have) or 'none'})"
            )
        keys = [k for k in keys if k[1] in symbols]
    if selected and keys:
        stored = {parse_timeframe(i.timeframe) for k in keys for i in groups[k]}
        missing = [tf.name for tf in selected if tf not in stored]
        if missing:
            raise UsageError(
                f"--timeframe {', '.join(missing)} is not stored "
                f"(stored: {', '.join(t.name for t in sorted(stored))})"
            )
    return keys


def run_validate(
    settings,
    *,
    dataset: str | None = None,
    symbols: list[str] | None = None,
    timeframes: list[str] | None = None,
    start: str | None = None,
    end: str | None = None,
    report_path: str | Path | None = None,
    json_path: str | Path | None = None,
    html_path: str | Path | None = None,
    reference: bool = False,
    env_file: str | None = None,
    out: TextIO | None = None,
    fetcher: Fetcher | None = None,
) -> int:
    """The CLI's `validate`: validate, write the text (and JSON, HTML) report, print a table.

    Returns 0 clean (warnings/info allowed) or 1 when an error-severity rule failed; raises
    UsageError / UnreadableStoreError (exit 2) for bad arguments or an unreadable store.
    """
    from ..tables import format_table

    out = out or sys.stdout
    if html_path:  # before the work: a page that cannot have its charts is asked for in vain
        from ..plot import require_matplotlib

        require_matplotlib()
    progress = Progress(noun="rows", units_noun="files", count_bars=False)
    with ProgressDisplay(progress, "validate"):
        report = validate_store(
            settings, dataset=dataset, symbols=symbols, timeframes=timeframes, start=start, end=end,
            reference=reference, fetcher=fetcher, env_file=env_file, progress=progress,
        )  # fmt: skip
    root = Path(settings.store.path)
    if report_path is None:
        stamp = report.started.strftime("%Y%m%dT%H%M%SZ")
        report_path = root / "logs" / f"validate-{stamp}.txt"
    print(format_table(report.table_rows()), file=out)
    for note in report.notes:
        print(f"note: {note}", file=out)
    print(report.verdict, file=out)
    try:
        report.write_text(Path(report_path))
        print(f"report: {report_path}", file=out)
        if json_path:
            report.write_json(Path(json_path))
            print(f"json: {json_path}", file=out)
        if html_path:
            from .html import write_html

            write_html(report, Path(html_path))
            print(f"html: {html_path}", file=out)
    except OSError as e:  # the results are on stdout; the place asked for cannot be written
        raise UsageError(f"cannot write the validation report ({e}); pass --report/--json/--html a writable path") from None
    return report.exit_code

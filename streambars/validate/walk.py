"""Walk one store file: every selected timeframe, a UTC month at a time, all rules at once.

The file is seen through :class:`FileView` (what the store reader gives: its contract, each
timeframe's extent, and time-range reads), so the walk is tested with arrays in memory and
runs the same on a file the daemon is appending to. Each month is read coarsest timeframe
first: the writer appends a coarse bar together with (or after) the finest bars it covers,
so every coarse bar read has its finest bars read too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..timeframes import Session, Timeframe
from ..timeutil import NS
from .calendar import CalendarSpec, trading_intervals
from .crosstf import Aggregation, CrossTimeframe, Level
from .reference import REFERENCE_SCHEMAS, Fetcher, ReferenceUnavailable, compare_reference
from .report import SeriesResult
from .series import OUT_OF_RANGE, VALID_FROM, VALID_UNTIL, Params, SeriesCheck, out_of_range


class FileView(Protocol):
    """One symbol's file as the walk needs it."""

    dataset: str
    symbol: str
    stype: str
    path: str
    session: Session
    timeframes: Sequence[Timeframe]  # stored, ascending

    def extent(self, tf: Timeframe) -> tuple[int, int, int]:
        """(rows, first ts, last ts) of a timeframe; rows 0 when empty."""
        ...

    def read(self, tf: Timeframe, start: int, end: int) -> np.ndarray:
        """BAR_DTYPE rows with start <= ts_event < end, in stored order."""
        ...


@dataclass
class FileOutcome:
    results: list[SeriesResult]
    notes: list[str]


def month_edges(lo: int, hi: int) -> list[int]:
    """lo, the first instants of every UTC month in (lo, hi), hi."""
    first = np.datetime64(lo, "ns").astype("datetime64[M]") + 1
    last = np.datetime64(hi - 1, "ns").astype("datetime64[M]")
    edges = [lo]
    if first <= last:
        months = np.arange(first, last + 1, dtype="datetime64[M]").astype("datetime64[ns]").astype(np.int64)
        edges += months.tolist()
    edges.append(hi)
    return edges


def _nests(tf: Timeframe, parent: Timeframe, boundaries: np.ndarray | None) -> bool:
    """True when every interval of ``tf`` is a union of whole ``parent`` intervals."""
    if parent.is_daily:
        return False
    if not tf.is_daily:
        return tf.seconds % parent.seconds == 0
    return boundaries is not None and bool((boundaries % parent.nanos == 0).all())


def validate_file(
    view: FileView,
    selected: Sequence[Timeframe] | None,
    params: Params,
    calendar: CalendarSpec,
    start: int | None = None,
    end: int | None = None,
    fetch_reference: Fetcher | None = None,
    reference_error: str | None = None,
) -> FileOutcome:
    """Validate the selected timeframes of one file (all stored ones when ``selected`` is None)."""
    notes: list[str] = []
    stored = sorted(view.timeframes)
    extents = {tf.name: view.extent(tf) for tf in stored}
    chosen = [tf for tf in stored if selected is None or tf in selected]
    results = {tf.name: SeriesResult(view.dataset, view.symbol, tf.name, view.path) for tf in chosen}
    present = [tf for tf in stored if extents[tf.name][0] > 0]
    if not present or not chosen:
        for r in results.values():
            _skip_all(r, "no bars stored")
        return FileOutcome(list(results.values()), notes)

    # A first or last row outside the calendar's span (a damaged row) is counted here and
    # the walk clamped to the span: reads by time never reach it, and month and session
    # arithmetic stays inside int64 and the calendar. Rows in between are caught by feed().
    odd_rows: dict[str, list[int]] = {}
    for tf in chosen:
        rows, first, last = extents[tf.name]
        odd = sorted({t for t in (first, last) if rows and out_of_range(np.array([t]))[0]})
        if odd and (start is None or odd[-1] >= start) and (end is None or odd[0] < end):
            odd_rows[tf.name] = odd
            results[tf.name].rows += len(odd)
            results[tf.name].tally("ts_misaligned").add(np.array(odd, np.int64), [OUT_OF_RANGE] * len(odd))
    lo = start if start is not None else min(extents[tf.name][1] for tf in present)
    hi = end if end is not None else max(extents[tf.name][2] for tf in present) + 1
    lo, hi = max(lo, VALID_FROM), min(hi, VALID_UNTIL)
    if hi <= lo:
        for r in results.values():
            _skip_all(r, "no bars in the range")
        return FileOutcome(list(results.values()), notes)

    bounds = view.session.boundaries()
    near = bounds[(bounds >= lo - 3 * 86400 * NS) & (bounds <= hi + 3 * 86400 * NS)]

    # gaps: on the finest selected timeframe only (coarser ones would repeat it, blurred)
    sessions = None
    gap_tf = chosen[0]
    if calendar.name == "none":
        gap_note = calendar.note or "no trading calendar"
    else:
        try:
            sessions = trading_intervals(calendar, lo, hi)
            gap_note = ""
        except Exception as e:  # calendar out of range, unknown name: say so, check the rest
            gap_note = f"calendar {calendar} unavailable for this range: {e}"
    checks: dict[str, SeriesCheck] = {}
    for tf in chosen:
        r = results[tf.name]
        use = sessions if (tf == gap_tf and sessions is not None) else None
        checks[tf.name] = SeriesCheck(r, tf, params, bounds if tf.is_daily else None, use, hours_from=bounds)
        checks[tf.name].counted_out_of_range.update(odd_rows.get(tf.name, ()))
        if use is None:
            r.skipped["gap_in_session"] = (
                gap_note if tf == gap_tf or sessions is None else f"checked on {gap_tf.name} (the finest selected)"
            )

    # cross-timeframe: every chosen timeframe coarser than the finest stored one
    finest = present[0]
    levels: list[Level] = []
    level_tfs: list[Timeframe] = []
    for tf in chosen:
        r = results[tf.name]
        if tf <= finest:
            if tf == finest:
                r.skipped["cross_timeframe"] = "the finest stored timeframe (the others are checked against it)"
            else:
                r.skipped["cross_timeframe"] = f"finer than the finest non-empty timeframe {finest.name}"
            continue
        if not _nests(tf, finest, near):
            r.skipped["cross_timeframe"] = f"{tf.name} intervals are not whole {finest.name} intervals"
            continue
        parent = None
        for j in range(len(levels) - 1, -1, -1):
            if _nests(tf, level_tfs[j], near):
                parent = j
                break
        agg = Aggregation(tf.nanos, bounds if tf.is_daily else None, filter_in=parent is None)
        # with --start, a bucket that begins before it is incomplete: not reported missing
        head = start if start is not None else np.iinfo(np.int64).min
        levels.append(Level(tf.name, agg, parent, head, tally=r.tally("cross_timeframe")))
        level_tfs.append(tf)
    cross = CrossTimeframe(levels) if levels else None

    order = sorted(chosen, reverse=True)  # coarsest first
    edges = month_edges(lo, hi)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        coarse: dict[str, np.ndarray] = {}
        for tf in order:
            if tf == finest and cross is not None:
                continue
            bars = view.read(tf, a, b)
            checks[tf.name].feed(bars)
            if cross is not None and tf > finest:
                coarse[tf.name] = bars
        if cross is not None:
            fine = view.read(finest, a, b)
            if finest.name in checks:
                checks[finest.name].feed(fine)
            cross.feed(fine, coarse, b)
    for c in checks.values():
        c.finish()
    if cross is not None:
        cross.finish(complete_until=hi if end is not None else None)
        for lv in cross.levels:
            if lv.skipped_partial:
                notes.append(
                    f"{view.symbol} {lv.name}: {lv.skipped_partial} bar(s) straddling the range end "
                    "not compared across timeframes"
                )

    if fetch_reference is not None or reference_error is not None:
        for tf in chosen:
            r = results[tf.name]
            schema = REFERENCE_SCHEMAS.get(tf.name)
            if schema is None:
                continue
            if reference_error is not None:
                r.skipped["reference_mismatch"] = reference_error
                continue
            _reference(view, tf, schema, lo, hi, bounds, fetch_reference, r)
    return FileOutcome(list(results.values()), notes)


def _reference(view, tf, schema, lo, hi, bounds, fetch, r: SeriesResult) -> None:
    try:
        ref = fetch(view.dataset, view.symbol, view.stype, schema, lo, hi)
    except ReferenceUnavailable as e:
        r.skipped["reference_mismatch"] = str(e)
        return
    except Exception as e:  # a download that failed after its retries: say so, go on
        r.skipped["reference_mismatch"] = f"Databento's {schema} could not be fetched: {e}"
        return
    ours = view.read(tf, lo, hi)
    if tf.is_daily and ref.shape[0]:
        rts = np.asarray(ref["ts_event"]).astype(np.int64)
        on_boundary = np.isin(rts, bounds)
        if not on_boundary.all():
            r.skipped["reference_mismatch"] = (
                f"Databento's {schema} bars start at {np.datetime_as_string(rts[~on_boundary][0].astype('datetime64[ns]'), 's')}Z, "
                f"not on this file's session boundary ({view.session}): daily bars are not comparable"
            )
            return
    ts, details = compare_reference(ours, ref)
    r.tally("reference_mismatch").add(ts, details)


def _skip_all(r: SeriesResult, why: str) -> None:
    from .report import RULE_ORDER

    for name in RULE_ORDER:
        if name != "reference_mismatch":
            r.skipped[name] = why

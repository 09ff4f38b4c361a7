"""Trading hours for the gap rule: a Databento dataset mapped to an exchange calendar.

``gap_in_session`` only counts time when the market was open, so weekends, holidays, early
closes and the CME daily maintenance halt are never reported as gaps. Trading hours come
from `exchange_calendars` (sessions, early closes, holidays, intraday breaks) plus the
daily halts the calendar does not model (CMES ends a session at 17:00 CT, but Globex does
not trade from 16:00 to 17:00 CT).

``validation.calendar``:
  - ``auto``  map the file's Databento dataset (table below); no mapping -> no gap check
  - ``none``  no gap check
  - any exchange_calendars name (``CMES``, ``XNYS``, ``us_futures``, ``24/5``, ``24/7`` ...),
    optionally with halts: ``CMES+halt=16:00-17:00@America/Chicago``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import numpy as np

from ..timeutil import NS


@dataclass(frozen=True)
class Halt:
    """A daily pause the calendar does not know about: [start, end) local time, Mon-Fri."""

    start: time
    end: time
    tz: str

    def __str__(self) -> str:
        return f"{self.start.strftime('%H:%M')}-{self.end.strftime('%H:%M')}@{self.tz}"


@dataclass(frozen=True)
class CalendarSpec:
    name: str  # exchange_calendars name, or "none"
    halts: tuple[Halt, ...] = ()
    note: str = ""  # why this calendar (shown in the report)

    def __str__(self) -> str:
        return self.name + "".join(f"+halt={h}" for h in self.halts)


CME_HALT = Halt(time(16, 0), time(17, 0), "America/Chicago")

#: Databento dataset (or its prefix before the first dot) -> trading calendar.
DATASET_CALENDARS: dict[str, CalendarSpec] = {
    "GLBX.MDP3": CalendarSpec(
        "CMES",
        (CME_HALT,),
        "CME Globex (exchange_calendars CMES: 17:00-17:00 CT with CME holidays and early closes) "
        "less the 16:00-17:00 CT daily halt; products with shorter hours (grains) need their own "
        "validation.calendar",
    ),
    "XNAS.ITCH": CalendarSpec("XNAS", (), "Nasdaq regular hours 09:30-16:00 ET; extended hours are not checked"),
    "XNAS.BASIC": CalendarSpec("XNAS", (), "Nasdaq regular hours 09:30-16:00 ET"),
    "XNYS.PILLAR": CalendarSpec("XNYS", (), "NYSE regular hours 09:30-16:00 ET"),
    "ARCX.PILLAR": CalendarSpec("XNYS", (), "US equities regular hours 09:30-16:00 ET"),
    "DBEQ.BASIC": CalendarSpec("XNYS", (), "US equities regular hours 09:30-16:00 ET"),
    "EQUS": CalendarSpec("XNYS", (), "US equities regular hours 09:30-16:00 ET"),
    "OPRA": CalendarSpec("XNYS", (), "US options regular hours 09:30-16:00 ET"),
    "XEUR.EOBI": CalendarSpec("XEUR", (), "Eurex (exchange_calendars XEUR)"),
    "IFEU.IMPACT": CalendarSpec(
        "none",
        (),
        "exchange_calendars has no ICE Futures Europe calendar (IEPA is ICE US: US holidays, New "
        "York hours that drift from London's around DST); set validation.calendar to check gaps",
    ),
    "NDEX.IMPACT": CalendarSpec(
        "none", (), "exchange_calendars has no ICE Endex calendar; set validation.calendar to check gaps"
    ),
}


def calendar_for(setting: str, dataset: str) -> CalendarSpec:
    """The calendar for ``validation.calendar`` (``auto`` maps ``dataset``)."""
    setting = (setting or "auto").strip()
    if setting.lower() == "none":
        return CalendarSpec("none", (), "validation.calendar = 'none'")
    if setting.lower() != "auto":
        return parse_calendar(setting)
    ds = (dataset or "").upper()
    spec = DATASET_CALENDARS.get(ds) or DATASET_CALENDARS.get(ds.split(".")[0])
    if spec is None:
        return CalendarSpec(
            "none", (), f"no trading calendar known for dataset {dataset!r}; set validation.calendar"
        )
    return spec


def parse_calendar(text: str) -> CalendarSpec:
    """'CMES', 'XNYS', 'CMES+halt=16:00-17:00@America/Chicago' -> CalendarSpec (checked)."""
    import exchange_calendars as xc

    name, *extras = text.split("+")
    names = set(xc.get_calendar_names(include_aliases=True))
    if name not in names:
        raise ValueError(
            f"validation.calendar {text!r}: {name!r} is not an exchange_calendars name "
            "(e.g. CMES, XNYS, us_futures, 24/5, 24/7), 'auto' or 'none'"
        )
    halts = []
    for extra in extras:
        key, _, value = extra.partition("=")
        span, _, tz = value.partition("@")
        a, _, b = span.partition("-")
        try:
            if key != "halt":
                raise ValueError
            ZoneInfo(tz)
            halts.append(Halt(time.fromisoformat(a), time.fromisoformat(b), tz))
        except (ValueError, KeyError):
            raise ValueError(
                f"validation.calendar {text!r}: {extra!r} is not halt=HH:MM-HH:MM@Zone/Name"
            ) from None
    return CalendarSpec(name, tuple(halts), f"validation.calendar = {text!r}")


def trading_intervals(spec: CalendarSpec, start_ns: int, end_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint [open, close) ns arrays covering [start_ns, end_ns) at least.

    Raises ValueError when the calendar does not cover the range (the caller notes it).
    """
    if spec.name == "none":
        raise ValueError("no calendar")
    first = _day(start_ns) - timedelta(days=3)
    last = _day(end_ns) + timedelta(days=3)
    opens, closes = _sessions(spec.name, first, last)
    for halt in spec.halts:
        hs, he = _halt_intervals(halt, first, last)
        opens, closes = _subtract(opens, closes, hs, he)
    return opens, closes


def _day(ns: int) -> date:
    return (datetime(1970, 1, 1) + timedelta(microseconds=ns // 1000)).date()


@lru_cache(maxsize=16)
def _sessions(name: str, first: date, last: date) -> tuple[np.ndarray, np.ndarray]:
    import warnings

    import exchange_calendars as xc

    with warnings.catch_warnings():  # pandas deprecations raised inside exchange_calendars
        warnings.simplefilter("ignore")
        cal = xc.get_calendar(name, start=first.isoformat(), end=last.isoformat())
    sched = cal.schedule
    opens = sched["open"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    closes = sched["close"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    if "break_start" in sched and sched["break_start"].notna().any():
        bs = sched["break_start"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
        be = sched["break_end"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
        has = sched["break_start"].notna().to_numpy()
        opens, closes = _subtract(opens, closes, bs[has], be[has])
    # Adjacent sessions (CMES closes at 17:00 and reopens at 17:00) merge into one stretch.
    return _merge(opens, closes)


def _halt_intervals(halt: Halt, first: date, last: date) -> tuple[np.ndarray, np.ndarray]:
    zone = ZoneInfo(halt.tz)
    starts, ends = [], []
    day = first
    while day <= last:
        if day.weekday() < 5:
            a = datetime.combine(day, halt.start, tzinfo=zone)
            b = datetime.combine(day if halt.end > halt.start else day + timedelta(days=1), halt.end, tzinfo=zone)
            starts.append(int(a.timestamp()) * NS)
            ends.append(int(b.timestamp()) * NS)
        day += timedelta(days=1)
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64)


def _merge(opens: np.ndarray, closes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if opens.size == 0:
        return opens, closes
    order = np.argsort(opens, kind="stable")
    opens, closes = opens[order], closes[order]
    run_close = np.maximum.accumulate(closes)
    new = np.ones(opens.size, bool)
    new[1:] = opens[1:] > run_close[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], opens.size) - 1
    return opens[starts], run_close[ends]


def _subtract(
    opens: np.ndarray, closes: np.ndarray, cut_s: np.ndarray, cut_e: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """[opens, closes) minus the union of [cut_s, cut_e); both sorted lists of intervals."""
    if cut_s.size == 0 or opens.size == 0:
        return opens, closes
    cut_s, cut_e = _merge(cut_s, cut_e)
    out_o, out_c = [], []
    j = 0
    for o, c in zip(opens.tolist(), closes.tolist(), strict=True):
        while j < cut_s.size and cut_e[j] <= o:
            j += 1
        k, cur = j, o
        while k < cut_s.size and cut_s[k] < c:
            if cut_s[k] > cur:
                out_o.append(cur)
                out_c.append(int(cut_s[k]))
            cur = max(cur, int(cut_e[k]))
            k += 1
        if cur < c:
            out_o.append(cur)
            out_c.append(c)
    return np.asarray(out_o, np.int64), np.asarray(out_c, np.int64)

"""Timeframes: parsing their names, and where their intervals start.

Sub-day timeframes align to the UNIX epoch in UTC, so a bar's open is simply
``ts - ts % seconds``. Daily bars align to a trading-session boundary given as a
local time of day in an IANA zone (17:00 America/Chicago for CME Globex), which
moves in UTC across daylight-saving changes; the boundaries are precomputed as a
sorted int64 array that the numba kernel binary-searches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from fnmatch import fnmatchcase
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from .timeutil import NS

NS_PER_SECOND = NS
SECONDS_PER_DAY = 86_400

STANDARD_TIMEFRAMES: tuple[str, ...] = (
    "1s", "5s", "10s", "15s", "30s",
    "1min", "2min", "3min", "5min", "10min", "15min", "30min",
    "1h", "2h", "4h", "1d",
)

#: 'm' is a minute as in Databento's schema names (ohlcv-1m); the store names it 'min'.
_UNIT_SECONDS = {"s": 1, "min": 60, "m": 60, "h": 3600, "d": SECONDS_PER_DAY}
_PATTERN = re.compile(r"^\s*(\d+)\s*(s|min|m|h|d)\s*$")
ALLOWED_TEXT = (
    "a whole positive number followed by s, min (or m, as in ohlcv-1m), h or d (e.g. 1s, 7s, "
    "15s, 5min, 1m, 4h, 1d), at most one day long; 1d is the only daily timeframe"
)


class TimeframeError(ValueError):
    """A timeframe string that is not allowed; the message names it and what is allowed."""


@dataclass(frozen=True, order=True)
class Timeframe:
    """One bar length. ``seconds`` orders timeframes; ``name`` is how the store names it."""

    seconds: int
    name: str

    @property
    def nanos(self) -> int:
        return self.seconds * NS_PER_SECOND

    @property
    def is_daily(self) -> bool:
        return self.seconds == SECONDS_PER_DAY

    @property
    def divides_day(self) -> bool:
        """Lengths like 7s are allowed (epoch-aligned) but do not nest into days."""
        return SECONDS_PER_DAY % self.seconds == 0

    def __str__(self) -> str:
        return self.name


def canonical_name(seconds: int) -> str:
    """The store's name for a length: the largest unit that divides it (90s -> '90s', 120s -> '2min')."""
    if seconds == SECONDS_PER_DAY:
        return "1d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}min"
    return f"{seconds}s"


def parse_timeframe(text: str) -> Timeframe:
    """Parse '15s', '5min' (or '5m'), '4h', '1d'; refuse anything longer than a day."""
    if not isinstance(text, str):
        raise TimeframeError(f"timeframe {text!r} is not a string; allowed: {ALLOWED_TEXT}")
    m = _PATTERN.match(text)
    if not m:
        raise TimeframeError(f"timeframe {text!r} is not understood; allowed: {ALLOWED_TEXT}")
    seconds = int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds <= 0:
        raise TimeframeError(f"timeframe {text!r} is zero; allowed: {ALLOWED_TEXT}")
    if seconds > SECONDS_PER_DAY:
        raise TimeframeError(
            f"timeframe {text!r} ({seconds} s) is longer than a day; allowed: {ALLOWED_TEXT}"
        )
    if m.group(2) == "d" and seconds != SECONDS_PER_DAY:
        raise TimeframeError(f"timeframe {text!r}: only 1d is daily; allowed: {ALLOWED_TEXT}")
    return Timeframe(seconds, canonical_name(seconds))


def parse_timeframes(texts: list[str] | tuple[str, ...]) -> tuple[Timeframe, ...]:
    """Parse, de-duplicate and sort ascending; an empty list is an error."""
    if not texts:
        raise TimeframeError(f"no timeframes given; allowed: {ALLOWED_TEXT}")
    return tuple(sorted({parse_timeframe(t) for t in texts}))


@dataclass(frozen=True)
class Session:
    """Where daily bars start: a local time of day in an IANA time zone."""

    time_of_day: time
    tz: str

    @classmethod
    def parse(cls, text: str) -> Session:
        """Parse '17:00 America/Chicago' (also 'HH:MM:SS ZONE')."""
        parts = str(text).split()
        if len(parts) != 2:
            raise ValueError(
                f"session {text!r} is not 'HH:MM Zone/Name' (e.g. '17:00 America/Chicago')"
            )
        try:
            tod = time.fromisoformat(parts[0])
        except ValueError:
            raise ValueError(f"session {text!r}: {parts[0]!r} is not a time of day HH:MM") from None
        try:
            ZoneInfo(parts[1])
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"session {text!r}: {parts[1]!r} is not an IANA time zone") from None
        return cls(tod, parts[1])

    def __str__(self) -> str:
        return f"{self.time_of_day.strftime('%H:%M:%S')} {self.tz}"

    def boundaries(self, first_year: int = 1990, last_year: int = 2100) -> np.ndarray:
        """Session starts (int64 ns, UTC) for every calendar day of the years given, sorted."""
        return _session_boundaries(self.time_of_day, self.tz, first_year, last_year)

    def boundary_step(self, first_year: int = 1990, last_year: int = 2100) -> int:
        """The longest length (ns) that every session start of those years is a multiple of:
        a length x lines up with every boundary iff ``boundary_step() % x == 0``, one integer
        test instead of a pass over ~40k boundaries (an Aggregator asks once per timeframe)."""
        return _boundary_step(self.time_of_day, self.tz, first_year, last_year)

    def boundary_on(self, day: date) -> int:
        """The session start on a local calendar day, in ns since the epoch."""
        local = datetime.combine(day, self.time_of_day, tzinfo=ZoneInfo(self.tz))
        return int(local.timestamp()) * NS_PER_SECOND + local.microsecond * 1000


#: Days between two look-ups of a zone's offset when building session boundaries: a week
#: whose first and last day have one offset is taken to have it throughout. A month was
#: once used and missed pairs of changes inside one month (Cairo's Ramadan break in
#: September 2010, a two-week DST in north-east Brazil in October 2000); no zone in the
#: tz database changes twice within a week from 1990 to 2100 (checked zone by zone).
_OFFSET_PROBE_DAYS = 7


@lru_cache(maxsize=8)
def _session_boundaries(tod: time, tz: str, first_year: int, last_year: int) -> np.ndarray:
    # A boundary is local midnight + time of day - the UTC offset in force then. Offsets change
    # only at DST (and the like) transitions, so ask the zone once a week and walk day by day
    # only through weeks whose offset changes: ~7k zone look-ups instead of ~40k.
    zone = ZoneInfo(tz)
    tod_seconds = tod.hour * 3600 + tod.minute * 60 + tod.second

    def offset(d: date) -> int:
        return int(zone.utcoffset(datetime.combine(d, tod)).total_seconds())

    first, end = date(first_year, 1, 1), date(last_year + 1, 1, 1)
    n_days = (end - first).days
    offsets: list[int] = []
    step = _OFFSET_PROBE_DAYS
    o_here = offset(first)
    for k in range(0, n_days, step):
        n = min(step, n_days - k)
        o_next = offset(first + timedelta(days=k + n))
        if o_here == o_next:
            offsets.extend([o_here] * n)
        else:
            offsets.extend(offset(first + timedelta(days=k + i)) for i in range(n))
        o_here = o_next
    epoch_day = (first - date(1970, 1, 1)).days
    day_index = np.arange(epoch_day, epoch_day + n_days, dtype=np.int64)
    out = (day_index * SECONDS_PER_DAY + tod_seconds - np.asarray(offsets, np.int64)) * NS_PER_SECOND
    out.setflags(write=False)
    return out


@lru_cache(maxsize=8)
def _boundary_step(tod: time, tz: str, first_year: int, last_year: int) -> int:
    return int(np.gcd.reduce(_session_boundaries(tod, tz, first_year, last_year)))


UTC_MIDNIGHT = Session(time(0, 0), "UTC")


#: Databento's US equity and equity-option datasets (exchanges, ATSs, TRFs, the consolidated
#: EQUS.* products and OPRA), whose trading day is the New York calendar day.
US_EQUITY_DATASETS: tuple[str, ...] = (
    "XNAS.ITCH", "XNAS.BASIC", "XNAS.QBBO", "XNAS.NLS", "XBOS.ITCH", "XPSX.ITCH",
    "XNYS.PILLAR", "XNYS.BBO", "XNYS.TRADES", "XNYS.TRADESBBO", "ARCX.PILLAR", "XASE.PILLAR",
    "XCHI.PILLAR", "XCIS.PILLAR", "XCIS.BBO", "XCIS.TRADES", "XCIS.TRADESBBO",
    "BATS.PITCH", "BATY.PITCH", "EDGA.PITCH", "EDGX.PITCH", "IEXG.TOPS", "MEMX.MEMOIR",
    "EPRL.DOM", "OCEA.MEMOIR", "FINN.NLS", "FINY.TRADES", "DBEQ.BASIC", "EQUS.*", "OPRA.PILLAR",
)

#: Where daily bars start when ``bars.session`` is not configured: the first row whose
#: patterns (fnmatch) match the dataset wins. docs/contract.md ("Daily sessions") and the
#: README show this table; tests/test_session_defaults.py keeps them equal to it.
SESSION_DEFAULTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("GLBX.MDP3",), "17:00 America/Chicago"),
    (US_EQUITY_DATASETS, "00:00 America/New_York"),
    (("IFEU.IMPACT", "NDEX.IMPACT"), "00:00 Europe/London"),
    (("*",), "00:00 UTC"),
)


def default_session(dataset: str) -> Session:
    """The daily session of ``dataset`` when none is configured (SESSION_DEFAULTS): a 1d bar
    of NVDA on XNAS.ITCH starts at New York midnight, not at CME's 17:00 Chicago."""
    code = (dataset or "").upper()
    for patterns, session in SESSION_DEFAULTS:
        if any(fnmatchcase(code, p) for p in patterns):
            return Session.parse(session)
    raise AssertionError("SESSION_DEFAULTS ends with a catch-all row")  # pragma: no cover

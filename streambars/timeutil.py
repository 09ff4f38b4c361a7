"""Time in one place: nanoseconds since the epoch (UTC) in, ISO-8601 out.

* :data:`NS` — nanoseconds per second.
* :func:`to_ns` — ISO string / datetime / date / pandas.Timestamp / numpy datetime64 / int
  ns -> int ns (naive times are UTC), for the public read API.
* :func:`parse_time` — a command-line bound (``--start``/``--end``) -> int ns or None.
* :func:`parse_day` — a command-line date ``YYYY-MM-DD`` / ``YYYY-MM`` -> UTC datetime.
* :func:`iso` — int ns -> ISO-8601 with a ``Z``, at the precision the caller shows.
* :func:`check_tz` — an IANA zone name (``--tz``, ``tz=``), checked once for every reader.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import numpy as np

from .errors import UsageError

NS = 1_000_000_000

#: The range a command-line date may take: int64 nanoseconds since 1970 end in April 2262.
FIRST_DAY = datetime(1970, 1, 1, tzinfo=UTC)
LAST_DAY = datetime(2262, 4, 1, tzinfo=UTC)


def to_ns(value: Any, what: str = "time", tz: str | None = None) -> int | None:
    """ISO string / datetime / date / pandas.Timestamp / numpy datetime64 / int ns -> int ns UTC.

    Naive times are UTC, or wall-clock times in ``tz`` when given (a time that does not
    exist or exists twice there, at a daylight-saving change, is refused). None stays None."""
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
    if ts.tzinfo is None and tz is not None:
        try:
            ts = ts.tz_localize(tz)
        except Exception as e:  # noqa: BLE001 - pytz's NonExistent/AmbiguousTimeError, not ValueErrors
            raise UsageError(
                f"{what} {value!r} is not one time in {tz} ({e}): add a UTC offset, e.g. 2024-03-10T03:30-04:00"
            ) from None
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.value)


def parse_time(value: str | None, what: str) -> int | None:
    """'2024-03-01', '2024-03', '2024-03-01T14:30:00Z' (UTC when no zone) -> ns."""
    if value is None or value == "":
        return None
    import pandas as pd

    text = str(value).strip()
    try:
        ts = pd.Timestamp(text + "-01" if len(text) == 7 and text[4] == "-" else text)
    except (ValueError, TypeError):
        ts = None
    if ts is None or ts is pd.NaT:
        raise UsageError(
            f"--{what} {value!r} is not a date or time: use YYYY-MM-DD, YYYY-MM or ISO-8601 "
            "(2024-03-01T14:30:00Z; UTC when no zone is given)"
        )
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    try:
        return int(ts.value)
    except OverflowError:
        # Beyond int64 nanoseconds (before 1677 / after 2262, e.g. 0001-01-01, 9999-12-31):
        # a start before every bar or an end after every bar is no bound; the other way
        # round it selects nothing.
        low_side = ts.year < 1970
        if (what == "start") == low_side:
            return None
        return -(2**63) + 1 if low_side else 2**63 - 1


def parse_day(text: str, name: str) -> datetime:
    """'YYYY-MM-DD' or 'YYYY-MM' (first of the month) as a UTC datetime."""
    try:
        if len(text) == 7:
            day = datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
        else:
            day = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
    except ValueError:
        raise UsageError(f"--{name} {text!r} is not a date YYYY-MM-DD or a month YYYY-MM") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise UsageError(
            f"--{name} {text}: backfill dates lie between {FIRST_DAY:%Y-%m-%d} and {LAST_DAY:%Y-%m-%d} "
            "(Databento's timestamps are nanoseconds since 1970)")
    return day


def inclusive_days(start: datetime, end: datetime, end_text: str) -> str:
    """'2024-01-01 .. 2024-12-30 inclusive (--end 2024-12-31 is exclusive)': the days of a
    [start, end) request, said so at run time because an exclusive end surprises people."""
    last = end - timedelta(days=1)
    return f"{start:%Y-%m-%d} .. {last:%Y-%m-%d} inclusive (--end {end_text} is exclusive)"


Precision = Literal["exact", "auto", "ms", "s"]


def iso(ns: int | None, precision: Precision = "exact", missing: str = "-") -> str:
    """ISO-8601 UTC with a ``Z``; ``missing`` for None (and, at ``ms``, for a negative ns).

    * ``exact`` — to the nanosecond only when needed, trailing zeros dropped (reports);
    * ``auto`` — whole seconds, else all nine digits (inspect, export);
    * ``ms`` — always milliseconds, truncated (daemon logs);
    * ``s`` — seconds, truncated (backfill messages).
    """
    if ns is None or (precision == "ms" and ns < 0):
        return missing
    ns = int(ns)
    if precision == "ms":
        return str(np.datetime64(ns, "ns"))[:23] + "Z"
    if precision == "auto":
        unit = "s" if ns % NS == 0 else "ns"
        return str(np.datetime_as_string(np.datetime64(ns, "ns"), unit=unit, timezone="UTC"))
    s, frac = divmod(ns, NS)
    text = datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac and precision == "exact":
        text += f".{frac:09d}".rstrip("0")
    return text + "Z"


def check_tz(tz: str | None, what: str = "tz") -> str:
    """The IANA zone name ``tz`` ('UTC' for None), or a UsageError saying the ``what`` (the
    argument or flag that gave it) is not one."""
    if tz is None:
        return "UTC"
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(str(tz))
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise UsageError(f"{what} {tz!r} is not a time zone: give an IANA name, e.g. 'America/New_York' or 'UTC'") from None
    return str(tz)

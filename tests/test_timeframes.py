"""Timeframe parsing and session alignment."""

from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np
import pytest

from streambars.timeframes import (
    STANDARD_TIMEFRAMES,
    Session,
    TimeframeError,
    parse_timeframe,
    parse_timeframes,
)


def test_standard_names_round_trip():
    assert [parse_timeframe(t).name for t in STANDARD_TIMEFRAMES] == list(STANDARD_TIMEFRAMES)
    assert [t.seconds for t in parse_timeframes(list(STANDARD_TIMEFRAMES))] == [
        1, 5, 10, 15, 30, 60, 120, 180, 300, 600, 900, 1800, 3600, 7200, 14400, 86400,
    ]


def test_equivalent_spellings_collapse():
    assert parse_timeframes(["60s", "1min", "3600s", "1h"]) == parse_timeframes(["1min", "1h"])
    assert parse_timeframe("7s").seconds == 7


@pytest.mark.parametrize("bad", ["7x", "0s", "25h", "1.5min", "2d", "", "min", "-5s"])
def test_refused_with_value_and_allowed(bad):
    with pytest.raises(TimeframeError) as e:
        parse_timeframe(bad)
    assert repr(bad) in str(e.value) and "allowed" in str(e.value)


@pytest.mark.parametrize(
    ("tz", "tod", "days", "utc_hours"),
    [
        # Spring forward 2024-03-10: CST (UTC-6) -> CDT (UTC-5).
        ("America/Chicago", "17:00", ["2024-03-08", "2024-03-09", "2024-03-10", "2024-03-11"], [23, 23, 22, 22]),
        # Fall back 2024-11-03.
        ("America/Chicago", "17:00", ["2024-11-01", "2024-11-02", "2024-11-03", "2024-11-04"], [22, 22, 23, 23]),
        ("America/New_York", "00:00", ["2024-03-09", "2024-03-10", "2024-03-11"], [5, 5, 4]),
        ("America/New_York", "00:00", ["2024-11-02", "2024-11-03", "2024-11-04"], [4, 4, 5]),
    ],
)
def test_session_boundaries_follow_dst(tz, tod, days, utc_hours):
    s = Session.parse(f"{tod} {tz}")
    b = s.boundaries()
    for d, h in zip(days, utc_hours, strict=True):
        ns = s.boundary_on(date.fromisoformat(d))
        assert datetime.fromtimestamp(ns / 1e9, UTC).hour == h
        assert b[np.searchsorted(b, ns)] == ns


def test_bad_session_is_refused():
    for text in ["17:00", "25:00 America/Chicago", "17:00 Nowhere/City"]:
        with pytest.raises(ValueError):
            Session.parse(text)


@pytest.mark.parametrize("spec", ["17:00 America/Chicago", "00:00 America/New_York", "02:30 Europe/London",
                                  "09:00 Asia/Tokyo", "18:00 Australia/Sydney"])
def test_boundaries_equal_a_day_by_day_zoneinfo_walk(spec):
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    s = Session.parse(spec)
    b = s.boundaries(2000, 2030)
    zone, d, ref = ZoneInfo(s.tz), date(2000, 1, 1), []
    while d < date(2031, 1, 1):
        ref.append(int(datetime.combine(d, s.time_of_day, tzinfo=zone).timestamp()) * 10**9)
        d += timedelta(days=1)
    np.testing.assert_array_equal(b, np.array(ref, np.int64))


@pytest.mark.parametrize("spec", ["17:00 America/Chicago", "00:00 UTC", "02:30 Europe/London",
                                  "09:00 Asia/Kolkata", "18:00 Australia/Lord_Howe", "17:00:30 America/Chicago"])
def test_boundary_step_answers_what_a_pass_over_every_boundary_answers(spec):
    """Aggregator asks boundary_step() % x instead of scanning ~40k boundaries for each
    timeframe x: both must say the same for lengths that do and do not line up (Kolkata is
    UTC+5:30, Lord Howe shifts by half an hour at DST, a time of day with seconds)."""
    s = Session.parse(spec)
    b = s.boundaries()
    step = s.boundary_step()
    assert step > 0
    for seconds in (1, 5, 30, 60, 300, 900, 1800, 3600, 7200, 86400, 7, 90):
        x = seconds * 10**9
        assert (step % x == 0) == (not np.any(b % x)), (spec, seconds)


@pytest.mark.parametrize(("tz", "first_year", "last_year"), [
    ("Africa/Cairo", 2010, 2010),  # DST broken for Ramadan until 10 September, ended 30 September
    ("America/Fortaleza", 2000, 2000),  # DST from 8 to 22 October 2000
    ("America/Noronha", 2000, 2000),
    ("Asia/Gaza", 2040, 2041),  # rules for Ramadan, both changes inside one month
])
def test_boundaries_see_two_offset_changes_inside_one_month(tz, first_year, last_year):
    """Boundaries are built from the zone's offset asked once a week (see _OFFSET_PROBE_DAYS);
    asked once a month, a month whose first days of it and of the next share an offset was
    taken to keep it, and these zones' daily bars were an hour off for up to three weeks."""
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    s = Session.parse(f"17:00 {tz}")
    zone, d, ref = ZoneInfo(tz), date(first_year, 1, 1), []
    while d < date(last_year + 1, 1, 1):
        ref.append(int(datetime.combine(d, s.time_of_day, tzinfo=zone).timestamp()) * 10**9)
        d += timedelta(days=1)
    np.testing.assert_array_equal(s.boundaries(first_year, last_year), np.array(ref, np.int64))

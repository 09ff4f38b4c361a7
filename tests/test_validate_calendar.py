"""Gaps are judged in trading hours only: holidays, early closes, the CME halt and DST."""

from __future__ import annotations

import numpy as np
import pytest

from streambars.timeframes import Session, parse_timeframe
from streambars.validate.calendar import calendar_for, parse_calendar, trading_intervals
from streambars.validate.series import Params
from streambars.validate.walk import validate_file

from .test_validate_fixtures import NS, ArrayView, bars_1s, ns, seconds_in

GLBX = calendar_for("auto", "GLBX.MDP3")


def _iso(x):
    return [str(np.datetime64(int(v), "ns"))[:19] for v in x]


def _gaps(ts: np.ndarray, spec=GLBX, dataset="GLBX.MDP3", session="17:00 America/Chicago"):
    """gap_in_session findings (start, details) on 1s bars at ``ts``."""
    view = ArrayView({"1s": bars_1s(np.unique(ts))}, dataset=dataset, session=Session.parse(session))
    out = validate_file(view, [parse_timeframe("1s")], Params(), spec)
    r = out.results[0]
    if "gap_in_session" in r.skipped:
        return None
    t = r.tallies["gap_in_session"]
    return [(_iso([x])[0], t.details[x].split(" for ")[1].split(" ")[0]) for x in t.first]


def _follow_calendar(first, last, spec=GLBX, fill=0.8):
    o, c = trading_intervals(spec, ns(first), ns(last))
    keep = (o < ns(last)) & (c > ns(first))
    return seconds_in(np.maximum(o[keep], ns(first)), np.minimum(c[keep], ns(last)), fill=fill)


def _drop(ts, a, b):
    """No bar in [a, b) (one right before and right after)."""
    return np.union1d(ts[(ts < ns(a)) | (ts >= ns(b))], [ns(a) - NS, ns(b)])


def test_cme_hours_july_4th_thanksgiving_christmas():
    o, c = trading_intervals(GLBX, ns("2024-07-03T00:00:00"), ns("2024-07-06T00:00:00"))
    pairs = list(zip(_iso(o), _iso(c), strict=True))
    # 17:00 CDT open; the 16:00-17:00 CDT halt; July 4th closes at 12:00 CDT (17:00 UTC)
    assert ("2024-07-02T22:00:00", "2024-07-03T21:00:00") in pairs
    assert ("2024-07-03T22:00:00", "2024-07-04T17:00:00") in pairs
    assert ("2024-07-04T22:00:00", "2024-07-05T21:00:00") in pairs
    o, c = trading_intervals(GLBX, ns("2024-11-27T00:00:00"), ns("2024-12-03T00:00:00"))
    pairs = list(zip(_iso(o), _iso(c), strict=True))
    assert ("2024-11-27T23:00:00", "2024-11-28T18:00:00") in pairs  # Thanksgiving 12:00 CST
    assert ("2024-11-28T23:00:00", "2024-11-29T18:00:00") in pairs  # Black Friday early close
    assert ("2024-12-01T23:00:00", "2024-12-02T22:00:00") in pairs  # Sunday evening open
    o, c = trading_intervals(GLBX, ns("2024-12-23T00:00:00"), ns("2024-12-28T00:00:00"))
    assert not ((o < ns("2024-12-25T20:00:00")) & (c > ns("2024-12-25T20:00:00"))).any()


def test_july_4th_early_close_is_not_a_gap_but_a_hole_in_its_morning_is():
    ts = _follow_calendar("2024-07-03T00:00:00", "2024-07-06T00:00:00")
    assert _gaps(ts) == []
    # trades also in the closed afternoon and on the weekend change nothing
    extra = np.arange(ns("2024-07-04T18:00:00"), ns("2024-07-04T18:03:00"), NS)
    assert _gaps(np.union1d(ts, extra)) == []
    assert _gaps(_drop(ts, "2024-07-04T15:00:00", "2024-07-04T15:20:00")) == [("2024-07-04T15:00:00", "00:20:00")]
    # a hole that runs into the early close counts only its trading part
    assert _gaps(_drop(ts, "2024-07-04T16:30:00", "2024-07-04T23:00:00")) == [
        ("2024-07-04T16:30:00", "00:30:00"),
        ("2024-07-04T22:00:00", "01:00:00"),
    ]


def test_thanksgiving_is_quiet_and_a_missing_session_is_reported():
    ts = _follow_calendar("2024-11-27T00:00:00", "2024-12-02T06:00:00")
    assert _gaps(ts) == []
    # Black Friday's whole session missing: one gap, the session's length (17:00 -> 12:00 CST)
    assert _gaps(_drop(ts, "2024-11-28T23:00:00", "2024-11-29T18:00:00")) == [
        ("2024-11-28T23:00:00", "19:00:00")
    ]


def test_dst_change_moves_the_open_and_the_halt():
    ts = _follow_calendar("2024-03-08T00:00:00", "2024-03-12T00:00:00")
    assert _gaps(ts) == []
    o, _ = trading_intervals(GLBX, ns("2024-03-08T00:00:00"), ns("2024-03-12T00:00:00"))
    assert "2024-03-10T22:00:00" in _iso(o)  # Sunday 17:00 CDT (a week earlier: 23:00 UTC)
    # bars that (wrongly) start at 23:00 UTC on the DST Sunday leave the first hour empty
    late = ts[(ts < ns("2024-03-10T22:00:00")) | (ts >= ns("2024-03-10T23:00:00"))]
    assert _gaps(late) == [("2024-03-10T22:00:00", "01:00:00")]
    # 21:00-22:00 UTC is trading on Friday (15:00 CST) but the halt on Monday (16:00 CDT)
    fri = _drop(ts, "2024-03-08T21:00:00", "2024-03-08T22:00:00")
    assert _gaps(fri) == [("2024-03-08T21:00:00", "01:00:00")]
    mon = ts[(ts < ns("2024-03-11T21:00:00")) | (ts >= ns("2024-03-11T22:00:00"))]
    assert _gaps(mon) == []


def test_us_equities_regular_hours_and_none():
    spec = calendar_for("auto", "XNAS.ITCH")
    assert spec.name == "XNAS"
    ts = _follow_calendar("2024-07-01T00:00:00", "2024-07-09T00:00:00", spec)
    # pre-market trades are outside the calendar and change nothing
    ts = np.union1d(ts, np.arange(ns("2024-07-02T11:00:00"), ns("2024-07-02T11:01:00"), 5 * NS))
    kw = dict(spec=spec, dataset="XNAS.ITCH", session="00:00 America/New_York")
    assert _gaps(ts, **kw) == []  # July 3rd closes at 13:00 ET, July 4th is a holiday
    assert _gaps(_drop(ts, "2024-07-03T16:00:00", "2024-07-03T16:30:00"), **kw) == [("2024-07-03T16:00:00", "00:30:00")]
    assert _gaps(ts, spec=calendar_for("auto", "IFEU.IMPACT"), dataset="IFEU.IMPACT") is None
    assert _gaps(ts, spec=calendar_for("none", "GLBX.MDP3")) is None


def test_calendar_setting_parsing():
    spec = parse_calendar("CMES+halt=16:00-17:00@America/Chicago")
    assert spec.name == "CMES" and str(spec) == "CMES+halt=16:00-17:00@America/Chicago"
    assert calendar_for("us_futures", "GLBX.MDP3").name == "us_futures"
    assert calendar_for("auto", "EQUS.MINI").name == "XNYS"
    assert calendar_for("auto", "SOMETHING.NEW").name == "none"
    with pytest.raises(ValueError, match="not an exchange_calendars name"):
        calendar_for("NOPE", "GLBX.MDP3")
    with pytest.raises(ValueError, match="halt=HH:MM"):
        parse_calendar("CMES+halt=16-17")

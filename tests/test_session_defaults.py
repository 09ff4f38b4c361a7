"""Daily sessions default per dataset (timeframes.SESSION_DEFAULTS): the docs show that table,
a configured bars.session still wins, and a store built under the old one-for-all default
(17:00 America/Chicago) keeps working."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import databento as db
import numpy as np
import pandas as pd
import pytest

from streambars.cli import main
from streambars.config import load_settings
from streambars.pipeline import settle_session
from streambars.store import open_store
from streambars.timeframes import SESSION_DEFAULTS, Session, default_session

from .markdown import table_after

REPO = Path(__file__).resolve().parents[1]


def _docs_table(path: Path, heading: str) -> list[tuple[tuple[str, ...], str]]:
    """(patterns, session) rows of the first markdown table after ``heading``."""
    return [(tuple(re.findall(r"`([^`]+)`", cells[0])), cells[1]) for cells in table_after(path.read_text(), heading)]


@pytest.mark.parametrize(("doc", "heading"), [("docs/contract.md", "### Daily sessions"),
                                              ("README.md", "Daily sessions by dataset")])
def test_docs_table_is_the_code_table(doc, heading):
    assert _docs_table(REPO / doc, heading) == [(p, s) for p, s in SESSION_DEFAULTS]


@pytest.mark.parametrize(("dataset", "expected"), [
    ("GLBX.MDP3", "17:00 America/Chicago"),
    ("XNAS.ITCH", "00:00 America/New_York"), ("xnys.pillar", "00:00 America/New_York"),
    ("DBEQ.BASIC", "00:00 America/New_York"), ("EQUS.MINI", "00:00 America/New_York"),
    ("EQUS.SUMMARY", "00:00 America/New_York"), ("OPRA.PILLAR", "00:00 America/New_York"),
    ("MEMX.MEMOIR", "00:00 America/New_York"), ("IEXG.TOPS", "00:00 America/New_York"),
    ("IFEU.IMPACT", "00:00 Europe/London"), ("NDEX.IMPACT", "00:00 Europe/London"),
    ("XEUR.EOBI", "00:00 UTC"), ("ABCD.NEW", "00:00 UTC"),
])
def test_default_session(dataset, expected):
    assert default_session(dataset) == Session.parse(expected)


def test_new_york_midnight_in_utc_across_dst():
    ny = default_session("XNAS.ITCH")
    assert pd.Timestamp(ny.boundary_on(date(2021, 1, 4)), tz="UTC") == pd.Timestamp("2021-01-04T05:00Z")
    assert pd.Timestamp(ny.boundary_on(date(2021, 6, 1)), tz="UTC") == pd.Timestamp("2021-06-01T04:00Z")


def test_configured_session_wins_and_defaults_follow_the_dataset(tmp_path):
    s = load_settings(None, {"databento.dataset": "XNAS.ITCH", "store.path": str(tmp_path)})
    assert s.session_pending and str(s.bars.session) == "00:00:00 America/New_York"
    # A --from-dbn file of another dataset settles the session for that dataset.
    assert str(settle_session(s, "GLBX.MDP3").bars.session) == "17:00:00 America/Chicago"
    set_ = load_settings(None, {"databento.dataset": "XNAS.ITCH", "bars.session": "09:30 America/New_York"})
    assert not set_.session_pending
    assert settle_session(set_, "GLBX.MDP3").bars.session == Session.parse("09:30 America/New_York")


@pytest.fixture
def nvda(testdata) -> Path:
    return testdata / "XNAS.ITCH" / "test_data.ohlcv-1s.dbn.zst"


def _backfill(store: Path, path: Path, *extra: str) -> int:
    return main(["backfill", "--store", str(store), "--from-dbn", str(path), "--end", "2020-12-30",
                 "--timeframes", "1s,1min,1d", "--log-format", "json", *extra])


def test_xnas_daily_bar_starts_at_new_york_midnight(tmp_path, nvda):
    assert _backfill(tmp_path, nvda) == 0
    with open_store(tmp_path) as reader:
        got = reader.read("NVDA", "1d", dataset="XNAS.ITCH")
    # Reference: the records' days in New York, in UTC (pandas, not our session code).
    ts = pd.DatetimeIndex(db.DBNStore.from_file(nvda).to_ndarray()["ts_event"].astype("datetime64[ns]"), tz="UTC")
    days = ts.tz_convert("America/New_York").normalize().tz_convert("UTC").unique()
    assert list(pd.DatetimeIndex(got["ts_event"].astype("datetime64[ns]"), tz="UTC")) == list(days)
    assert list(days) == [pd.Timestamp("2020-12-28T05:00Z")]  # not 2020-12-27T23:00Z (CME's 17:00 CT)
    assert got["volume"].sum() == db.DBNStore.from_file(nvda).to_ndarray()["volume"].sum()


def test_store_built_under_the_old_default_keeps_its_session(tmp_path, nvda):
    # Built when every dataset defaulted to CME's session (what --session now spells out).
    assert _backfill(tmp_path, nvda, "--session", "17:00 America/Chicago") == 0
    # A later run without --session: the file's recorded session is kept, not refused.
    again = load_settings(None, {"store.path": str(tmp_path), "databento.dataset": "XNAS.ITCH"})
    assert settle_session(again, "XNAS.ITCH").bars.session == Session.parse("17:00 America/Chicago")
    assert _backfill(tmp_path, nvda) == 0
    with open_store(tmp_path) as reader:
        got = reader.read("NVDA", "1d", dataset="XNAS.ITCH")
    assert list(got["ts_event"]) == [pd.Timestamp("2020-12-27T23:00Z").value]
    assert np.all(got["volume"] > 0)
    # Another dataset in the same store gets its own default.
    assert settle_session(again, "IFEU.IMPACT").bars.session == Session.parse("00:00 Europe/London")


def test_auto_is_the_default_spelled_out():
    auto = load_settings(None, {"databento.dataset": "OPRA.PILLAR", "bars.session": "auto"})
    assert auto.session_pending and auto.bars.session == Session.parse("00:00 America/New_York")
    assert auto == load_settings(None, {"databento.dataset": "OPRA.PILLAR"})

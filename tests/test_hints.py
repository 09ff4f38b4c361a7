"""Friction a new user meets first: Databento's `1m` spelling, a continuous symbol with the
default raw_symbol stype, and an exclusive --end nobody mentioned."""

from __future__ import annotations

from datetime import date

import pytest

from streambars.cli import build_parser, main
from streambars.config import implied_stype, load_settings, stype_hint
from streambars.timeframes import parse_timeframe, parse_timeframes

DATASET = "GLBX.MDP3"


@pytest.mark.parametrize(("alias", "name", "seconds"), [
    ("1m", "1min", 60), ("5m", "5min", 300), ("60m", "1h", 3600), ("1h", "1h", 3600), ("1d", "1d", 86400),
])
def test_databento_spelling_is_accepted(alias, name, seconds):
    tf = parse_timeframe(alias)
    assert (tf.name, tf.seconds) == (name, seconds)
    assert parse_timeframes([alias, name]) == (tf,)


def test_1m_in_config_and_help():
    assert [t.name for t in load_settings(None, {"bars.timeframes": "1s,1m,1h"}).bars.timeframes] == ["1s", "1min", "1h"]
    assert "1m" in build_parser().format_help()


@pytest.mark.parametrize(("symbol", "stype"), [
    ("ES.c.0", "continuous"), ("CL.n.1", "continuous"), ("ES.v.0", "continuous"), ("ES.C.0", "continuous"),
    ("ES.FUT", "parent"), ("AAPL.OPT", "parent"),
    ("ESH4", None), ("BRK.B", None), ("ES.c", None), ("FUT", None),
])
def test_implied_stype(symbol, stype):
    assert implied_stype(symbol) == stype


def test_stype_hint_names_the_flag():
    assert stype_hint(["ESH4"], "raw_symbol") == ""
    assert stype_hint(["ES.c.0"], "continuous") == ""
    hint = stype_hint(["ES.c.0", "NQ.c.0", "ES.FUT"], "raw_symbol")
    assert "ES.c.0, NQ.c.0 are continuous symbols: add --stype-in continuous" in hint
    assert "ES.FUT is a parent symbol: add --stype-in parent" in hint


@pytest.fixture
def market(fake_historical):
    fake_historical.add_instrument(DATASET, 101, "ESH4", date(2023, 12, 1), date(2024, 6, 1))
    fake_historical.add_continuous(DATASET, "ES.c.0", [(date(2023, 12, 1), date(2024, 6, 1), 101)])
    return fake_historical


def _backfill(tmp_path, fake, *extra: str) -> int:
    return main(["backfill", "--store", str(tmp_path / "store"), "--dataset", DATASET, "--start", "2024-01-01",
                 "--end", "2024-12-31", "--historical-gateway", fake.url, "--env-file", "/nonexistent",
                 "--log-format", "json", "--dry-run", *extra])


def test_continuous_symbol_with_raw_symbol_stype_fails_with_the_hint(market, api_key, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    assert _backfill(tmp_path, market, "--symbols", "ES.c.0") == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("streambars: ")]
    assert len(err) == 1
    assert "has no symbol ES.c.0 " in err[0]  # as typed: the client's upper-casing is undone
    assert "ES.C.0" not in err[0]
    assert "--stype-in continuous" in err[0]


def test_plan_prints_the_inclusive_dates(market, api_key, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    assert _backfill(tmp_path, market, "--symbols", "ES.c.0", "--stype-in", "continuous") == 0
    out = capsys.readouterr().out
    assert "dates: 2024-01-01 .. 2024-12-30 inclusive (--end 2024-12-31 is exclusive)" in out


def test_month_end_is_said_as_the_last_day(market, api_key, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATABENTO_API_KEY", api_key)
    assert main(["backfill", "--store", str(tmp_path / "store"), "--dataset", DATASET, "--start", "2024-01",
                 "--end", "2024-03", "--symbols", "ESH4", "--historical-gateway", market.url,
                 "--env-file", "/nonexistent", "--log-format", "json", "--dry-run"]) == 0
    assert "dates: 2024-01-01 .. 2024-02-29 inclusive (--end 2024-03 is exclusive)" in capsys.readouterr().out

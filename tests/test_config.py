"""Configuration: every bad value is refused with the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from streambars.config import ConfigError, load_api_key, load_settings, parse_override
from streambars.timeframes import STANDARD_TIMEFRAMES


def test_defaults_cover_every_standard_timeframe():
    s = load_settings()
    assert [t.name for t in s.bars.timeframes] == list(STANDARD_TIMEFRAMES)


def test_toml_file_and_override(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        '[databento]\ndataset = "XNAS.ITCH"\nsymbols = ["AAPL", "MSFT"]\n'
        '[bars]\ntimeframes = ["1min", "1s"]\nsession = "00:00 America/New_York"\n'
    )
    s = load_settings(p, dict([parse_override('bars.timeframes=["5s","1s"]')]))
    assert s.databento.symbols == ("AAPL", "MSFT")
    assert [t.name for t in s.bars.timeframes] == ["1s", "5s"]
    assert str(s.bars.session) == "00:00:00 America/New_York"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("bars.timeframes", ["1s", "7x"], "'7x'"),
        ("bars.session", "17:00 Mars/Olympus", "IANA"),
        ("databento.schema", "mbo", "ohlcv-1s"),
        ("databento.live_gateway", "localhost", "host:port"),
        ("store.chunk_rows", 3, "1024"),
        ("validation.policy", "ignore", "flag"),
        ("validation.rules", {"no_such_rule": "drop"}, "per-record rule"),
        ("live.unknown", 1, "known key"),
        ("nosection.key", 1, "section"),
    ],
)
def test_bad_values_name_key_value_and_allowed(key, value, fragment):
    with pytest.raises(ConfigError) as e:
        load_settings(None, {key: value})
    assert key.split(".")[0] in str(e.value)
    assert fragment in str(e.value)


@pytest.mark.parametrize("rows", [64, 1000, 1023, 1536, 4095, 1_000_448, 2**21])
def test_chunk_rows_not_whole_pages_are_refused_naming_the_key(rows):
    # 52-byte bars fill whole 4 KiB pages only in multiples of 1024 rows (52 * 1024 = 13 pages):
    # any other chunk leaves a gap after it, as every allocation starts on a page.
    assert (rows * 52 % 4096 == 0) == (rows % 1024 == 0)
    with pytest.raises(ConfigError) as e:
        load_settings(None, {"store.chunk_rows": rows})
    msg = str(e.value)
    assert "store.chunk_rows" in msg and str(rows) in msg and "multiple of 1024" in msg and "\n" not in msg


@pytest.mark.parametrize("rows", [1024, 4096, 5120, 65_536, 999_424])
def test_chunk_rows_in_whole_pages_are_taken_as_given(rows):
    assert load_settings(None, {"store.chunk_rows": rows}).store.chunk_rows == rows


def test_malformed_toml_names_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[bars\ntimeframes = 1")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_settings(p)


def test_api_key_never_from_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[databento]\napi_key = "db-abc"\n')
    with pytest.raises(ConfigError, match="DATABENTO_API_KEY") as e:
        load_settings(p)
    assert "db-abc" not in str(e.value)


def test_ohlcv_1m_cannot_make_seconds():
    with pytest.raises(ConfigError, match="ohlcv-1m"):
        load_settings(None, {"databento.schema": "ohlcv-1m", "bars.timeframes": ["1s", "1min"]})


def test_api_key_from_env_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DATABENTO_API_KEY", raising=False)
    env = tmp_path / ".env"
    env.write_text("DATABENTO_API_KEY=db-TESTKEY0123456789abcdefghij\n")
    assert load_api_key(env) == "db-TESTKEY0123456789abcdefghij"
    with pytest.raises(ConfigError, match="DATABENTO_API_KEY"):
        load_api_key(tmp_path / "missing.env")

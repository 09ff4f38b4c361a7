"""`validate --reference`: our 1min/1h/1d against Databento's own OHLCV, via the Historical source."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest

from streambars.config import load_settings
from streambars.synthetic import OHLCV_DTYPE
from streambars.validate import validate_store
from streambars.validate.reference import ReferenceUnavailable, reference_path

from .fakes.historical import FakeHistorical
from .test_validate_fixtures import all_timeframes, bars_1s, ns, seconds_in, write_store

KEY = "db-" + "R" * 29
RTYPE = {"ohlcv-1m": 0x21, "ohlcv-1h": 0x22, "ohlcv-1d": 0x23}


def _dbn(bars: np.ndarray, schema: str) -> np.ndarray:
    out = np.zeros(bars.size, OHLCV_DTYPE)
    out["length"] = OHLCV_DTYPE.itemsize // 4
    out["rtype"] = RTYPE[schema]
    out["publisher_id"] = 1
    out["instrument_id"] = 42
    out["ts_event"] = bars["ts_event"].astype(np.uint64)
    for f in ("open", "high", "low", "close", "volume"):
        out[f] = bars[f]
    return out


@pytest.fixture
def store_and_fake(tmp_path, monkeypatch):
    ts = seconds_in(np.array([ns("2024-03-05T14:00:00")]), np.array([ns("2024-03-05T18:00:00")]), fill=0.5)
    bars = all_timeframes(bars_1s(ts), ["1s", "1min", "1h", "1d"])
    write_store(tmp_path, bars)
    fake = FakeHistorical(KEY, tls=False)
    fake.add_continuous("GLBX.MDP3", "ES.c.0", [(date(2024, 3, 1), date(2024, 4, 1), 42)])
    m = bars["1min"].copy()
    m["high"][10] += 250_000_000  # Databento disagrees about one minute
    fake.add_records("GLBX.MDP3", "ohlcv-1m", _dbn(m, "ohlcv-1m"))
    fake.add_records("GLBX.MDP3", "ohlcv-1h", _dbn(bars["1h"][1:], "ohlcv-1h"))  # one hour missing
    d = bars["1d"].copy()
    d["ts_event"] = ns("2024-03-05T00:00:00")  # Databento's daily bars start at 00:00 UTC
    fake.add_records("GLBX.MDP3", "ohlcv-1d", _dbn(d, "ohlcv-1d"))
    monkeypatch.setenv("DATABENTO_API_KEY", KEY)
    with fake:
        settings = load_settings(None, {"store.path": str(tmp_path), "databento.historical_gateway": fake.url})
        yield settings, fake, bars


def test_reference_mismatches_reported_and_months_cached(store_and_fake):
    settings, fake, bars = store_and_fake
    r = validate_store(settings, reference=True, env_file=None)
    by_tf = {s.timeframe: s for s in r.series}
    m = by_tf["1min"].tallies["reference_mismatch"]
    assert m.first == [int(bars["1min"]["ts_event"][10])] and "high" in m.details[m.first[0]]
    h = by_tf["1h"].tallies["reference_mismatch"]
    assert h.first == [int(bars["1h"]["ts_event"][0])] and h.details[h.first[0]] == "only in our store"
    assert "not on this file's session boundary" in by_tf["1d"].skipped["reference_mismatch"]
    assert "reference_mismatch" not in by_tf["1s"].tallies and r.exit_code == 1
    assert reference_path(settings.store.path, "GLBX.MDP3", "ES.c.0", "ohlcv-1m", "2024-03").is_file()
    n = fake.endpoint_count("/v0/timeseries.get_range")
    validate_store(settings, reference=True, env_file=None)
    assert fake.endpoint_count("/v0/timeseries.get_range") == n  # a past month is never fetched twice


def test_reference_unavailable_is_said_not_pretended(store_and_fake, monkeypatch):
    settings, _, _ = store_and_fake
    monkeypatch.delenv("DATABENTO_API_KEY")
    r = validate_store(settings, reference=True, env_file=None)
    assert any("--reference unavailable" in n and "API key" in n for n in r.notes)
    one = next(s for s in r.series if s.timeframe == "1min")
    assert "reference_mismatch" in one.skipped and "reference_mismatch" not in one.tallies

    def refuse(*_):
        raise ReferenceUnavailable("offline")

    r = validate_store(settings, reference=True, fetcher=refuse)
    assert next(s for s in r.series if s.timeframe == "1h").skipped["reference_mismatch"] == "offline"
    assert r.exit_code == 0


def test_reference_cost_limit(store_and_fake):
    settings, fake, _ = store_and_fake
    fake.cost_per_record = 100.0
    r = validate_store(settings, reference=True, env_file=None)
    why = next(s for s in r.series if s.timeframe == "1min").skipped["reference_mismatch"]
    assert "max_cost" in why and fake.endpoint_count("/v0/timeseries.get_range") == 0

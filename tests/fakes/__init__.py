"""Fakes of Databento's gateways for tests, plus seeded record generators and fixtures.

* :mod:`tests.fakes.historical` — ``FakeHistorical``: HTTPS Historical gateway (thread).
* :mod:`tests.fakes.live` — ``FakeLive``: Live gateway speaking the real protocol (asyncio
  TCP server on its own thread).

Fixtures (import them into a test module, or list ``"tests.fakes"`` in ``pytest_plugins`` of
the root conftest):

* ``api_key`` — a well-formed fake key (``db-`` + 29 characters), registered as a secret.
* ``fake_historical`` — a started ``FakeHistorical`` for ``api_key``; the process trusts its CA
  (``REQUESTS_CA_BUNDLE``/``SSL_CERT_FILE`` set through monkeypatch; ``.env`` has them for
  subprocesses); ``.url`` is the gateway to give ``HistoricalSource`` / the config.
* ``fake_live`` — a started ``FakeLive`` for ``api_key``; ``.gateway`` is ``"127.0.0.1:PORT"``.

Generators (DBN v3 structs as numpy structured arrays, no Python object per record):
``make_ohlcv(...)``, ``make_trades(...)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import databento_dbn as dbn
import numpy as np
import pytest

OHLCV_DTYPE = np.dtype(dbn.OHLCVMsg._dtypes)
TRADE_DTYPE = np.dtype(dbn.TradeMsg._dtypes)
NS = 1_000_000_000
RTYPE = {"ohlcv-1s": 0x20, "ohlcv-1m": 0x21, "trades": 0x00}
TEST_KEY = "db-" + "FakeKey0123456789abcdefghijk" + "Z"


def make_ohlcv(
    instrument_id: int,
    start_ns: int,
    n: int,
    *,
    schema: str = "ohlcv-1s",
    seed: int = 0,
    price: float = 4000.0,
    fill: float = 0.8,
    publisher_id: int = 1,
) -> np.ndarray:
    """``n`` bars of ``schema`` from ``start_ns``; a share ``1-fill`` of the intervals is
    skipped (quiet seconds), prices a seeded random walk in 0.25 ticks (fixed-point 1e-9)."""
    rng = np.random.default_rng(seed)
    step = NS if schema == "ohlcv-1s" else 60 * NS
    slots = np.flatnonzero(rng.random(int(n / fill) + 16) < fill)[:n]
    a = np.zeros(len(slots), dtype=OHLCV_DTYPE)
    a["length"] = OHLCV_DTYPE.itemsize // 4
    a["rtype"] = RTYPE[schema]
    a["publisher_id"] = publisher_id
    a["instrument_id"] = instrument_id
    a["ts_event"] = (start_ns // step) * step + slots.astype(np.int64) * step
    tick = 250_000_000
    close = int(price * NS) + np.cumsum(rng.integers(-2, 3, len(slots))) * tick
    openp = np.concatenate([[close[0]], close[:-1]]) if len(close) else close
    a["open"] = openp
    a["close"] = close
    a["high"] = np.maximum(openp, close) + rng.integers(0, 3, len(slots)) * tick
    a["low"] = np.minimum(openp, close) - rng.integers(0, 3, len(slots)) * tick
    a["volume"] = rng.integers(1, 200, len(slots))
    return a


def make_trades(
    instrument_id: int,
    start_ns: int,
    n: int,
    *,
    seed: int = 0,
    price: float = 4000.0,
    mean_gap_ns: int = 50_000_000,
    publisher_id: int = 1,
) -> np.ndarray:
    """``n`` trades from ``start_ns`` with exponential gaps (ts_recv = ts_event + 100 µs)."""
    rng = np.random.default_rng(seed)
    a = np.zeros(n, dtype=TRADE_DTYPE)
    a["length"] = TRADE_DTYPE.itemsize // 4
    a["rtype"] = 0
    a["publisher_id"] = publisher_id
    a["instrument_id"] = instrument_id
    ts = start_ns + np.cumsum(rng.exponential(mean_gap_ns, n).astype(np.int64) + 1)
    a["ts_event"] = ts
    a["ts_recv"] = ts + 100_000
    a["price"] = int(price * NS) + np.cumsum(rng.integers(-1, 2, n)) * 250_000_000
    a["size"] = rng.integers(1, 20, n)
    a["action"] = b"T"
    a["side"] = np.where(rng.random(n) < 0.5, b"A", b"B")
    a["flags"] = 0x80
    a["sequence"] = np.arange(n, dtype=np.uint32)
    return a


@pytest.fixture
def api_key() -> str:
    from streambars.observe import register_secret

    register_secret(TEST_KEY)
    return TEST_KEY


@pytest.fixture
def fake_historical(api_key: str, tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    from .historical import FakeHistorical

    fake = FakeHistorical(api_key).start(cert_dir=tmp_path_factory.mktemp("fake-ca"))
    for k, v in fake.env.items():
        monkeypatch.setenv(k, v)
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake_live(api_key: str) -> Iterator[object]:
    from .live import FakeLive

    fake = FakeLive(api_key).start()
    try:
        yield fake
    finally:
        fake.stop()

"""The kernel never writes past the ``out`` it is given, whatever room is left, from whatever
row it is told to start at (a live call writes into the rest of a shared pool).

Each of its loops takes only as many records as the bars they can close fit ``out``. The
compiled kernel has no bounds check, so a bound too loose would write past the buffer
silently: here ``out`` is the head of a larger array whose tail rows are canaries, and the
bars must equal a plain run's."""

from __future__ import annotations

import numpy as np
import pytest

from streambars.engine import Aggregator
from streambars.engine import kernel as K
from streambars.records import TAGGED_BAR_DTYPE, RecordBatch
from streambars.timeframes import STANDARD_TIMEFRAMES, Session

from .reference import by_key

S = 1_000_000_000
START = 1_709_856_000 * S  # 2024-03-08: the streams cross the 2024-03-10 DST change
CME = Session.parse("17:00 America/Chicago")
CANARY = 0x5A


def bars_1s(seed: int, n: int) -> RecordBatch:
    """1s bars, mostly a second apart, with gaps from seconds to days: a gap closes a bar of
    every level at once, the case that fills ``out`` fastest."""
    rng = np.random.default_rng(seed)
    gaps = rng.choice([1, 1, 1, 1, 1, 1, 1, 2, 7, 59, 61, 3_601, 86_399, 200_000], n,
                      p=[0.5, 0.1, 0.1, 0.1, 0.05, 0.04, 0.04, 0.02, 0.01, 0.01, 0.01, 0.01, 0.005, 0.005])
    ts = START + np.cumsum(gaps).astype(np.int64) * S
    close = 5_000 * S + np.cumsum(rng.integers(-4, 5, n)) * S // 4
    open_ = close + rng.integers(-2, 3, n) * S // 4
    high = np.maximum(open_, close) + rng.integers(0, 3, n) * S // 4
    low = np.minimum(open_, close) - rng.integers(0, 3, n) * S // 4
    vol = rng.integers(1, 500, n).astype(np.uint64)
    return RecordBatch("ohlcv-1s", np.zeros(n, np.int32), ts, open_, high, low, close, vol)


def run_in(agg: Aggregator, batch: RecordBatch, cap: int, out_start: int) -> np.ndarray:
    """Every bar of ``batch`` through the kernel's entry point into ``out`` of ``cap`` rows,
    from row ``out_start`` on (as a live call writes into a pool), checking the canaries
    after each call."""
    big = np.zeros(cap + 256, TAGGED_BAR_DTYPE)
    raw = big.view(np.uint8)
    raw[cap * TAGGED_BAR_DTYPE.itemsize:] = CANARY
    out = big[:cap]
    cols = (batch.series, batch.ts_event, batch.open, batch.high, batch.low, batch.close, batch.volume)
    agg._grow(1)
    parts, done, calls = [], 0, 0
    while True:
        done, end, status, _ = K.aggregate(*cols, done, agg._st, out, out_start)
        calls += 1
        assert (raw[cap * TAGGED_BAR_DTYPE.itemsize:] == CANARY).all(), f"wrote past out (cap {cap})"
        assert out_start <= end <= cap
        parts.append(out[out_start:end].copy())
        if status == K.OK:
            break
        assert status == K.FULL
        out_start = 0
    assert calls < len(batch)  # progress: a call that found room took records
    return np.concatenate(parts)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cap", [32, 33, 47, 100, 333, 2_000, 40_000])
def test_the_kernel_writes_inside_out_whatever_room_is_left(seed, cap):
    batch = bars_1s(seed, 30_000)
    want = Aggregator(STANDARD_TIMEFRAMES, input_kind="ohlcv-1s", session=CME)
    want_bars = np.concatenate([want.process(batch).bars, want.finish().bars])
    agg = Aggregator(STANDARD_TIMEFRAMES, input_kind="ohlcv-1s", session=CME)
    got = run_in(agg, batch, cap, out_start=cap // 3 if cap > 3 * len(STANDARD_TIMEFRAMES) else 0)
    got = np.concatenate([got, agg.finish().bars])
    assert len(want_bars) > 1.5 * len(batch)
    assert by_key(got).tobytes() == by_key(want_bars).tobytes()
    assert not agg.counts.any()

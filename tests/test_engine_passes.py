"""The level-by-level segments of the 1s run loop (kernel._segment, _pass, _run_passes) against
the frozen kernel (engine_kernel_v2): bars per (series, timeframe) and state word for state word.

test_engine_runs_diff's streams break runs every few records; these are long clean runs (so
segments reach MAX_SEGMENT and the output buffer's room), with gaps of every size (a coarse
level closes on a source bar far past its end), a daily level fed by 1s directly, and the
ways a segment must stop: a record the run does not take (tie, late, misaligned, broken; with
fail policies too), another series, the batch end at any split, a volume that could wrap a
coarser level (the rest of the run goes to _run_exact) and a count near the output's uint32.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streambars.engine as engine
from streambars.engine import kernel as K
from streambars.records import RecordBatch
from streambars.rules import RECORD_RULE_NAMES
from streambars.timeframes import STANDARD_TIMEFRAMES

from .test_engine_kernel_diff import SESSIONS, START, Twin, drive
from .test_engine_runs_diff import RealTwin

S = 1_000_000_000
TICK = 250_000_000
#: steps between a series' records: mostly 1 s, as ES 1s bars are, and gaps past 5s, 1min,
#: 1h, a day, a weekend (rare enough that a day holds ~1,000 records)
GAPS = np.array([1, 2, 3, 4, 5, 6, 11, 59, 61, 299, 3_601, 14_401, 86_400, 3 * 86_400])
GAP_P = np.array([0.8, 0.07, 0.04, 0.03, 0.02, 0.01, 0.01, 0.004, 0.004, 0.004, 0.001, 0.001, 0.0005, 0.0005])

LADDERS = [
    list(STANDARD_TIMEFRAMES),
    ["1s", "5s"],
    ["1s", "1d"],  # level 1 daily: bucket() with the session's bounds in the loop
    ["1s", "5s", "15s", "1min", "1h", "4h", "1d"],
    ["1s", "10s", "90s", "1h", "6h", "1d"],  # 90s's source is 10s, 1d's is 6h or 1h
]


def clean_stream(rng: np.random.Generator, n: int, n_series: int, dirt: float, huge: float,
                 large: float = 0.0) -> RecordBatch:
    """Long runs of one series (up to 12,000 records) of clean 1s bars; ``dirt``: the share of
    records a run does not take (ties, late, misaligned, broken); ``huge``: the share of
    volumes near 2**63 (two of them wrap a coarse bar); ``large``: the share of volumes of
    2**49..2**56 (above what a segment takes, and their sums pass 2**62, yet nothing wraps)."""
    runs = rng.integers(1, 12_000, max(1, n // 2_000))
    series = np.repeat(rng.integers(0, n_series, len(runs)), runs)
    series = np.resize(series, n).astype(np.int32)
    clock = np.full(n_series, START + int(rng.integers(0, 86_400)) * S, np.int64)
    ts = np.empty(n, np.int64)
    steps = rng.choice(GAPS, n, p=GAP_P / GAP_P.sum()) * S
    for i, s in enumerate(series):
        clock[s] += steps[i]
        ts[i] = clock[s]
    close = (20_000 + np.cumsum(rng.integers(-3, 4, n))) * TICK
    o = close + rng.integers(-2, 3, n) * TICK
    h = np.maximum(o, close) + rng.integers(0, 3, n) * TICK
    lo = np.minimum(o, close) - rng.integers(0, 3, n) * TICK
    vol = rng.integers(1, 500, n).astype(np.uint64)
    pick = rng.random(n)
    bad = pick < dirt
    kind = rng.integers(0, 5, n)
    ts[bad & (kind == 0)] -= S  # a tie with the record before (or late)
    ts[bad & (kind == 1)] += S // 2  # misaligned
    lo[bad & (kind == 2)] = -TICK
    h[bad & (kind == 3)] -= 10 * TICK
    vol[bad & (kind == 4)] = 0
    big = (pick >= dirt) & (pick < dirt + huge)
    vol[big] = np.uint64(2**63) + rng.integers(0, 2**62, int(big.sum())).astype(np.uint64)
    mid = (pick >= dirt + huge) & (pick < dirt + huge + large)
    vol[mid] = rng.integers(2**49, 2**56, int(mid.sum())).astype(np.uint64)
    return RecordBatch("ohlcv-1s", series, ts, o, h, lo, close.copy(), vol)


class PassTwin(RealTwin):
    def __init__(self, rng: np.random.Generator, tfs: list[str], out_capacity: int, fail: bool):
        Twin.__init__(self, rng, "ohlcv-1s")
        policy = "fail" if fail else "flag"
        kw = dict(input_kind="ohlcv-1s", session=SESSIONS[int(rng.integers(2))],
                  policies={"price_non_positive": policy, "volume_overflow": policy, "ts_misaligned": "drop"},
                  out_capacity=out_capacity)
        self.new, self.old = engine.Aggregator(tfs, **kw), engine.Aggregator(tfs, **kw)
        self.label = f"{tfs} {kw}"


@pytest.mark.parametrize("ladder", range(len(LADDERS)))
@pytest.mark.parametrize("case", ["clean", "dirty", "huge", "large", "fail", "tiny-buffer"])
def test_segments_equal_the_frozen_kernel(ladder, case):
    rng = np.random.default_rng(ladder * 10 + len(case))
    twin = PassTwin(rng, LADDERS[ladder], 64 if case == "tiny-buffer" else 65_536, case == "fail")
    dirt = {"clean": 0.0, "huge": 0.0, "large": 0.0, "tiny-buffer": 0.001}.get(case, 0.002)
    batch = clean_stream(rng, 24_000, [1, 2, 3][ladder % 3], dirt, 0.001 if case in ("huge", "fail") else 0.0,
                         0.001 if case == "large" else 0.0)
    drive(twin, rng, batch, [1, 7, 64, 500, 4_000, 10_000, 24_000])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), ladder=st.sampled_from(range(len(LADDERS))),
       cuts=st.lists(st.integers(0, 6_000), max_size=8))
def test_any_split_of_a_long_run_equals_the_frozen_kernel(seed, ladder, cuts):
    """Batches cut anywhere (mid-segment, mid-bar of every level) give the same bars and state."""
    rng = np.random.default_rng(seed)
    twin = PassTwin(rng, LADDERS[ladder], 65_536, False)
    batch = clean_stream(rng, 6_000, 1 + seed % 2, 0.0005, 0.0)
    edges = sorted({0, len(batch), *cuts})
    for a, b in zip(edges, edges[1:], strict=False):
        twin.check(*twin.both("process", batch.slice(a, b)), f"process [{a}, {b})")
    twin.check(*twin.both("finish"), "finish")


def test_a_count_near_the_outputs_uint32_leaves_the_run_to_the_old_loop():
    """A running 1h bar's count near 2**32 (restored state: no stream of that size in a test):
    its closed bar's count field wraps, and a pass reading it would fold the wrapped count into
    the running 2h bar's state; segments stop before that, and the old loop folds the
    state's int64 count."""
    rng = np.random.default_rng(5)
    twin = PassTwin(rng, list(STANDARD_TIMEFRAMES), 65_536, False)
    batch = clean_stream(rng, 20_000, 1, 0.0, 0.0)
    hour = [t.name for t in twin.new.timeframes].index("1h")
    i = 0
    while not twin.new.get_series_state(0)["levels"][hour, K.L_ACTIVE]:  # up to a running 1h bar
        twin.check(*twin.both("process", batch.slice(i, i + 100)), f"process [{i}, {i + 100})")
        i += 100
    for agg in (twin.new, twin.old):
        state = agg.get_series_state(0)
        state["levels"][hour, K.L_COUNT] = 2**32 - 2
        agg.set_series_state(0, state)
    # small batches: the state is compared while a coarser bar holds the count (the bars
    # alone would not show it: their uint32 field wraps the same either way)
    drive(twin, rng, batch.slice(i, i + 6_000), [7, 64, 300])


@pytest.mark.parametrize("level", ["1min", "1d"])
def test_a_running_volume_near_2_64_leaves_the_run_to_the_old_loop(level):
    """A running bar's volume so near 2**64 that the running volumes' sum does not wrap yet,
    but the next few hundred records' volumes overflow it (restored state). Segments check no
    sum per record; they start only while the running volumes sum below 2**62, so these
    records go to the loop that saturates and counts volume_overflow, as the frozen kernel."""
    rng = np.random.default_rng(11)
    twin = PassTwin(rng, list(STANDARD_TIMEFRAMES), 65_536, False)
    batch = clean_stream(rng, 20_000, 1, 0.0, 0.0)
    k = [t.name for t in twin.new.timeframes].index(level)
    i = 0
    while not twin.new.get_series_state(0)["levels"][k, K.L_ACTIVE]:
        twin.check(*twin.both("process", batch.slice(i, i + 100)), f"process [{i}, {i + 100})")
        i += 100
    for agg in (twin.new, twin.old):
        state = agg.get_series_state(0)
        levels = state["levels"]
        others = sum(int(levels[j, K.L_VOLUME]) for j in range(len(levels)) if j != k and levels[j, K.L_ACTIVE])
        levels[k, K.L_VOLUME] = np.uint64(2**64 - 1 - others - 50_000).view(np.int64)
        agg.set_series_state(0, state)
    drive(twin, rng, batch.slice(i, i + 6_000), [7, 64, 3_000])
    rule = list(RECORD_RULE_NAMES).index("volume_overflow")
    assert twin.new.counts[0, rule] > 0

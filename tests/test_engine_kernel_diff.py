"""The kernel with its run loops equals the kernel before them (a frozen copy, engine_kernel_v2)
bar for bar, each (series, timeframe) in emission order (the frozen kernel emits in closing
order, the level-by-level passes each level's bars together), and state word for state word: on random streams with runs of
one series, ties, late, misaligned and broken records, huge volumes, flushes, fail policies
and random batch splits, at 1..16 timeframes (daily bars and roots like 7s/13s included)."""

from __future__ import annotations

import numpy as np
import pytest

import streambars.engine as engine
from streambars.engine import Aggregator
from streambars.errors import RuleViolationError
from streambars.records import UNDEF_PRICE, RecordBatch
from streambars.rules import RECORD_RULE_NAMES
from streambars.timeframes import STANDARD_TIMEFRAMES, Session

from . import engine_kernel_v2 as frozen
from .reference import by_key

S = 1_000_000_000
TICK = 250_000_000
START = 1_709_856_000 * S  # 2024-03-08: the streams cross the 2024-03-10 DST change
SESSIONS = [Session.parse("17:00 America/Chicago"), Session.parse("00:00 America/New_York")]
EXOTIC = ["7s", "13s", "90s", "20min", "6h"]
GAPS_S = np.array([1, 1, 1, 1, 1, 1, 2, 3, 4, 5, 9, 31, 61, 299, 3_599, 14_401, 86_400])


def _frozen_from_row(*args):
    """The frozen kernel behind today's entry point, which writes from a given row of ``out``
    (process() hands a live record the rest of a shared pool) and returns the row after its
    last bar: the frozen one writes from row 0 of what it is given and returns a count."""
    *head, out, out_start = args
    done, nout, status, info = frozen.aggregate(*head, out[out_start:])
    return done, out_start + nout, status, info


def stream(rng: np.random.Generator, kind: str, n: int, n_series: int) -> RecordBatch:
    """Runs of one series (1..150 records), mostly 1 s apart (bars) or ns apart (trades), with
    ties, late and misaligned records, broken prices, zero, absurd and huge volumes."""
    runs = rng.integers(1, 150, n)
    series = np.repeat(rng.integers(0, n_series, n), runs)[:n].astype(np.int32)
    clock = np.full(n_series, START + int(rng.integers(0, 86_400)) * S, np.int64)
    ts = np.empty(n, np.int64)
    bad = rng.random(n)
    for i, s in enumerate(series):
        if kind == "trades":
            step = int(rng.choice([0, int(rng.integers(1, S)), int(rng.integers(1, 60 * S)), 3_600 * S]))
        else:
            step = 0 if rng.random() < 0.05 else int(rng.choice(GAPS_S)) * S
        clock[s] += step
        ts[i] = clock[s]
        if bad[i] < 0.01:  # late: before the series' clock
            ts[i] -= int(rng.integers(1, 400)) * S
        elif bad[i] < 0.015 and kind != "trades":
            ts[i] += S // 2
    close = (20_000 + np.cumsum(rng.integers(-3, 4, n))) * TICK
    vol = rng.integers(1, 500, n).astype(np.uint64)
    if kind == "trades":
        o = h = lo = c = close
    else:
        o = close + rng.integers(-2, 3, n) * TICK
        h = np.maximum(o, close) + rng.integers(0, 3, n) * TICK
        lo = np.minimum(o, close) - rng.integers(0, 3, n) * TICK
        c = close
    o, h, lo, c = (np.array(x) for x in (o, h, lo, c))
    pick = rng.random(n)
    c[pick < 0.004] = UNDEF_PRICE
    lo[(pick >= 0.004) & (pick < 0.008)] = -TICK
    if kind != "trades":
        h[(pick >= 0.008) & (pick < 0.012)] -= 10 * TICK
    vol[(pick >= 0.012) & (pick < 0.016)] = 0
    vol[(pick >= 0.016) & (pick < 0.02)] = 10**7
    if rng.random() < 0.5:  # volumes that overflow a bar, or a coarser bar when folded
        huge = rng.random(n) < 0.01
        vol[huge] = np.uint64(2**63) + rng.integers(0, 2**62, int(huge.sum())).astype(np.uint64)
    return RecordBatch(kind, series, ts, o, h, lo, c, vol)


def timeframes(rng: np.random.Generator, kind: str) -> list[str]:
    k = int(rng.integers(1, 17))
    tfs = list(rng.choice(STANDARD_TIMEFRAMES, k, replace=False))
    if rng.random() < 0.3:
        tfs.append(str(rng.choice(EXOTIC)))
    if rng.random() < 0.4 and "1d" not in tfs:
        tfs.append("1d")
    if kind != "trades" and rng.random() < 0.5 and "1s" not in tfs:  # the finest level = the input
        tfs.append("1s")
    return tfs


class Twin:
    """One configuration run by the current kernel and by the frozen one, side by side."""

    def __init__(self, rng: np.random.Generator, kind: str):
        tfs = timeframes(rng, kind)
        rules = list(RECORD_RULE_NAMES)
        policies = {r: str(rng.choice(["flag", "drop", "fail"], p=[0.5, 0.35, 0.15])) for r in rules}
        kw = dict(input_kind=kind, session=SESSIONS[int(rng.integers(2))], policies=policies,
                  max_volume=int(rng.choice([0, 10**6])), out_capacity=int(rng.choice([64, 65_536])))
        self.new, self.old = Aggregator(tfs, **kw), Aggregator(tfs, **kw)
        self.label = f"{tfs} {policies}"

    def both(self, method: str, *args):
        """The same call on both; returns (new result, old result), either a BarBatch or the
        RuleViolationError it raised. process() and the flushes call the compiled entry point
        ``engine._direct`` for plain columns and ``engine._aggregate`` otherwise: both are
        swapped for the frozen kernel (swapping only the latter ran the current kernel on both
        sides; tests/test_engine_runs_diff.py checks the frozen one is really called)."""
        results = []
        saved = engine._aggregate, engine._direct
        for agg, kernel in ((self.new, None), (self.old, _frozen_from_row)):
            if kernel is not None:
                engine._aggregate = engine._direct = kernel
            try:
                results.append(getattr(agg, method)(*args))
            except RuleViolationError as err:
                results.append(err)
            finally:
                engine._aggregate, engine._direct = saved
        return results

    def check(self, new, old, where: str) -> None:
        assert type(new) is type(old), (where, self.label, new, old)
        if isinstance(new, RuleViolationError):
            assert (new.rule, new.index, new.series_index, new.ts_event) == (old.rule, old.index, old.series_index, old.ts_event), where
            new, old = new.bars, old.bars
        assert by_key(new.bars).tobytes() == by_key(old.bars).tobytes(), (where, self.label)
        a, b = self.new.get_state(), self.old.get_state()
        for key in a:
            assert np.array_equal(a[key], b[key]), (where, key, self.label)


def drive(twin: Twin, rng: np.random.Generator, batch: RecordBatch, sizes) -> None:
    """Feed ``batch`` to both in random pieces of ``sizes`` records, with random flushes, going
    on after a failed record as a caller may; every result and state must match."""
    i = 0
    while i < len(batch):
        n = int(rng.choice(sizes))
        new, old = twin.both("process", batch.slice(i, i + n))
        twin.check(new, old, f"process [{i}, {i + n})")
        if isinstance(new, RuleViolationError):  # the caller may go on after the bad record
            i += new.index + 1
            continue
        i += n
        if rng.random() < 0.1 and i < len(batch):
            until = int(batch.ts_event[i]) - int(rng.integers(0, 3_600)) * S
            twin.check(*twin.both("flush", until), f"flush({until})")
    twin.check(*twin.both("finish"), "finish")
    assert np.array_equal(twin.new.counts, twin.old.counts)


@pytest.mark.parametrize("seed", range(48))
def test_the_kernel_equals_the_frozen_one(seed):
    rng = np.random.default_rng(seed)
    kind = ["ohlcv-1s", "trades"][seed % 2]
    twin = Twin(rng, kind)
    batch = stream(rng, kind, int(rng.integers(200, 3_000)), int(rng.choice([1, 1, 2, 3])))
    drive(twin, rng, batch, [1, 7, 64, 500, 4_000])

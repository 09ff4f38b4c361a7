"""The kernel's run loops against the frozen kernel before them (engine_kernel_v2), bar for bar
and state word for state word, with the frozen kernel really called.

``Aggregator.process`` and the flushes call the compiled entry point ``engine._direct``, not
``engine._aggregate``, for plain columns: Twin swaps both (it once swapped only the latter,
so its two aggregators ran the current kernel; test_the_frozen_kernel_is_called guards
that). test_engine_kernel_diff runs random set-ups; the set-ups here aim at the run loops:
1s alone (_run_single), 1s + 5s (_run_passes' segments with no coarser pass), 1s..1d
(segments and passes; _run_exact where a huge volume could wrap), 1s with two children of 1s
(no run loop), a 1s..1d ladder with 7s/13s roots. Bars compare per (series, timeframe): see
test_engine_kernel_diff. test_engine_passes aims at the segments with long clean runs.
"""

from __future__ import annotations

import numpy as np
import pytest

import streambars.engine as engine
from streambars.timeframes import STANDARD_TIMEFRAMES

from . import engine_kernel_v2 as frozen
from .test_engine_kernel_diff import Twin, drive, stream

FIXED = [
    ["1s"],
    ["1s", "5s"],
    list(STANDARD_TIMEFRAMES),
    ["1s", "5s", "10s", "15s", "30s", "1min", "1h", "1d"],
    ["1s", "7s", "13s", "1min"],
    ["1s", "2s", "1min", "1d"],
]


class RealTwin(Twin):
    def __init__(self, rng: np.random.Generator, kind: str, tfs: list[str] | None = None):
        super().__init__(rng, kind)
        if tfs is not None:  # the same random policies and options, these timeframes
            new = self.new
            kw = dict(input_kind=kind, session=new.session, max_volume=int(rng.choice([0, 10**6])),
                      policies={k: v.name.lower() for k, v in new.policies.items()},
                      out_capacity=int(rng.choice([64, 65_536])))
            self.new, self.old = engine.Aggregator(tfs, **kw), engine.Aggregator(tfs, **kw)
            self.label = f"{tfs} {kw}"


@pytest.mark.parametrize("tfs", range(len(FIXED)))
@pytest.mark.parametrize("seed", range(6))
def test_run_loops_equal_the_frozen_kernel(tfs, seed):
    rng = np.random.default_rng(1000 + seed)
    twin = RealTwin(rng, "ohlcv-1s", FIXED[tfs])
    drive(twin, rng, stream(rng, "ohlcv-1s", 3_000, [1, 1, 2, 3][seed % 4]), [1, 7, 64, 500, 4_000])


def test_the_frozen_kernel_is_called(monkeypatch):
    """RealTwin runs the old aggregator on the frozen kernel (else the cases above would
    compare the current kernel with itself)."""
    real, calls = frozen.aggregate, []

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(frozen, "aggregate", counting)
    rng = np.random.default_rng(7)
    twin = RealTwin(rng, "ohlcv-1s", ["1s", "5s"])
    twin.both("process", stream(rng, "ohlcv-1s", 100, 1))
    assert calls

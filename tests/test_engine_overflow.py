"""volume_overflow: a bar's volume saturates at 2**64 - 1 instead of wrapping, counted as a rule
with the usual policies; and engine states saved before the rule existed still restore."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streambars.engine import STATE_LAYOUT_VERSION, Aggregator
from streambars.errors import RuleViolationError
from streambars.records import RecordBatch
from streambars.rules import RECORD_RULE_NAMES, RULES

from .engine_state_v1 import CUT, v1_input
from .engine_state_v1 import PATH as V1_STATE
from .engine_state_v1 import TIMEFRAMES as V1_TIMEFRAMES
from .reference import by_key, diff_bars, sort_bars
from .test_engine import (
    PROPERTY,
    START,
    TICK,
    TIMEFRAME_SETS,
    copy_batch,
    feed,
    make,
    random_stream,
    reference,
    take,
)

S = 1_000_000_000
MAX = 2**64 - 1
H = 2**63
BIT = RULES["volume_overflow"].bit


def recs(seconds: list[int], volumes: list[int], kind: str = "ohlcv-1s") -> RecordBatch:
    n = len(seconds)
    price = np.full(n, 100 * TICK, np.int64)
    ts = np.array([START + s * S for s in seconds], np.int64)
    return RecordBatch(kind, np.zeros(n, np.int32), ts, price, price, price, price, np.array(volumes, np.uint64))


def by_tf(bars: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    b = sort_bars(bars)
    b = b[b["timeframe"] == k]
    return list(zip(((b["ts_event"] - START) // S).tolist(), b["volume"].tolist(), b["count"].tolist(), strict=True))


def test_the_rule_is_appended_after_the_existing_bits():
    assert RECORD_RULE_NAMES[-1] == "volume_overflow" and BIT == 7  # the bit order is saved state
    assert RULES["volume_overflow"].severity.name == "ERROR"


# -- a record whose own volume overflows the bar it lands in ----------------------------------
# 2**63 + (2**63 + 173) wraps to 173; then every further volume in a saturated bar overflows too


@pytest.mark.parametrize("kind,seconds", [("trades", [0, 0, 1, 60]), ("ohlcv-1m", [0, 0, 0, 60])])
@pytest.mark.parametrize("policy", ["flag", "drop"])
def test_a_record_overflowing_its_bar_is_counted_and_saturates_or_is_dropped(kind, seconds, policy):
    # trades in one minute, or three publishers' bars of one minute
    agg = make(("1min", "1h"), kind, policies={"volume_overflow": policy})
    got = feed(agg, recs(seconds, [H, H + 173, 5, 7], kind))
    assert agg.counts[0, :BIT].sum() == 0
    t2 = START + seconds[2] * S
    if policy == "flag":  # kept: the minute saturates, the next record overflows it again, and
        # the hour, saturated by that minute, overflows when finish() folds the next minute in
        assert agg.first_violations(0, "volume_overflow") == [START, t2, START + 60 * S]
        assert by_tf(got, 0) == [(0, MAX, 3), (60, 7, 1)] and by_tf(got, 1) == [(0, MAX, 4)]
    else:  # dropped: as if the record never came
        assert agg.first_violations(0, "volume_overflow") == [START]
        assert by_tf(got, 0) == [(0, H + 5, 2), (60, 7, 1)] and by_tf(got, 1) == [(0, H + 12, 3)]
    assert agg.counts[0, BIT] == len(agg.first_violations(0, "volume_overflow"))


def test_a_record_overflowing_its_bar_with_policy_fail_raises_and_is_not_applied():
    agg = make(("1s", "1min"), "trades", policies={"volume_overflow": "fail"})
    batch = recs([0, 0, 1], [H, H + 173, 5], "trades")
    with pytest.raises(RuleViolationError) as info:
        agg.process(batch)
    err = info.value
    assert err.rule == "volume_overflow" and err.index == 1 and err.ts_event == START
    assert agg.counts[0, BIT] == 1
    rest = feed(agg, batch.slice(2, 3))
    assert by_tf(np.concatenate([err.bars.bars, rest]), 1) == [(0, H + 5, 2)]


@pytest.mark.parametrize("policy", ["flag", "drop", "fail"])
def test_with_several_roots_the_record_is_checked_against_each_before_anything_changes(policy):
    # 7s and 13s do not nest: both are fed by the records themselves
    agg = make(("7s", "13s"), "trades", policies={"volume_overflow": policy})
    batch = recs([0, 0, 0, 20], [H, H + 173, 5, 7], "trades")

    def at(x: int, n: int) -> int:  # the n-second bar (epoch-aligned) holding second x
        return ((START + x * S) // (n * S) * n * S - START) // S

    if policy == "fail":
        with pytest.raises(RuleViolationError) as info:
            agg.process(batch)
        assert info.value.index == 1 and len(info.value.bars) == 0
        got = feed(agg, batch.slice(2, 4))
    else:
        got = feed(agg, batch)
    if policy == "flag":
        assert agg.first_violations(0, "volume_overflow") == [START, START]
        assert by_tf(got, 0) == [(at(0, 7), MAX, 3), (at(20, 7), 7, 1)]
        assert by_tf(got, 1) == [(at(0, 13), MAX, 3), (at(20, 13), 7, 1)]
    else:
        assert agg.first_violations(0, "volume_overflow") == [START]
        assert by_tf(got, 0) == [(at(0, 7), H + 5, 2), (at(20, 7), 7, 1)]
        assert by_tf(got, 1) == [(at(0, 13), H + 5, 2), (at(20, 13), 7, 1)]


# -- a closed bar overflowing the coarser bar it is folded into --------------------------------


@pytest.mark.parametrize("policy", ["flag", "drop"])
def test_a_fold_overflow_saturates_the_coarser_bar_and_is_charged_to_the_record_that_closed_it(policy):
    # 1s bars never overflow; the minute does when the 1s bar of second 1 is folded into it,
    # which the record of second 60 does: that record is charged, and kept (not its volume)
    agg = make(("1s", "1min"), policies={"volume_overflow": policy})
    got = feed(agg, recs([0, 1, 60], [H, H + 173, 5]))
    assert agg.counts[0, BIT] == 1 and agg.first_violations(0, "volume_overflow") == [START + 60 * S]
    assert by_tf(got, 0) == [(0, H, 1), (1, H + 173, 1), (60, 5, 1)]
    assert by_tf(got, 1) == [(0, MAX, 2), (60, 5, 1)]


def test_a_fold_overflow_in_finish_is_charged_to_the_series_last_record():
    agg = make(("1s", "1min", "1d"))
    got = feed(agg, recs([0, 1], [H, H + 173]))
    assert agg.counts[0, BIT] == 1 and agg.first_violations(0, "volume_overflow") == [START + S]
    assert by_tf(got, 1) == [(0, MAX, 2)] and by_tf(got, 2)[0][1:] == (MAX, 2)


def test_a_fold_overflow_with_policy_fail_raises_with_the_bars_it_closed():
    agg = make(("1s", "1min"), policies={"volume_overflow": "fail"})
    batch = recs([0, 1, 60, 61], [H, H + 173, 5, 6])
    with pytest.raises(RuleViolationError) as info:
        agg.process(batch)
    err = info.value
    assert err.rule == "volume_overflow" and err.index == 2 and err.ts_event == START + 60 * S
    # closed by the record, so emitted: the seconds, and the saturated minute
    assert by_tf(err.bars.bars, 0) == [(0, H, 1), (1, H + 173, 1)] and by_tf(err.bars.bars, 1) == [(0, MAX, 2)]
    # the clock moved to the record (what it closed stays closed); it is in no bar
    rest = feed(agg, batch.slice(3, 4))
    assert by_tf(rest, 0) == [(61, 6, 1)] and by_tf(rest, 1) == [(60, 6, 1)]
    assert agg.counts[0, RULES["ts_not_increasing"].bit] == 0


# -- properties -------------------------------------------------------------------------------


def huge_volumes(batch: RecordBatch, seed: int) -> RecordBatch:
    b = copy_batch(batch)
    rng = np.random.default_rng(seed)
    big = rng.random(len(b)) < 0.3
    b.volume[big] = rng.integers(2**62, 2**63, int(big.sum()), dtype=np.uint64) * np.uint64(2) - rng.integers(
        0, 2, int(big.sum()), dtype=np.uint64)
    return b


def saturated_reference(agg: Aggregator, batch: RecordBatch) -> np.ndarray:
    """The reference bars with volumes summed exactly (Python ints via two 32-bit halves) and
    saturated at 2**64 - 1."""
    v = batch.volume
    hi = RecordBatch(batch.kind, batch.series, batch.ts_event, batch.open, batch.high, batch.low, batch.close, v >> 32)
    lo = RecordBatch(batch.kind, batch.series, batch.ts_event, batch.open, batch.high, batch.low, batch.close,
                     v & np.uint64(0xFFFFFFFF))
    want, want_lo = reference(agg, hi), reference(agg, lo)
    want["volume"] = [min(MAX, (int(a) << 32) + int(b)) for a, b in zip(want["volume"], want_lo["volume"], strict=True)]
    return want


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), tfs=st.sampled_from(TIMEFRAME_SETS),
       kind=st.sampled_from(["ohlcv-1s", "trades"]), chunk=st.integers(1, 120), publishers=st.sampled_from([1, 3]))
def test_flagged_huge_volumes_saturate_every_bar_exactly_and_any_split_agrees(seed, tfs, kind, chunk, publishers):
    batch = huge_volumes(random_stream(seed, kind=kind, publishers=publishers), seed)
    agg = make(tfs, kind)
    whole = feed(agg, batch)
    assert agg.counts[:, BIT].sum() > 0 and agg.counts[:, :BIT].sum() == 0
    assert diff_bars(whole, saturated_reference(agg, batch)) == ""
    split = make(tfs, kind)
    assert np.array_equal(feed(split, batch, [chunk]), whole)
    assert np.array_equal(split.counts, agg.counts)
    for s in range(agg.n_series):
        assert split.first_violations(s, BIT) == agg.first_violations(s, BIT)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), tfs=st.sampled_from(TIMEFRAME_SETS), chunk=st.integers(1, 120))
def test_dropped_overflows_are_the_same_for_any_split(seed, tfs, chunk):
    batch = huge_volumes(random_stream(seed, kind="trades"), seed)
    agg = make(tfs, "trades", policies={"volume_overflow": "drop"})
    whole = feed(agg, batch)
    split = make(tfs, "trades", policies={"volume_overflow": "drop"})
    assert np.array_equal(feed(split, batch, [chunk]), whole)
    assert np.array_equal(split.counts, agg.counts)


def test_normal_volumes_never_overflow():
    batch = random_stream(5, kind="trades")
    agg = make(kind="trades")
    assert diff_bars(feed(agg, batch), reference(agg, batch)) == "" and not agg.counts.any()


# -- engine states saved before the rule existed ----------------------------------------------

def _v1(prefix: str) -> dict[str, np.ndarray]:
    """A state saved by the engine of layout version 1 (commit 5c936c1, 7 rules); see
    tests/data/README.md for how it was made."""
    with np.load(V1_STATE) as z:
        return {k.split(".", 1)[1]: z[k] for k in z.files if k.startswith(prefix + ".")}


def test_v1_state_is_really_the_old_layout():
    old = _v1("all")
    assert old["layout"][0] == 1 and STATE_LAYOUT_VERSION == 2
    assert old["series"].shape[1] == 2 + 7 * (1 + 8) < make(V1_TIMEFRAMES).get_state()["series"].shape[1]


@pytest.mark.parametrize("how", ["whole", "series"])
def test_a_state_saved_before_volume_overflow_restores_and_resumes_exactly(how):
    batch = v1_input()
    full = make(V1_TIMEFRAMES)
    want = feed(full, batch)
    assert full.counts[:, :BIT].any()
    first = make(V1_TIMEFRAMES).process(batch.slice(0, CUT)).bars  # no ties: v1 made the same bars
    rest = batch.slice(CUT, len(batch))
    restored = make(V1_TIMEFRAMES)
    if how == "whole":
        restored.set_state(_v1("all"))
        series = range(full.n_series)
    else:
        restored.set_series_state(1, _v1("one"))
        series = [1]
        rest = take(rest, np.flatnonzero(rest.series == 1))
        want, first = want[want["series"] == 1], first[first["series"] == 1]
    got = by_key(np.concatenate([first, feed(restored, rest)]))
    assert np.array_equal(got, want)
    for s in series:
        assert restored.counts[s].tolist() == full.counts[s].tolist()
        for rule in RECORD_RULE_NAMES:
            assert restored.first_violations(s, rule) == full.first_violations(s, rule), rule
    # and it saves in today's layout
    buf = io.BytesIO()
    np.savez(buf, **restored.get_state())
    buf.seek(0)
    assert int(np.load(buf)["layout"][0]) == STATE_LAYOUT_VERSION


def test_a_state_of_an_unknown_layout_version_is_refused():
    state = make(V1_TIMEFRAMES).get_series_state(0)
    state["layout"] = state["layout"].copy()
    state["layout"][0] = 99
    with pytest.raises(ValueError, match="layout"):
        make(V1_TIMEFRAMES).set_series_state(0, state)
    old = _v1("one")
    with pytest.raises(ValueError, match="timeframes"):
        make(("1s", "1min")).set_series_state(0, old)

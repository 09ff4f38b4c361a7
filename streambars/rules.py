"""Validation rules: one definition each, shared by the engine (inline) and `validate`.

Each rule has a stable name (used in configuration, reports, metrics and the engine's
counters), a severity, and for per-record rules a bit in the mask returned by the numba
function :func:`record_violations`, which both the aggregation kernel and the offline
validator call. Rules that need a whole series (cross-timeframe consistency, gaps, price
jumps, volume outliers) live in :mod:`streambars.validate` and only run offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numba
import numpy as np

from .records import UNDEF_PRICE


class Severity(IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2

    def __str__(self) -> str:
        return self.name.lower()


class Policy(IntEnum):
    """What the engine does with a record that breaks a rule."""

    FLAG = 0  # count it, keep the record in the bars
    DROP = 1  # count it, leave the record out of every bar
    FAIL = 2  # stop with an error naming the rule, series and timestamp

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Rule:
    name: str
    severity: Severity
    description: str
    bit: int = -1  # per-record rules: bit index in record_violations' mask; -1 for series rules
    always_drop: bool = False  # a record breaking it can never be part of a bar (policy FLAG acts as DROP)


# Per-record rules, in bit order. The order is part of the engine's saved state: append only.
PRICE_UNDEFINED = 0
PRICE_NON_POSITIVE = 1
OHLC_RELATION = 2
VOLUME_ZERO = 3
VOLUME_ABSURD = 4
TS_NOT_INCREASING = 5
TS_MISALIGNED = 6
VOLUME_OVERFLOW = 7
N_RECORD_RULES = 8

RECORD_RULES: tuple[Rule, ...] = (
    Rule("price_undefined", Severity.ERROR, "open/high/low/close is UNDEF_PRICE", PRICE_UNDEFINED, True),
    Rule("price_non_positive", Severity.ERROR, "a price is zero or negative", PRICE_NON_POSITIVE),
    Rule(
        "ohlc_relation",
        Severity.ERROR,
        "high < max(open, close), low > min(open, close) or high < low",
        OHLC_RELATION,
    ),
    Rule("volume_zero", Severity.WARNING, "volume (or trade size) is zero", VOLUME_ZERO),
    Rule("volume_absurd", Severity.ERROR, "volume above the configured maximum", VOLUME_ABSURD),
    Rule(
        "ts_not_increasing",
        Severity.ERROR,
        "timestamp before the previous one of the series, or inside a bar already closed (late); "
        "never merged. An equal timestamp is not late: it folds into the same bar",
        TS_NOT_INCREASING,
        True,
    ),
    Rule("ts_misaligned", Severity.ERROR, "timestamp not aligned to the interval", TS_MISALIGNED),
    Rule(
        "volume_overflow",
        Severity.ERROR,
        "a bar's volume sum would pass 2**64 - 1 (it saturates there, never wraps)",
        VOLUME_OVERFLOW,
    ),
)

# Rules that need a whole series; run by `streambars validate` only.
SERIES_RULES: tuple[Rule, ...] = (
    Rule("ts_duplicate", Severity.ERROR, "two bars with the same timestamp"),
    Rule("count_invalid", Severity.ERROR, "count is zero, or volume/count out of range"),
    Rule(
        "cross_timeframe",
        Severity.ERROR,
        "bar differs from the aggregation of the finest stored bars in its interval",
    ),
    Rule("gap_in_session", Severity.WARNING, "no bar for longer than the threshold in trading hours"),
    Rule("price_jump", Severity.WARNING, "open or close moved more than the threshold from last close"),
    Rule("volume_outlier", Severity.INFO, "volume far above the series' typical volume"),
    Rule("reference_mismatch", Severity.ERROR, "bar differs from Databento's own OHLCV bar"),
)

RULES: dict[str, Rule] = {r.name: r for r in RECORD_RULES + SERIES_RULES}
RECORD_RULE_NAMES: tuple[str, ...] = tuple(r.name for r in RECORD_RULES)
ALWAYS_DROP_MASK = sum(1 << r.bit for r in RECORD_RULES if r.always_drop)


def policy_array(policies: dict[str, Policy | str], default: Policy | str = Policy.FLAG) -> np.ndarray:
    """Per-record-rule policy codes (int8, indexed by bit) for the kernel."""
    out = np.full(N_RECORD_RULES, int(Policy[str(default).upper()]), dtype=np.int8)
    for name, policy in policies.items():
        rule = RULES.get(name)
        if rule is None or rule.bit < 0:
            raise ValueError(
                f"validation policy for unknown rule {name!r}; per-record rules are: "
                + ", ".join(RECORD_RULE_NAMES)
            )
        out[rule.bit] = int(Policy[str(policy).upper()])
    return out


@numba.njit(cache=True, inline="always")
def record_violations(
    ts: np.int64,
    o: np.int64,
    h: np.int64,
    lo: np.int64,
    c: np.int64,
    v: np.uint64,
    prev_ts: np.int64,
    strictly_increasing: bool,
    interval_ns: np.int64,
    max_volume: np.uint64,
) -> np.int64:
    """Bitmask of the per-record rules this record (bar or trade) breaks on its own.

    volume_overflow is not among them: it depends on the bar the record goes into, so the
    engine's kernel checks it as it adds volumes (and the validator on stored volumes).

    ``prev_ts`` is the series' last accepted timestamp (-1 if none); a record may share it
    unless ``strictly_increasing`` (the engine and the validator both pass False: trades
    share nanoseconds, publishers share bar intervals). ``interval_ns`` 0
    skips the alignment check (trades). ``max_volume`` 0 disables the absurd-volume check.
    """
    mask = 0
    if o == UNDEF_PRICE or h == UNDEF_PRICE or lo == UNDEF_PRICE or c == UNDEF_PRICE:
        mask |= 1 << PRICE_UNDEFINED
    else:
        if o <= 0 or h <= 0 or lo <= 0 or c <= 0:
            mask |= 1 << PRICE_NON_POSITIVE
        if h < lo or h < o or h < c or lo > o or lo > c:
            mask |= 1 << OHLC_RELATION
    if v == 0:
        mask |= 1 << VOLUME_ZERO
    elif max_volume > 0 and v > max_volume:
        mask |= 1 << VOLUME_ABSURD
    if prev_ts >= 0 and (ts < prev_ts or (strictly_increasing and ts == prev_ts)):
        mask |= 1 << TS_NOT_INCREASING
    if interval_ns > 0 and ts % interval_ns != 0:
        mask |= 1 << TS_MISALIGNED
    return mask

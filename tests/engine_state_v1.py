"""The input behind tests/data/engine_state_v1.npz (a state the layout-1 engine saved).

Kept apart from the tests so the old engine can import it to write that file: it uses
nothing the old engine lacks (see tests/data/README.md)."""

from __future__ import annotations

from pathlib import Path

from streambars.records import RecordBatch

from .test_engine import copy_batch, random_stream

PATH = Path(__file__).parent / "data" / "engine_state_v1.npz"
TIMEFRAMES = ("1s", "5s", "1min", "15min", "1h", "1d")
CUT = 300  # the state is taken after records [0, CUT)
S = 1_000_000_000


def v1_input() -> RecordBatch:
    """Clean records with a few zero volumes and misaligned timestamps (counters to carry)."""
    b = copy_batch(random_stream(7, n=600))
    b.volume[10::37] = 0
    b.ts_event[25::41] += S // 2
    return b

"""The one-record call (live feeding): its bars are views of a pool the calls share, and its
columns get the lighter check a single element allows; neither may change a bar."""

from __future__ import annotations

import numpy as np
import pytest

from streambars.records import RecordBatch

from .reference import by_key, diff_bars
from .test_engine import feed, make, random_stream, reference

COLS = ("series", "ts_event", "open", "high", "low", "close", "volume")


def test_each_result_keeps_its_bars_while_later_calls_fill_the_pool_and_the_next():
    batch = random_stream(7, n=6000, n_series=2)
    agg = make()
    parts = [agg.process(batch.slice(i, i + 1)).bars for i in range(len(batch))]
    copies = [p.copy() for p in parts]
    parts.append(agg.finish().bars)
    copies.append(parts[-1].copy())
    got = np.concatenate(parts)
    assert sum(len(p) for p in parts) > 2 * 4096  # the pool was replaced at least twice
    pools = {id(p.base) for p in parts[:-1] if len(p)}
    assert 3 <= len(pools) < len(parts) // 100  # results share pools: the path under test
    assert all(a.tobytes() == b.tobytes() for a, b in zip(parts, copies, strict=True))
    assert by_key(got).tobytes() == feed(make(), batch).tobytes()  # one batch: no pool
    assert not diff_bars(got, reference(agg, batch))
    got[:] = 0  # a caller writing into its bars touches nobody else's
    later = agg.process(batch.slice(0, 0)).bars
    assert len(later) == 0


@pytest.mark.parametrize("column", COLS)
def test_one_record_columns_strided_or_not_one_dimensional(column):
    """One element is read at offset 0 whatever the stride (a strided view goes the fast way
    and gives the same bars); a 2-d column is refused as before, with the state untouched."""
    batch = random_stream(5, n=300, n_series=1)
    want = feed(make(), batch, [1])
    agg = make()
    parts = []
    for i in range(len(batch)):
        one = batch.slice(i, i + 1)
        strided = np.repeat(getattr(one, column), 3)[::3]
        assert strided.strides == (3 * strided.itemsize,)
        parts.append(agg.process(RecordBatch(**{**vars(one), column: strided})).bars)
        if i == 100:
            before = agg.get_state()
            flat = RecordBatch(**{**vars(one), column: getattr(one, column).reshape(1, 1)})
            with pytest.raises(TypeError):
                agg.process(flat)
            assert all(np.array_equal(before[k], v) for k, v in agg.get_state().items())
    parts.append(agg.finish().bars)
    assert by_key(np.concatenate(parts)).tobytes() == want.tobytes()


@pytest.mark.parametrize("size", [1, 5, 100])
@pytest.mark.parametrize("how", ["read-only", "broadcast"])
def test_read_only_columns_when_a_new_series_grows_the_state(size, how):
    """A record of a series not seen yet stops the first kernel call (the state grows) and
    the rest goes through a second call: the same way as the first, not numba's dispatcher,
    which refuses read-only columns (the live daemon's prices are broadcast views: a one-
    record batch of a new symbol stopped the daemon with a TypeError)."""
    batch = random_stream(9, n=600, n_series=3)
    want = feed(make(), batch, [size])

    def frozen(x: np.ndarray) -> np.ndarray:
        if how == "broadcast" and x.size == 1:
            return np.broadcast_to(x, x.shape)  # read-only, stride 0
        x = x.copy()
        x.setflags(write=False)
        return x

    agg = make()
    parts = []
    for i in range(0, len(batch), size):
        one = batch.slice(i, i + size)
        parts.append(agg.process(RecordBatch(one.kind, *(frozen(getattr(one, c)) for c in COLS))).bars)
    parts.append(agg.finish().bars)
    assert agg.n_series == 3
    assert by_key(np.concatenate(parts)).tobytes() == want.tobytes()

"""DBN OHLCV records -> the engine's columns in one pass, without the GIL.

Building a :class:`~streambars.records.RecordBatch` the numpy way reads each 56-byte
record seven times: two masks for the ``length``/``rtype`` check, then one strided copy per
column, each holding the GIL (measured ~0.75 s of a year of 1s bars, beside ~1.1 s of zstd).
Here one loop checks every record's header and copies its six fields into contiguous
columns; the numbers are the same (``ts_event`` is reinterpreted as int64, as numpy's
``astype`` does).
"""

from __future__ import annotations

import numba
import numpy as np

from ..jitcache import load_without_refresh

# loaded from numba's cache at the first call without numba's ~0.2-0.6 s refresh (jitcache.py):
# a backfill's first batch waited for it
load_without_refresh(__name__, "_ohlcv")


@numba.njit(cache=True, nogil=True, _nrt=False)
def _ohlcv(length: np.ndarray, rtype: np.ndarray, ts: np.ndarray, o: np.ndarray, h: np.ndarray,
           lo: np.ndarray, c: np.ndarray, v: np.ndarray, want_len: int, rt0: int, rt1: int,
           out_ts: np.ndarray, out_o: np.ndarray, out_h: np.ndarray, out_l: np.ndarray,
           out_c: np.ndarray, out_v: np.ndarray) -> int:
    """Copy each record's fields; the first record whose header is wrong, or -1."""
    for i in range(length.shape[0]):
        rt = rtype[i]
        if length[i] != want_len or (rt != rt0 and rt != rt1):
            return i
        out_ts[i] = ts[i]
        out_o[i] = o[i]
        out_h[i] = h[i]
        out_l[i] = lo[i]
        out_c[i] = c[i]
        out_v[i] = v[i]
    return -1


def ohlcv_columns(arr: np.ndarray, want_len: int, rtypes: tuple[int, ...]
                  ) -> tuple[int, tuple[np.ndarray, ...]]:
    """``(first bad record or -1, (ts_event int64, open, high, low, close int64, volume uint64))``
    of a structured array of DBN OHLCV records; a record is bad when its ``length`` is not
    ``want_len`` (in 4-byte words) or its ``rtype`` is not one of ``rtypes`` (the columns
    are then filled only before it)."""
    n = arr.shape[0]
    cols = tuple(np.empty(n, np.int64) for _ in range(5)) + (np.empty(n, np.uint64),)
    bad = _ohlcv(arr["length"], arr["rtype"], arr["ts_event"].view(np.int64), arr["open"], arr["high"],
                 arr["low"], arr["close"], arr["volume"], want_len, rtypes[0], rtypes[-1], *cols)
    return int(bad), cols

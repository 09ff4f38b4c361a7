"""Grouping tagged bars by (series, timeframe) for the writers: one pass, without the GIL.

``np.take`` of 52-byte void items costs ~140 ns a row (numpy's generic item copy) and holds
the GIL, so the write stage's grouping stalled decode beside it. A counting sort by key,
copying each row's bar as 13 int32 words, costs a fraction of that and releases the GIL:
the same rows in the same order (stable by key), so the stored bytes do not change.
"""

from __future__ import annotations

import numba
import numpy as np

from ..jitcache import load_without_refresh

# loaded from numba's cache at the first call without numba's ~0.6 s refresh (jitcache.py)
load_without_refresh(__name__, "_scatter", "_count_tags", "_scatter_tagged")

#: int32 words of one stored bar (BAR_DTYPE: 52 bytes)
BAR_WORDS = 13


@numba.njit(cache=True, nogil=True, _nrt=False)
def _scatter(words: np.ndarray, first: int, key: np.ndarray, pos: np.ndarray, out: np.ndarray) -> None:
    for i in range(words.shape[0]):
        k = key[i]
        j = pos[k]
        pos[k] = j + 1
        for w in range(BAR_WORDS):
            out[j, w] = words[i, first + w]


def scatter_rows(rows: np.ndarray, bar_offset: int, key: np.ndarray, counts: np.ndarray,
                 out: np.ndarray) -> bool:
    """Copy each row's bar (``bar_offset`` bytes into it) into ``out`` (BAR_DTYPE-sized
    items, at least ``len(rows)``) grouped by ``key`` (ascending, each group in row order);
    ``counts`` = ``np.bincount(key)``. False (nothing done) when the rows' layout does not
    allow the word copy: the caller takes the general path."""
    n = rows.shape[0]
    size = rows.dtype.itemsize
    if (not rows.flags.c_contiguous or size % 4 or bar_offset % 4 or rows.ndim != 1
            or out.dtype.itemsize != BAR_WORDS * 4 or not out.flags.c_contiguous):
        return False
    words = rows.view(np.uint8).view(np.int32).reshape(n, size // 4)
    pos = np.zeros(counts.shape[0], np.int64)
    np.cumsum(counts[:-1], out=pos[1:])
    _scatter(words, bar_offset // 4, key.astype(np.int64, copy=False), pos,
             out[:n].view(np.uint8).view(np.int32).reshape(n, BAR_WORDS))
    return True


# -- tagged bars straight from the engine's arrays ----------------------------------------
#
# The writer set used to copy every queued batch into one buffer, then take contiguous
# copies of the two tag columns, range-check them, build and bincount a key, and each
# append then compared the ts_event of every row with the row before it (a strided column):
# five passes over ~60 bytes a bar before HDF5 saw one. Here one counting pass reads the tags
# (checking them) of each queued array as the engine made it, and the scatter pass copies the
# bars and checks each group's ts_event order on the way: two passes, no queue copy.

#: int32 words of one tagged bar (TAGGED_BAR_DTYPE: series, timeframe, then a bar)
TAGGED_WORDS = 15


@numba.njit(cache=True, nogil=True, _nrt=False)
def _count_tags(words: np.ndarray, ntf: int, nseries: int, counts: np.ndarray) -> int:
    """Add each row's key (series * ntf + timeframe) to ``counts``; the first row whose tags
    are out of range (nothing counted for it or after it), or -1."""
    for i in range(words.shape[0]):
        s = words[i, 0]
        t = words[i, 1]
        if s < 0 or s >= nseries or t < 0 or t >= ntf:
            return i
        counts[s * ntf + t] += 1
    return -1


@numba.njit(cache=True, nogil=True, _nrt=False)
def _scatter_tagged(words: np.ndarray, ntf: int, pos: np.ndarray, last: np.ndarray, out: np.ndarray) -> bool:
    """Copy each row's bar to ``out[pos[key]]`` (advancing it); ``last[key]`` is the ts_event
    of the key's row before. False when some group's ts_event does not increase."""
    ok = True
    for i in range(words.shape[0]):
        k = words[i, 0] * ntf + words[i, 1]
        j = pos[k]
        pos[k] = j + 1
        ts = (np.int64(words[i, 3]) << 32) | (np.int64(words[i, 2]) & 0xFFFFFFFF)
        if ts <= last[k]:
            ok = False
        last[k] = ts
        for w in range(BAR_WORDS):
            out[j, w] = words[i, 2 + w]
    return ok


def _tag_words(arr: np.ndarray) -> np.ndarray:
    return arr.view(np.uint8).view(np.int32).reshape(arr.shape[0], TAGGED_WORDS)


def count_tagged(arrays: list[np.ndarray], ntf: int, nseries: int) -> np.ndarray | None:
    """Rows per key (series * ntf + timeframe) over contiguous TAGGED_BAR_DTYPE ``arrays``,
    or None when a row's tags are outside ``nseries`` x ``ntf``."""
    counts = np.zeros(nseries * ntf, np.int64)
    for arr in arrays:
        if arr.shape[0] and _count_tags(_tag_words(arr), ntf, nseries, counts) >= 0:
            return None
    return counts


def scatter_tagged(arrays: list[np.ndarray], ntf: int, counts: np.ndarray, out: np.ndarray) -> bool:
    """Copy the bars of ``arrays`` (in order) into ``out`` (BAR_DTYPE-sized items, at least
    the rows counted) grouped by key, ascending, each group in row order (a stable sort by
    key across the arrays); ``counts`` from :func:`count_tagged`. True when every group's
    ts_event strictly increases (False: the copy is still whole; the caller checks again)."""
    n = int(counts.sum())
    pos = np.zeros(counts.shape[0], np.int64)
    np.cumsum(counts[:-1], out=pos[1:])
    last = np.full(counts.shape[0], np.iinfo(np.int64).min, np.int64)
    words = out[:n].view(np.uint8).view(np.int32).reshape(n, BAR_WORDS)
    ok = True
    for arr in arrays:
        if arr.shape[0]:
            ok &= _scatter_tagged(_tag_words(arr), ntf, pos, last, words)
    return ok

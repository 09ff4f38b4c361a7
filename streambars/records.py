"""What flows between the stages: numpy batches of input records and of closed bars.

Sources turn Databento records into :class:`RecordBatch` (columnar arrays, one row per
record, no Python object per record); the engine turns those into :class:`BarBatch`
(one structured array of closed bars tagged with series and timeframe index). Keeping
these two types in one small module is what lets sources, engine and store evolve apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

InputKind = Literal["ohlcv-1s", "ohlcv-1m", "trades"]
INPUT_KINDS: tuple[str, ...] = ("ohlcv-1s", "ohlcv-1m", "trades")

# Databento's fixed-point price scale and "no price" sentinel (databento_dbn.UNDEF_PRICE).
FIXED_PRICE_SCALE = 1_000_000_000
UNDEF_PRICE = np.iinfo(np.int64).max

#: Which timestamp of a trade decides its bar (and its order and lateness): Databento builds
#: its own OHLCV from trades by ``ts_recv``; ``ts_event`` is the matching engine's time.
TRADE_CLOCKS: tuple[str, ...] = ("ts_recv", "ts_event")

#: How long one input record spans, by kind (0: trades are instants, not intervals).
INPUT_INTERVAL_NS: dict[str, int] = {
    "ohlcv-1s": 1_000_000_000,
    "ohlcv-1m": 60_000_000_000,
    "trades": 0,
}

#: One stored bar, exactly the bar contract of DESIGN.md. Stores and readers use this dtype.
BAR_DTYPE = np.dtype(
    [
        ("ts_event", "<i8"),
        ("open", "<i8"),
        ("high", "<i8"),
        ("low", "<i8"),
        ("close", "<i8"),
        ("volume", "<u8"),
        ("count", "<u4"),
    ]
)

#: The fewest bars that fill whole 4 KiB pages: 1024 52-byte rows are 13 pages. The store
#: starts every allocation on a page (store/layout.py FILE_SPACE), so its chunks are a multiple
#: of this many rows; any other size leaves a gap after every chunk.
BAR_PAGE_ROWS = 4096 // math.gcd(4096, BAR_DTYPE.itemsize)

#: A closed bar as the engine emits it: which series (symbol) and which timeframe, then the bar.
TAGGED_BAR_DTYPE = np.dtype([("series", "<i4"), ("timeframe", "<i4")] + BAR_DTYPE.descr)


@dataclass
class RecordBatch:
    """A batch of input records of one kind, columnar.

    ``series`` is the dense index of the *requested symbol* each record belongs to (the
    pipeline maps instrument_id -> symbol -> index, so a continuous contract that rolls to a
    new instrument keeps one series). For trades, open/high/low/close are the same
    ``price`` array and ``volume`` is the trade size.
    """

    kind: str
    series: np.ndarray  # int32
    ts_event: np.ndarray  # int64 ns
    open: np.ndarray  # int64 fixed-point
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray  # uint64

    def __len__(self) -> int:
        return int(self.ts_event.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.ts_event.nbytes * 6 + self.series.nbytes)

    def slice(self, start: int, stop: int) -> RecordBatch:
        """A view of rows [start, stop): used to split batches without copying."""
        return RecordBatch(
            self.kind,
            self.series[start:stop],
            self.ts_event[start:stop],
            self.open[start:stop],
            self.high[start:stop],
            self.low[start:stop],
            self.close[start:stop],
            self.volume[start:stop],
        )

    def take(self, index: np.ndarray) -> RecordBatch:
        """The rows an integer index or boolean mask selects (a copy); trades keep one
        shared price array."""
        o = self.open[index]
        if self.open is self.close:
            return RecordBatch(self.kind, self.series[index], self.ts_event[index], o, o, o, o,
                               self.volume[index])
        return RecordBatch(
            self.kind, self.series[index], self.ts_event[index], o, self.high[index],
            self.low[index], self.close[index], self.volume[index],
        )

    @classmethod
    def empty(cls, kind: str) -> RecordBatch:
        i8 = np.empty(0, np.int64)
        return cls(kind, np.empty(0, np.int32), i8, i8, i8, i8, i8, np.empty(0, np.uint64))

    @classmethod
    def from_ohlcv(cls, kind: str, series: np.ndarray, arr: np.ndarray) -> RecordBatch:
        """From a DBN OHLCV structured array (``DBNStore.to_ndarray()``), any DBN version."""
        return cls(
            kind,
            np.ascontiguousarray(series, dtype=np.int32),
            np.ascontiguousarray(arr["ts_event"]).astype(np.int64, copy=False),
            np.ascontiguousarray(arr["open"], dtype=np.int64),
            np.ascontiguousarray(arr["high"], dtype=np.int64),
            np.ascontiguousarray(arr["low"], dtype=np.int64),
            np.ascontiguousarray(arr["close"], dtype=np.int64),
            np.ascontiguousarray(arr["volume"], dtype=np.uint64),
        )

    @classmethod
    def from_trades(cls, series: np.ndarray, arr: np.ndarray, clock: str = "ts_recv") -> RecordBatch:
        """From a DBN trades structured array; price is shared by open/high/low/close.

        ``clock`` names the field that becomes the batch's time (``ts_event`` column): by
        default ``ts_recv``, as Databento's own OHLCV bars are built (see TRADE_CLOCKS)."""
        if clock not in TRADE_CLOCKS:
            raise ValueError(f"trade clock {clock!r} is not one of {', '.join(TRADE_CLOCKS)}")
        price = np.ascontiguousarray(arr["price"], dtype=np.int64)
        return cls(
            "trades",
            np.ascontiguousarray(series, dtype=np.int32),
            np.ascontiguousarray(arr[clock]).astype(np.int64, copy=False),
            price,
            price,
            price,
            price,
            np.ascontiguousarray(arr["size"]).astype(np.uint64),
        )


@dataclass(slots=True)  # slots: built once per engine call, ~0.1 us of a one-record call
class BarBatch:
    """Closed bars, each (series, timeframe) in time order (across timeframes in no set
    order: the engine emits a run of 1s bars level by level)."""

    bars: np.ndarray  # TAGGED_BAR_DTYPE
    #: rows per (series, timeframe) (int64, n_series x n_timeframes), when the pipeline
    #: counted them just after the engine made them: the store writers then skip their own
    #: counting pass over the bars (they have left the cache by then)
    counts: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.bars.shape[0])

    @classmethod
    def empty(cls) -> BarBatch:
        return cls(np.empty(0, TAGGED_BAR_DTYPE))


class SeriesRegistry:
    """Stored symbol <-> dense series index; the engine's state arrays are indexed by it."""

    def __init__(self, names: list[str] | None = None):
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        for name in names or []:
            self.index(name)

    def index(self, name: str) -> int:
        """The index of ``name``, assigning the next one the first time it is seen."""
        i = self._index.get(name)
        if i is None:
            i = self._index[name] = len(self.names)
            self.names.append(name)
        return i

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

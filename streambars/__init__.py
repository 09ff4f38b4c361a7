"""streambars: Databento market data -> validated multi-timeframe OHLCV bars in HDF5.

The public reading API lives here: ``streambars.open_store(path)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .startup import default_numba_cache_dir
from .version import __version__

__all__ = ["__version__", "open_store"]

default_numba_cache_dir()

if TYPE_CHECKING:  # pragma: no cover
    from .store import StoreReader


def open_store(path: Any) -> StoreReader:
    """Open a store directory (or one .h5 file) for reading, safe while a writer appends."""
    from .store import open_store as _open

    return _open(path)

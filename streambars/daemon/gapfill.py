"""Filling an outage longer than Databento's intraday replay window from the Historical API.

The live gateway replays at most ``live.replay_window_h`` hours. When the daemon resumes
from further back (a long outage, a stopped service), :class:`HistoricalGapFill` asks the
cost first (above ``databento.max_cost`` it does not download), downloads ``[start, end)``
per symbol with :class:`~streambars.sources.historical.HistoricalSource` (which retries),
and yields the records as :class:`~streambars.sources.live.LiveRecords` batches; the epoch
sends them through its usual path (replay de-duplication, the raw archive, the engine). The
live subscription then replays from ``end``. Anything that fails is logged as a GAP with
its bounds and length; the daemon goes on (``streambars backfill`` can fill it later).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import numpy as np

from ..config import Settings
from ..errors import AuthenticationError, SourceError
from ..observe import get_logger, scrub
from ..records import RecordBatch, SeriesRegistry
from ..sources.live import LiveRecords
from ..timeutil import NS, iso

log = get_logger("streambars.gapfill")


def _iso(ts_ns: int) -> str:
    return iso(ts_ns, "ms")


class HistoricalGapFill:
    """``[start, end)`` of every symbol from Historical, as record batches.

    After :meth:`batches` is exhausted: :attr:`filled` says whether the gap was filled, and
    :attr:`final_until` (when not None) is the time before which bars are final: nothing
    older can arrive any more (the live subscription starts at ``end``)."""

    def __init__(self, settings: Settings, key: str, registry: SeriesRegistry, start: int, end: int):
        self.settings, self.key, self.registry = settings, key, registry
        self.start, self.end = start, end
        self.filled = False
        self.final_until: int | None = None

    async def batches(self) -> AsyncIterator[LiveRecords]:
        s, start, end = self.settings, self.start, self.end
        db = s.databento
        if db.stype_in == "parent":
            log.error("GAP: cannot fill from Historical for stype_in=parent subscriptions",
                      gap_from=_iso(start), gap_to=_iso(end))
            return
        log.warning("outage longer than the replay window: filling it from the Historical API",
                    gap_from=_iso(start), gap_to=_iso(end), gap_s=round((end - start) / NS, 1),
                    symbols=self.registry.names)
        from ..sources import dbnfile
        from ..sources.historical import HistoricalSource

        self.final_until = end
        tmp = Path(tempfile.mkdtemp(prefix=f".gapfill-{os.getpid()}-", dir=Path(s.store.path) / db.dataset))
        try:
            client = await anyio.to_thread.run_sync(
                lambda: HistoricalSource(self.key, gateway=db.historical_gateway or None)
            )
            names = list(self.registry.names)
            cost = await anyio.to_thread.run_sync(
                lambda: client.get_cost(db.dataset, names, db.schema, db.stype_in, start, end)
            )
            if cost > db.max_cost:
                log.error("GAP: filling it from Historical would cost more than databento.max_cost; "
                          "not filled", cost_usd=round(cost, 2), max_cost_usd=db.max_cost,
                          gap_from=_iso(start), gap_to=_iso(end), gap_s=round((end - start) / NS, 1))
                return
            for name in names:
                series = self.registry.index(name)
                dest = tmp / f"{series}.dbn.zst"
                await anyio.to_thread.run_sync(
                    lambda n=name, d=dest: client.download_month(db.dataset, n, db.schema, db.stype_in,
                                                                 start, end, d)
                )
                it = iter(dbnfile.iter_records(dest, expected_schema=db.schema))
                done = object()
                while True:
                    item = await anyio.to_thread.run_sync(next, it, done)
                    if item is done:
                        break
                    _, arr = item  # type: ignore[misc]
                    ser = np.full(len(arr), series, dtype=np.int32)
                    if db.schema == "trades":
                        batch = RecordBatch.from_trades(ser, arr, s.bars.trade_clock)
                    else:
                        batch = RecordBatch.from_ohlcv(db.schema, ser, arr)
                    yield LiveRecords(batch, arr, int(arr["ts_event"][-1]))
                log.info("gap filled from Historical", symbol=name, gap_from=_iso(start), gap_to=_iso(end))
        except AuthenticationError:
            self.final_until = None
            raise
        except (SourceError, OSError) as e:
            log.error("GAP: filling from Historical failed", gap_from=_iso(start), gap_to=_iso(end),
                      gap_s=round((end - start) / NS, 1), error=scrub(str(e)))
            return
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.filled = True

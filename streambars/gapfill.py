"""Filling an outage longer than Databento's intraday replay window from the Historical API.

The live gateway replays at most ``live.replay_window_h`` hours. When the daemon resumes
from further back (a long outage, a stopped service), :func:`fill_from_historical`
asks the cost first (above ``databento.max_cost`` it does not download), downloads
``[start, end)`` per symbol with :class:`~streambars.sources.historical.HistoricalSource`
(which retries), and feeds the records through the epoch's usual path:
replay de-duplication, the raw archive, the engine. The live subscription then replays from
``end``. Anything that fails is logged as a GAP with its bounds and length; the daemon goes on
(``streambars backfill`` can fill it later).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import numpy as np

from .errors import AuthenticationError, SourceError
from .observe import get_logger, scrub
from .records import RecordBatch

if TYPE_CHECKING:
    from .feed import Epoch

log = get_logger("streambars.gapfill")


async def fill_from_historical(epoch: Epoch, start: int, end: int) -> bool:
    """Feed ``[start, end)`` of every symbol from Historical into the epoch; True if done."""
    from .feed import _iso
    from .sources.live import LiveRecords

    s = epoch.settings
    db = s.databento
    if db.stype_in == "parent":
        log.error("GAP: cannot fill from Historical for stype_in=parent subscriptions",
                  gap_from=_iso(start), gap_to=_iso(end))
        return False
    log.warning("outage longer than the replay window: filling it from the Historical API",
                gap_from=_iso(start), gap_to=_iso(end), gap_s=round((end - start) / 1e9, 1),
                symbols=epoch.registry.names)
    from .sources import dbnfile
    from .sources.historical import HistoricalSource

    tmp = Path(tempfile.mkdtemp(prefix=f".gapfill-{os.getpid()}-", dir=Path(s.store.path) / db.dataset))
    try:
        client = await anyio.to_thread.run_sync(
            lambda: HistoricalSource(epoch.d.key, gateway=db.historical_gateway or None)
        )
        names = list(epoch.registry.names)
        cost = await anyio.to_thread.run_sync(
            lambda: client.get_cost(db.dataset, names, db.schema, db.stype_in, start, end)
        )
        if cost > db.max_cost:
            log.error("GAP: filling it from Historical would cost more than databento.max_cost; "
                      "not filled", cost_usd=round(cost, 2), max_cost_usd=db.max_cost,
                      gap_from=_iso(start), gap_to=_iso(end), gap_s=round((end - start) / 1e9, 1))
            await epoch._flush(end)
            return False
        for name in names:
            series = epoch.registry.index(name)
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
                    batch = RecordBatch.from_trades(ser, arr, epoch.settings.bars.trade_clock)
                else:
                    batch = RecordBatch.from_ohlcv(db.schema, ser, arr)
                await epoch._records(LiveRecords(batch, arr, int(arr["ts_event"][-1])))
            log.info("gap filled from Historical", symbol=name, gap_from=_iso(start), gap_to=_iso(end))
    except AuthenticationError:
        raise
    except (SourceError, OSError) as e:
        log.error("GAP: filling from Historical failed", gap_from=_iso(start), gap_to=_iso(end),
                  gap_s=round((end - start) / 1e9, 1), error=scrub(str(e)))
        await epoch._flush(end)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Bars ending before the fill's end are final: nothing older can arrive any more.
    await epoch._flush(end)
    return True

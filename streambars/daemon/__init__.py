"""`streambars run`: the live daemon under systemd (docs/daemon.md).

The wing, one job per module, each importing only the ones below it:

* ``service``  -- :class:`Daemon` (signals, epochs, notify, metrics, log file), :func:`run_daemon`
* ``epoch``    -- :class:`Epoch`: one pipeline run fed by a supervised Live connection;
  talks to its host through :class:`EpochHost`
* ``gapfill``  -- :class:`HistoricalGapFill`: an outage beyond the replay window, as batches
* ``resume``   -- replay de-duplication watermarks, reconnect backoff, wall-clock closing
* ``stats``    -- :class:`DaemonStats`, the one sink of counters (STATUS=) and metrics
* ``metrics``  -- Prometheus registry and /metrics
* ``notify``   -- sd_notify over $NOTIFY_SOCKET, the watchdog gate
"""

from __future__ import annotations

from .epoch import Epoch, EpochHost
from .service import Daemon, LogFile, check_store_writable, check_symbols, run_daemon
from .stats import Counters, DaemonStats

__all__ = [
    "Counters",
    "Daemon",
    "DaemonStats",
    "Epoch",
    "EpochHost",
    "LogFile",
    "check_store_writable",
    "check_symbols",
    "run_daemon",
]

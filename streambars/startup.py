"""What the command does first, before any heavy import: the numba cache location, and
SIGTERM/SIGINT turned into :class:`~streambars.errors.Interrupted`.

Kept free of third-party imports (structlog alone takes ~0.3 s to import) so that the stop
signals are handled from the first moments of a run: a SIGTERM that lands while the
program is still importing exits 130 with one line, like one landing later.
"""

from __future__ import annotations

import os
import signal
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def default_numba_cache_dir() -> None:
    """Point numba's cache at a writable place when the package directory is read-only.

    Must run before numba is imported; an explicit NUMBA_CACHE_DIR always wins.
    """
    if "NUMBA_CACHE_DIR" in os.environ:
        return
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    if not os.access(pkg_dir, os.W_OK):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["NUMBA_CACHE_DIR"] = os.path.join(base, "streambars", "numba")


def redeliver_later(signum: int, delay: float = 0.01) -> None:
    """Send ``signum`` to this process again shortly, from a helper thread."""
    import threading

    timer = threading.Timer(delay, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _in_finaliser(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_stop_signal(signum: int, frame: Any) -> None:
    if _in_finaliser(frame):
        # Python swallows an exception raised in __del__ (a reader being collected): the
        # stop would be lost and the run go on to exit 0. Ask again once it has returned.
        redeliver_later(signum)
        return
    # One exception per run: further signals while the stack unwinds (files closing) are
    # ignored, so a second Ctrl-C cannot turn a clean stop into a traceback in a finally.
    ignore_stop_signals()
    from .errors import Interrupted

    raise Interrupted(signal.Signals(signum).name)


def ignore_stop_signals() -> None:
    """From now on SIGTERM/SIGINT do nothing (the process is already on its way out)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def interrupt_on_stop_signals() -> None:
    """SIGTERM and SIGINT both raise KeyboardInterrupt (:class:`Interrupted`) in the main
    thread, so every ``finally`` closes its files (SIGTERM's default would kill the process
    without that) and the CLI exits 130. Async stages replace these handlers with their own
    while they run (backfill's pipeline, the daemon's drain) and restore them after."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)

"""`streambars run`: the live daemon under systemd.

One process, one anyio (asyncio) event loop::

    signals ──▶ Daemon ──(epochs)──▶ Feed.produce ──(bounded stream)──▶ run_pipeline ──▶ store
                  │                   reconnects, replay de-dup,            engine, writer
                  │                   archive, FlushUntil / Checkpoint
                  └─ notify (READY/STATUS/WATCHDOG/STOPPING), metrics, log file

* **Start**: the configuration is validated (by the CLI), the symbol list checked, the store
  directory proven writable and the API key loaded *before* anything connects. Then each
  symbol's file is opened (the lock names a second writer), the engine state and the
  daemon's watermarks are restored from the files, and the feed subscribes with
  ``start=`` the oldest mark so the gap since the last run is replayed (or filled from the
  Historical API when it is older than the replay window).
* **READY=1** after the first successful subscription. **WATCHDOG=1** only when a
  checkpoint or a bar write has gone through the whole pipeline (engine *and* writer), at
  most every ``WATCHDOG_USEC/2``: a stuck stage stops the pings.
* **SIGTERM/SIGINT**: ``STOPPING=1``; the feed stops reading, sends a last checkpoint and
  closes its stream; the pipeline drains; every file is flushed and closed; exit 0. A
  second signal, or the drain taking longer than ``STOP_DEADLINE_S``, abandons the drain
  (everything flushed so far is safe; the rest is replayed next start) and exits 1.
* **SIGHUP**: reopens ``logging.file`` (for logrotate), and re-reads the TOML file; if the
  symbol list changed, the current epoch is drained and checkpointed and a new one starts
  with the new list (state round-trips through the files exactly as across a restart, so
  nothing is lost). Other changed keys are reported as needing a restart.
* **Exit codes**: 0 clean stop; 1 failure (systemd restarts: disk full, the store, a bug);
  2 bad configuration, an API key or a dataset the gateway refused
  (``RestartPreventExitStatus=2``: restarting cannot help). Every failure is first one JSON
  ``error`` event (cause, kind, exit code) and ``STATUS=failed: ...``, then one
  ``streambars: ...`` line on stderr.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import anyio

from ..config import Settings, load_api_key, load_settings
from ..errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    AuthenticationError,
    ConfigError,
    DatasetError,
    StoreError,
    StreambarsError,
)
from ..observe import configure_logging, get_logger, scrub
from ..pipeline import most_telling_error, unwrapped
from .epoch import Epoch
from .metrics import DaemonMetrics
from .notify import Notifier, WatchdogGate
from .stats import DaemonStats

log = get_logger("streambars.daemon")

STOP_DEADLINE_S = 20.0  # keep below TimeoutStopSec= in the unit
STATUS_INTERVAL_S = 2.0


# ------------------------------------------------------------------------------ pre-flight


def check_symbols(settings: Settings) -> None:
    if not settings.databento.symbols:
        raise ConfigError(
            "databento.symbols", [], "at least one symbol (config databento.symbols or --symbols)"
        )
    if settings.bars.per_publisher:
        raise ConfigError("bars.per_publisher", True, "false for the live daemon, which combines every "
                          "publisher of a symbol into its bars; per-publisher series are built by backfill")


def check_store_writable(settings: Settings) -> Path:
    """Create ``<store>/<dataset>`` if needed and prove a file can be written there."""
    root = Path(settings.store.path)
    target = root / settings.databento.dataset
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".streambars-write-test.{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise StoreError(
            f"store directory {target} is not writable ({e.strerror or e}); "
            f"give the daemon's user write access or set store.path"
        ) from None
    return root


# ------------------------------------------------------------------------------ logging


class LogFile:
    """``logging.file``: opened line-buffered; :meth:`open` again after logrotate (SIGHUP)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.stream: TextIO | None = None

    def open(self) -> None:
        path = self.settings.logging.file
        if not path:
            return
        old = self.stream
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - long-lived
        except OSError as e:
            raise ConfigError("logging.file", path, f"a writable file path ({e.strerror})") from None
        fmt = self.settings.logging.format
        configure_logging(self.settings.logging.level, "json" if fmt == "auto" else fmt, self.stream)
        if old is not None:
            old.close()

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()


# ------------------------------------------------------------------------------ status


# ------------------------------------------------------------------------------ the daemon


class Daemon:
    """Owns the process-wide pieces (notify, metrics, signals, log file) across epochs."""

    def __init__(
        self,
        settings: Settings,
        key: str,
        *,
        notifier: Notifier | None = None,
        reload_settings: Callable[[], Settings] | None = None,
        log_file: LogFile | None = None,
    ):
        self.settings = settings
        self.key = key
        self.notifier = notifier or Notifier(unset_environment=True)
        self.gate = WatchdogGate(self.notifier)
        self.stats = DaemonStats(DaemonMetrics(settings.databento.dataset))
        self.metrics, self.counters = self.stats.metrics, self.stats.counters
        self.reload_settings = reload_settings
        self.log_file = log_file
        self.stop_event: anyio.Event  # made in main(): anyio primitives belong to the loop
        self.reload_event: anyio.Event
        self.stop_signal: str | None = None
        self.ready_sent = False
        self.abandoned = False

    # -- the epoch's host (EpochHost) -------------------------------------------------

    @property
    def watchdog_interval(self) -> float | None:
        return self.gate.interval

    def data_moved(self) -> None:
        """A checkpoint or a bar write went through the whole pipeline: ping the watchdog."""
        self.gate.alive()

    def subscribed(self, description: str) -> None:
        if not self.ready_sent:
            self.ready_sent = True
            self.counters.state = "streaming"
            self.notifier.ready(status=f"subscribed: {description}")
            self.metrics.ready.set(1)
            log.info("ready", subscription=description)

    def status(self, text: str | None = None) -> None:
        line = self.stats.status_line()
        self.notifier.status(text or line)

    # -- signals ----------------------------------------------------------------------

    async def watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self._on_sighup()
                    continue
                name = signal.Signals(signum).name
                if self.stop_event.is_set():
                    log.warning("second stop signal: abandoning the drain", signal=name)
                    self.abandoned = True
                    self._abandon_scope.cancel()
                    continue
                self.stop_signal = name
                log.info("stopping: draining the pipeline, flushing every file", signal=name)
                self.counters.state = "stopping"
                self.notifier.stopping(status=f"{name}: draining and flushing")
                self.stop_event.set()
                self._tg.start_soon(self._stop_deadline)

    async def _stop_deadline(self) -> None:
        await anyio.sleep(STOP_DEADLINE_S)
        log.error("the drain took longer than the stop deadline; abandoning it",
                  deadline_s=STOP_DEADLINE_S)
        self.abandoned = True
        self._abandon_scope.cancel()

    def _on_sighup(self) -> None:
        if self.log_file is not None:
            try:
                self.log_file.open()
            except ConfigError as e:
                log.error("SIGHUP: could not reopen the log file; keeping the old one", error=str(e))
        log.info("SIGHUP: log file reopened" if self.settings.logging.file else "SIGHUP received")
        if self.reload_settings is None:
            return
        try:
            new = self.reload_settings()
            check_symbols(new)
        except (ConfigError, StreambarsError) as e:
            log.error("SIGHUP: the configuration has an error; keeping the running one",
                      error=scrub(str(e)))
            return
        changed = _changed_keys(self.settings, new)
        symbols_changed = "databento.symbols" in changed
        others = sorted(k for k in changed if k != "databento.symbols" and not k.startswith("logging."))
        if others:
            log.warning("SIGHUP: these changes take effect only after a restart", keys=others)
        if symbols_changed:
            log.info("SIGHUP: symbol list changed; re-subscribing without losing state",
                     old=list(self.settings.databento.symbols), new=list(new.databento.symbols))
            self.settings = replace(self.settings, databento=replace(
                self.settings.databento, symbols=new.databento.symbols))
            self.reload_event.set()
        else:
            log.info("SIGHUP: symbol list unchanged")

    # -- the run ----------------------------------------------------------------------

    async def main(self) -> int:
        lv = self.settings.live
        if lv.metrics_port:
            try:
                self.metrics.serve(lv.metrics_port, lv.metrics_host)
            except OSError as e:
                raise ConfigError("live.metrics_port", lv.metrics_port,
                                  f"a free port on {lv.metrics_host} ({e.strerror})") from None
        self.stop_event = anyio.Event()
        self.reload_event = anyio.Event()
        self._abandon_scope = anyio.CancelScope()
        try:
            async with unwrapped(), anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self.watch_signals)
                tg.start_soon(self._status_loop)
                with self._abandon_scope:
                    while True:
                        self.reload_event = anyio.Event()
                        epoch = Epoch(self)
                        await epoch.run()
                        if self.stop_event.is_set() or not self.reload_event.is_set():
                            break
                        log.info("starting a new epoch with the reloaded symbol list")
                tg.cancel_scope.cancel()
        finally:
            self.metrics.close()
        if self.abandoned:
            log.warning("stopped without finishing the drain; unflushed records are replayed next start")
            return EXIT_FAILED
        log.info("stopped", **{"signal": self.stop_signal or "none"}, summary=self.counters.line())
        return EXIT_OK

    async def _status_loop(self) -> None:
        while True:
            await anyio.sleep(STATUS_INTERVAL_S)
            self.status()


def _changed_keys(old: Settings, new: Settings) -> list[str]:
    out = []
    for section in ("databento", "bars", "store", "validation", "live", "logging"):
        a, b = getattr(old, section), getattr(new, section)
        for name in a.__dataclass_fields__:
            if getattr(a, name) != getattr(b, name):
                out.append(f"{section}.{name}")
    return out


def _reloader(settings: Settings) -> Callable[[], Settings] | None:
    """How SIGHUP re-reads the configuration: the TOML file, keeping command-line overrides
    of everything but the symbol list (symbols given on the command line cannot reload)."""
    path = settings.source_path
    if path is None:
        return None
    try:
        from_file = load_settings(path)
    except ConfigError:
        return None
    if from_file.databento.symbols != settings.databento.symbols:
        log.info("symbols come from the command line: SIGHUP will not change them")
        return None
    return lambda: load_settings(path)


def run_daemon(settings: Settings, env_file: str | os.PathLike[str] | None = ".env") -> int:
    """The `streambars run` command; returns the process exit code."""
    from ..pipeline import settle_session

    settings = settle_session(settings, settings.databento.dataset)
    check_symbols(settings)
    log_file = LogFile(settings)
    log_file.open()
    check_store_writable(settings)
    key = load_api_key(env_file)
    assert key is not None
    daemon = Daemon(settings, key, reload_settings=_reloader(settings), log_file=log_file)
    log.info(
        "starting",
        pid=os.getpid(),
        dataset=settings.databento.dataset,
        schema=settings.databento.schema,
        symbols=list(settings.databento.symbols),
        stype_in=settings.databento.stype_in,
        store=str(settings.store.path),
        gateway=settings.databento.live_gateway or "databento",
        watchdog_s=daemon.gate.interval,
        notify=daemon.notifier.enabled,
    )
    try:
        return anyio.run(daemon.main, backend="asyncio")
    except DatasetError as e:
        return _fatal(daemon, "the Live gateway does not serve this dataset; check databento.dataset",
                      e, EXIT_USAGE, settings)
    except AuthenticationError as e:
        return _fatal(daemon, "the Live gateway refused the API key; not retrying", e, EXIT_USAGE,
                      settings)
    except KeyboardInterrupt:
        raise  # a stop before the signal receivers were installed: the CLI says so, exit 130
    except BaseException as e:
        # Every other failure (StoreError on disk full, an OSError, a bug) is one JSON error
        # event in the journal and STATUS=; the CLI prints the one line and picks the exit
        # code (2 for configuration, else 1: systemd restarts).
        cause = most_telling_error(e) if isinstance(e, BaseExceptionGroup) else e
        log.error("stopped by an error", error=scrub(f"{cause}" or type(cause).__name__),
                  kind=type(cause).__name__,
                  exit_code=getattr(cause, "exit_code", EXIT_FAILED))
        daemon.notifier.notify(STATUS=f"failed: {scrub(str(cause))}")
        raise
    finally:
        log_file.flush()


def _fatal(daemon: Daemon, what: str, e: BaseException, code: int, settings: Settings) -> int:
    msg = scrub(str(e))
    log.error(what, error=msg, exit_code=code)
    daemon.notifier.notify(STATUS=f"failed: {what}: {msg}", ERRNO=13)
    # The same one line as every other failure (the event above is the journal's JSON).
    print(f"streambars: {what}: {msg}", file=sys.stderr, flush=True)
    return code

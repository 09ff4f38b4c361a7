"""`backfill --scheduler ADDRESS | --workers N`: the symbols of one plan on a Dask cluster.

Why Dask: `distributed` is a well-kept engine that users already run (scheduler, workers,
retries, a dashboard, deployment on SSH/Kubernetes/HPC), so we hand it tasks instead of
writing and operating a scheduler of our own.

* **Planning stays here.** The submitting process reads every ledger, prices the downloads
  and applies ``--max-cost``/``--yes``/``--dry-run`` once for the whole plan
  (:func:`streambars.backfill.plan_backfill`) before any task starts.
* **One task per symbol** (:func:`run_symbol`): its months in order through
  :func:`streambars.backfill.execute`, the same function a single-process run calls, so
  engine state and held-open bars flow as they do there. One task per symbol means one
  writer per file (the store's flock enforces it anyway).
* **A shared filesystem.** The store, with its raw archive (``--from-dbn`` inputs are copied
  into it while planning), must be mounted at the same path on every worker. A task first
  checks it sees the marker file this run wrote into the store, and fails with a clear
  message if not.
* **The API key never travels.** Tasks hold no secret: a worker that must download reads
  ``DATABENTO_API_KEY`` from its own environment, else from the ``--env-file`` path (a
  local cluster's workers inherit the submitting process's environment).
* **Faults.** A task whose worker dies is run again elsewhere by Dask and a task that raised
  is retried (``cluster.retries``); :func:`~streambars.backfill.execute` re-reads the file's
  ledger, so the retry does only what is missing and the store ends as one run leaves it.
  Ctrl-C (or SIGTERM) asks every worker to stop at its next batch, waits for them and
  cancels the rest: every file stays as consistent as after a single-process Ctrl-C.
* **Progress** comes back as Dask events (``Worker.log_event``) and is summed per symbol's
  latest attempt on the submitting terminal; each task returns a :class:`SymbolReport`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from .backfill import (
    BackfillResult,
    Plan,
    RunHooks,
    StopRequested,
    archived,
    execute,
    print_summary,
)
from .config import API_KEY_ENV, ConfigError
from .errors import DamagedInputError, StreambarsError, UsageError
from .inputs import discard_archived_copy, wait_archived
from .observe import LOG_EVERY_S, Progress, ProgressDisplay, configure_logging, get_logger, scrub

log = get_logger("streambars.cluster")

EXTRA = "pip install '.[cluster]' in a checkout of streambars (it is not on PyPI)"
#: How long Ctrl-C waits for running tasks to stop at a batch boundary before cancelling.
STOP_WAIT_S = 60.0
#: A local cluster's workers run long CPU-bound tasks that allocate and free large arrays.
#: Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, so glibc hands every freed
#: batch back to the kernel and faults it in again (3-5x the page faults, 3x the system time
#: of one process); its statistical profiler (a stack sample every 10 ms) and 20 ms tick take
#: the GIL. Without them a symbol costs as much CPU in a worker as in one process
#: (bench/cluster.py; docs/cluster.md gives the same settings for `dask worker`).
LOCAL_WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,  # glibc's own default
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "1s",
}


class StoreNotVisibleError(StreambarsError):
    """A worker does not see the store this run writes (not the same shared filesystem)."""


class TaskFailed(Exception):
    """An unexpected error in a task, reduced to a scrubbed one-line message (no chained
    exception or argument that could carry a secret leaves the worker)."""


class SymbolsFailed(StreambarsError):
    """Some symbols of a cluster backfill failed (named); the others are in the store."""


def require_distributed() -> None:
    """Dask lives in an optional extra: say which one when it is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise UsageError(f"--scheduler/--workers (config [cluster]) need Dask distributed: {EXTRA}") from None


# ----------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class SymbolTask:
    """One symbol's part of the plan, as shipped to a worker. Holds no secret."""

    symbol: str
    plan: Plan
    token: str  # this run: names the store marker, the progress topic and the stop flag
    marker: str  # <store>/.streambars-cluster-<token>, written by the submitting process
    log_level: str = "info"

    def __repr__(self) -> str:  # what the dashboard and Dask's logs show
        return f"SymbolTask({self.symbol!r}, items={len(self.plan.items)}, run={self.token[:8]})"


@dataclass
class SymbolReport:
    """What a task returns: plain values (pickled back to the submitting process)."""

    symbol: str
    ok: bool = True
    error: str = ""
    cancelled: bool = False
    records: int = 0
    bars: int = 0
    bars_written: int = 0
    downloaded: int = 0
    bars_per_timeframe: dict[str, int] = field(default_factory=dict)
    violations: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""
    #: the archive copy of a --from-dbn input the task found damaged (the submitter made it)
    damaged_copy: str = ""


#: Runs told to stop, per worker process (set by :func:`_request_stop` through ``Client.run``).
_STOPPED: set[str] = set()
_LOGGING: list[str] = []


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def topic(token: str) -> str:
    return f"streambars-progress-{token}"


def check_store(task: SymbolTask) -> None:
    """Fail (Dask retries elsewhere) unless this worker sees the store the submitter writes:
    the marker file there must hold this run's token."""
    try:
        ok = Path(task.marker).read_text() == task.token
    except OSError:
        ok = False
    if not ok:
        raise StoreNotVisibleError(
            f"worker {_worker_name()} does not see the store {task.plan.settings.store.path} "
            f"({task.marker} is missing there): the store and its raw archive must be on a "
            "filesystem every worker mounts at the same path (docs/cluster.md)"
        )


def run_symbol(task: SymbolTask) -> SymbolReport:
    """The Dask task: check the store, then run the symbol's part of the plan. Errors meant
    for users come back in the report (no retry can fix them); anything else is raised,
    scrubbed, for Dask to retry."""
    if task.log_level not in _LOGGING:  # workers are not terminals: JSON lines
        configure_logging(task.log_level, "json")
        _LOGGING[:] = [task.log_level]
    report = SymbolReport(task.symbol, worker=_worker_name())
    if task.token in _STOPPED:
        return replace(report, ok=False, cancelled=True, error="cancelled")
    check_store(task)
    attempt = uuid.uuid4().hex[:12]
    emit = _emitter(task, attempt)
    emit("start", 0, None)
    t0 = time.monotonic()
    hooks = RunHooks(
        on_progress=lambda label, result, units: emit("item", units, result, label),
        should_stop=lambda: task.token in _STOPPED,
        terminal=False,
    )
    try:
        result = execute(task.plan, hooks=hooks)
    except (StopRequested, KeyboardInterrupt):
        return replace(report, ok=False, cancelled=True, error="cancelled")
    except (StreambarsError, ConfigError) as e:
        text = scrub(str(e))
        if isinstance(e, ConfigError) and e.key == API_KEY_ENV:
            text = (f"worker {_worker_name()} must download but has no {API_KEY_ENV} in its "
                    f"environment or in {task.plan.env_file or '.env'}: give every worker the key "
                    "(docs/cluster.md)")
        log.error("symbol failed", symbol=task.symbol, error=text)
        return replace(report, ok=False, error=text, seconds=time.monotonic() - t0,
                       damaged_copy=e.archive_copy if isinstance(e, DamagedInputError) else "")
    except Exception as e:
        log.error("symbol failed; Dask retries it", symbol=task.symbol, error=scrub(f"{type(e).__name__}: {e}"))
        raise TaskFailed(scrub(f"{type(e).__name__}: {e}")) from None
    emit("end", -1, result)
    s = result.stats
    return replace(report, records=s.records, bars=s.bars, bars_written=s.bars_written,
                   downloaded=result.chunks_downloaded, bars_per_timeframe=dict(result.bars_per_timeframe),
                   violations=dict(result.violations), seconds=time.monotonic() - t0)


def _emitter(task: SymbolTask, attempt: str) -> Callable[..., None]:
    """Progress events for the submitting terminal (fire-and-forget; none outside a worker)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return lambda *a, **k: None
    host, pid = socket.gethostname(), os.getpid()

    def emit(kind: str, units: int, result: BackfillResult | None, label: str = "") -> None:
        stats = result.stats if result is not None else None
        worker.log_event(topic(task.token), {
            "kind": kind, "symbol": task.symbol, "attempt": attempt, "units": units, "label": label,
            "records": stats.records if stats else 0, "bars": stats.bars if stats else 0,
            "bytes": stats.progress.bytes if stats else 0,
            "host": host, "pid": pid,
        })

    return emit


def _request_stop(token: str) -> None:
    """Runs on every worker (``Client.run``): its tasks of run ``token`` stop at the next batch."""
    _STOPPED.add(token)


try:  # the plugin must be a WorkerPlugin; without the extra there is no cluster to plug into
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - require_distributed() names the extra first
    _WorkerPlugin = object  # type: ignore[assignment,misc]


class _IgnoreSigint(_WorkerPlugin):  # type: ignore[misc,valid-type]
    """Worker plugin for a local cluster: Ctrl-C on the terminal reaches the whole process
    group; the submitting process alone handles it and stops the tasks cleanly."""

    name = "streambars-ignore-sigint"

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)



# ----------------------------------------------------------------------------- progress


class Board:
    """The submitting terminal's view: per symbol the figures of its latest attempt (a task
    retried after its worker died starts again from zero; the dead attempt is forgotten)."""

    def __init__(self, plan: Plan):
        self.symbols = list(plan.symbols)
        self.units_total = sum(len(i.spans) for i in plan.items)
        self.lock = threading.Lock()
        self.latest: dict[str, dict[str, Any]] = {}
        self.attempts: dict[str, set[str]] = {}
        self.finished: set[str] = set()
        self.events: list[dict[str, Any]] = []
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.progress = Progress(units_total=self.units_total or None, units_noun="chunks")

    def on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """Dask calls this (its event loop thread) for every progress event."""
        msg = event[1]
        with self.lock:
            self.events.append(msg)
            self.attempts.setdefault(msg["symbol"], set()).add(msg["attempt"])
            prev = self.latest.get(msg["symbol"])
            if msg["kind"] == "end" and prev is not None:
                msg = {**msg, "units": prev["units"]}
            self.latest[msg["symbol"]] = msg
        for listener in self.listeners:
            listener(msg)

    def finish(self, symbol: str) -> None:
        with self.lock:
            self.finished.add(symbol)

    def update(self) -> Progress:
        """Sum the latest figures into the Progress the line is drawn from."""
        with self.lock:
            p = self.progress
            p.records = sum(m["records"] for m in self.latest.values())
            p.bars = sum(m["bars"] for m in self.latest.values())
            p.bytes = sum(m.get("bytes", 0) for m in self.latest.values())
            p.units_done = min(sum(max(m["units"], 0) for m in self.latest.values()), self.units_total)
            return p

    def prefix(self) -> str:
        return f"symbols {len(self.finished)}/{len(self.symbols)} "


# ----------------------------------------------------------------------------- submitting


@contextlib.contextmanager
def connect(scheduler: str, workers: int, quiet: bool = True) -> Iterator[Any]:
    """A Client of the existing cluster at ``scheduler``, or of a local cluster of
    ``workers`` single-threaded processes (closed, its workers ended, on the way out)."""
    require_distributed()
    import logging

    from distributed import Client, LocalCluster

    # Dask's own INFO lines (workers joining, nannies closing) would drown the progress line.
    if quiet:
        logging.getLogger("distributed").setLevel(logging.WARNING)

    if scheduler:
        try:
            client = Client(scheduler, timeout="15s")
        except (OSError, TimeoutError) as e:
            raise StreambarsError(f"cannot reach the Dask scheduler at {scheduler}: {scrub(str(e))}") from None
        try:
            yield client
        finally:
            client.close()
        return
    import dask

    dask.config.set(LOCAL_WORKER_CONFIG)  # handed to each worker process the nannies start
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR)
    try:
        client = Client(cluster)
        try:
            client.register_plugin(_IgnoreSigint())
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def run_on_cluster(plan: Plan, out: TextIO = sys.stdout, client: Any = None,
                   on_event: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run ``plan`` one task per symbol on the configured cluster (or on ``client``), draw the
    aggregated progress, print the per-symbol summary. Returns 0 when every symbol succeeded;
    raises :class:`SymbolsFailed` (exit 1) naming those that did not."""
    cfg = plan.settings.cluster
    store = Path(plan.settings.store.path).resolve()
    env_file = str(Path(plan.env_file).resolve()) if plan.env_file else None
    plan = replace(plan, settings=replace(plan.settings, store=replace(plan.settings.store, path=store)),
                   env_file=env_file)
    # Items name archive paths: make them absolute too (a worker's cwd is its own). Workers
    # read --from-dbn inputs from the archive, so their copies must be there first.
    wait_archived()
    named = (archived(i, plan.settings, plan.dataset) for i in plan.items)
    plan = replace(plan, items=tuple(replace(i, path=i.path.resolve(), read_from=None) if i.path is not None else i
                                     for i in named))
    token = uuid.uuid4().hex
    store.mkdir(parents=True, exist_ok=True)
    marker = store / f".streambars-cluster-{token}"
    marker.write_text(token)
    board = Board(plan)
    if on_event is not None:
        board.listeners.append(on_event)
    level = plan.settings.logging.level
    if not cfg.scheduler and level in ("debug", "info"):
        level = "warning"  # local workers share this terminal: the submitter reports progress
    tasks = [SymbolTask(s, plan.for_symbols([s]), token, str(marker), level) for s in plan.symbols]
    reports: dict[str, SymbolReport] = {}
    try:
        with contextlib.ExitStack() as stack:
            if client is None:
                client = stack.enter_context(connect(cfg.scheduler, cfg.workers,
                                                          plan.settings.logging.level != "debug"))
            where = cfg.scheduler or (f"a local cluster of {cfg.workers} worker process(es)" if cfg.workers
                                      else client.scheduler.address)
            print(f"cluster: {len(tasks)} symbol task(s) on {where}", file=out)
            log.info("cluster run", symbols=len(tasks), scheduler=cfg.scheduler or "local", workers=cfg.workers)
            client.subscribe_topic(topic(token), board.on_event)
            board.progress.started = time.monotonic()  # rates count work, not cluster start-up
            try:
                with _sigterm_as_interrupt():
                    futures = {client.submit(run_symbol, t, key=f"streambars-backfill-{t.symbol}-{token[:8]}",
                                             retries=cfg.retries, pure=False): t.symbol for t in tasks}
                    try:
                        _collect(futures, board, reports)
                    except KeyboardInterrupt:
                        _stop_all(client, token, futures)
                        raise
            finally:
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(topic(token))
    finally:
        marker.unlink(missing_ok=True)
    # every task has ended (others may have read the same copy): as in one process, a damaged
    # input's copy this run made is not kept, for repair.from_archive would read it back
    for copy in sorted({r.damaged_copy for r in reports.values() if r.damaged_copy}):
        discard_archived_copy(Path(copy))
    return _summarize(plan, board, reports, out)


def _collect(futures: dict[Any, str], board: Board, reports: dict[str, SymbolReport]) -> None:
    """Wait for every task, drawing the aggregated progress meanwhile."""
    from distributed import wait

    progress = board.update()
    display = ProgressDisplay(progress, "backfill", every=LOG_EVERY_S)
    display.fields["symbols"] = f"{len(board.finished)}/{len(board.symbols)}"
    pending = set(futures)
    with display:
        while pending:
            try:
                done = wait(list(pending), timeout=0.5, return_when="FIRST_COMPLETED").done
            except TimeoutError:
                done = set()
            for f in done:
                pending.discard(f)
                symbol = futures[f]
                reports[symbol] = _report(f, symbol)
                board.finish(symbol)
                r = reports[symbol]
                if r.ok:
                    log.info("symbol done", symbol=symbol, worker=r.worker, records=r.records,
                             bars_written=r.bars_written)
                else:
                    log.warning("symbol failed", symbol=symbol, worker=r.worker, error=r.error)
            board.update()
            display.fields["symbols"] = f"{len(board.finished)}/{len(board.symbols)}"
            display.update(board.prefix())


def _report(future: Any, symbol: str) -> SymbolReport:
    """A finished future as a report: its result, or its error as one scrubbed line."""
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        return SymbolReport(symbol, ok=False, error="its worker died every time it ran (Dask gave up)")
    except StreambarsError as e:
        return SymbolReport(symbol, ok=False, error=scrub(str(e)))
    except Exception as e:
        text = str(e) if isinstance(e, TaskFailed) else f"{type(e).__name__}: {e}"
        return SymbolReport(symbol, ok=False, error=scrub(text))


def _stop_all(client: Any, token: str, futures: dict[Any, str]) -> None:
    """Ctrl-C: every worker stops this run's tasks at their next batch (what was flushed is
    kept, as a single-process Ctrl-C keeps it); tasks not started return at once."""
    from distributed import wait

    log.warning("interrupted: stopping every task at its next batch (Ctrl-C again to leave at once)")
    try:
        client.run(_request_stop, token)
        wait(list(futures), timeout=STOP_WAIT_S)
    except Exception as e:  # a dead worker or a timeout: cancelling below is all that is left
        log.warning("stopping tasks", error=scrub(str(e)))
    finally:
        client.cancel(list(futures))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a cluster run the way Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _summarize(plan: Plan, board: Board, reports: dict[str, SymbolReport], out: TextIO) -> int:
    """Per-symbol table, then the totals; failures named in one line (exit 1)."""
    rows = [("symbol", "result", "records", "bars written", "seconds", "attempts", "worker")]
    for s in plan.symbols:
        r = reports.get(s, SymbolReport(s, ok=False, error="not run"))
        rows.append((s, "ok" if r.ok else f"FAILED: {r.error}", f"{r.records:,}", f"{r.bars_written:,}",
                     f"{r.seconds:.1f}", str(len(board.attempts.get(s, ())) or "-"), r.worker))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1], file=out)
    total = BackfillResult(chunks_total=plan.chunks_total, chunks_skipped=plan.chunks_skipped,
                           seconds=time.monotonic() - board.progress.started)
    for r in reports.values():
        total.stats.records += r.records
        total.stats.bars += r.bars
        total.stats.bars_written += r.bars_written
        total.chunks_downloaded += r.downloaded
        for tf, n in r.bars_per_timeframe.items():
            total.bars_per_timeframe[tf] = total.bars_per_timeframe.get(tf, 0) + n
        for k, n in r.violations.items():
            total.violations[k] = total.violations.get(k, 0) + n
    print_summary(total, out)
    failed = [s for s in plan.symbols if not reports.get(s, SymbolReport(s, ok=False)).ok]
    if failed:
        first = reports.get(failed[0])
        raise SymbolsFailed(
            f"{len(failed)} of {len(plan.symbols)} symbol(s) failed: {', '.join(failed)}"
            + (f" (first: {failed[0]}: {first.error})" if first and first.error else "")
            + "; the others are in the store, rerun to retry"
        )
    return 0

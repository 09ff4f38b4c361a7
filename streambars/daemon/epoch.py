"""One epoch of the live daemon: files, engine and a supervised Live feed into the pipeline.

An epoch opens every symbol's file, restores the engine state and the watermarks saved in
it, and runs :func:`streambars.pipeline.run_pipeline` fed by :meth:`Epoch.produce`, the
loop that really moves data:

* connect (``Live.subscribe`` runs on a worker thread, bounded by a timeout) with
  ``start=`` the oldest watermark, so whatever happened since is replayed; a gap older than
  ``live.replay_window_h`` is first filled from the Historical API;
* read events with a short timeout so the loop comes round at least every ``TICK_S``:
  records are de-duplicated (:class:`~streambars.daemon.resume.Watermarks`), appended to the raw
  archive, and sent on; ``END_OF_INTERVAL`` and the wall clock past a bar's end by the grace
  send :class:`~streambars.pipeline.FlushUntil`; every ``CHECKPOINT_INTERVAL_S`` a
  :class:`~streambars.pipeline.Checkpoint` carries the engine state and the watermarks to
  the files (its completion pings the watchdog);
* on a disconnect, a gateway error or ``heartbeat_timeout_s`` of silence: log it, back off
  (exponential, jittered; checkpoints continue meanwhile), reconnect and replay. A refused
  API key is fatal at once.

The epoch ends when the daemon stops (SIGTERM) or reloads its symbol list (SIGHUP): a last
checkpoint, the stream closed, the pipeline drained, every file closed.
"""

from __future__ import annotations

import shutil
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any, Protocol

import anyio
import numpy as np
from anyio.abc import ObjectSendStream

from .. import archive as archive_mod
from ..archive import live_archive_head, live_archive_tail
from ..config import Settings, stype_hint
from ..errors import AuthenticationError, DatasetError, SourceError, StoreError
from ..fsio import pid_alive
from ..observe import get_logger, scrub
from ..pipeline import (
    Checkpoint,
    FlushUntil,
    PipelineItem,
    PipelineStats,
    restore_engine,
    run_pipeline,
)
from ..records import INPUT_INTERVAL_NS, BarBatch, RecordBatch, SeriesRegistry
from ..sources.live import (
    EndOfInterval,
    GatewayError,
    Heartbeat,
    HeartbeatTimeout,
    LiveDisconnected,
    LiveEvent,
    LiveRecords,
    LiveSession,
    SystemMessage,
)
from ..store import symbols_with_note
from ..timeutil import NS, iso
from .gapfill import HistoricalGapFill
from .resume import Backoff, WallClockCloser, Watermarks
from .stats import DaemonStats

log = get_logger("streambars.feed")

CHECKPOINT_INTERVAL_S = 5.0
TICK_S = 0.25
ARCHIVE_THREAD_RECORDS = 512  # archive batches at least this big on a worker thread
MERGE_MAX_RECORDS = 65_536  # at most this many records merged while the pipeline is busy
LIVE_NOTE = "live"


def _iso(ts_ns: int | None) -> str:
    return iso(ts_ns, "ms")


class EpochHost(Protocol):
    """What an epoch needs of the process that runs it (:class:`~.service.Daemon`)."""

    settings: Settings
    key: str
    stop_event: anyio.Event  # SIGTERM/SIGINT: drain and end
    reload_event: anyio.Event  # SIGHUP changed the symbols: drain, end, start anew
    stats: DaemonStats  # the one sink of counters and metrics
    watchdog_interval: float | None  # None: no watchdog

    def data_moved(self) -> None:
        """A checkpoint or a bar write went through the whole pipeline."""

    def subscribed(self, description: str) -> None:
        """A subscription succeeded (the first one sends READY=1)."""

    def status(self, text: str | None = None) -> None:
        """Set STATUS= (the counters' line when no text)."""


class Epoch:
    """One pipeline run over one symbol list; see the module doc."""

    def __init__(self, host: EpochHost):
        self.host = host
        self.stats = host.stats
        self.settings = s = host.settings
        db, lv = s.databento, s.live
        # Series are stored symbols: for a parent subscription, the instruments the stream
        # maps (registered as they come), never the parent itself.
        self.registry = SeriesRegistry([] if db.stype_in == "parent" else list(db.symbols))
        self.interval_ns = INPUT_INTERVAL_NS[db.schema]
        self.closer = WallClockCloser(lv.close_grace_s, interval_ns=self.interval_ns)
        self.engine_marks = Watermarks()  # what reached the engine
        self.archive_marks = Watermarks()  # what reached the raw archive
        self.notes: dict[str, dict[str, Any]] = {}
        self.start_hints: dict[int, int] = {}  # series without a saved mark: replay from here
        self.flushed_until = 0
        self.tf_names = tuple(t.name for t in s.bars.timeframes)
        self.last_bar = np.full((len(self.registry), len(self.tf_names)), -1, np.int64)
        self.symbol_errors: set[str] = set()
        self.disconnected_at: float | None = None  # wall clock
        self.connected_description = ""
        self.pipeline_stats = PipelineStats()
        self._ckpt_due = 0.0
        self._pending_wait = max(lv.batch_max_ms / 1000.0, 0.001)

    # -- set-up ------------------------------------------------------------------------

    def _open(self) -> tuple[Any, Any, Any]:
        from ..pipeline import make_engine, make_writers

        s, db = self.settings, self.settings.databento
        _remove_dead_gapfills(Path(s.store.path) / db.dataset)
        if db.stype_in == "parent":
            for name in _daemon_written_symbols(s.store.path, db.dataset):
                self.registry.index(name)
        writers = make_writers(s, db.dataset, db.stype_in)
        try:
            for name in self.registry.names:
                writers.writer(name)  # open + lock now: a second writer is refused at start
            engine = make_engine(s)
            progress = restore_engine(engine, writers, self.registry)
        except BaseException:
            writers.close_all()
            raise
        for name, note in progress.items():
            i = self.registry.index(name)
            live = dict(note.get(LIVE_NOTE) or {})
            self.notes[name] = {k: v for k, v in note.items() if k != LIVE_NOTE}
            if "last_ts" in live:
                self.engine_marks.set(i, int(live["last_ts"]), int(live.get("n_at_last", 1)))
            self.flushed_until = max(self.flushed_until, int(live.get("flushed_until", 0)))
            tail = live_archive_tail(s.store.path, db.dataset, name)
            if tail is not None:
                self.archive_marks.set(i, *tail)
                if "last_ts" not in live:
                    # Archived but never checkpointed (killed within its first seconds):
                    # replay from the first record the daemon ever archived.
                    head = live_archive_head(s.store.path, db.dataset, name)
                    if head is not None:
                        self.start_hints[i] = head
        self.closer.flushed_until = self.flushed_until
        arch = archive_mod.LiveArchive(s.store.path, db.dataset, db.schema, db.stype_in)
        log.info(
            "resuming",
            symbols=self.registry.names,
            engine_marks={n: _iso(self.engine_marks.to_note(i).get("last_ts")) for i, n in enumerate(self.registry.names)},
            archive_marks={n: _iso(self.archive_marks.to_note(i).get("last_ts")) for i, n in enumerate(self.registry.names)},
        )
        return writers, engine, arch

    # -- the epoch ---------------------------------------------------------------------

    async def run(self) -> None:
        writers, engine, arch = await anyio.to_thread.run_sync(self._open)
        self.engine, self.writers, self.archive = engine, writers, arch
        m = self.stats.snapshots
        m.queue_depths = self._queue_depths
        m.validation_counts = self._validation_counts
        m.last_bars = self._last_bars
        m.aggregated = lambda: self.pipeline_stats.records
        send, recv = anyio.create_memory_object_stream[PipelineItem](self.settings.live.queue_size)
        self._feed_queue = send
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.produce, send)
                await run_pipeline(
                    recv, engine, writers, self.registry,
                    queue_size=self.settings.live.queue_size,
                    stats=self.pipeline_stats, on_written=self._on_written,
                )
        finally:
            with anyio.CancelScope(shield=True):  # even when the drain is abandoned
                await anyio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        try:
            self.archive.close()
        finally:
            self.writers.close_all()
        log.info("epoch closed: files flushed and closed", records=self.pipeline_stats.records,
                 bars=self.pipeline_stats.bars_written)

    # -- the producer: the loop that moves data ---------------------------------------

    async def produce(self, send: ObjectSendStream[PipelineItem]) -> None:
        lv = self.settings.live
        backoff = Backoff(lv.reconnect_min_s, lv.reconnect_max_s)
        async with send:
            self._send = send
            while not self._stopping():
                start = await self._fill_gap_if_needed()
                if self._stopping():
                    break
                session = self._session(start)
                try:
                    await session.connect()
                except (AuthenticationError, DatasetError):
                    raise  # retrying cannot help: the daemon exits 2
                except (SourceError, OSError, ValueError) as e:
                    await _close_session(session)
                    delay = backoff.next()
                    self.stats.state("connecting")
                    log.warning("cannot reach the Live gateway; retrying", gateway=self._gateway_text(),
                                attempt=backoff.attempt, retry_in_s=round(delay, 2),
                                error=scrub(str(e)))
                    self.host.status(f"cannot reach {self._gateway_text()}: {scrub(str(e))}; "
                                  f"attempt {backoff.attempt}, retrying in {delay:.1f}s")
                    await self._idle(delay)
                    continue
                try:
                    reason = await self._pump(session, start, backoff)
                finally:
                    await _close_session(session)  # same task as connect(): it owns a task group
                self.closer.disconnected()
                self.stats.connected(False)
                if self._stopping():
                    break
                self.disconnected_at = time.time()
                self.stats.reconnect(reason.split(":")[0])
                delay = backoff.next()
                log.warning("live connection lost; reconnecting with replay", reason=reason,
                            retry_in_s=round(delay, 2), last_held=_iso(self.engine_marks.resume_ts()))
                await self._idle(delay)
            # Stopping: everything passed on is in the pipeline; persist where we are.
            await send.send(self._checkpoint())

    def _stopping(self) -> bool:
        return self.host.stop_event.is_set() or self.host.reload_event.is_set()

    async def _idle(self, seconds: float) -> None:
        """Wait (backoff) while still checkpointing, so the watchdog sees a live pipeline."""
        deadline = time.monotonic() + seconds
        while not self._stopping():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with anyio.move_on_after(min(left, TICK_S)):
                await self.host.stop_event.wait()
            await self._periodic(allow_flush=False)

    async def _periodic(self, allow_flush: bool = True) -> None:
        now = time.monotonic()
        if allow_flush:
            until = self.closer.until()
            if until is not None:
                await self._flush(until)
        if now >= self._ckpt_due:
            self._ckpt_due = now + min(
                CHECKPOINT_INTERVAL_S, self.host.watchdog_interval or CHECKPOINT_INTERVAL_S
            )
            await self._send.send(self._checkpoint())

    async def _flush(self, until: int) -> None:
        if until > self.flushed_until:
            self.flushed_until = until
            await self._send.send(FlushUntil(until))

    def _checkpoint(self) -> Checkpoint:
        progress = {}
        for i, name in enumerate(self.registry.names):
            live = self.engine_marks.to_note(i)
            live["flushed_until"] = int(self.flushed_until)
            progress[name] = {**self.notes.get(name, {}), LIVE_NOTE: live}
        # Saved by the writer stage after everything sent before it: the watchdog's proof
        # that the whole pipeline moves even when no bar closes.
        return Checkpoint(tuple(self.registry.names), progress, on_saved=self.host.data_moved)

    # -- one connection ----------------------------------------------------------------

    def _gateway_text(self) -> str:
        return self.settings.databento.live_gateway or "Databento's Live gateway"

    def _session(self, start: int | None) -> LiveSession:
        db, lv = self.settings.databento, self.settings.live
        return LiveSession(
            self.host.key, db.dataset, db.schema, db.symbols, db.stype_in,
            gateway=db.live_gateway or None, start=start, registry=self.registry,
            batch_max_records=lv.batch_max_records, batch_max_ms=lv.batch_max_ms,
            heartbeat_interval_s=lv.heartbeat_interval_s, heartbeat_timeout_s=lv.heartbeat_timeout_s,
            queue_size=lv.queue_size, trade_clock=self.settings.bars.trade_clock,
        )

    async def _pump(self, session: LiveSession, start: int | None, backoff: Backoff) -> str:
        """Read one connection until it ends; returns why it ended."""
        replay = start is not None
        self.closer.subscribed()
        self.engine_marks.arm()
        self.archive_marks.arm()
        self.stats.connected(True)
        self.stats.state("catching up" if replay else "streaming")
        desc = (f"{self.settings.databento.dataset} {self.settings.databento.schema} "
                f"{len(self.registry.names)} symbol(s) via {self._gateway_text()}"
                + (f", replay from {_iso(start)}" if replay else ""))
        if self.disconnected_at is not None:
            self._log_gap(start)
        self.host.subscribed(desc)
        got_data = False
        # Records wait here only while the pipeline is still busy with earlier ones: they are
        # then sent as one bigger batch, so a busy feed costs fewer engine calls, archive
        # frames and store appends. An idle pipeline gets every batch at once (no latency).
        pending: list[LiveRecords] = []
        reason = "stopping"
        while not self._stopping():
            ev: LiveEvent | None = None
            with anyio.move_on_after(self._pending_wait if pending else TICK_S):
                try:
                    ev = await session.__anext__()
                except StopAsyncIteration:
                    reason = "closed: the session ended"
                    break
                except LiveDisconnected as e:
                    reason = ("heartbeat: " if isinstance(e, HeartbeatTimeout) else "disconnect: ") + scrub(str(e))
                    break
            if isinstance(ev, LiveRecords):
                if not got_data:
                    got_data = True
                    backoff.reset()
                pending.append(ev)
                n = sum(len(p.batch) for p in pending)
                if n < MERGE_MAX_RECORDS and self._pipeline_busy():
                    continue
            if pending:
                await self._records(_merge(pending))
                pending = []
            if ev is not None and not isinstance(ev, LiveRecords):
                if not got_data:
                    got_data = True
                    backoff.reset()
                why = await self._control(ev)
                if why is not None:
                    return why
            await self._periodic()
        if pending:
            await self._records(_merge(pending))
        return reason

    def _pipeline_busy(self) -> bool:
        """Anything still queued between here and the store writer."""
        if self._send.statistics().current_buffer_used:
            return True
        return any(self.pipeline_stats.queue_depths().values())

    async def _records(self, ev: LiveRecords) -> None:
        b = ev.batch
        n = len(b)
        if n == 0:
            return
        keep = self.engine_marks.filter(b.series, b.ts_event)
        akeep = self.archive_marks.filter(b.series, b.ts_event)
        dup = 0 if keep is None else int(n - keep.sum())
        if dup:
            self.stats.duplicates(dup)
        # The raw archive first: what is not yet in it (after a kill -9 it may hold more
        # than the engine state saw), before anything aggregates it.
        if akeep is None:
            await self._archive(ev.records, b.series)
        elif akeep.any():
            await self._archive(ev.records[akeep], b.series[akeep])
        if keep is not None:
            if not keep.any():
                return
            idx = np.flatnonzero(keep)
            b = b.take(idx)
        last_end = int(b.ts_event.max()) + self.interval_ns
        self.closer.records(last_end)
        self.stats.records(len(b), last_end, time.time())
        await self._send.send(b)

    async def _archive(self, records: np.ndarray, series: np.ndarray) -> None:
        n = len(records)
        try:
            if n >= ARCHIVE_THREAD_RECORDS:
                # zstd releases the GIL: a big batch compresses while the loop keeps reading.
                await anyio.to_thread.run_sync(self.archive.append_batch, records, series, self.registry.names)
            elif n:
                self.archive.append_batch(records, series, self.registry.names)
        except OSError as e:
            # Disk full, quota, read-only remount: fatal (exit 1, systemd restarts); what was
            # appended before is intact (each frame is flushed), the rest is replayed.
            where = e.filename or f"{self.settings.store.path}/{self.settings.databento.dataset}/raw"
            raise StoreError(
                f"appending to the raw archive {where} failed: {e.strerror or e} (errno {e.errno}); "
                "free space and restart: what was stored is kept and the rest is replayed") from None

    async def _control(self, ev: LiveEvent) -> str | None:
        """Act on a control event; a string means: end this connection for that reason."""
        if isinstance(ev, EndOfInterval):
            # "All records for the given timestamp have been published": whether that stamp
            # is the interval's open or its end, nothing stamped before it can still come.
            # (Aligned down, in case a gateway stamps it with its own clock.)
            ts = int(ev.ts_event)
            await self._flush(ts - ts % self.interval_ns if self.interval_ns else ts)
        elif isinstance(ev, Heartbeat) or (
            isinstance(ev, SystemMessage) and ev.code == "replay_completed"
        ):
            if self.closer.catching_up:
                log.info("replay caught up", how="heartbeat" if isinstance(ev, Heartbeat) else ev.code)
                self.stats.state("streaming")
            self.closer.caught_up()
        elif isinstance(ev, SystemMessage):
            if ev.code == "slow_reader_warning":
                log.warning("the gateway says this reader is slow", message=ev.message)
        elif isinstance(ev, GatewayError):
            if ev.code == "symbol_resolution_failed":
                key = ev.symbol or ev.message
                if key not in self.symbol_errors:
                    self.symbol_errors.add(key)
                    self.stats.symbol_error()
                    hint = stype_hint([ev.symbol], self.settings.databento.stype_in) if ev.symbol else ""
                    log.error("the gateway could not resolve a symbol; going on with the others",
                              symbol=ev.symbol, message=scrub(ev.message), **({"hint": hint} if hint else {}))
            elif ev.code in ("auth_failed", "api_key_deactivated"):
                raise AuthenticationError(f"the Live gateway: {scrub(ev.message)} ({ev.code})")
            elif ev.code == "skipped_records_after_slow_reading":
                return f"skipped_records: {scrub(ev.message)} (reconnecting to replay them)"
            else:
                log.error("Live gateway error", code=ev.code, message=scrub(ev.message))
        return None

    def _log_gap(self, start: int | None) -> None:
        assert self.disconnected_at is not None
        outage = time.time() - self.disconnected_at
        self.disconnected_at = None
        data_gap = None if start is None else max(time.time() - start / NS, 0.0)
        self.stats.gap("replay", outage)
        log.warning("reconnected; the gap is being replayed", outage_s=round(outage, 3),
                    replay_from=_iso(start),
                    replay_span_s=None if data_gap is None else round(data_gap, 3),
                    reconnects=self.stats.counters.reconnects)

    # -- gaps beyond the replay window -------------------------------------------------

    def _resume_start(self) -> int | None:
        """Where the next subscription replays from (None: no replay, join live)."""
        marks = self.engine_marks.last_ts
        held = [int(t) for t in marks if t >= 0]
        held += [h for i, h in self.start_hints.items() if i >= len(marks) or marks[i] < 0]
        if not held:
            return None
        return max(min(held), self.flushed_until)

    async def _fill_gap_if_needed(self) -> int | None:
        start = self._resume_start()
        if start is None:
            return None
        window_ns = int(self.settings.live.replay_window_h * 3600 * NS)
        now_ns = time.time_ns()
        oldest = now_ns - window_ns + 60 * NS  # a minute's margin inside the window
        if start >= oldest:
            return start
        gap_s = (oldest - start) / NS
        fill = HistoricalGapFill(self.settings, self.host.key, self.registry, start, oldest)
        async with aclosing(fill.batches()) as batches:
            async for batch in batches:
                await self._records(batch)
        if fill.final_until is not None:
            await self._flush(fill.final_until)
        filled = fill.filled
        self.stats.gap("historical" if filled else "none", gap_s)
        if not filled:
            log.error("GAP: older than the replay window and not filled from Historical; "
                      "run `streambars backfill` over it", gap_from=_iso(start), gap_to=_iso(oldest),
                      gap_s=round(gap_s, 1))
        return oldest if not filled else max(self._resume_start() or oldest, oldest)

    # -- pipeline callbacks and metrics snapshots --------------------------------------

    def _on_written(self, bars: BarBatch, written: int) -> None:
        self.host.data_moved()
        if len(bars) == 0:
            return
        arr = bars.bars
        s, t = arr["series"], arr["timeframe"]
        if len(self.registry) > self.last_bar.shape[0]:
            grow = len(self.registry) - self.last_bar.shape[0]
            self.last_bar = np.vstack([self.last_bar, np.full((grow, len(self.tf_names)), -1, np.int64)])
        np.maximum.at(self.last_bar, (s, t), arr["ts_event"])
        i = int(np.argmax(arr["ts_event"]))
        last = f"{self.registry.names[int(s[i])]} {self.tf_names[int(t[i])]} {_iso(int(arr['ts_event'][i]))}"
        self.stats.bars(written, self.tf_names, t, last)

    def _queue_depths(self) -> dict[str, int]:
        return {"feed": self._feed_queue.statistics().current_buffer_used,
                **self.pipeline_stats.queue_depths()}

    def _validation_counts(self) -> list[tuple[str, str, int]]:
        from ..rules import RECORD_RULE_NAMES

        counts = np.asarray(self.engine.counts)
        out = []
        for i, name in enumerate(self.registry.names[: counts.shape[0]]):
            for j, rule in enumerate(RECORD_RULE_NAMES[: counts.shape[1]]):
                out.append((name, rule, int(counts[i, j])))
        return out

    def _last_bars(self) -> list[tuple[str, str, int]]:
        out = []
        lb = self.last_bar
        for i, j in zip(*np.nonzero(lb >= 0), strict=True):
            out.append((self.registry.names[int(i)], self.tf_names[int(j)], int(lb[i, j])))
        return out


def _remove_dead_gapfills(directory: Path) -> None:
    """Remove ``.gapfill-<pid>-*`` download dirs of daemons that died mid-fill."""
    for d in directory.glob(".gapfill-*"):
        pid = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
        if not pid.isdigit():
            continue
        if not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _daemon_written_symbols(root: Any, dataset: str) -> list[str]:
    """Stored symbols a daemon wrote: a live archive, or a file with a live note.

    A ``parent`` subscription learns its instruments from the stream; registering the ones
    a daemon wrote before lets their engine state and marks (or, if killed before their
    first checkpoint, their archive) be found again at start."""
    out = archive_mod.live_symbols(root, dataset)
    out += [name for name in symbols_with_note(root, dataset, LIVE_NOTE) if name not in out]
    return out


async def _close_session(session: LiveSession) -> None:
    """Close a Live session; a failure while closing must never end the epoch."""
    try:
        await session.close()
    except Exception as e:  # e.g. its batch ticker caught blocked on the stream being closed
        log.debug("closing the live session raised; ignored", error=scrub(repr(e)))


def _merge(parts: list[LiveRecords]) -> LiveRecords:
    """One LiveRecords of several, in order (trades keep one shared price array)."""
    if len(parts) == 1:
        return parts[0]
    bs = [p.batch for p in parts]
    shared = bs[0].open is bs[0].close

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(b, name) for b in bs])

    o = cat("open")
    batch = RecordBatch(
        bs[0].kind, cat("series"), cat("ts_event"), o,
        o if shared else cat("high"), o if shared else cat("low"), o if shared else cat("close"),
        cat("volume"),
    )
    records = np.concatenate([p.records for p in parts])
    return LiveRecords(batch, records, parts[-1].last_ts_event, sum(p.unmapped for p in parts))



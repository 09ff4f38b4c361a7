"""The anyio pipeline: source -> engine -> store writer, joined by bounded streams.

One task per stage. A full stream blocks its producer (backpressure), so memory stays
bounded however long the run; nothing is dropped. An exception in any stage cancels the
others (anyio task group) and surfaces once. Backfill and the daemon share this module:
they differ only in the source they plug in and the control items it sends.

Items a source may send, besides :class:`~streambars.records.RecordBatch`:

* :class:`Checkpoint` — "everything before this is aggregated": the engine attaches each
  named series' state and the writer stores it (with an optional progress note) in the
  series' file, in the same flush as the bars. A restart restores that state, so an
  in-progress hour or day bar includes what came before the restart.
* :class:`FlushUntil` — close every bar whose interval ended before ``ts`` (live: the wall
  clock past a bar's end by the grace, or Databento's END_OF_INTERVAL).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import anyio.lowlevel
import anyio.streams.memory
import anyio.to_thread
import numpy as np
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .config import ConfigError, Settings
from .engine import Aggregator
from .engine.kernel import S_LAST
from .errors import AuthenticationError, RuleViolationError, StreambarsError
from .observe import Progress, get_logger
from .records import TAGGED_BAR_DTYPE, BarBatch, RecordBatch, SeriesRegistry
from .store import StoreWriterSet
from .store.gather import count_tagged

log = get_logger("streambars.pipeline")

# anyio imports its parts at their first use: a run's first ~50 ms went to importing them
# (its memory streams, worker threads and asyncio backend), inside the run; a process pays
# for them once, where it imports everything else.
with contextlib.suppress(ImportError):  # anyio's own module: its name may change
    importlib.import_module("anyio._backends._asyncio")

_NO_BARS = np.empty(0, TAGGED_BAR_DTYPE)

ENGINE_STATE = "engine_state"
PROGRESS = "progress"


@dataclass
class Checkpoint:
    """Persist engine state (and ``progress[symbol]``, a JSON-able note) for these symbols."""

    symbols: tuple[str, ...]
    progress: dict[str, Any] = field(default_factory=dict)
    states: dict[str, bytes] = field(default_factory=dict)  # filled in by the engine stage
    on_saved: Callable[[], None] | None = None  # called once saved (daemon: watchdog proof)


@dataclass
class FlushUntil:
    """Close every bar whose interval ends at or before ``ts`` (ns)."""

    ts: int


@dataclass
class Finish:
    """End of input: close every open bar (backfill's last item)."""


PipelineItem = RecordBatch | Checkpoint | FlushUntil | Finish


def settle_session(settings: Settings, dataset: str) -> Settings:
    """The settings with the daily session decided for ``dataset`` (call before any engine or
    writer is made). A configured ``bars.session`` stands. Otherwise the dataset's default
    (timeframes.SESSION_DEFAULTS) -- unless the store already holds files of that dataset:
    their session is kept, because a file's session is part of its contract (a writer with
    another one is refused) and daily bars already written cannot move. So a store built
    when every dataset defaulted to 17:00 America/Chicago keeps working unchanged."""
    if not settings.session_pending:
        return settings
    from .store.salvage import recorded_sessions
    from .timeframes import Session, default_session

    session = default_session(dataset)
    stored = recorded_sessions(settings.store.path, dataset)
    if stored:
        kept = Session.parse(max(stored, key=lambda k: stored[k]))
        if kept != session:
            log.info("session.kept_from_store", dataset=dataset, session=str(kept), default=str(session),
                     why="the store's files of this dataset were built with it; set bars.session "
                     "(in a new store) to use another")
        session = kept
    return replace(settings, bars=replace(settings.bars, session=session), session_pending=False)


def make_engine(settings: Settings, registry: SeriesRegistry | None = None, out_capacity: int = 65536) -> Aggregator:
    """The aggregator the settings describe (timeframes, input schema, session, rules);
    ``registry`` lets its errors name the symbol instead of a series index; ``out_capacity``:
    bars of its reused output buffer (see Aggregator)."""
    v = settings.validation
    return Aggregator(
        settings.bars.timeframes,
        input_kind=settings.databento.schema,
        session=settings.bars.session,
        policies=v.policies(),
        default_policy=v.policy,
        max_volume=v.max_volume,
        series_names=registry,
        out_capacity=out_capacity,
    )


def make_writers(settings: Settings, dataset: str, stype: str, coalesce_rows: int = 0) -> StoreWriterSet:
    """Writers for one dataset's files, with the settings' timeframes and session;
    ``coalesce_rows`` > 0 (backfill) holds bars back to write them in large slabs."""
    return StoreWriterSet(
        settings.store.path,
        dataset,
        stype=stype,
        timeframes=settings.bars.timeframes,
        session=settings.bars.session,
        chunk_rows=settings.store.chunk_rows,
        coalesce_rows=coalesce_rows,
    )


def encode_state(state: dict[str, np.ndarray]) -> bytes:
    """An engine series state as npz bytes (plain arrays, no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **state)
    return buf.getvalue()


def decode_state(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def restore_engine(engine: Aggregator, writers: StoreWriterSet, registry: SeriesRegistry) -> dict[str, Any]:
    """Load each registered symbol's saved engine state and progress note from its file."""
    progress: dict[str, Any] = {}
    for name in registry.names:
        writer = writers.writer(name)
        blob = writer.read_meta(ENGINE_STATE)
        if blob:
            engine.set_series_state(registry.index(name), decode_state(blob))
        note = writer.read_meta(PROGRESS)
        progress[name] = json.loads(note) if note else {}
    return progress


class ResumeFilter:
    """Drops records a restored engine already aggregated: ``ts <= `` its last accepted ts.

    A rerun (or a month redone after a crash) feeds records again from a chunk's start; the
    engine state restored from the store already holds everything up to its last record, so
    those are not new data and must not be counted as ``ts_not_increasing`` violations.
    Marks are taken once, at restore time; records past them go to the engine untouched.
    """

    def __init__(self, engine: Aggregator, n_series: int):
        self.marks = np.array(
            [int(engine.get_series_state(i)["series"][S_LAST]) for i in range(n_series)], np.int64
        )
        self.skipped = 0

    def __call__(self, batch: RecordBatch) -> RecordBatch:
        if not len(batch) or not len(self.marks) or int(self.marks.max()) < 0:
            return batch
        series = batch.series
        known = series < len(self.marks)
        mark = np.where(known, self.marks[np.minimum(series, len(self.marks) - 1)], -1)
        keep = batch.ts_event > mark
        # Records of a series arrive in time order: once one is past the mark, all later are.
        self.marks[np.unique(series[keep & known])] = -1
        if keep.all():
            return batch
        self.skipped += int((~keep).sum())
        return batch.take(keep)


def tag_counts(bars: BarBatch, n_timeframes: int, n_series: int) -> BarBatch:
    """``bars`` with ``bars.counts`` (rows per series and timeframe) set, counted while the
    engine's bars are still in cache (the writers then skip their own counting pass); a
    live batch (a few bars) is left to bincount: the counts' set-up costs more than it saves."""
    arr = bars.bars
    if arr.shape[0] >= 1024 and arr.dtype == TAGGED_BAR_DTYPE and arr.flags.c_contiguous:
        counts = count_tagged([arr], n_timeframes, n_series)
        if counts is not None:
            bars.counts = counts.reshape(n_series, n_timeframes)
    return bars


def _process(engine: Aggregator, batch: RecordBatch) -> BarBatch:
    """The engine stage's work on a worker thread: the batch's bars, counted (the count is
    ~0.2 s of a year of 1s bars that would otherwise stall the event loop)."""
    return tag_counts(engine.process(batch), len(engine.timeframes), engine.n_series)


@dataclass
class PipelineStats:
    records: int = 0
    bars: int = 0
    bars_written: int = 0
    batches: int = 0
    progress: Progress = field(default_factory=Progress)
    #: bars closed per timeframe index (the aggregator's order)
    per_timeframe: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def count_bars(self, bars: BarBatch, n_timeframes: int = 0, n_series: int = 0) -> None:
        """Add the batch's bars per timeframe; given the engine's timeframes and series, its
        rows per (series, timeframe) too, kept in ``bars.counts`` for the writers (unless
        :func:`tag_counts` put them there already)."""
        if bars.counts is None and n_timeframes:
            tag_counts(bars, n_timeframes, n_series)
        if bars.counts is not None:
            by_tf = bars.counts.sum(axis=0)
        else:
            by_tf = np.bincount(bars.bars["timeframe"], minlength=len(self.per_timeframe))
        if len(by_tf) > len(self.per_timeframe):
            grown = np.zeros(len(by_tf), np.int64)
            grown[: len(self.per_timeframe)] = self.per_timeframe
            self.per_timeframe = grown
        self.per_timeframe += by_tf

    queues: dict[str, Any] = field(default_factory=dict)  # stage -> send stream (depth metrics)

    def queue_depths(self) -> dict[str, int]:
        """Items waiting in each of the pipeline's queues (by the stage they feed)."""
        return {name: s.statistics().current_buffer_used for name, s in self.queues.items()}


async def run_pipeline(
    source: AsyncIterator[PipelineItem],
    engine: Aggregator,
    writers: StoreWriterSet,
    registry: SeriesRegistry,
    *,
    queue_size: int = 8,
    stats: PipelineStats | None = None,
    on_written: Callable[[BarBatch, int], None] | None = None,
) -> PipelineStats:
    """Run the three stages until the source is exhausted; return counts.

    ``on_written(bars, rows_written)`` is called after every flush (the daemon uses it for
    the watchdog, metrics and STATUS=; backfill for its progress line).
    """
    stats = stats or PipelineStats()
    to_engine_send, to_engine_recv = anyio.create_memory_object_stream[PipelineItem](queue_size)
    to_writer_send, to_writer_recv = anyio.create_memory_object_stream[BarBatch | Checkpoint](queue_size)
    stats.queues.update(engine=to_engine_send, writer=to_writer_send)

    rule_failure: list[RuleViolationError] = []

    async def feed(send: ObjectSendStream[PipelineItem]) -> None:
        async with send:
            try:
                async for item in source:
                    await send.send(item)
            except anyio.BrokenResourceError:
                if not rule_failure:
                    raise  # the engine stage did not stop on purpose
            finally:
                # Close a source left mid-way here, in the task that iterated it: a task
                # group inside it must exit in this task, not in a garbage collector's.
                await _close(source)

    async def aggregate(
        recv: ObjectReceiveStream[PipelineItem], send: ObjectSendStream[BarBatch | Checkpoint]
    ) -> None:
        async with recv, send:
            async for item in recv:
                if isinstance(item, RecordBatch):
                    stats.records += len(item)
                    stats.batches += 1
                    stats.progress.add(records=len(item), nbytes=item.nbytes)
                    try:
                        bars = await anyio.to_thread.run_sync(_process, engine, item)
                    except RuleViolationError as e:
                        # Bars closed before the violation are final: the writer stores them
                        # (it drains its stream), then the failure is raised below.
                        if len(getattr(e, "bars", ())):
                            await send.send(e.bars)
                        rule_failure.append(e)
                        return
                elif isinstance(item, FlushUntil):
                    bars = engine.flush(item.ts)
                elif isinstance(item, Finish):
                    bars = engine.finish()
                elif isinstance(item, Checkpoint):
                    for name in item.symbols:
                        if name in registry:
                            state = engine.get_series_state(registry.index(name))
                            item.states[name] = encode_state(state)
                    await send.send(item)
                    continue
                else:  # pragma: no cover - a programming error in a source
                    raise TypeError(f"unexpected pipeline item {type(item).__name__}")
                if len(bars):
                    stats.bars += len(bars)
                    stats.count_bars(bars, len(engine.timeframes), engine.n_series)
                    stats.progress.add(bars=len(bars))
                    await send.send(bars)

    async def write(recv: ObjectReceiveStream[BarBatch | Checkpoint]) -> None:
        async with recv:
            async for item in recv:
                if isinstance(item, Checkpoint):
                    # with a coalescing writer set, the bars it holds back go first
                    stats.bars_written += await anyio.to_thread.run_sync(
                        _save_checkpoint, writers, item, registry.names)
                    if item.on_saved is not None:
                        item.on_saved()
                    continue
                if isinstance(item, BarBatch) and writers.hold(item, registry.names):
                    written = 0  # queued for a later slab: no thread hop for it
                else:
                    written = await anyio.to_thread.run_sync(writers.write, item, registry.names)
                stats.bars_written += written
                if on_written is not None:
                    on_written(item, written)
            # the end of the stream (input done, or the engine stopped on a rule failure: the
            # bars closed before it are final): nothing stays held back by coalescing
            stats.bars_written += await anyio.to_thread.run_sync(writers.flush)

    async with unwrapped(), anyio.create_task_group() as tg:
        tg.start_soon(feed, to_engine_send)
        tg.start_soon(aggregate, to_engine_recv, to_writer_send)
        tg.start_soon(write, to_writer_recv)
    if rule_failure:
        raise rule_failure[0]
    return stats


async def _close(source: AsyncIterator[PipelineItem]) -> None:
    """``aclose()`` a source generator. One suspended inside an anyio task group answers the
    GeneratorExit with a group of it: that is a clean close too."""
    aclose = getattr(source, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except BaseExceptionGroup as eg:
        if eg.split(GeneratorExit)[1] is not None:
            raise


@contextlib.asynccontextmanager
async def unwrapped() -> AsyncIterator[None]:
    """Raise the most telling error of a task group's ExceptionGroup on its own, once."""
    try:
        yield
    except BaseExceptionGroup as eg:
        raise most_telling_error(eg) from None


def most_telling_error(eg: BaseExceptionGroup) -> BaseException:
    flat: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            flat.append(e)

    walk(eg)
    # Errors that only say another task failed first are the least telling.
    secondary = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)
    for kind in (AuthenticationError, ConfigError, StreambarsError, Exception):
        for e in flat:
            if isinstance(e, kind) and not isinstance(e, secondary):
                return e
    return flat[0]


def _save_checkpoint(writers: StoreWriterSet, cp: Checkpoint, series_names: Sequence[str]) -> int:
    """Store the checkpoint's engine states and progress notes, each in the same append as
    its file's bars still held back by coalescing (rows -> marks -> state); returns rows written."""
    meta_by_symbol: dict[str, dict[str, bytes]] = {}
    for name in cp.symbols:
        meta: dict[str, bytes] = {}
        if name in cp.states:
            meta[ENGINE_STATE] = cp.states[name]
        if name in cp.progress:
            meta[PROGRESS] = json.dumps(cp.progress[name], sort_keys=True).encode()
        if meta:
            meta_by_symbol[name] = meta
    if not meta_by_symbol:
        return writers.flush()
    return writers.write(_NO_BARS, series_names, meta_by_symbol)

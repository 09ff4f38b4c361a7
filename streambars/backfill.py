"""`streambars backfill`: history, month by month, into the store — resume-safe, paid once.

The plan is a list of (month, symbol) chunks. For each chunk:

1. *download* (its own task, running ahead): if the raw archive already holds that month
   it is not requested again (``--force`` re-downloads); otherwise ``timeseries.get_range``
   streams it into the archive atomically. Cost is asked for and checked first.
2. *decode* the archived DBN into numpy record batches;
3. the shared pipeline aggregates every timeframe and appends to the store; after the
   chunk's last batch a :class:`~streambars.pipeline.Checkpoint` stores the engine state and
   marks the month done in the symbol's file, in the same flush as its bars.

A rerun skips months marked done, restores the engine state of the last one, and redoes
a month cut off mid-way (rows already stored are not written twice: high-water marks).
At the end, bars whose interval closed by ``--end`` are written; bars that reach past it
stay open in the saved state, so extending the range later completes them instead of
leaving a truncated final bar in the store.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TextIO

import anyio

from . import archive
from .config import Settings, check_timeframes_fit, load_api_key
from .engine import Aggregator
from .errors import CostLimitError, Interrupted, UsageError
from .observe import Progress, TerminalProgress, get_logger
from .pipeline import (
    Checkpoint,
    Finish,
    FlushUntil,
    PipelineItem,
    PipelineStats,
    ResumeFilter,
    make_engine,
    make_writers,
    restore_engine,
    run_pipeline,
    unwrapped,
)
from .records import INPUT_KINDS, SeriesRegistry
from .rules import RECORD_RULE_NAMES
from .sources import dbnfile
from .sources.historical import UnknownSymbolError
from .store import StoreWriterSet

log = get_logger("streambars.backfill")

#: Batches (of ~64k records, or of the bars they close) queued between stages: enough to keep
#: both cores busy, small enough that a year-long backfill stays near 0.5 GB resident.
BACKFILL_QUEUE = 3


@dataclass(frozen=True)
class BackfillOptions:
    start: str | None = None
    end: str | None = None
    yes: bool = False
    dry_run: bool = False
    force: bool = False
    from_dbn: tuple[str, ...] = ()
    env_file: str | None = ".env"


@dataclass(frozen=True)
class Chunk:
    """One request: a symbol over [start, end) within one calendar month (UTC)."""

    symbol: str
    month: str  # YYYY-MM
    start: datetime
    end: datetime

    @property
    def key(self) -> str:
        """What the progress note records; a partial month has its own key."""
        full = self.start.day == 1 and self.end == _next_month(self.start)
        return self.month if full else f"{self.start:%Y-%m-%d}/{self.end:%Y-%m-%d}"


@dataclass
class BackfillResult:
    chunks_total: int = 0
    chunks_skipped: int = 0
    chunks_downloaded: int = 0
    stats: PipelineStats = field(default_factory=PipelineStats)
    bars_per_timeframe: dict[str, int] = field(default_factory=dict)
    violations: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


#: The range a backfill date may take: int64 nanoseconds since 1970 end in April 2262.
FIRST_DAY = datetime(1970, 1, 1, tzinfo=UTC)
LAST_DAY = datetime(2262, 4, 1, tzinfo=UTC)


def parse_day(text: str, name: str) -> datetime:
    """'YYYY-MM-DD' or 'YYYY-MM' (first of the month) as a UTC datetime."""
    try:
        if len(text) == 7:
            day = datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
        else:
            day = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
    except ValueError:
        raise UsageError(f"--{name} {text!r} is not a date YYYY-MM-DD or a month YYYY-MM") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise UsageError(
            f"--{name} {text}: backfill dates lie between {FIRST_DAY:%Y-%m-%d} and {LAST_DAY:%Y-%m-%d} "
            "(Databento's timestamps are nanoseconds since 1970)")
    return day


def _next_month(d: datetime) -> datetime:
    return datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC)


def plan_chunks(symbols: Sequence[str], start: datetime, end: datetime) -> list[Chunk]:
    """Month-by-month chunks, months outermost so every symbol advances together."""
    if end <= start:
        raise UsageError(f"--end {end:%Y-%m-%d} is not after --start {start:%Y-%m-%d}")
    chunks: list[Chunk] = []
    cursor = start
    while cursor < end:
        stop = min(_next_month(datetime(cursor.year, cursor.month, 1, tzinfo=UTC)), end)
        chunks += [Chunk(s, f"{cursor:%Y-%m}", cursor, stop) for s in symbols]
        cursor = stop
    return chunks


def run_backfill(settings: Settings, options: BackfillOptions, out: TextIO = sys.stdout) -> int:
    """The command: plan, check cost, run the pipeline, print the summary. Returns exit code."""
    if options.from_dbn:
        result = ingest_dbn_files(settings, [Path(p) for p in options.from_dbn], out=out)
    else:
        result = backfill_historical(settings, options, out=out)
        if result is None:  # dry run
            return 0
    print_summary(result, settings, out)
    return 0


def backfill_historical(
    settings: Settings, options: BackfillOptions, out: TextIO = sys.stdout
) -> BackfillResult | None:
    db = settings.databento
    if not db.symbols:
        raise UsageError("no symbols: give --symbols or databento.symbols in the config")
    if not options.start or not options.end:
        raise UsageError("backfill needs --start and --end (or --from-dbn PATH...)")
    start, end = parse_day(options.start, "start"), parse_day(options.end, "end")
    chunks = plan_chunks(db.symbols, start, end)
    root = settings.store.path
    registry = SeriesRegistry(list(db.symbols))
    writers = make_writers(settings, db.dataset, db.stype_in)
    result = BackfillResult(chunks_total=len(chunks))
    try:
        engine = make_engine(settings, registry)
        progress = restore_engine(engine, writers, registry)
        todo = [c for c in chunks if c.key not in progress.get(c.symbol, {}).get("done", [])]
        result.chunks_skipped = len(chunks) - len(todo)
        need = [
            c for c in todo
            if options.force or not archive.exists(root, db.dataset, c.symbol, c.month, c.key)
        ]
        print(
            f"plan: {len(chunks)} chunk(s) ({len(db.symbols)} symbol(s) x months), "
            f"{result.chunks_skipped} already in the store, {len(todo) - len(need)} from the "
            f"raw archive, {len(need)} to download",
            file=out,
        )
        client = None
        if need:
            from .sources.historical import HistoricalSource

            key = load_api_key(options.env_file)
            client = HistoricalSource(key, gateway=db.historical_gateway or None)
            # Resolve over the whole range first (free): a symbol unknown for the entire range
            # is the user's mistake; one that merely did not trade in some month is not.
            _, not_found = client.resolve_symbols(
                db.dataset, sorted({c.symbol for c in need}), db.stype_in, start, end
            )
            if not_found:
                raise UnknownSymbolError(
                    f"{db.dataset} ({db.stype_in}) has no symbol {', '.join(sorted(not_found))} "
                    f"between {start:%Y-%m-%d} and {end:%Y-%m-%d}; check --symbols, --stype-in "
                    "and --dataset",
                    tuple(not_found),
                )
            cost = _cost(client, db, chunks, need)
            print(f"cost of the download: ${cost:,.2f} (limit ${db.max_cost:,.2f})", file=out)
            if options.dry_run:
                return None
            if cost > db.max_cost and not options.yes:
                raise CostLimitError(
                    f"the download would cost ${cost:,.2f}, above databento.max_cost "
                    f"${db.max_cost:,.2f}; rerun with --yes to accept or --max-cost to raise it"
                )
        elif options.dry_run:
            print("nothing to download: no cost", file=out)
            return None
        done = {name: list(note.get("done", [])) for name, note in progress.items()}
        result = _run(settings, engine, writers, registry, todo, done, client, options.force, end, result)
    finally:
        writers.close_all()
    return result


def _cost(client: Any, db: Any, chunks: list[Chunk], need: list[Chunk]) -> float:
    """What downloading ``need`` costs: one request for a whole fresh plan, else one per
    month (with that month's missing symbols), so archived months are not priced again."""
    if len(need) == len(chunks):
        symbols = list(dict.fromkeys(c.symbol for c in need))
        return client.get_cost(db.dataset, symbols, db.schema, db.stype_in, chunks[0].start, chunks[-1].end)
    by_month: dict[tuple[datetime, datetime], list[str]] = {}
    for c in need:
        by_month.setdefault((c.start, c.end), []).append(c.symbol)
    return sum(
        client.get_cost(db.dataset, symbols, db.schema, db.stype_in, start, end)
        for (start, end), symbols in by_month.items()
    )


def _run(
    settings: Settings,
    engine: Aggregator,
    writers: StoreWriterSet,
    registry: SeriesRegistry,
    todo: list[Chunk],
    done_keys: dict[str, list[str]],
    client: Any,
    force: bool,
    range_end: datetime,
    result: BackfillResult,
) -> BackfillResult:
    db = settings.databento
    root = settings.store.path
    progress = Progress(units_total=len(todo))
    terminal = TerminalProgress(progress)
    t0 = time.monotonic()

    # The download task runs beside the pipeline (in _run_with_signals' task group), not in
    # a task group inside the source generator: a generator suspended at a yield inside a
    # task group is finalised from another task when the pipeline stops (an error, SIGTERM),
    # and anyio then raises "Attempted to exit cancel scope in a different task" over the
    # real cause.
    ready_send, ready_recv = anyio.create_memory_object_stream[tuple[Chunk, Path | None]](2)

    async def download() -> None:
        async with ready_send:
            for chunk in todo:
                path = archive.month_path(root, db.dataset, chunk.symbol, chunk.month, chunk.key)
                if client is not None and (force or not path.exists()):
                    log.info("downloading", symbol=chunk.symbol, month=chunk.key)
                    try:
                        await anyio.to_thread.run_sync(
                            lambda c=chunk, p=path: client.download_month(
                                db.dataset, c.symbol, db.schema, db.stype_in, c.start, c.end, p
                            )
                        )
                    except UnknownSymbolError:
                        # Resolved for the range, not for this month (not listed yet, or
                        # expired): an empty month, nothing archived, marked done.
                        log.warning("symbol not listed this month", symbol=chunk.symbol, month=chunk.key)
                        path = None
                    result.chunks_downloaded += 1
                await ready_send.send((chunk, path))

    async def source() -> AsyncIterator[PipelineItem]:
        async with ready_recv:
            async for chunk, path in ready_recv:
                if path is not None:
                    async for batch in _decode(path, registry, db.schema, db.stype_in, chunk.symbol, resume):
                        yield batch
                        terminal.update(f"{chunk.key} {chunk.symbol}")
                done_keys.setdefault(chunk.symbol, []).append(chunk.key)
                yield Checkpoint(
                    (chunk.symbol,), {chunk.symbol: {"done": sorted(set(done_keys[chunk.symbol]))}}
                )
                progress.units_done += 1
                log.info("month done", symbol=chunk.symbol, month=chunk.key, **progress.fields())
                _give_back_free_memory()
        yield FlushUntil(int(range_end.timestamp()) * 1_000_000_000)
        yield Checkpoint(tuple(registry.names))

    result.stats.progress = progress
    resume = ResumeFilter(engine, len(registry))
    try:
        _run_with_signals(
            run_pipeline(source(), engine, writers, registry, stats=result.stats, queue_size=BACKFILL_QUEUE),
            download,
        )
    finally:
        terminal.close()
    _collect(engine, result)
    result.seconds = time.monotonic() - t0
    return result


def _give_back_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``), once a month-chunk.

    A month's batches are freed by then, but glibc keeps their memory in the arenas of the
    worker threads that allocated them, fragmented: without this a 3-symbol, 16-timeframe
    backfill grew ~6 MB a month (flat with it: 399 -> 430 MB over a year, same CPU time).
    A no-op where there is no glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


async def _decode(
    path: Path, registry: SeriesRegistry, schema: str, stype_in: str, symbol: str | None,
    resume: ResumeFilter,
) -> AsyncIterator[PipelineItem]:
    """Decode one DBN file in bounded batches off the event loop, minus what is already done."""
    it: Iterator = dbnfile.iter_batches(path, registry, expected_schema=schema, stype_in=stype_in, symbol=symbol)
    sentinel = object()
    while True:
        batch = await anyio.to_thread.run_sync(next, it, sentinel)
        if batch is sentinel:
            return
        batch = resume(batch)
        if len(batch):
            yield batch


def expand_dbn_paths(paths: Sequence[Path]) -> list[Path]:
    """``--from-dbn`` arguments as files: a directory stands for the DBN files directly in it
    (``*.dbn``, ``*.dbn.zst``, not hidden, not recursive, sorted); a missing path or a
    directory without DBN files is a usage error naming it."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.name.endswith((".dbn", ".dbn.zst")) and not f.name.startswith(".") and f.is_file())
            if not found:
                raise UsageError(f"--from-dbn {p}: a directory without .dbn or .dbn.zst files in it")
            out += found
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise UsageError(f"--from-dbn {p}: not a regular file")
        else:
            raise UsageError(f"--from-dbn {p}: no such file or directory")
    return list(dict.fromkeys(out))


def ingest_dbn_files(settings: Settings, paths: list[Path], out: TextIO = sys.stdout) -> BackfillResult:
    """`--from-dbn`: DBN files the user already has; no API key, same pipeline."""
    paths = expand_dbn_paths(paths)
    infos = [dbnfile.describe(p) for p in paths]
    datasets = {i.dataset for i in infos}
    if len(datasets) != 1:
        raise UsageError(f"--from-dbn files mix datasets {sorted(datasets)}; ingest one dataset at a time")
    for info in infos:
        if info.schema not in INPUT_KINDS:
            raise UsageError(
                f"--from-dbn {info.path}: schema {info.schema or 'mixed (a live capture)'} cannot "
                f"make bars; allowed: {', '.join(INPUT_KINDS)}"
            )
    schemas = {i.schema for i in infos}
    if len(schemas) != 1:
        raise UsageError(f"--from-dbn files mix schemas {sorted(schemas)}; ingest one schema at a time")
    dataset, schema = datasets.pop(), schemas.pop()
    stype = infos[0].stype_in or settings.databento.stype_in
    settings = replace(settings, databento=replace(settings.databento, dataset=dataset, schema=schema))
    check_timeframes_fit(schema, settings.bars.timeframes)
    registry = SeriesRegistry()
    writers = make_writers(settings, dataset, stype)
    result = BackfillResult(chunks_total=len(paths))
    t0 = time.monotonic()
    try:
        engine = make_engine(settings, registry)
        # Restore saved state for every symbol these files hold, so reruns are idempotent.
        for info in infos:
            for name in info.symbols:
                registry.index(name)
        restore_engine(engine, writers, registry)
        resume = ResumeFilter(engine, len(registry))
        end_ns = max((i.end_ns for i in infos if i.end_ns), default=None)

        async def source() -> AsyncIterator[PipelineItem]:
            for info in sorted(infos, key=lambda i: i.start_ns or 0):
                async for batch in _decode(info.path, registry, schema, stype, None, resume):
                    yield batch
                log.info("file done", path=str(info.path), **result.stats.progress.fields())
            if end_ns is not None:
                yield FlushUntil(end_ns)
            else:
                yield Finish()
            yield Checkpoint(tuple(registry.names))

        print(f"ingesting {len(paths)} DBN file(s): {dataset} {schema}", file=out)
        _run_with_signals(
            run_pipeline(source(), engine, writers, registry, stats=result.stats, queue_size=BACKFILL_QUEUE)
        )
        _collect(engine, result)
    finally:
        writers.close_all()
    result.seconds = time.monotonic() - t0
    return result


def _run_with_signals(coro: Any, *background: Callable[[], Awaitable[None]]) -> None:
    """Run the pipeline (and ``background`` tasks beside it); SIGTERM and SIGINT stop it the same way: cancel, keep what was
    flushed, then raise :class:`~streambars.errors.Interrupted` (the CLI exits 130).

    Plain ``signal.signal`` handlers (not anyio's receiver) for the whole run, restored
    after: asyncio's ``remove_signal_handler`` resets SIGTERM to SIG_DFL, so a signal landing
    while the loop shuts down would kill the process; and a KeyboardInterrupt raised inside
    the event loop comes out as an anyio RuntimeError with a long traceback."""
    stopped: list[str] = []
    cancel: list[Any] = []

    def on_signal(signum: int, frame: Any) -> None:
        if not stopped:
            log.warning("stopping; the month in progress is redone next time",
                        signal=signal.Signals(signum).name)
        stopped.append(signal.Signals(signum).name)
        if cancel:
            cancel[0]()

    async def main() -> None:
        if stopped:
            coro.close()
            return
        async with unwrapped(), anyio.create_task_group() as tg:
            loop = asyncio.get_running_loop()
            cancel.append(lambda: loop.call_soon_threadsafe(tg.cancel_scope.cancel))
            if stopped:
                tg.cancel_scope.cancel()
            for task in background:
                tg.start_soon(task)
            await coro
            tg.cancel_scope.cancel()  # the pipeline is done: nothing in the background matters
        cancel.clear()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        anyio.run(main)
    finally:
        cancel.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        raise Interrupted(stopped[0])


def _collect(engine: Aggregator, result: BackfillResult) -> None:
    """Bars per timeframe and validation counts of a finished run, into the result."""
    per_tf = result.stats.per_timeframe
    result.bars_per_timeframe = {
        tf.name: int(per_tf[k]) if k < len(per_tf) else 0 for k, tf in enumerate(engine.timeframes)
    }
    counts = engine.counts
    for j, name in enumerate(RECORD_RULE_NAMES):
        total = int(counts[:, j].sum()) if counts.size else 0
        if total:
            result.violations[name] = total


def print_summary(result: BackfillResult, settings: Settings, out: TextIO) -> None:
    s = result.stats
    rate = s.records / result.seconds if result.seconds else 0.0
    print(
        f"done: {s.records:,} records in, {s.bars:,} bars closed, {s.bars_written:,} bars written "
        f"in {result.seconds:.1f}s ({rate:,.0f} records/s); chunks: {result.chunks_total} planned, "
        f"{result.chunks_skipped} already done, {result.chunks_downloaded} downloaded",
        file=out,
    )
    if result.bars_per_timeframe:
        print(
            "bars per timeframe: "
            + ", ".join(f"{tf} {n:,}" for tf, n in result.bars_per_timeframe.items()),
            file=out,
        )
    if result.violations:
        print(
            "validation: " + ", ".join(f"{k}={v:,}" for k, v in sorted(result.violations.items())),
            file=out,
        )
    else:
        print("validation: no rule broken", file=out)

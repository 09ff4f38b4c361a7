"""`streambars backfill`: history into the store, in any order, resume-safe, paid once.

Planning reads each symbol's ledger (:mod:`streambars.ledger`) from its file, if the file
exists (nothing is created until the inputs are checked), and keeps only the spans of the
requested range the file has not ingested: only those are priced and downloaded.

Each input then becomes an :class:`Item` (an archive file and, per symbol, the spans of it
that count) and goes through the shared pipeline one of two ways:

* **append** -- every new span starts at or after what the file holds: the saved engine state
  continues, and after each item a :class:`~streambars.pipeline.Checkpoint` stores the engine
  state and the grown ledger in the same flush as its bars;
* **rebuild** -- a span reaches earlier: every span of the ledger, old and new, is read back
  from the raw archive in time order into a new file, which replaces the old one atomically.

Downloads run one item ahead in their own task and land in the raw archive atomically, so a
killed run redoes at most the item in progress and never pays twice. Bars an input cannot
prove closed (past ``--end``, or past the last record of an input without a known end) stay
open in the saved state for the next input to complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TextIO

import anyio
import numpy as np
import zstandard

from . import archive
from .config import Settings, check_timeframes_fit, load_api_key
from .engine import Aggregator
from .engine.kernel import S_LAST
from .errors import CostLimitError, Interrupted, UsageError
from .ledger import EMPTY, LIVE, NS, Ledger, Span, span_key
from .observe import Progress, TerminalProgress, get_logger
from .pipeline import (
    ENGINE_STATE,
    PROGRESS,
    Checkpoint,
    FlushUntil,
    PipelineItem,
    PipelineStats,
    ResumeFilter,
    decode_state,
    make_engine,
    make_writers,
    run_pipeline,
    unwrapped,
)
from .records import INPUT_INTERVAL_NS, INPUT_KINDS, RecordBatch, SeriesRegistry
from .resume import live_archive_head
from .rules import RECORD_RULE_NAMES
from .sources import dbnfile
from .sources.dbnfile import PUBLISHER_SEPARATOR, base_symbol
from .sources.historical import UnknownSymbolError
from .store import StoreWriterSet
from .store.layout import file_path, filename_to_symbol, store_files

log = get_logger("streambars.backfill")

#: Batches (of ~64k records, or of the bars they close) queued between stages: enough to keep
#: both cores busy, small enough that a year-long backfill stays near 0.5 GB resident.
BACKFILL_QUEUE = 3
#: Bars the store writers hold back before writing them in one append a file (a slab per
#: timeframe, one flush each) instead of one append per engine batch; checkpoints (each
#: item's end) write them first, in the same append as the state. 64k tagged bars (~4 MB):
#: at 16 timeframes a batch of 1s bars closes ~106k bars, so the writes are as before (RSS
#: unchanged); with few or coarse timeframes (4: ~1.2k bars a batch) the writer went from
#: 1.6M to 5.8M rows/s of CPU. Holding more (128k, 256k) cut the 16-timeframe write CPU by
#: 14-30% but raised a year's peak RSS by 45-90 MB: not taken.
COALESCE_ROWS = 1 << 16


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
    def start_ns(self) -> int:
        return int(self.start.timestamp()) * NS

    @property
    def end_ns(self) -> int:
        return int(self.end.timestamp()) * NS

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
        result = ingest_dbn_files(settings, [Path(p) for p in options.from_dbn], out=out, end=options.end)
    else:
        result = backfill_historical(settings, options, out=out)
    if result is None:  # dry run
        return 0
    print_summary(result, settings, out)
    return 0


# ----------------------------------------------------------------------------- what goes in


@dataclass(frozen=True)
class Item:
    """One input to aggregate: an archive file, and per symbol the spans of it that count.

    Only records inside their symbol's spans reach the engine, so an input that overlaps what
    a file already holds adds just the new part (see :mod:`streambars.ledger`)."""

    path: Path | None  # None: nothing to read (an empty span)
    spans: dict[str, tuple[tuple[int, int], ...]]
    source: str  # the ledger's name for it (relative to <store>/<dataset>/raw/), LIVE or EMPTY
    end_known: bool
    label: str
    fetch: bool = False  # Historical: download [start, end) of the one symbol first
    by_symbol: bool = True  # a per-symbol archive file: every record is that symbol's

    @property
    def start(self) -> int:
        return min(a for spans in self.spans.values() for a, _ in spans)

    @property
    def end(self) -> int:
        return max(b for spans in self.spans.values() for _, b in spans)


@dataclass
class FileState:
    """What planning read from a symbol's existing file(s) (nothing for a new symbol).

    ``files``: stored file name -> (progress note, engine state): the symbol's own file, or
    with ``bars.per_publisher`` its ``SYMBOL@VENUE`` files (which all keep the same ledger)."""

    ledger: Ledger = field(default_factory=Ledger)
    files: dict[str, tuple[dict[str, Any], bytes | None]] = field(default_factory=dict)

    def note(self, name: str) -> dict[str, Any]:
        return self.files.get(name, ({}, None))[0]


def _raw_root(settings: Settings, dataset: str) -> Path:
    return Path(settings.store.path) / dataset / "raw"


def _publisher_files(root: Path, dataset: str, symbol: str) -> list[str]:
    """The ``SYMBOL@VENUE`` files a per-publisher store holds for ``symbol``."""
    found = [filename_to_symbol(p.name) for p in store_files(root / dataset)] if (root / dataset).is_dir() else []
    return sorted(n for n in found if PUBLISHER_SEPARATOR in n and base_symbol(n) == symbol)


def read_file_states(
    settings: Settings, writers: StoreWriterSet, dataset: str, symbols: Sequence[str]
) -> dict[str, FileState]:
    """Each symbol's ledger, notes and engine states, from files that exist (none is created).

    Opening an existing file takes its writer lock, so a daemon or another backfill writing it
    is named now, before anything is downloaded or paid for."""
    root = Path(settings.store.path)
    raw = _raw_root(settings, dataset)
    states: dict[str, FileState] = {}
    for symbol in symbols:
        names = _publisher_files(root, dataset, symbol) if settings.bars.per_publisher else [symbol]
        files: dict[str, tuple[dict[str, Any], bytes | None]] = {}
        for name in names:
            w = writers.existing(name)
            if w is not None:
                text = w.read_meta(PROGRESS)
                files[name] = (json.loads(text) if text else {}), w.read_meta(ENGINE_STATE)
        if not files:
            states[symbol] = FileState()
            continue

        def legacy(key: str, n: str = symbol) -> str:
            return str(archive.path(root, dataset, n, key[:7], key).relative_to(raw))

        note = next(iter(files.values()))[0]
        ledger = Ledger.from_note(note, legacy)
        for _, blob in files.values():
            last = int(decode_state(blob)["series"][S_LAST]) if blob else -1
            ledger.engine_mark = max(ledger.engine_mark, last + 1)
        live = dict(note.get("live") or {})
        if "last_ts" in live:
            head = live_archive_head(root, dataset, symbol)
            if head is not None and head <= int(live["last_ts"]):
                # The daemon covered from its first record until the time it proved closed
                # (the wall clock or END_OF_INTERVAL), or at least to its last record.
                last, flushed = int(live["last_ts"]) + 1, int(live.get("flushed_until", 0))
                ledger.live = Span(head, max(last, flushed), LIVE, flushed >= last)
        states[symbol] = FileState(ledger, files)
    return states


def _check_fits(states: dict[str, FileState], writers: StoreWriterSet, settings: Settings) -> None:
    """A file built from one input schema (or trade clock) refuses another: one line naming it."""
    schema, clock = settings.databento.schema, settings.bars.trade_clock
    for fs in states.values():
        for name, (_, blob) in fs.files.items():
            ledger = fs.ledger
            if blob is not None and ledger.schema is None:  # written before the ledger said it
                ledger.schema = _state_schema(blob)
            why = ledger.check_builds(file_path(writers.root, writers.dataset, name), schema, clock)
            if why:
                raise UsageError(why)


def _state_schema(blob: bytes) -> str | None:
    """The input schema an engine state was built from (its input interval says it)."""
    interval = int(decode_state(blob)["layout"][3])
    return {v: k for k, v in INPUT_INTERVAL_NS.items()}.get(interval)


def _rebuild_items(settings: Settings, dataset: str, symbol: str, ledger: Ledger) -> list[Item]:
    """What a rebuild of ``symbol`` reads: every span its ledger holds, from the raw archive."""
    raw = _raw_root(settings, dataset)
    items: list[Item] = []
    for span in ledger.sources():
        spans = {symbol: ((span.start, span.end),)}
        label = f"{span_key(span.start, span.end)} {symbol}"
        if span.source == EMPTY:
            items.append(Item(None, spans, EMPTY, span.end_known, label))
        elif span.source == LIVE:
            for p in sorted(archive.raw_dir(settings.store.path, dataset, symbol).glob("*" + archive.LIVE_SUFFIX)):
                items.append(Item(p, spans, LIVE, False, f"{label} (live)"))
        else:
            p = raw / span.source
            if not p.is_file():
                raise UsageError(
                    f"{file_path(settings.store.path, dataset, symbol)} must be rebuilt to take earlier "
                    f"history, but the raw archive lacks {p} (its records from "
                    f"{_iso(span.start)} to {_iso(span.end)}); restore that file, or backfill into "
                    "a new --store"
                )
            items.append(Item(p, spans, span.source, span.end_known, label,
                              by_symbol=not span.source.startswith(INPUTS_DIR + "/")))
    return items


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- Historical


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
    raw = _raw_root(settings, db.dataset)
    writers = make_writers(settings, db.dataset, db.stype_in, COALESCE_ROWS)
    result = BackfillResult(chunks_total=len(chunks))
    try:
        states = read_file_states(settings, writers, db.dataset, db.symbols)
        _check_fits(states, writers, settings)
        forced: set[str] = set()
        if options.force:  # what this range holds is downloaded and aggregated afresh
            lo, hi = int(start.timestamp()) * NS, int(end.timestamp()) * NS
            for name, fs in states.items():
                keep = [s for s in fs.ledger.spans if not (lo <= s.start and s.end <= hi)]
                if len(keep) != len(fs.ledger.spans):
                    fs.ledger.spans = keep
                    forced.add(name)
        new: dict[str, list[Item]] = {name: [] for name in db.symbols}
        items: list[Item] = []  # months outermost, so every symbol advances together
        for c in chunks:
            parts = states[c.symbol].ledger.missing(c.start_ns, c.end_ns)
            result.chunks_skipped += not parts
            for a, b in parts:
                key = span_key(a, b)
                path = archive.path(root, db.dataset, c.symbol, c.month, key)
                item = Item(path, {c.symbol: ((a, b),)}, str(path.relative_to(raw)), True,
                            f"{key} {c.symbol}", fetch=True)
                new[c.symbol].append(item)
                items.append(item)
        need = [i for i in items if options.force or not i.path.exists()]  # type: ignore[union-attr]
        rebuild = [n for n in db.symbols if new[n] and (n in forced or new[n][0].start < states[n].ledger.frontier())]
        rebuild += [n for n in forced if n not in rebuild]
        print(
            f"plan: {len(chunks)} chunk(s) ({len(db.symbols)} symbol(s) x months), "
            f"{result.chunks_skipped} already in the store, {len(items) - len(need)} from the "
            f"raw archive, {len(need)} to download"
            + (f"; {len(rebuild)} file(s) to rebuild with earlier history: {', '.join(rebuild)}" if rebuild else ""),
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
                db.dataset, sorted({next(iter(i.spans)) for i in need}), db.stype_in, start, end
            )
            if not_found:
                raise UnknownSymbolError(
                    f"{db.dataset} ({db.stype_in}) has no symbol {', '.join(sorted(not_found))} "
                    f"between {start:%Y-%m-%d} and {end:%Y-%m-%d}; check --symbols, --stype-in "
                    "and --dataset",
                    tuple(not_found),
                )
            cost = _cost(client, db, items, need)
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
        fetch = {id(i) for i in need}
        appended = [n for n in db.symbols if new[n] and n not in rebuild]
        run = Runner(settings, db.dataset, db.stype_in, writers, states, client, result)
        if appended:
            run.append([i for i in items if next(iter(i.spans)) in appended], fetch,
                       flush_end=int(end.timestamp()) * NS)
        for name in rebuild:
            ledger = Ledger(schema=states[name].ledger.schema, trade_clock=states[name].ledger.trade_clock,
                            spans=list(states[name].ledger.spans), live=states[name].ledger.live)
            for i in new[name]:
                ledger.add(Span(i.start, i.end, i.source, True))
            run.rebuild(name, ledger, fetch_items={i.source: i for i in new[name] if id(i) in fetch})
    finally:
        writers.close_all()
    return result


def _cost(client: Any, db: Any, items: list[Item], need: list[Item]) -> float:
    """What downloading ``need`` costs: one request for a whole fresh plan, else one per
    span (with that span's missing symbols), so archived or stored spans are not priced again."""
    if len(need) == len(items):
        symbols = list(dict.fromkeys(next(iter(i.spans)) for i in need))
        return client.get_cost(db.dataset, symbols, db.schema, db.stype_in, min(i.start for i in need),
                               max(i.end for i in need))
    by_span: dict[tuple[int, int], list[str]] = {}
    for i in need:
        by_span.setdefault((i.start, i.end), []).append(next(iter(i.spans)))
    return sum(
        client.get_cost(db.dataset, symbols, db.schema, db.stype_in, a, b)
        for (a, b), symbols in by_span.items()
    )


# ----------------------------------------------------------------------------- running


class Runner:
    """Runs items through the pipeline: appended to files as they are, or rebuilt from the
    archive into a new file that then replaces the old one."""

    def __init__(self, settings: Settings, dataset: str, stype: str, writers: StoreWriterSet,
                 states: dict[str, FileState], client: Any, result: BackfillResult):
        self.settings, self.dataset, self.stype = settings, dataset, stype
        self.writers, self.states, self.client, self.result = writers, states, client, result
        self.schema = settings.databento.schema
        self.clock = settings.bars.trade_clock
        self.t0 = time.monotonic()

    def _ledger_note(self, file: str, symbol: str, ledger: Ledger) -> dict[str, Any]:
        ledger.schema = self.schema
        ledger.trade_clock = self.clock if self.schema == "trades" else None
        return ledger.to_note(self.states.get(symbol, FileState()).note(file))

    def _files(self, symbol: str, registry: SeriesRegistry) -> list[str]:
        """The stored files of ``symbol``: itself, or its ``SYMBOL@VENUE`` files seen so far."""
        if not self.settings.bars.per_publisher:
            return [symbol]
        seen = {n for n in registry.names if PUBLISHER_SEPARATOR in n and base_symbol(n) == symbol}
        return sorted(seen | set(self.states.get(symbol, FileState()).files))

    def _checkpoint(self, symbols: Sequence[str], registry: SeriesRegistry,
                    ledgers: dict[str, Ledger]) -> Checkpoint:
        notes = {f: self._ledger_note(f, s, ledgers[s]) for s in symbols for f in self._files(s, registry)}
        return Checkpoint(tuple(notes), notes)

    def append(self, items: list[Item], fetch: set[int], flush_end: int | None) -> None:
        """Aggregate ``items`` onto the files as they stand (the saved engine state goes on)."""
        names = list(dict.fromkeys(n for i in items for n in i.spans))
        registry = SeriesRegistry(names)
        engine = make_engine(self.settings, registry)
        for name in names:
            for file, (_, blob) in self.states.setdefault(name, FileState()).files.items():
                if blob:
                    engine.set_series_state(registry.index(file), decode_state(blob))
        ledgers = {n: self.states[n].ledger for n in names}
        self._run(items, fetch, engine, self.writers, registry, ledgers, flush_end,
                  ResumeFilter(engine, len(registry)))

    def rebuild(self, name: str, ledger: Ledger, fetch_items: dict[str, Item]) -> None:
        """Aggregate every span of ``ledger`` from the archive (downloading the new ones) in
        time order into a new file, then swap it in: one in-order run over the union."""
        items = _rebuild_items_or_fetch(self.settings, self.dataset, name, ledger, fetch_items)
        tmp_root = Path(self.settings.store.path) / self.dataset / f".rebuild-{os.getpid()}"
        _remove_dead_rebuilds(Path(self.settings.store.path) / self.dataset)
        shutil.rmtree(tmp_root, ignore_errors=True)
        registry = SeriesRegistry([name])
        engine = make_engine(self.settings, registry)
        built = Ledger(live=ledger.live)
        tmp_writers = make_writers(replace(self.settings, store=replace(self.settings.store, path=tmp_root)),
                                   self.dataset, self.stype, COALESCE_ROWS)
        log.info("rebuilding with earlier history", symbol=name, spans=len(items))
        try:
            try:
                self._run(items, {id(i) for i in items if i.fetch}, engine, tmp_writers, registry,
                          {name: built}, ledger.known_end(), None)
                files = self._files(name, registry)
                for file in files:
                    tmp_writers.writer(file)  # a file with no bars at all is still rebuilt
            finally:
                tmp_writers.close_all()
            for file in files:
                self.writers.writer(file).replace_contents(file_path(tmp_root, self.dataset, file))
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
        self.states[name].ledger = built

    def _run(self, items: list[Item], fetch: set[int], engine: Aggregator, writers: StoreWriterSet,
             registry: SeriesRegistry, ledgers: dict[str, Ledger], flush_end: int | None,
             resume: ResumeFilter | None) -> None:
        db, result = self.settings.databento, self.result
        progress = Progress(units_total=len(items))
        terminal = TerminalProgress(progress)
        client = self.client

        # The download task runs beside the pipeline (in _run_with_signals' task group), not
        # in a task group inside the source generator: a generator suspended at a yield inside
        # a task group is finalised from another task when the pipeline stops (an error,
        # SIGTERM), and anyio then raises "exit cancel scope in a different task" over the cause.
        ready_send, ready_recv = anyio.create_memory_object_stream[tuple[Item, Path | None]](2)

        async def download() -> None:
            async with ready_send:
                for item in items:
                    path = item.path
                    if id(item) in fetch and client is not None:
                        (symbol, ((a, b),)), = item.spans.items()
                        log.info("downloading", symbol=symbol, span=item.label)
                        try:
                            await anyio.to_thread.run_sync(
                                lambda s=symbol, a=a, b=b, p=path: client.download_month(
                                    db.dataset, s, db.schema, db.stype_in, a, b, p
                                )
                            )
                        except UnknownSymbolError:
                            # Resolved for the range, not for this span (not listed yet, or
                            # expired): nothing there, nothing archived, covered all the same.
                            log.warning("symbol not listed in this span", symbol=symbol, span=item.label)
                            path = None
                        result.chunks_downloaded += 1
                    await ready_send.send((item, path))

        async def source() -> AsyncIterator[PipelineItem]:
            async with ready_recv:
                async for item, path in ready_recv:
                    if path is not None:
                        async for batch in _decode(item, path, registry, self.schema, self.stype,
                                                   self.clock, resume, self.settings.bars.per_publisher):
                            yield batch
                            terminal.update(item.label)
                    for name, spans in item.spans.items():
                        if item.source != LIVE:
                            for a, b in spans:
                                ledgers[name].add(Span(a, b, item.source if path else EMPTY, item.end_known))
                    yield self._checkpoint(list(item.spans), registry, ledgers)
                    progress.units_done += 1
                    log.info("month done", month=item.label, **progress.fields())
                    _give_back_free_memory()
            if flush_end is not None:
                yield FlushUntil(flush_end)
            yield self._checkpoint(list(ledgers), registry, ledgers)

        result.stats.progress = progress
        try:
            _run_with_signals(
                run_pipeline(source(), engine, writers, registry, stats=result.stats, queue_size=BACKFILL_QUEUE),
                download,
            )
        finally:
            terminal.close()
        _collect(engine, result)
        result.seconds = time.monotonic() - self.t0


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


def _rebuild_items_or_fetch(settings: Settings, dataset: str, name: str, ledger: Ledger,
                            fetch_items: dict[str, Item]) -> list[Item]:
    """The rebuild's items: archived spans as they are, spans still to download as fetches."""
    fetched = {src: i for src, i in fetch_items.items()}
    archived = Ledger(spans=[s for s in ledger.spans if s.source not in fetched], live=ledger.live)
    items = _rebuild_items(settings, dataset, name, archived) + list(fetched.values())
    return sorted(items, key=lambda i: i.start)


def _remove_dead_rebuilds(directory: Path) -> None:
    """Rebuild folders of processes that died mid-way (the real file was never touched)."""
    for d in directory.glob(".rebuild-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not archive._pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


async def _decode(
    item: Item, path: Path, registry: SeriesRegistry, schema: str, stype_in: str, clock: str,
    resume: ResumeFilter | None, per_publisher: bool = False,
) -> AsyncIterator[PipelineItem]:
    """Decode one input in bounded batches off the event loop, keeping only the records inside
    their symbol's spans (and, after a restart, past what the engine already holds)."""
    symbol = next(iter(item.spans)) if item.by_symbol else None
    if item.source == LIVE:
        it: Iterator = _live_batches(path, registry, schema, symbol or "", clock)
    else:
        it = dbnfile.iter_batches(path, registry, expected_schema=schema, stype_in=stype_in, symbol=symbol,
                                  trade_clock=clock, per_publisher=per_publisher)
    keep = SpanFilter(item.spans, registry, per_publisher)
    sentinel = object()
    while True:
        batch = await anyio.to_thread.run_sync(next, it, sentinel)
        if batch is sentinel:
            return
        batch = keep(batch)
        if resume is not None:
            batch = resume(batch)
        if len(batch):
            yield batch


def _live_batches(path: Path, registry: SeriesRegistry, schema: str, symbol: str, clock: str) -> Iterator[RecordBatch]:
    """What the daemon archived for ``symbol`` (a cut-off last frame is left out, as on resume)."""
    contents = archive.read_live_file(path)
    dtype = dbnfile.record_dtype(schema, int(contents.metadata.version), bool(contents.metadata.ts_out))
    arr = np.frombuffer(contents.records, dtype=dtype)
    series = np.full(len(arr), registry.index(symbol), np.int32)
    for lo in range(0, len(arr), dbnfile.CHUNK_RECORDS):
        part, ser = arr[lo:lo + dbnfile.CHUNK_RECORDS], series[lo:lo + dbnfile.CHUNK_RECORDS]
        yield (RecordBatch.from_trades(ser, part, clock) if schema == "trades"
               else RecordBatch.from_ohlcv(schema, ser, part))


class SpanFilter:
    """Keeps the records whose time lies in their symbol's spans; drops every other record."""

    def __init__(self, spans: dict[str, tuple[tuple[int, int], ...]], registry: SeriesRegistry,
                 per_publisher: bool = False):
        self.spans, self.registry, self.per_publisher = spans, registry, per_publisher

    def __call__(self, batch: RecordBatch) -> RecordBatch:
        if not len(batch):
            return batch
        names = self.registry.names
        if self.per_publisher:  # SYMBOL@VENUE series take their symbol's spans
            names = [base_symbol(n) for n in names]
        ts = batch.ts_event
        series = batch.series
        first = int(series[0])
        if (series == first).all():
            spans = self.spans.get(names[first], ())
            if len(spans) == 1 and spans[0][0] <= int(ts.min()) and int(ts.max()) < spans[0][1]:
                return batch
        keep = np.zeros(len(batch), bool)
        for s in np.unique(series).tolist():
            mine = series == s
            for a, b in self.spans.get(names[s], ()):
                keep |= mine & (ts >= a) & (ts < b)
        return batch if keep.all() else batch.take(keep)


# ----------------------------------------------------------------------------- DBN files


INPUTS_DIR = "_inputs"


def _file_span(path: Path, schema: str, clock: str) -> tuple[int, int]:
    """(records, one past the last record's time): reads the whole file, which also proves it
    whole (a corrupt or cut-off file is refused here, before anything is written)."""
    n, last = 0, -1
    field_name = clock if schema == "trades" else "ts_event"
    for _, arr in dbnfile.iter_records(path, expected_schema=schema):
        n += len(arr)
        if len(arr):
            last = max(last, int(arr[field_name].max()))
    return n, last + 1


def _keep_input(raw: Path, path: Path) -> str:
    """Copy a DBN file the user gave into the raw archive (compressed, named by its content),
    so a later rebuild can read it again; returns its ledger source."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    stem = path.name.split(".")[0] or "input"
    rel = f"{INPUTS_DIR}/{stem}-{digest.hexdigest()[:16]}.dbn.zst"
    dest = raw / rel
    if dest.is_file():
        return rel
    with open(path, "rb") as src:
        if src.read(4) == b"\x28\xb5\x2f\xfd":
            src.seek(0)
            archive.write_atomic(dest, src)
        else:
            src.seek(0)
            cctx = zstandard.ZstdCompressor(level=3)
            archive.write_atomic(dest, cctx.read_to_iter(src))
    return rel


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


def ingest_dbn_files(
    settings: Settings, paths: list[Path], out: TextIO = sys.stdout, end: str | None = None
) -> BackfillResult:
    """`--from-dbn`: DBN files the user already has; no API key, same pipeline.

    Each file covers ``[Metadata start, end)`` where the end is the Metadata end of a
    compressed file (a zstd frame cut short is detected), else -- a live capture, or a plain
    file that may have been cut at a record boundary -- one past its last record, unless
    ``end`` ('YYYY-MM-DD') declares the inputs complete up to then."""
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
    assert schema is not None
    stype = infos[0].stype_in or settings.databento.stype_in
    settings = replace(settings, databento=replace(settings.databento, dataset=dataset, schema=schema))
    check_timeframes_fit(schema, settings.bars.timeframes)
    declared_end = int(parse_day(end, "end").timestamp()) * NS if end else None
    clock = settings.bars.trade_clock
    spans: list[tuple[dbnfile.DbnInfo, int, int, bool]] = []
    for info in infos:
        _, proven = _file_span(info.path, schema, clock)
        known = info.compressed and info.end_ns is not None
        stop = info.end_ns if known else proven
        if declared_end is not None and declared_end >= stop:
            stop, known = declared_end, True
        spans.append((info, info.start_ns, max(stop, info.start_ns), known))
    spans.sort(key=lambda s: s[1])
    names = list(dict.fromkeys(n for info in infos for n in info.symbols))
    writers = make_writers(settings, dataset, stype, COALESCE_ROWS)
    result = BackfillResult(chunks_total=len(paths))
    raw = _raw_root(settings, dataset)
    try:
        states = read_file_states(settings, writers, dataset, names)
        _check_fits(states, writers, settings)
        print(f"ingesting {len(paths)} DBN file(s): {dataset} {schema}", file=out)
        items: list[Item] = []
        for info, a, b, known in spans:
            parts = {n: tuple(states[n].ledger.missing(a, b)) for n in info.symbols}
            parts = {n: p for n, p in parts.items() if p}
            if not parts:
                log.info("already in the store", path=str(info.path))
                result.chunks_skipped += 1
                continue
            source = _keep_input(raw, info.path)
            items.append(Item(raw / source, parts, source, known, info.path.name, by_symbol=False))
        rebuild = sorted({n for i in items for n, p in i.spans.items()
                          if p[0][0] < states[n].ledger.frontier()})
        if rebuild:
            print(f"{len(rebuild)} file(s) to rebuild with earlier history: {', '.join(rebuild)}", file=out)
        run = Runner(settings, dataset, stype, writers, states, None, result)
        appended = [i for i in items if set(i.spans) - set(rebuild)]
        if appended:
            trimmed = [replace(i, spans={n: p for n, p in i.spans.items() if n not in rebuild}) for i in appended]
            last = max(trimmed, key=lambda i: i.end)
            run.append(trimmed, set(), last.end if last.end_known else None)
        for name in rebuild:
            ledger = states[name].ledger
            ledger = Ledger(spans=list(ledger.spans), schema=ledger.schema, trade_clock=ledger.trade_clock,
                            live=ledger.live)
            for i in items:
                for a, b in i.spans.get(name, ()):
                    ledger.add(Span(a, b, i.source, i.end_known))
            run.rebuild(name, ledger, {})
    finally:
        writers.close_all()
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
            result.violations[name] = result.violations.get(name, 0) + total


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

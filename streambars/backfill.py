"""`streambars backfill`: history into the store, in any order, resume-safe, paid once.

Planning (:func:`plan_backfill`, once, in the process the user started) reads each
symbol's ledger (:mod:`streambars.ledger`) from its file, if the file exists (nothing is
created until the inputs are checked), and keeps only the spans of the requested range the
file has not ingested: only those are priced and downloaded, and the cost guard runs here.
Execution (:func:`execute`) carries out the :class:`Plan` for all its symbols in this
process, or for one symbol per task on a Dask cluster (:mod:`streambars.cluster`); it reads
each ledger again, so a part that is run again does only what is still missing.

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
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import anyio
import numpy as np

from . import archive
from .config import Settings, check_timeframes_fit, load_api_key, stype_hint
from .engine import Aggregator
from .engine.kernel import S_LAST
from .errors import CostLimitError, DamagedInputError, Interrupted, SourceError, UsageError
from .fsio import pid_alive
from .inputs import (
    INPUTS_DIR,
    UNNAMED,
    InputCopy,
    archived_source,
    check_unchanged,
    discard_archived,
    wait_archived,
)
from .ledger import EMPTY, LIVE, Ledger, Span, live_span, span_key
from .observe import Progress, ProgressDisplay, get_logger
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
    settle_session,
    unwrapped,
)
from .records import INPUT_INTERVAL_NS, INPUT_KINDS, RecordBatch, SeriesRegistry
from .rules import RECORD_RULE_NAMES
from .sources import dbnfile
from .sources.dbnfile import PUBLISHER_SEPARATOR, base_symbol
from .sources.historical import UnknownSymbolError
from .store import StoreWriterSet
from .store.layout import file_path, filename_to_symbol, store_files
from .timeutil import NS, inclusive_days, iso, parse_day

log = get_logger("streambars.backfill")
#: The progress amounts a "file done" event would show beside the file's own records as if
#: they were the file's: there they are named as the run's totals (rate, ETA and the like
#: already read as the run's).
_RUN_TOTALS = {"bars": "total_bars", "mb": "total_mb"}

#: Batches (of ~64k records, or of the bars they close) queued between stages: enough to keep
#: both cores busy, small enough that a year-long backfill stays near 0.5 GB resident.
BACKFILL_QUEUE = 3
#: Bars the store writers hold back before writing them in one append a file (a slab per
#: timeframe, one flush each) instead of one append per engine batch; checkpoints (each
#: item's end) write them first, in the same append as the state. 256k tagged bars (~15 MB
#: queued, ~13 MB grouped): at 16 timeframes a batch of 1s bars closes ~106k bars, so a file
#: gets an append every ~2.5 batches; the write stage's CPU per row fell by ~30% against 64k
#: (measured 6.9 -> 10.2M rows/s of append). The ~30 MB it holds are paid for many times
#: over by the backfill no longer importing pandas/pyarrow (~180 MB).
COALESCE_ROWS = 1 << 18
#: The engine's reused output buffer, in bars: room for the ~1.6 bars a record of a decoded
#: chunk (dbnfile.CHUNK_RECORDS), so each chunk's bars go straight into a fresh array that
#: becomes the result (Aggregator.process). With the default 64k a 64k-record chunk took the
#: reused buffer and came out through a growing bytearray: the engine stage cost ~1.6-2x more
#: per record than with 16k-record chunks (measured 69-119 against 36-93 ns with the helpers
#: running, 4 interleaved pairs; best 69 against 36).
ENGINE_OUT_ROWS = 2 * dbnfile.CHUNK_RECORDS + 1024


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


# ----------------------------------------------------------------------------- what goes in


@dataclass(frozen=True)
class Item:
    """One input to aggregate: an archive file, and per symbol the spans of it that count.

    Only records inside their symbol's spans reach the engine, so an input that overlaps what
    a file already holds adds just the new part (see :mod:`streambars.ledger`)."""

    path: Path | None  # None: nothing to read (an empty span), or read_from's copy not named yet
    spans: dict[str, tuple[tuple[int, int], ...]]
    #: the ledger's name for it (relative to <store>/<dataset>/raw/), LIVE or EMPTY; UNNAMED
    #: for a --from-dbn input until its copy is archived under its hash's name (:func:`archived`)
    source: str
    end_known: bool
    label: str
    fetch: bool = False  # Historical: download [start, end) of the one symbol first
    #: --from-dbn: the user's file, read while its archive copy (``path``) is finished
    read_from: Path | None = None
    by_symbol: bool = True  # a per-symbol archive file: every record is that symbol's

    @property
    def start(self) -> int:
        return min(a for spans in self.spans.values() for a, _ in spans)

    @property
    def from_user(self) -> bool:
        """A --from-dbn input (named ``_inputs/...`` in the archive once copied there)."""
        return self.source.startswith(INPUTS_DIR + "/")

    def span(self, start: int, end: int, source: str | None = None) -> Span:
        """A ledger span of this input (``source``: instead of its own, e.g. EMPTY)."""
        source = self.source if source is None else source
        if source == UNNAMED:  # a programming error: the ledger would name no file
            raise RuntimeError(f"{self.label}: its archive copy is not named yet (see backfill.archived)")
        return Span(start, end, source, self.end_known)

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
        if note.get("live"):
            ledger.live = live_span(archive.live_archive_head(root, dataset, symbol), note["live"])
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
                    f"{iso(span.start, 's')} to {iso(span.end, 's')}); restore that file, or backfill into "
                    "a new --store"
                )
            items.append(Item(p, spans, span.source, span.end_known, label,
                              by_symbol=not span.source.startswith(INPUTS_DIR + "/")))
    return items


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """What a backfill will do, decided once by the submitting process (ledgers read, cost
    checked). :func:`execute` carries it out for all its symbols or, on a cluster worker, for
    one (:meth:`for_symbols`); execution re-reads each file, so a retried task skips what an
    earlier attempt already finished. Holds no secret: a worker loads the API key itself."""

    settings: Settings  # effective settings (--from-dbn: the files' dataset and schema)
    dataset: str
    stype: str
    symbols: tuple[str, ...]
    items: tuple[Item, ...]  # in run order (months outermost)
    flush_end: int | None  # appended files: bars ending by then are final
    chunks_total: int = 0
    chunks_skipped: int = 0
    #: --force: spans inside [a, b) are done afresh; an archive file older than
    #: ``planned_at`` is downloaded again (once: a retried task finds it fresh)
    force_range: tuple[int, int] | None = None
    planned_at: float = 0.0
    env_file: str | None = ".env"

    def for_symbols(self, names: Sequence[str]) -> Plan:
        """The part of this plan that concerns ``names`` (a cluster task: one symbol)."""
        keep = set(names)
        items = tuple(replace(i, spans={n: s for n, s in i.spans.items() if n in keep})
                      for i in self.items if keep & set(i.spans))
        return replace(self, symbols=tuple(n for n in self.symbols if n in keep), items=items,
                       chunks_total=0, chunks_skipped=0)  # the whole plan's counts, not a task's


def _stale(item: Item, plan: Plan | None) -> bool:
    """Does ``item`` still need downloading? Missing from the archive, or --force and older
    than the plan (a task retried after a kill does not pay for it twice)."""
    if item.path is None or not item.fetch:
        return False
    try:
        mtime = item.path.stat().st_mtime
    except FileNotFoundError:
        return True
    return plan is not None and plan.force_range is not None and mtime < plan.planned_at


def archived(item: Item, settings: Settings, dataset: str) -> Item:
    """``item`` with its archive copy's path and ledger name: a --from-dbn input is named by
    its content, known only once hashed (beside the run); call after :func:`wait_archived`
    saw its copy archived. Other items are returned as they are."""
    if item.source != UNNAMED or item.read_from is None:
        return item
    rel = archived_source(item.read_from)
    return replace(item, path=_raw_root(settings, dataset) / rel, source=rel)


def plan_backfill(settings: Settings, options: BackfillOptions,
                  out: TextIO = sys.stdout) -> tuple[Plan, Any] | None:
    """Plan and price the whole backfill (``--from-dbn`` or Historical): prints the plan and
    the cost, enforces ``--max-cost``/``--yes``/``--dry-run``. Returns the plan and the
    Historical client it used (None when nothing is downloaded), or None for a dry run."""
    if options.from_dbn:
        return plan_dbn_files(settings, [Path(p) for p in options.from_dbn], out=out, end=options.end), None
    return plan_historical(settings, options, out=out)


# ----------------------------------------------------------------------------- Historical


def plan_historical(settings: Settings, options: BackfillOptions,
                    out: TextIO = sys.stdout) -> tuple[Plan, Any] | None:
    """Historical planning: only spans the files lack are items; only items missing from the
    archive are priced. The cost guard runs here, once, before anything is downloaded."""
    db = settings.databento
    if not db.symbols:
        raise UsageError("no symbols: give --symbols or databento.symbols in the config")
    if not options.start or not options.end:
        raise UsageError("backfill needs --start and --end (or --from-dbn PATH...)")
    start, end = parse_day(options.start, "start"), parse_day(options.end, "end")
    settings = settle_session(settings, db.dataset)
    chunks = plan_chunks(db.symbols, start, end)
    root = settings.store.path
    raw = _raw_root(settings, db.dataset)
    planned_at = time.time()
    writers = make_writers(settings, db.dataset, db.stype_in)
    try:
        states = read_file_states(settings, writers, db.dataset, db.symbols)
        _check_fits(states, writers, settings)
    finally:
        writers.close_all()
    force_range = (int(start.timestamp()) * NS, int(end.timestamp()) * NS) if options.force else None
    forced = _apply_force(states, force_range)
    new: dict[str, list[Item]] = {name: [] for name in db.symbols}
    items: list[Item] = []  # months outermost, so every symbol advances together
    skipped = 0
    for c in chunks:
        parts = states[c.symbol].ledger.missing(c.start_ns, c.end_ns)
        skipped += not parts
        for a, b in parts:
            key = span_key(a, b)
            path = archive.path(root, db.dataset, c.symbol, c.month, key)
            item = Item(path, {c.symbol: ((a, b),)}, str(path.relative_to(raw)), True,
                        f"{key} {c.symbol}", fetch=True)
            new[c.symbol].append(item)
            items.append(item)
    plan = Plan(settings, db.dataset, db.stype_in, tuple(db.symbols), tuple(items),
                int(end.timestamp()) * NS, len(chunks), skipped, force_range, planned_at, options.env_file)
    need = [i for i in items if _stale(i, plan)]
    rebuild = _rebuilds(states, new, forced)
    print(
        f"plan: {len(chunks)} chunk(s) ({len(db.symbols)} symbol(s) x months), "
        f"{skipped} already in the store, {len(items) - len(need)} from the "
        f"raw archive, {len(need)} to download"
        + (f"; {len(rebuild)} file(s) to rebuild with earlier history: {', '.join(rebuild)}" if rebuild else ""),
        file=out,
    )
    print(f"dates: {inclusive_days(start, end, options.end)}", file=out)
    client = None
    if need:
        client = historical_client(settings, options.env_file)
        # Resolve over the whole range first (free): a symbol unknown for the entire range
        # is the user's mistake; one that merely did not trade in some month is not.
        _, not_found = client.resolve_symbols(
            db.dataset, sorted({next(iter(i.spans)) for i in need}), db.stype_in, start, end
        )
        if not_found:
            hint = stype_hint(not_found, db.stype_in) or "check --symbols, --stype-in and --dataset"
            raise UnknownSymbolError(
                f"{db.dataset} ({db.stype_in}) has no symbol {', '.join(sorted(not_found))} "
                f"between {start:%Y-%m-%d} and {end:%Y-%m-%d}; {hint}",
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
    return plan, client


def historical_client(settings: Settings, env_file: str | None) -> Any:
    """A Historical client with the API key from the environment or ``env_file``."""
    from .sources.historical import HistoricalSource

    key = load_api_key(env_file)
    return HistoricalSource(key, gateway=settings.databento.historical_gateway or None)


def _apply_force(states: dict[str, FileState], force_range: tuple[int, int] | None) -> set[str]:
    """--force: forget the spans inside the range, so they are downloaded and aggregated
    afresh; returns the symbols whose ledger lost spans (those files are rebuilt)."""
    forced: set[str] = set()
    if force_range is None:
        return forced
    lo, hi = force_range
    for name, fs in states.items():
        keep = [s for s in fs.ledger.spans if not (lo <= s.start and s.end <= hi)]
        if len(keep) != len(fs.ledger.spans):
            fs.ledger.spans = keep
            forced.add(name)
    return forced


def _rebuilds(states: dict[str, FileState], new: dict[str, list[Item]], forced: set[str]) -> list[str]:
    """Symbols whose new spans reach before what their file holds (or --force): rebuilt."""
    out = []
    for name, its in new.items():
        spans = [a for i in its for a, _ in i.spans.get(name, ())]
        if spans and (name in forced or min(spans) < states[name].ledger.frontier()):
            out.append(name)
    return out + sorted(n for n in forced if n not in out and n in new)


def execute(plan: Plan, *, client: Any = None, hooks: RunHooks | None = None) -> BackfillResult:
    """Carry out ``plan`` (all its symbols, or the one a cluster task was given).

    Each file's ledger is read again first: a task retried after its worker died finds what
    the earlier attempt finished and does only the rest, so the store ends as one run would
    leave it. ``client``: the Historical client planning used; without one, a client is
    made (API key from this process's environment or ``plan.env_file``) only if something
    must be downloaded."""
    settings = plan.settings
    result = BackfillResult(chunks_total=plan.chunks_total, chunks_skipped=plan.chunks_skipped)
    writers = make_writers(settings, plan.dataset, plan.stype, COALESCE_ROWS)
    try:
        states = read_file_states(settings, writers, plan.dataset, plan.symbols)
        _check_fits(states, writers, settings)
        forced = _apply_force(states, plan.force_range)
        new: dict[str, list[Item]] = {n: [] for n in plan.symbols}
        items: list[Item] = []
        for item in plan.items:
            spans = {n: tuple(p for a, b in s for p in states[n].ledger.missing(a, b))
                     for n, s in item.spans.items() if n in states}
            spans = {n: s for n, s in spans.items() if s}
            if not spans:
                continue  # done by an earlier attempt
            item = replace(item, spans=spans)
            items.append(item)
            for n in spans:
                new[n].append(item)
        rebuild = _rebuilds(states, new, forced)

        def make_client() -> Any:
            return client if client is not None else historical_client(settings, plan.env_file)

        run = Runner(settings, plan.dataset, plan.stype, writers, states, make_client, result, plan, hooks)
        appended = {n for n in plan.symbols if new[n] and n not in rebuild}
        if appended:
            run.append([replace(i, spans={n: s for n, s in i.spans.items() if n in appended})
                        for i in items if appended & set(i.spans)], plan.flush_end)
        if rebuild:
            wait_archived()  # a rebuild reads every input back from the archive
        for name in rebuild:
            old = states[name].ledger
            ledger = Ledger(spans=list(old.spans), schema=old.schema, trade_clock=old.trade_clock, live=old.live)
            mine = [archived(replace(i, spans={name: i.spans[name]}), settings, plan.dataset) for i in new[name]]
            for i in mine:
                for a, b in i.spans[name]:
                    ledger.add(i.span(a, b))
            run.rebuild(name, ledger, fetch_items={i.source: i for i in mine if i.fetch})
    finally:
        writers.close_all()
        wait_archived(check=False)  # no input copy outlives the run
    return result


def backfill_historical(
    settings: Settings, options: BackfillOptions, out: TextIO = sys.stdout
) -> BackfillResult | None:
    """Plan, price and run a Historical backfill in this process (None: a dry run)."""
    planned = plan_historical(settings, options, out)
    if planned is None:
        return None
    plan, client = planned
    return execute(plan, client=client)


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
                 states: dict[str, FileState], make_client: Callable[[], Any] | None,
                 result: BackfillResult, plan: Plan | None = None, hooks: RunHooks | None = None):
        self.settings, self.dataset, self.stype = settings, dataset, stype
        self.writers, self.states, self.result, self.plan = writers, states, result, plan
        self.make_client, self._client = make_client, None
        self.hooks = hooks or RunHooks()
        self.units_done = 0
        self.schema = settings.databento.schema
        self.clock = settings.bars.trade_clock
        self.t0 = time.monotonic()

    def client(self) -> Any:
        """The Historical client, made at the first download (a run from the archive alone
        needs no API key)."""
        if self._client is None and self.make_client is not None:
            self._client = self.make_client()
        return self._client

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

    def append(self, items: list[Item], flush_end: int | None) -> None:
        """Aggregate ``items`` onto the files as they stand (the saved engine state goes on)."""
        names = list(dict.fromkeys(n for i in items for n in i.spans))
        registry = SeriesRegistry(names)
        engine = make_engine(self.settings, registry, out_capacity=ENGINE_OUT_ROWS)
        for name in names:
            for file, (_, blob) in self.states.setdefault(name, FileState()).files.items():
                if blob:
                    engine.set_series_state(registry.index(file), decode_state(blob))
        ledgers = {n: self.states[n].ledger for n in names}
        self._run(items, engine, self.writers, registry, ledgers, flush_end,
                  ResumeFilter(engine, len(registry)))

    def rebuild(self, name: str, ledger: Ledger, fetch_items: dict[str, Item]) -> None:
        """Aggregate every span of ``ledger`` from the archive (downloading the new ones) in
        time order into a new file, then swap it in: one in-order run over the union."""
        items = _rebuild_items_or_fetch(self.settings, self.dataset, name, ledger, fetch_items)
        _remove_dead_rebuilds(Path(self.settings.store.path) / self.dataset)
        tmp_root = _rebuild_dir(Path(self.settings.store.path) / self.dataset)
        registry = SeriesRegistry([name])
        engine = make_engine(self.settings, registry, out_capacity=ENGINE_OUT_ROWS)
        built = Ledger(live=ledger.live)
        tmp_writers = make_writers(replace(self.settings, store=replace(self.settings.store, path=tmp_root)),
                                   self.dataset, self.stype, COALESCE_ROWS)
        log.info("rebuilding with earlier history", symbol=name, spans=len(items))
        try:
            try:
                self._run(items, engine, tmp_writers, registry, {name: built}, ledger.known_end(), None)
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

    def _run(self, items: list[Item], engine: Aggregator, writers: StoreWriterSet,
             registry: SeriesRegistry, ledgers: dict[str, Ledger], flush_end: int | None,
             resume: ResumeFilter | None) -> None:
        db, result = self.settings.databento, self.result
        sizes = [_input_size(i, self.plan) for i in items]
        progress = Progress(units_total=len(items), units_noun="chunks" if any(i.by_symbol for i in items) else "files",
                            input_total=sum(sizes) if None not in sizes else None)  # type: ignore[arg-type]
        display = ProgressDisplay(progress, self.hooks.what, show=self.hooks.terminal)
        hooks = self.hooks

        records_done = [0]

        def item_done(item: Item, records: int) -> None:
            """Once the item's checkpoint is saved (a rerun will not redo it). Its records are
            counted as the source sends them: the pipeline's live count lags a finished input
            by the batches still queued, and runs ahead of it by the next input's batches the
            engine took while the writer saved this one."""
            progress.units_done += 1
            self.units_done += 1
            records_done[0] += records
            what = "month" if item.by_symbol else "file"
            # The file's own records; every other figure is the run's so far, and named so.
            run = {_RUN_TOTALS.get(k, k): v for k, v in progress.fields().items() if k != progress.noun}
            log.info(f"{what} done", **{what: item.label, "records": records, **run,
                                        "total_records": records_done[0]})
            if hooks.on_progress is not None:
                hooks.on_progress(item.label, result, self.units_done)

        # The download task runs beside the pipeline (in _run_with_signals' task group), not
        # in a task group inside the source generator: a generator suspended at a yield inside
        # a task group is finalised from another task when the pipeline stops (an error,
        # SIGTERM), and anyio then raises "exit cancel scope in a different task" over the cause.
        ready_send, ready_recv = anyio.create_memory_object_stream[tuple[Item, Path | None]](2)

        async def download() -> None:
            async with ready_send:
                for item in items:
                    path = item.read_from or item.path
                    if _stale(item, self.plan):
                        (symbol, ((a, b),)), = item.spans.items()
                        log.info("downloading", symbol=symbol, span=item.label)
                        try:
                            client = await anyio.to_thread.run_sync(self.client)
                            await anyio.to_thread.run_sync(
                                lambda s=symbol, a=a, b=b, p=path, c=client: c.download_month(
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
                done = 0
                async for item, path in ready_recv:
                    size, done = sizes[done], done + 1
                    base, records = progress.input_bytes, 0

                    def consumed(n: int, base: int = base) -> None:
                        progress.input_bytes = base + n

                    display.update(item.label)
                    if path is not None:
                        async for batch in _decode(item, path, registry, self.schema, self.stype, self.clock,
                                                   resume, self.settings.bars.per_publisher, consumed):
                            records += len(batch)
                            yield batch
                    progress.input_bytes = base + (size or 0)
                    if item.read_from is not None:  # its source is named only once archived
                        await anyio.to_thread.run_sync(wait_archived, [item.read_from])
                        check_unchanged(item.read_from)  # read beside that copy: the same file?
                        item = archived(item, self.settings, self.dataset)
                    for name, spans in item.spans.items():
                        if item.source != LIVE:
                            for a, b in spans:
                                ledgers[name].add(item.span(a, b, None if path else EMPTY))
                    checkpoint = self._checkpoint(list(item.spans), registry, ledgers)
                    checkpoint.on_saved = lambda item=item, records=records: item_done(item, records)
                    yield checkpoint
                    _give_back_free_memory()
            if flush_end is not None:
                yield FlushUntil(flush_end)
            yield self._checkpoint(list(ledgers), registry, ledgers)

        result.stats.progress = progress
        _tune_c_heap()
        with display:  # stops rich's refresh thread however the run ends
            _run_with_signals(
                run_pipeline(source(), engine, writers, registry, stats=result.stats, queue_size=BACKFILL_QUEUE),
                download,
                should_stop=hooks.should_stop,
            )
        _collect(engine, result)
        result.seconds = time.monotonic() - self.t0


def _input_size(item: Item, plan: Plan | None) -> int | None:
    """Bytes the item's input file holds (0: nothing to read), None when not known yet (it is
    still to be downloaded): a run's ETA is by input bytes only when every size is known."""
    if item.path is None and item.read_from is None:
        return 0
    if _stale(item, plan):
        return None
    try:
        return (item.read_from or item.path).stat().st_size
    except OSError:
        return None


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

#: glibc mallopt parameters (malloc.h); backfill keeps 32 MiB freed for reuse, one arena.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_KEEP_FREED = 32 << 20


def _tune_c_heap() -> None:
    """How the C heap serves the pipeline's big per-batch arrays (the engine's ~8 MB output,
    decode's columns, freed a batch later, often by another thread):

    * from memory freed a batch ago, not fresh ``mmap`` pages: with glibc's defaults each
      was mapped, zero-filled page by page and unmapped again, a third of the engine stage's
      CPU (0.113 -> 0.076 s a month of 1s bars, alone); up to 32 MiB freed at the heap's top
      is kept for reuse, the monthly :func:`_give_back_free_memory` returns the rest;
    * from one arena: glibc gives each thread that allocates its own (the pipeline's worker
      threads: several), each keeping its own freed memory: a year of 1s bars in one input
      peaked at 388 MB, 337 MB with one (the stages allocate a few large blocks a batch, so
      sharing one lock costs nothing measurable).

    A no-op without glibc."""
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _KEEP_FREED)
    mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED)
    mallopt(_M_ARENA_MAX, 1)


def _rebuild_items_or_fetch(settings: Settings, dataset: str, name: str, ledger: Ledger,
                            fetch_items: dict[str, Item]) -> list[Item]:
    """The rebuild's items: archived spans as they are, spans still to download as fetches."""
    archived = Ledger(spans=[s for s in ledger.spans if s.source not in fetch_items], live=ledger.live)
    items = _rebuild_items(settings, dataset, name, archived) + list(fetch_items.values())
    return sorted(items, key=lambda i: i.start)


def _rebuild_dir(directory: Path) -> Path:
    """A fresh folder for one rebuild, named by host and pid (several workers, on several
    machines, may rebuild different symbols of one store at once; none may take another's)."""
    d = directory / f".rebuild-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    return d


#: This machine in rebuild folder names (no '-': the name splits on it).
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:10]


def _remove_dead_rebuilds(directory: Path) -> None:
    """Rebuild folders of processes that died mid-way (the real file was never touched).
    Only this machine's: a pid says nothing about a process on another host."""
    for d in directory.glob(".rebuild-*"):
        parts = d.name.split("-")  # .rebuild, host, pid, token (or .rebuild, pid: before hosts)
        host, pid = (parts[1], parts[2]) if len(parts) == 4 else (_HOST, parts[-1])
        if host == _HOST and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


async def _decode(
    item: Item, path: Path, registry: SeriesRegistry, schema: str, stype_in: str, clock: str,
    resume: ResumeFilter | None, per_publisher: bool = False, position: Callable[[int], None] | None = None,
) -> AsyncIterator[PipelineItem]:
    """Decode one input in bounded batches off the event loop, keeping only the records inside
    their symbol's spans (and, after a restart, past what the engine already holds);
    ``position`` is told the bytes of the input read so far (progress)."""
    symbol = next(iter(item.spans)) if item.by_symbol else None
    if item.source == LIVE:
        it: Iterator = _live_batches(path, registry, schema, symbol or "", clock)
    else:
        it = dbnfile.iter_batches(path, registry, expected_schema=schema, stype_in=stype_in, symbol=symbol,
                                  trade_clock=clock, per_publisher=per_publisher, position=position)
    keep = SpanFilter(item.spans, registry, per_publisher)
    sentinel = object()
    while True:
        try:
            batch = await anyio.to_thread.run_sync(next, it, sentinel)
        except SourceError as e:
            if type(e) is not SourceError or not item.from_user:
                raise
            if item.read_from is not None:  # its copy is not kept: nothing will name it
                await anyio.to_thread.run_sync(discard_archived, item.read_from)
                copy = ""
            else:  # a cluster worker reads the archive copy: its submitter removes it
                copy = str(item.path)
            # a --from-dbn file is checked as it is decoded here: name the user's file too
            raise DamagedInputError(f"{e} (input {item.label})", archive_copy=copy) from None
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
    """`--from-dbn` in this process: plan, then run."""
    return execute(plan_dbn_files(settings, paths, out=out, end=end))


def plan_dbn_files(
    settings: Settings, paths: list[Path], out: TextIO = sys.stdout, end: str | None = None
) -> Plan:
    """`--from-dbn`: DBN files the user already has; no API key, same pipeline. Each file is
    copied into the raw archive here, so workers need to see only the store.

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
    settings = settle_session(settings, dataset)  # the files' dataset, not the configured one
    check_timeframes_fit(schema, settings.bars.timeframes)
    declared_end = int(parse_day(end, "end").timestamp()) * NS if end else None
    clock = settings.bars.trade_clock
    raw = _raw_root(settings, dataset)
    # A file is read here only when its end must be proven (decoded, hashed and copied in
    # that one read); a compressed file with a Metadata end is hashed and copied beside the
    # run, and checked record by record as the pipeline decodes it: damage stops the run
    # before that input's checkpoint, so no ledger counts it
    spans: list[tuple[dbnfile.DbnInfo, int, int, bool]] = []
    inputs: dict[Path, InputCopy] = {}
    try:
        for info in infos:
            known = info.compressed and info.end_ns is not None
            got = inputs[info.path] = InputCopy.read(raw, info, schema, clock, scan=not known)
            stop = info.end_ns if known else got.proven_end
            assert stop is not None
            if declared_end is not None and declared_end >= stop:
                stop, known = declared_end, True
            spans.append((info, info.start_ns, max(stop, info.start_ns), known))
        spans.sort(key=lambda s: s[1])
        return _plan_inputs(settings, paths, infos, stype, spans, inputs, out)
    finally:
        for got in inputs.values():
            got.drop()  # the ones not kept


def _plan_inputs(settings: Settings, paths: list[Path], infos: list[dbnfile.DbnInfo], stype: str,
                 spans: list[tuple[dbnfile.DbnInfo, int, int, bool]], inputs: dict[Path, InputCopy],
                 out: TextIO) -> Plan:
    """The --from-dbn plan once every file is read: what each symbol's file lacks."""
    dataset, schema = settings.databento.dataset, settings.databento.schema
    names = list(dict.fromkeys(n for info in infos for n in info.symbols))
    writers = make_writers(settings, dataset, stype)
    raw = _raw_root(settings, dataset)
    try:
        states = read_file_states(settings, writers, dataset, names)
        _check_fits(states, writers, settings)
    finally:
        writers.close_all()
    print(f"ingesting {len(paths)} DBN file(s): {dataset} {schema}", file=out)
    items: list[Item] = []
    skipped = 0
    for info, a, b, known in spans:
        parts = {n: tuple(states[n].ledger.missing(a, b)) for n in info.symbols}
        parts = {n: p for n, p in parts.items() if p}
        if not parts:
            log.info("already in the store", path=str(info.path))
            skipped += 1
            continue
        inputs[info.path].keep(raw)  # finished (and named) beside the run: see streambars.inputs
        items.append(Item(None, parts, UNNAMED, known, info.path.name, by_symbol=False, read_from=info.path))
    new = {n: [i for i in items if n in i.spans] for n in names}
    rebuild = _rebuilds(states, new, set())
    if rebuild:
        print(f"{len(rebuild)} file(s) to rebuild with earlier history: {', '.join(rebuild)}", file=out)
    # Appended files are flushed to where the last of their inputs is known to end.
    trimmed = [i for i in (replace(i, spans={n: p for n, p in i.spans.items() if n not in rebuild})
                           for i in items) if i.spans]
    last = max(trimmed, key=lambda i: i.end) if trimmed else None
    flush_end = last.end if last is not None and last.end_known else None
    return Plan(settings, dataset, stype, tuple(names), tuple(items), flush_end, len(paths), skipped)


class StopRequested(Exception):
    """A run's ``should_stop`` said stop (a cluster's Ctrl-C): what was flushed is kept."""


@dataclass
class RunHooks:
    """How a caller watches and stops a run (a cluster task: progress events, a stop flag)."""

    #: after each item: (its label, the result so far, items done so far)
    on_progress: Callable[[str, BackfillResult, int], None] | None = None
    #: polled about twice a second; True stops the run like SIGTERM does
    should_stop: Callable[[], bool] | None = None
    #: draw the progress line on a terminal (a worker leaves that to the submitter)
    terminal: bool = True
    #: what the progress bar and ``progress`` events call the run
    what: str = "backfill"


def _run_with_signals(coro: Any, *background: Callable[[], Awaitable[None]],
                      should_stop: Callable[[], bool] | None = None) -> None:
    """Run the pipeline (and ``background`` tasks beside it); SIGTERM and SIGINT stop it the
    same way: cancel, keep what was flushed, then raise :class:`~streambars.errors.Interrupted`
    (the CLI exits 130).

    Plain ``signal.signal`` handlers (not anyio's receiver) for the whole run, restored
    after: asyncio's ``remove_signal_handler`` resets SIGTERM to SIG_DFL, so a signal landing
    while the loop shuts down would kill the process; and a KeyboardInterrupt raised inside
    the event loop comes out as an anyio RuntimeError with a long traceback. Off the main
    thread (a Dask worker's task) signals belong to the worker; ``should_stop`` is the way to
    stop there (raises :class:`StopRequested`)."""
    stopped: list[str] = []
    requested: list[bool] = []
    cancel: list[Any] = []

    def on_signal(signum: int, frame: Any) -> None:
        # No logging here: the signal may land inside a write to stderr, and a second write
        # from the handler on the same thread deadlocks on the stream's lock (seen).
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

            async def poll() -> None:
                assert should_stop is not None
                while not await anyio.to_thread.run_sync(should_stop):
                    await anyio.sleep(0.5)
                log.warning("stop requested: stopping; the month in progress is redone next time")
                requested.append(True)
                tg.cancel_scope.cancel()

            for task in background:
                tg.start_soon(task)
            if should_stop is not None:
                tg.start_soon(poll)
            await coro
            tg.cancel_scope.cancel()  # the pipeline is done: nothing in the background matters
        cancel.clear()

    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        anyio.run(main)
    finally:
        cancel.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        log.warning("stopping; the month in progress is redone next time", signal=stopped[0])
        raise Interrupted(stopped[0])
    if requested:
        raise StopRequested()


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


def print_summary(result: BackfillResult, out: TextIO) -> None:
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

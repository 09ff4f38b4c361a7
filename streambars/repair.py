"""`streambars repair FILE`: rebuild a store file from the raw archive.

A damaged file (truncated, a checksum failing, rows at impossible times: something other than
streambars changed it) is refused by every writer and left as it is. The raw archive holds
every input the file was built from, so the file can be built again: exactly what a rebuild
after earlier history does (:meth:`streambars.backfill.Runner.rebuild`), from the ledger.

The ledger and the file's contract (timeframes, session, stype) are read from the damaged
file when they still can be; otherwise the ledger is put together from the archive itself
(Historical pieces by their names, DBN inputs kept under ``_inputs/`` by their Metadata, the
daemon's live files by their first and last record) and the contract comes from the
configuration. The damaged file is kept beside the new one as ``<name>.h5.damaged-<UTC>``
(readers do not list it) for whoever wants to look at it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from . import archive
from .archive import live_archive_head, live_archive_tail
from .backfill import (
    BackfillResult,
    FileState,
    RunHooks,
    Runner,
    print_summary,
)
from .config import Settings
from .errors import UsageError
from .inputs import INPUTS_DIR, file_span
from .ledger import LIVE, Ledger, Span, key_span, live_span, subtract
from .observe import get_logger
from .pipeline import make_writers, settle_session
from .sources import dbnfile
from .store.layout import SUFFIX, filename_to_symbol
from .store.lock import FileLock
from .store.salvage import salvage
from .timeframes import Session, parse_timeframes

log = get_logger("streambars.repair")


@dataclass
class RepairPlan:
    path: Path
    root: Path
    dataset: str
    symbol: str
    ledger: Ledger
    settings: Settings
    stype: str
    from_file: bool  # the ledger and contract were read from the damaged file itself


def plan_repair(settings: Settings, path: Path) -> RepairPlan:
    """Where the file lives, what built it and which archive spans rebuild it."""
    path = Path(path).resolve()
    if not path.name.endswith(SUFFIX) or path.name.startswith("."):
        raise UsageError(f"repair {path}: not a store file (<store>/<dataset>/<symbol>.h5)")
    dataset, root = path.parent.name, path.parent.parent
    if not (root / dataset / "raw").is_dir() and not path.is_file():
        raise UsageError(f"repair {path}: no such store file and no raw archive beside it")
    symbol = filename_to_symbol(path.name)
    found = salvage(path) if path.is_file() else None
    stype = settings.databento.stype_in
    bars = settings.bars
    if found is not None:
        stype = found.stype or stype
        if found.timeframes:
            bars = replace(bars, timeframes=parse_timeframes(found.timeframes))
        if found.session:
            bars = replace(bars, session=Session.parse(found.session))
    note = found.progress if found is not None else None
    clock = settings.bars.trade_clock
    ledger = Ledger.from_note(note) if note and note.get("coverage") else from_archive(root, dataset, symbol, clock)
    if note and note.get("live"):
        ledger.live = live_span(live_archive_head(root, dataset, symbol), note["live"])
    schema = ledger.schema or _archive_schema(root, dataset, symbol, ledger)
    if not ledger.sources():
        raise UsageError(f"repair {path}: the raw archive holds nothing for {symbol} in {dataset}; "
                         "backfill it again instead")
    settings = replace(
        settings,
        store=replace(settings.store, path=root),
        bars=bars,
        databento=replace(settings.databento, dataset=dataset, stype_in=stype, schema=schema or settings.databento.schema),
        # The damaged file's own session stands; without it, the file's dataset decides.
        session_pending=settings.session_pending and not (found is not None and found.session),
    )
    settings = settle_session(settings, dataset)
    return RepairPlan(path, root, dataset, symbol, ledger, settings, stype, note is not None)


def from_archive(root: Path, dataset: str, symbol: str, trade_clock: str = "ts_recv") -> Ledger:
    """A ledger put together from what the raw archive holds for ``symbol``."""
    raw = root / dataset / "raw"
    ledger = Ledger()
    d = archive.raw_dir(root, dataset, symbol)
    for p in sorted(d.glob("*" + archive.SUFFIX)) if d.is_dir() else []:
        if p.name.endswith(archive.LIVE_SUFFIX):
            continue
        stem = p.name[: -len(archive.SUFFIX)]
        try:
            a, b = key_span(stem.replace("_", "/", 1))
        except ValueError:
            continue
        ledger.add(Span(a, b, str(p.relative_to(raw)), True))
    inputs = raw / INPUTS_DIR
    for p in sorted(inputs.glob("*" + archive.SUFFIX)) if inputs.is_dir() else []:
        info = dbnfile.describe(p)
        if symbol not in info.symbols:
            continue
        # one past its last record on the clock that bins it (ts_recv for trades by default)
        end = info.end_ns if info.end_ns is not None else file_span(p, str(info.schema), trade_clock)[1]
        for a, b in subtract(info.start_ns, end, ledger.covered()):
            ledger.add(Span(a, b, str(p.relative_to(raw)), info.end_ns is not None))
    head, tail = live_archive_head(root, dataset, symbol), live_archive_tail(root, dataset, symbol)
    if head is not None and tail is not None:
        ledger.live = Span(head, tail[0] + 1, LIVE, False)
    return ledger


def _archive_schema(root: Path, dataset: str, symbol: str, ledger: Ledger) -> str | None:
    raw = root / dataset / "raw"
    for span in ledger.spans:
        if span.source:
            return dbnfile.describe(raw / span.source).schema
    return None


def repair_file(settings: Settings, path: str | os.PathLike[str], out: TextIO = sys.stdout) -> int:
    """The command: set the damaged file aside, rebuild it from the archive, summarise."""
    plan = plan_repair(settings, Path(path))
    print(f"repair {plan.path}: {len(plan.ledger.sources())} span(s) from the raw archive "
          f"({'ledger read from the file' if plan.from_file else 'ledger put together from the archive'})",
          file=out)
    lock = FileLock(plan.path, owner="repair")
    lock.acquire(purpose="repair")
    aside = None
    try:
        if plan.path.exists():
            aside = plan.path.with_name(f"{plan.path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
            os.replace(plan.path, aside)
    finally:
        lock.release()
    writers = make_writers(plan.settings, plan.dataset, plan.stype)
    result = BackfillResult(chunks_total=len(plan.ledger.sources()))
    try:
        states = {plan.symbol: FileState(plan.ledger)}
        Runner(plan.settings, plan.dataset, plan.stype, writers, states, None, result,
               hooks=RunHooks(what="repair")).rebuild(plan.symbol, plan.ledger, {})
    except BaseException:
        writers.close_all()
        if aside is not None and not plan.path.exists():
            os.replace(aside, plan.path)  # nothing was built: the damaged file goes back as it was
        raise
    writers.close_all()
    if aside is not None:
        print(f"the damaged file is kept as {aside}", file=out)
    print_summary(result, out)
    return 0


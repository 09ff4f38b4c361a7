"""What a store file has ingested: time spans per input, so history can arrive in any order.

A file's high-water marks say how far its bars reach, not what went into them. The ledger
says which time ranges of input were aggregated and where those inputs are kept in the raw
archive. It is what lets the store take history in any order with each input counted once:

* **Overlap is decided by coverage, not by record identity.** An input adds only the parts of
  its time range that no earlier input covered. Venues send identical trades (same time,
  price, size, even sequence number) in one match event, so comparing records would drop real
  trades; comparing time ranges never does. Two inputs covering the same hour: the first one
  ingested keeps the hour, the second adds nothing there.
* **Before, between or after.** New spans that all start at or after the file's *frontier*
  (the end of everything it holds) are appended: the saved engine state continues. Anything
  earlier means the file is *rebuilt*: every span, old and new, is read back from the raw
  archive in time order through a fresh engine into a new file that then replaces the old
  one atomically -- exactly one in-order run over the union.
* **A known end.** A span's end is known when the input says where it stops (a Historical
  request's end, a compressed DBN file's Metadata end); otherwise (a live capture, a plain
  DBN file that may have been cut at a record boundary) the span ends just after its last
  record and bars it cannot prove closed stay open in the saved engine state.

The ledger lives in the file's ``progress`` meta blob as JSON (``coverage``, ``schema``,
``trade_clock``), beside the daemon's ``live`` note. Files written before the ledger existed
are read through their ``done`` month keys (backfill) and ``live`` note (daemon).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .timeutil import NS

#: ``Span.source`` of what the daemon received (the ``*.live.dbn.zst`` files of the symbol).
LIVE = "live"
#: ``Span.source`` of a Historical request that returned nothing (a month a symbol was not listed).
EMPTY = ""


@dataclass(frozen=True, order=True)
class Span:
    """``[start, end)`` ns of input that was aggregated, and where its records are kept.

    ``source``: a path relative to ``<store>/<dataset>/raw/`` (a Historical piece, or a DBN file
    the user gave, kept under ``_inputs/``), :data:`LIVE`, or :data:`EMPTY` (nothing there).
    ``end_known``: the input said where it ends (else ``end`` is one past its last record).
    """

    start: int
    end: int
    source: str = EMPTY
    end_known: bool = True

    def to_json(self) -> list[Any]:
        return [self.start, self.end, self.source, int(self.end_known)]

    @classmethod
    def from_json(cls, row: Sequence[Any]) -> Span:
        return cls(int(row[0]), int(row[1]), str(row[2]), bool(row[3]) if len(row) > 3 else True)


def subtract(start: int, end: int, covered: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``[start, end)`` that no ``[a, b)`` of ``covered`` overlaps, in order."""
    out: list[tuple[int, int]] = []
    cursor = start
    for a, b in sorted(covered):
        if b <= cursor or a >= end:
            continue
        if a > cursor:
            out.append((cursor, min(a, end)))
        cursor = max(cursor, b)
        if cursor >= end:
            break
    if cursor < end:
        out.append((cursor, end))
    return out


@dataclass
class Ledger:
    """One file's coverage plus what built it (input schema and trade clock)."""

    spans: list[Span] = field(default_factory=list)
    schema: str | None = None
    trade_clock: str | None = None
    #: the daemon's span, derived from its ``live`` note and archive (never stored here)
    live: Span | None = None
    #: engine state's last accepted ts + 1 (files from before the ledger: their only frontier)
    engine_mark: int = 0

    @classmethod
    def from_note(cls, note: dict[str, Any] | None, legacy_month_source=None) -> Ledger:
        """Read the ledger out of a ``progress`` note (``{}`` for a new file).

        ``legacy_month_source(key) -> str``: the archive source of an old ``done`` month key
        ('YYYY-MM' or 'YYYY-MM-DD/YYYY-MM-DD'), for files written before the ledger."""
        note = note or {}
        spans = [Span.from_json(r) for r in note.get("coverage", [])]
        if not spans and note.get("done"):
            for key in note["done"]:
                a, b = key_span(key)
                spans.append(Span(a, b, legacy_month_source(key) if legacy_month_source else EMPTY))
        return cls(sorted(spans), note.get("schema"), note.get("trade_clock"))

    def to_note(self, note: dict[str, Any] | None = None) -> dict[str, Any]:
        """``note`` (other keys kept, e.g. the daemon's ``live``) with this ledger in it."""
        out = {k: v for k, v in (note or {}).items() if k not in ("done", "coverage", "schema", "trade_clock")}
        out["coverage"] = [s.to_json() for s in _merged(self.spans)]
        if self.schema:
            out["schema"] = self.schema
        if self.trade_clock:
            out["trade_clock"] = self.trade_clock
        return out

    # -- questions ---------------------------------------------------------------------

    def covered(self) -> list[tuple[int, int]]:
        """Every covered ``[a, b)``, the daemon's span included."""
        out = [(s.start, s.end) for s in self.spans]
        if self.live is not None:
            out.append((self.live.start, self.live.end))
        return sorted(out)

    def frontier(self) -> int:
        """Where the file's input ends: new input from here on is appended, earlier is merged."""
        ends = [b for _, b in self.covered()]
        return max([*ends, self.engine_mark], default=0)

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` this file has not ingested."""
        return subtract(start, end, self.covered())

    def sources(self) -> list[Span]:
        """Every span in time order, the daemon's cut to what Historical/DBN spans leave free
        (those are complete; the daemon may have missed records around a reconnect)."""
        out = list(self.spans)
        if self.live is not None:
            for a, b in subtract(self.live.start, self.live.end, [(s.start, s.end) for s in self.spans]):
                out.append(Span(a, b, LIVE, self.live.end_known and b == self.live.end))
        return sorted(out)

    def known_end(self) -> int | None:
        """Where the last input is known to end (bars ending by then are final), or None when
        the latest input's end is unknown."""
        src = self.sources()
        if not src:
            return None
        last = max(src, key=lambda s: s.end)
        return last.end if last.end_known else None

    def add(self, span: Span) -> None:
        self.spans = sorted([*self.spans, span])

    def check_builds(self, path: object, schema: str, trade_clock: str) -> str | None:
        """Why this file cannot take input of ``schema`` with ``trade_clock`` (None: it can)."""
        if self.schema and self.schema != schema:
            return (f"{path} was built from {self.schema} records; this input is {schema}. Bars from "
                    f"different input schemas do not mix: use another --store, or --schema {self.schema}")
        if schema == "trades" and self.trade_clock and self.trade_clock != trade_clock:
            return (f"{path} was built from trades binned by {self.trade_clock}; this run bins by "
                    f"{trade_clock}. Set bars.trade_clock = \"{self.trade_clock}\" or use another --store")
        return None


def live_span(head: int | None, live_note: dict[str, Any] | None) -> Span | None:
    """The daemon's span from its first archived record (``head``) and its ``live`` note: until
    the time it proved closed (the wall clock or END_OF_INTERVAL), or at least one past its
    last record (then with no known end)."""
    live = live_note or {}
    if head is None or "last_ts" not in live or head > int(live["last_ts"]):
        return None
    last, flushed = int(live["last_ts"]) + 1, int(live.get("flushed_until", 0))
    return Span(head, max(last, flushed), LIVE, flushed >= last)


def _merged(spans: Sequence[Span]) -> list[Span]:
    """Adjacent spans of one source and the same end-knowledge joined (a shorter ledger)."""
    out: list[Span] = []
    for s in sorted(spans):
        if out and out[-1].end == s.start and out[-1].source == s.source and s.source != EMPTY \
                and out[-1].end_known == s.end_known:
            out[-1] = Span(out[-1].start, s.end, s.source, s.end_known)
        else:
            out.append(s)
    return out


# ----------------------------------------------------------------------------- keys


def stamp(ns: int) -> str:
    """A time as an archive file name part: 'YYYY-MM-DD' at midnight UTC, else
    'YYYY-MM-DDTHH-MM-SS' (+ '.nnnnnnnnn' below the second)."""
    secs, frac = divmod(int(ns), NS)
    t = datetime.fromtimestamp(secs, UTC)
    if not frac and not (t.hour or t.minute or t.second):
        return f"{t:%Y-%m-%d}"
    return f"{t:%Y-%m-%dT%H-%M-%S}" + (f".{frac:09d}" if frac else "")


def parse_stamp(text: str) -> int:
    """The inverse of :func:`stamp`."""
    head, _, frac = text.partition(".")
    fmt = "%Y-%m-%dT%H-%M-%S" if "T" in head else "%Y-%m-%d"
    t = datetime.strptime(head, fmt).replace(tzinfo=UTC)
    return int(t.timestamp()) * NS + (int(frac.ljust(9, "0")) if frac else 0)


def span_key(start: int, end: int) -> str:
    """'YYYY-MM' for a whole UTC month, else 'start/end' stamps (see :func:`stamp`)."""
    a = datetime.fromtimestamp(start // NS, UTC)
    if start % NS == 0 and a.day == 1 and not (a.hour or a.minute or a.second):
        nxt = datetime(a.year + (a.month == 12), a.month % 12 + 1, 1, tzinfo=UTC)
        if end == int(nxt.timestamp()) * NS:
            return f"{a:%Y-%m}"
    return f"{stamp(start)}/{stamp(end)}"


def key_span(key: str) -> tuple[int, int]:
    """The ``[start, end)`` ns a :func:`span_key` (or an old 'YYYY-MM-DD/YYYY-MM-DD') names."""
    if "/" in key:
        a, b = key.split("/", 1)
        return parse_stamp(a), parse_stamp(b)
    a = datetime.strptime(key, "%Y-%m").replace(tzinfo=UTC)
    nxt = datetime(a.year + (a.month == 12), a.month % 12 + 1, 1, tzinfo=UTC)
    return int(a.timestamp()) * NS, int(nxt.timestamp()) * NS

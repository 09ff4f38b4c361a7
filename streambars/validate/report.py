"""What `streambars validate` found, and how it is shown: text file, JSON, terminal table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..fsio import write_atomic
from ..rules import RECORD_RULES, RULES, SERIES_RULES, Severity
from ..timeutil import iso
from .checks import Tally

#: Report order: per-record rules, then series rules (reference_mismatch only with --reference).
RULE_ORDER: tuple[str, ...] = tuple(r.name for r in RECORD_RULES + SERIES_RULES)
JSON_VERSION = 1




@dataclass
class SeriesResult:
    """One (dataset, symbol, timeframe): what was read and every rule's tally."""

    dataset: str
    symbol: str
    timeframe: str
    path: str = ""
    rows: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    tallies: dict[str, Tally] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # rule -> why it did not run

    def tally(self, rule: str) -> Tally:
        t = self.tallies.get(rule)
        if t is None:
            t = self.tallies[rule] = Tally(rule)
        return t

    def count(self, severity: Severity) -> int:
        return sum(t.count for t in self.tallies.values() if t.count and t.severity == severity)

    @property
    def status(self) -> str:
        for sev in (Severity.ERROR, Severity.WARNING, Severity.INFO):
            if self.count(sev):
                return str(sev)
        return "ok"

    def rule_rows(self) -> list[tuple[str, Tally | None, str]]:
        """(rule, tally or None, skip reason) for every rule, in report order."""
        out = []
        for name in RULE_ORDER:
            if name in self.tallies:
                out.append((name, self.tallies[name], ""))
            elif name in self.skipped:
                out.append((name, None, self.skipped[name]))
        return out

    def to_json(self) -> dict[str, Any]:
        rules = {}
        for name, t, why in self.rule_rows():
            if t is None:
                rules[name] = {"severity": str(RULES[name].severity), "checked": False, "reason": why}
                continue
            rules[name] = {
                "severity": str(t.severity),
                "checked": True,
                "count": t.count,
                "first": [iso(x) for x in t.first],
                "first_ns": list(t.first),
                "details": {iso(k): v for k, v in sorted(t.details.items())},
            }
        return {
            "dataset": self.dataset,
            "symbol": self.symbol,
            "timeframe": self.timeframe,
            "file": self.path,
            "rows": self.rows,
            "first": iso(self.first_ts) if self.first_ts is not None else None,
            "last": iso(self.last_ts) if self.last_ts is not None else None,
            "status": self.status,
            "errors": self.count(Severity.ERROR),
            "warnings": self.count(Severity.WARNING),
            "infos": self.count(Severity.INFO),
            "rules": rules,
        }


@dataclass
class Report:
    store: str
    started: datetime
    finished: datetime | None = None
    range_start: int | None = None
    range_end: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # dataset/file level remarks
    series: list[SeriesResult] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # store files that could not be read
    unreadable_rows: list[dict[str, str]] = field(default_factory=list)  # their table rows

    def count(self, severity: Severity) -> int:
        return sum(s.count(severity) for s in self.series)

    @property
    def exit_code(self) -> int:
        """0 clean (warnings, info allowed), 1 an error-severity rule failed, 2 a file unreadable."""
        if self.unreadable:
            return 2
        return 1 if self.count(Severity.ERROR) else 0

    @property
    def verdict(self) -> str:
        e, w, i = (self.count(s) for s in (Severity.ERROR, Severity.WARNING, Severity.INFO))
        bad = sum(1 for s in self.series if s.count(Severity.ERROR))
        head = "FAILED" if e else "OK"
        text = (
            f"{head}: {e} error(s), {w} warning(s), {i} info in {len(self.series)} series"
            + (f" ({bad} with errors)" if bad else "")
        )
        if self.unreadable:
            text = f"UNREADABLE: {len(self.unreadable)} file(s) could not be read; " + text
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "store": self.store,
            "started": self.started.isoformat().replace("+00:00", "Z"),
            "finished": self.finished.isoformat().replace("+00:00", "Z") if self.finished else None,
            "range": {"start": iso(self.range_start) if self.range_start is not None else None,
                      "end": iso(self.range_end) if self.range_end is not None else None},  # fmt: skip
            "parameters": self.parameters,
            "exit_code": self.exit_code,
            "result": self.verdict,
            "errors": self.count(Severity.ERROR),
            "warnings": self.count(Severity.WARNING),
            "infos": self.count(Severity.INFO),
            "notes": self.notes,
            "unreadable": self.unreadable,
            "series": [s.to_json() for s in self.series],
        }

    def write_json(self, path: Path) -> None:
        write_atomic(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())

    def write_text(self, path: Path) -> None:
        write_atomic(path, self.text().encode())

    def text(self) -> str:
        lines = [
            f"streambars validate  {self.started.strftime('%Y-%m-%dT%H:%M:%SZ')}",
            f"store: {self.store}",
            "range: "
            + (iso(self.range_start) if self.range_start is not None else "(start)")
            + " .. "
            + (iso(self.range_end) if self.range_end is not None else "(end)"),
        ]
        for k, v in self.parameters.items():
            lines.append(f"{k}: {v}")
        lines.append(f"result: {self.verdict}")
        lines.append("exit code: " + str(self.exit_code))
        for note in self.notes:
            lines.append(f"note: {note}")
        for s in self.series:
            lines.append("")
            lines.append(
                f"== {s.dataset} {s.symbol} {s.timeframe}: {s.rows:,} rows, "
                f"{iso(s.first_ts)} .. {iso(s.last_ts)}  [{s.status}]"
            )
            width = max(len(n) for n in RULE_ORDER)
            passed, skipped = [], []
            for name, t, why in s.rule_rows():
                if t is None:
                    skipped.append(f"{name}: {why}")
                elif not t.count:
                    passed.append(name)
                else:
                    sev = str(t.severity)
                    lines.append(f"  {name:<{width}}  {sev:<7}  {t.count:>9,}  first: {iso(t.first[0])}")
                    for ts in t.first:
                        lines.append(f"  {'':<{width}}  {'':<7}  {'':>9}    {iso(ts)}  {t.details.get(ts, '')}".rstrip())
            if passed:
                lines.append(f"  passed (0): {', '.join(passed)}")
            for text in skipped:
                lines.append(f"  not checked: {text}")
        lines.append("")
        return "\n".join(lines)

    def table_rows(self) -> list[dict[str, Any]]:
        rows = []
        for s in self.series:
            failing = [n for n, t in s.tallies.items() if t.count]
            failing.sort(key=RULE_ORDER.index)
            rows.append({
                "dataset": s.dataset,
                "symbol": s.symbol,
                "tf": s.timeframe,
                "rows": f"{s.rows:,}",
                "first": iso(s.first_ts),
                "last": iso(s.last_ts),
                "errors": s.count(Severity.ERROR),
                "warnings": s.count(Severity.WARNING),
                "info": s.count(Severity.INFO),
                "rules": ",".join(f"{n}={s.tallies[n].count}" for n in failing) or "ok",
            })  # fmt: skip
        for u in self.unreadable_rows:  # a damaged file: one row saying so
            rows.append({"dataset": u["dataset"], "symbol": u["symbol"], "tf": "-", "rows": "-",
                         "first": "-", "last": "-", "errors": "-", "warnings": "-", "info": "-",
                         "rules": u["status"]})  # fmt: skip
        return rows

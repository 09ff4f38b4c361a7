"""`validate --html`: the findings of a finished validation as one self-contained page.

The page is built from the :class:`~streambars.validate.report.Report` that validate already
produced (no rule runs again): the series table, one row per rule that found something
(severity, count, first offenders with their explanation) and, per such rule, a chart of
the bars around its first offender with every listed offender marked. Nothing is fetched
from elsewhere: the style is inline and the charts are PNG data URIs, so the file can be
mailed or archived as it is. Every text inserted (symbols, details, notes, paths) is
escaped.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..fsio import write_atomic
from ..plot import Candles, chart_png
from ..rules import Severity
from ..store.probe import TS_MAX, TS_MIN
from ..timeframes import parse_timeframe
from ..timeutil import iso
from .report import Report, SeriesResult

#: Bars shown each side of the first offender.
AROUND = 40
#: How far back (in intervals) a chart looks for the bars before a finding: a 1min gap of
#: almost four months still shows both sides, yet one chart never spans years of sparse bars.
LOOKBACK = AROUND * 4**6
#: Charts per page at most (each ~40 KB); the rest are listed without one.
MAX_CHARTS = 40

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#212121;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e0e0e0}
h3{font-size:15px;margin:20px 0 6px}
.verdict{font-weight:600;padding:8px 12px;border-radius:4px;display:inline-block}
.verdict.ok{background:#e8f5e9;color:#1b5e20}.verdict.failed{background:#ffebee;color:#b71c1c}
.verdict.unreadable{background:#fff3e0;color:#e65100}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:10px 0}
dl.meta dt{color:#616161}dl.meta dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #eeeeee;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#fafafa;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
td code,li code{font-size:12px}
.sev{font-weight:600;padding:1px 6px;border-radius:3px;font-size:12px}
.sev.error{background:#ffcdd2;color:#b71c1c}.sev.warning{background:#ffe0b2;color:#e65100}
.sev.info{background:#e3f2fd;color:#0d47a1}.sev.ok{background:#e8f5e9;color:#1b5e20}
ul.offenders{margin:0;padding-left:16px}
figure{margin:8px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #eeeeee}
figcaption{color:#616161;font-size:12px}
.note{color:#616161}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _sev(text: str) -> str:
    return f'<span class="sev {_e(text)}">{_e(text)}</span>'


def _anchor(s: SeriesResult, rule: str) -> str:
    raw = f"{s.dataset}-{s.symbol}-{s.timeframe}-{rule}"
    return "chart-" + "".join(c if c.isalnum() else "_" for c in raw)


def findings(report: Report) -> list[tuple[SeriesResult, str]]:
    """(series, rule) for every rule that found something, errors first, then report order."""
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    out = []
    for s in report.series:
        for name, t, _ in s.rule_rows():
            if t is not None and t.count:
                out.append((s, name))
    return sorted(out, key=lambda f: order.get(f[0].tallies[f[1]].severity, 3))


def _window(reader, s: SeriesResult, first: int) -> np.ndarray:
    """The stored bars around ``first``: the AROUND bars before it (however sparse, but no
    further back than LOOKBACK intervals) and the AROUND bars from it on, so a gap shows both
    of its sides. Two reads, each a binary search and AROUND + 1 rows at most."""
    tf = parse_timeframe(s.timeframe)
    after = reader.read(s.symbol, tf.name, first, None, dataset=s.dataset, limit=AROUND + 1)
    before = reader.read(s.symbol, tf.name, first - LOOKBACK * tf.nanos, first, dataset=s.dataset, limit=-AROUND)
    return np.concatenate([before, after])


def chart_for(reader, s: SeriesResult, rule: str) -> tuple[bytes | None, str]:
    """(PNG, caption) of the bars around the rule's first offender; (None, why) without one."""
    t = s.tallies[rule]
    if not t.first:
        return None, "no offending timestamps were kept"
    first = int(t.first[0])
    if not TS_MIN < first < TS_MAX:
        return None, f"no chart: the first offender's time ({first} ns) lies outside 1970..2100"
    try:
        bars = _window(reader, s, first)
    except (OSError, StoreError) as e:
        return None, f"no chart: the bars could not be read ({e})"
    bars = bars[(bars["ts_event"] > TS_MIN) & (bars["ts_event"] < TS_MAX)]
    if bars.shape[0] == 0:
        return None, "no chart: no stored bars around the first offender"
    bars = bars[np.argsort(bars["ts_event"], kind="stable")]  # out-of-order rows are findings too
    tf = parse_timeframe(s.timeframe)
    c = Candles.from_bars(bars, tf.nanos, s.timeframe)
    lo, hi = int(bars["ts_event"][0]), int(bars["ts_event"][-1])
    marks = [int(x) for x in t.first if lo <= int(x) <= hi]
    c.highlight = marks
    title = f"{s.symbol} {s.timeframe}  {rule}: first offender {iso(first)}"
    caption = (f"{len(c)} bars {iso(lo)} .. {iso(hi + tf.nanos)}; {len(marks)} of the first "
               f"{len(t.first)} offenders in view (marked)")  # fmt: skip
    return chart_png(c, title), caption


def render(report: Report, charts: bool = True) -> str:
    """The page as text."""
    from ..store import open_store

    cls = "unreadable" if report.unreadable else ("failed" if report.exit_code else "ok")
    found = findings(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>streambars validate: {_e(report.store)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>streambars validate</h1>",
        f'<p class="verdict {cls}" id="verdict">{_e(report.verdict)}</p>',
        '<dl class="meta">',
        f"<dt>store</dt><dd>{_e(report.store)}</dd>",
        f"<dt>range</dt><dd>{_e(iso(report.range_start) if report.range_start is not None else '(start)')}"
        f" .. {_e(iso(report.range_end) if report.range_end is not None else '(end)')}</dd>",
        f"<dt>run</dt><dd>{_e(report.started.strftime('%Y-%m-%dT%H:%M:%SZ'))}</dd>",
        f"<dt>exit code</dt><dd>{report.exit_code}</dd>",
        "</dl>",
        "<h2>Series</h2>",
        _table(report.table_rows(), "series"),
        f"<h2>Findings ({len(found)})</h2>",
    ]
    if found:
        parts.append(_findings_table(found))
    else:
        parts.append('<p class="note">No rule found anything.</p>')

    if charts and found:
        parts.append("<h2>Charts</h2>")
        reader = open_store(report.store)
        reader.strict_order = False  # out-of-order bars are what some rules report
        with reader:
            for i, (s, rule) in enumerate(found):
                t = s.tallies[rule]
                head = (f'<h3 id="{_anchor(s, rule)}">{_e(rule)} {_sev(str(t.severity))} '
                        f"{_e(s.symbol)} {_e(s.timeframe)} <small>({t.count:,})</small></h3>")  # fmt: skip
                if i >= MAX_CHARTS:
                    parts.append(head + f'<p class="note">no chart: only the first {MAX_CHARTS} findings get one</p>')
                    continue
                png, caption = chart_for(reader, s, rule)
                if png is None:
                    parts.append(head + f'<p class="note">{_e(caption)}</p>')
                    continue
                data = base64.b64encode(png).decode("ascii")
                alt = f"{s.symbol} {s.timeframe} bars around the first {rule} offender"
                parts.append(f'{head}<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
                             f"<figcaption>{_e(caption)}</figcaption></figure>")  # fmt: skip

    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>")
    if report.parameters:
        parts.append("<h2>Parameters</h2>" + _table([{"parameter": k, "value": v} for k, v in report.parameters.items()], "parameters"))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _table(rows: list[dict], table_id: str) -> str:
    if not rows:
        return '<p class="note">(none)</p>'
    cols = list(rows[0])
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            num = isinstance(v, int) or (isinstance(v, str) and v.replace(",", "").isdigit())
            cells.append(f'<td class="n">{_e(v)}</td>' if num else f"<td>{_e(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _findings_table(found: list[tuple[SeriesResult, str]]) -> str:
    rows = []
    for s, rule in found:
        t = s.tallies[rule]
        offenders = "".join(
            f"<li><code>{_e(iso(x))}</code> {_e(t.details.get(x, ''))}</li>" for x in t.first
        )
        rows.append(
            f'<tr><td><a href="#{_anchor(s, rule)}">{_e(rule)}</a></td><td>{_sev(str(t.severity))}</td>'
            f"<td>{_e(s.dataset)}</td><td>{_e(s.symbol)}</td><td>{_e(s.timeframe)}</td>"
            f'<td class="n">{t.count:,}</td><td><ul class="offenders">{offenders}</ul></td></tr>'
        )
    head = "".join(f"<th>{h}</th>" for h in ("rule", "severity", "dataset", "symbol", "tf", "count", "first offenders"))
    return f'<table id="findings"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def write_html(report: Report, path: Path) -> Path:
    """Render and write the page atomically (OSError when ``path`` cannot be written)."""
    return write_atomic(path, render(report).encode("utf-8"))

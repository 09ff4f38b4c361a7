"""Pictures of bars: candlesticks over a volume panel, as PNG (or SVG/PDF) bytes or a file.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no GUI, no global state),
with one PolyCollection for the bodies, one LineCollection for the wicks and one
PolyCollection for the volume: a few draw calls whatever the number of candles, where one
Rectangle artist per candle (``ax.bar``, mplfinance) costs seconds per ten thousand.

Large ranges are drawn with fewer, coarser candles (at most ``max_candles``; 0 = every bar):

1. the finest *stored* timeframe coarser than the one asked whose bars in the range fit
   (stored bars are the real ones: daily bars keep their session);
2. else the bars are merged in memory into candles of a whole multiple of the timeframe
   (epoch-aligned like the store's own sub-day bars, up to one UTC day), and then, if still
   too many, into groups of k consecutive candles.

The picture's title says which (e.g. ``1min bars shown as 4h candles``). matplotlib is an
optional dependency (``pip install '.[plot]'``); without it every picture fails
with one UsageError naming the extra.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import numpy as np

from .errors import StoreError, UsageError
from .fsio import write_atomic
from .records import FIXED_PRICE_SCALE
from .timeframes import Timeframe, TimeframeError, canonical_name, parse_timeframe
from .timeutil import NS, check_tz, iso, parse_time

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .store import StoreReader

#: Default upper bound on candles in one picture (about 2 px per candle at 1600 px wide).
MAX_CANDLES = 600
UP, DOWN = "#26a69a", "#ef5350"  # close >= open / close < open
HIGHLIGHT = "#ff9800"
#: Above this many candles in one picture the bodies would be narrower than a pixel: only
#: the high-low lines (and volume lines) are drawn, each set as one path (a year of 1min
#: bars: 5 s instead of 24 s).
DENSE = 2000
DENSE_COLOR = "#455a64"
FORMATS = ("png", "svg", "pdf")
EXTRA_HINT = "pip install '.[plot]' in a checkout of streambars (it is not on PyPI)"
#: Candle lengths (seconds) tried when merging in memory: each a whole multiple of the bars'.
MERGE_LADDER_S = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600, 43200, 86400)
DAY_S = 86_400


def require_matplotlib() -> None:
    """Fail early (exit 2, naming the extra) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"pictures need matplotlib, which is not installed: {EXTRA_HINT}") from None


@dataclass
class Candles:
    """Candles ready to draw: times (ns, candle open), float prices, volume; and what they are."""

    ts: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    width_ns: int  # the time one candle stands for
    label: str  # e.g. "1min" or "1min bars shown as 4h candles"
    bars: int = 0  # source bars behind the candles
    highlight: list[int] = field(default_factory=list)  # ts (ns) to mark

    @classmethod
    def from_bars(cls, bars: np.ndarray, width_ns: int, label: str) -> Candles:
        """BAR_DTYPE rows (int64 fixed-point prices) as candles, one per bar."""
        return cls(
            ts=bars["ts_event"].astype(np.int64),
            open=bars["open"] / FIXED_PRICE_SCALE,
            high=bars["high"] / FIXED_PRICE_SCALE,
            low=bars["low"] / FIXED_PRICE_SCALE,
            close=bars["close"] / FIXED_PRICE_SCALE,
            volume=bars["volume"].astype(np.float64),
            width_ns=width_ns,
            label=label,
            bars=int(bars.shape[0]),
        )

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def merged(self, keys: np.ndarray, width_ns: int, label: str) -> Candles:
        """Candles merged by ``keys`` (one value per candle, equal keys adjacent): open of
        the first, close of the last, high the max, low the min, volume the sum."""
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        ends = np.r_[starts[1:], len(self)] - 1
        return Candles(
            ts=self.ts[starts],
            open=self.open[starts],
            high=np.maximum.reduceat(self.high, starts),
            low=np.minimum.reduceat(self.low, starts),
            close=self.close[ends],
            volume=np.add.reduceat(self.volume, starts),
            width_ns=width_ns,
            label=label,
            bars=self.bars,
        )


def coarsen(c: Candles, tf: Timeframe, max_candles: int) -> Candles:
    """At most ``max_candles`` candles from ``c`` (bars of ``tf``, sorted by time)."""
    if max_candles <= 0 or len(c) <= max_candles:
        return c
    base, name = c, tf.name
    for seconds in () if tf.is_daily else MERGE_LADDER_S:
        if seconds <= tf.seconds or seconds % tf.seconds:
            continue
        width = seconds * NS
        keys = c.ts - c.ts % width
        name = canonical_name(seconds) + (" (UTC day)" if seconds == DAY_S else "")
        base = c.merged(keys, width, f"{tf.name} bars shown as {name} candles")
        if len(base) <= max_candles:
            return base
    k = -(-len(base) // max_candles)  # still too many: k consecutive candles per candle
    return base.merged(np.arange(len(base)) // k, base.width_ns * k,
                       f"{tf.name} bars shown as candles of {k} x {name}")


def parse_tz(name: str | None) -> ZoneInfo:
    """'UTC', 'America/New_York', ... as a ZoneInfo (UsageError from :func:`check_tz`)."""
    return ZoneInfo(check_tz(name, "--tz"))


# --------------------------------------------------------------------------- reading


def load_candles(
    reader: StoreReader,
    symbol: str,
    timeframe: str,
    start: int | None,
    end: int | None,
    dataset: str | None = None,
    max_candles: int = MAX_CANDLES,
) -> Candles:
    """The candles to draw for [start, end): checks every name first (UsageError, exit 2)."""
    try:
        tf = parse_timeframe(timeframe)
    except TimeframeError as e:
        raise UsageError(f"--timeframe: {e}") from None
    pairs = reader.pairs()  # one look at the store for every name check below
    datasets = sorted({d for d, _ in pairs})
    if dataset is not None and dataset not in datasets:
        raise UsageError(f"--dataset {dataset!r} is not in {reader.path} (it has: {', '.join(datasets) or 'none'})")
    have = sorted({s for d, s in pairs if dataset in (None, d)})
    if symbol not in have:
        raise UsageError(f"--symbol {symbol!r} is not in {reader.path} (it has: {', '.join(have) or 'none'})")
    holders = [d for d, s in pairs if s == symbol]
    if dataset is None and len(holders) > 1:
        raise UsageError(f"--symbol {symbol!r} is in several datasets ({', '.join(holders)}): pass --dataset")
    stored = sorted(parse_timeframe(t) for t in reader.timeframes(symbol, dataset))
    if tf not in stored:
        raise UsageError(f"{symbol} has no {tf.name} bars (stored: {', '.join(t.name for t in stored)})")
    n = reader.count(symbol, tf.name, start, end, dataset=dataset)
    if n == 0:
        span = reader.span(symbol, tf, dataset)
        held = f"{iso(span[0])} .. {iso(span[1])}" if span else "no rows"
        raise UsageError(
            f"no {symbol} {tf.name} bars in [{iso(start) if start is not None else 'start'}, "
            f"{iso(end) if end is not None else 'end'}) (the store holds {held})"
        )
    if 0 < max_candles < n:  # a stored coarser timeframe that fits is the truest picture
        for coarse in (t for t in stored if t > tf):
            m = reader.count(symbol, coarse.name, start, end, dataset=dataset)
            if 0 < m <= max_candles:
                bars = reader.read(symbol, coarse.name, start, end, dataset=dataset)
                c = Candles.from_bars(bars, coarse.nanos, f"{tf.name} bars shown as stored {coarse.name} bars")
                c.bars = n  # the title counts the bars asked for
                return c
    bars = reader.read(symbol, tf.name, start, end, dataset=dataset)
    return coarsen(Candles.from_bars(bars, tf.nanos, tf.name), tf, max_candles)


# --------------------------------------------------------------------------- drawing


def _figure(width_in: float, height_in: float) -> Figure:
    from matplotlib.figure import Figure

    # Fixed margins (inches), not constrained layout: that would double the drawing time.
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    fig.subplots_adjust(left=1.0 / width_in, right=1 - 0.2 / width_in, top=1 - 0.4 / height_in,
                        bottom=0.62 / height_in, hspace=0.06)  # fmt: skip
    return fig


def _ylim(c: Candles, marked: np.ndarray) -> tuple[float, float, bool]:
    """Price axis limits from the unmarked candles (an absurd marked price must not squash
    the rest); marked candles within three spans are shown whole. True when one is clipped."""
    base = ~marked if (~marked).any() else np.ones(len(c), bool)
    lo, hi = float(np.min(c.low[base])), float(np.max(c.high[base]))
    span = hi - lo or abs(hi) * 0.01 or 1.0
    clipped = False
    if marked.any():
        mlo, mhi = float(np.min(c.low[marked])), float(np.max(c.high[marked]))
        if mlo >= lo - 3 * span:
            lo = min(lo, mlo)
        else:
            clipped = True
        if mhi <= hi + 3 * span:
            hi = max(hi, mhi)
        else:
            clipped = True
        span = hi - lo or span
    return lo - 0.04 * span, hi + 0.08 * span, clipped


def _segments(x: np.ndarray, y0: np.ndarray, y1: np.ndarray, color: str, width: float, alpha: float) -> Any:
    """Vertical lines (x, y0)-(x, y1) as ONE path: one draw call for any number of them."""
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath

    verts = np.empty((2 * x.size, 2))
    verts[0::2, 0] = verts[1::2, 0] = x
    verts[0::2, 1], verts[1::2, 1] = y0, y1
    codes = np.tile(np.array([MplPath.MOVETO, MplPath.LINETO], dtype=MplPath.code_type), x.size)
    return PathPatch(MplPath(verts, codes), fill=False, edgecolor=color, linewidth=width, alpha=alpha,
                     zorder=2)  # fmt: skip


def draw(c: Candles, title: str, tz: ZoneInfo, size: tuple[float, float] = (16, 8)) -> Figure:
    """A figure: candles above, volume below, time axis in ``tz``, offending bars marked."""
    require_matplotlib()
    import matplotlib.dates as mdates
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.colors import to_rgba
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig = _figure(*size)
    ax, axv = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    day_ns = DAY_S * NS
    x = mdates.date2num(np.datetime64(0, "ns")) + c.ts / day_ns  # candle open, in matplotlib days
    spacing = np.diff(c.ts)
    typical = float(np.median(spacing[spacing > 0])) if (spacing > 0).any() else float(c.width_ns)
    half = 0.35 * min(float(c.width_ns), typical) / day_ns
    x = x + min(float(c.width_ns), typical) / day_ns / 2  # the candle's middle
    up = (c.close >= c.open)[:, None]
    colors = np.where(up, to_rgba(UP), to_rgba(DOWN))  # RGBA rows: colour names per candle are slow
    zeros = np.zeros(len(c))
    if len(c) > DENSE:  # bodies narrower than a pixel: the high-low range is the picture, and
        # up/down colours would only paint over each other (the last drawn wins): one colour
        ax.add_artist(_segments(x, c.low, c.high, DENSE_COLOR, 0.6, 1.0))  # add_artist: no per-vertex limits
        axv.add_artist(_segments(x, zeros, c.volume, DENSE_COLOR, 0.6, 0.55))
    else:
        ax.add_collection(LineCollection(np.stack([np.c_[x, c.low], np.c_[x, c.high]], axis=1), colors=colors,
                                         linewidths=0.6 if len(c) > 300 else 1.0, zorder=2), autolim=False)  # fmt: skip
        bottom, top = np.minimum(c.open, c.close), np.maximum(c.open, c.close)
        body = np.stack([np.c_[x - half, bottom], np.c_[x - half, top], np.c_[x + half, top],
                         np.c_[x + half, bottom]], axis=1)  # fmt: skip
        ax.add_collection(PolyCollection(body, facecolors=colors, edgecolors=colors, linewidths=0.5, zorder=3),
                          autolim=False)  # fmt: skip
        vol = np.stack([np.c_[x - half, zeros], np.c_[x - half, c.volume], np.c_[x + half, c.volume],
                        np.c_[x + half, zeros]], axis=1)  # fmt: skip
        axv.add_collection(PolyCollection(vol, facecolors=colors, edgecolors=colors, linewidths=0.3, alpha=0.55),
                           autolim=False)  # fmt: skip

    marked = np.isin(c.ts, np.asarray(c.highlight, dtype=np.int64)) if c.highlight else np.zeros(len(c), bool)
    lo, hi, clipped = _ylim(c, marked)
    pad = max(half * 3, (x[-1] - x[0]) * 0.01 if len(c) > 1 else half * 4)
    ax.set_xlim(x[0] - pad, x[-1] + pad)
    ax.set_ylim(lo, hi)
    axv.set_ylim(0, float(np.max(c.volume)) * 1.1 or 1.0)
    if c.highlight:
        zero = mdates.date2num(np.datetime64(0, "ns"))
        marks = np.asarray(sorted(set(c.highlight)), dtype=np.int64)
        hx = zero + (marks + min(float(c.width_ns), typical) / 2) / day_ns
        later = np.searchsorted(c.ts, marks, side="right")
        for a in (ax, axv):
            for m, h, nxt in zip(marks.tolist(), hx.tolist(), later.tolist(), strict=True):
                if m in c.ts or nxt >= len(c):
                    a.axvspan(h - 2.2 * half, h + 2.2 * half, color=HIGHLIGHT, alpha=0.25, lw=0, zorder=0)
                else:  # no bar there (a gap, a missing bar): shade up to the next bar
                    a.axvspan(zero + m / day_ns, x[nxt] - half, color=HIGHLIGHT, alpha=0.25, lw=0, zorder=0)
        ax.scatter(hx, np.full(hx.size, 0.985), transform=ax.get_xaxis_transform(), marker="v", s=46,
                   color=HIGHLIGHT, edgecolors="#5d4037", linewidths=0.6, zorder=5, clip_on=False,
                   label="offender" + ("s" if hx.size > 1 else "") + (" (price off scale)" if clipped else ""))
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9, borderaxespad=0.1)

    locator = mdates.AutoDateLocator(tz=tz, minticks=4, maxticks=10)
    axv.xaxis.set_major_locator(locator)
    axv.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=tz))
    ax.tick_params(labelbottom=False)
    axv.yaxis.set_major_formatter(EngFormatter(sep=""))
    axv.yaxis.set_major_locator(MaxNLocator(3))
    ax.set_ylabel("price")
    axv.set_ylabel("volume")
    axv.set_xlabel(f"time ({tz.key})")
    for a in (ax, axv):
        a.grid(True, color="#e0e0e0", linewidth=0.6)
        a.set_axisbelow(True)
        for side in ("top", "right"):
            a.spines[side].set_visible(False)
    ax.set_title(title, loc="left", fontsize=12)
    return fig


def title_for(symbol: str, c: Candles, tz: ZoneInfo, dataset: str = "") -> str:
    """'ES.c.0  1min  2024-03-11 13:30 .. 2024-03-12 00:00 UTC  (1,380 bars)'."""
    def fmt(ns: int) -> str:
        t = datetime.fromtimestamp(ns / NS, tz)
        return t.strftime("%Y-%m-%d %H:%M" + (":%S" if t.second else ""))

    end = int(c.ts[-1]) + c.width_ns
    where = f"  [{dataset}]" if dataset else ""
    drawn = "high-low lines" if len(c) > DENSE else "candles"
    return (f"{symbol}{where}   {c.label}   {fmt(int(c.ts[0]))} .. {fmt(end)} {tz.key}"
            f"   ({c.bars:,} bars, {len(c):,} {drawn})")  # fmt: skip


def figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    """The figure encoded (png/svg/pdf); the figure is released afterwards."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, facecolor="white")
    fig.clear()
    return buf.getvalue()


# --------------------------------------------------------------------------- the command


def _out_format(out: Path) -> str:
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise UsageError(f"--out {out}: the suffix picks the format, one of .{', .'.join(FORMATS)}")
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "is a directory" if out.is_dir() else f"{parent} is not a writable directory"
        raise UsageError(f"--out {out} cannot be written: {why}")
    return fmt


def plot_to_file(
    root: Path | str,
    *,
    symbol: str,
    timeframe: str,
    out: Path | str,
    start: str | None = None,
    end: str | None = None,
    dataset: str | None = None,
    tz: str | None = None,
    max_candles: int | None = None,
) -> tuple[Path, Candles]:
    """`streambars plot`: draw [start, end) of one series into ``out``; (path, candles).
    ``max_candles`` None: MAX_CANDLES; 0: every bar."""
    from .store import open_store

    require_matplotlib()
    out = Path(out)
    fmt = _out_format(out)
    zone = parse_tz(tz)
    t0, t1 = parse_time(start, "start"), parse_time(end, "end")
    if t0 is not None and t1 is not None and t1 <= t0:
        raise UsageError(f"--end {iso(t1)} is not after --start {iso(t0)}")
    if max_candles is None:
        max_candles = MAX_CANDLES
    if max_candles < 0:
        raise UsageError(f"--max-candles {max_candles}: give 0 (every bar) or a positive number")
    if not Path(root).exists():
        raise UsageError(f"no store at {root} (set --store or store.path)")
    try:
        reader = open_store(root)
    except StoreError as e:
        raise UsageError(str(e)) from None
    with reader:
        candles = load_candles(reader, symbol, timeframe, t0, t1, dataset, max_candles)
    ds = dataset or ""
    data = figure_bytes(draw(candles, title_for(symbol, candles, zone, ds), zone), fmt)
    try:
        write_atomic(out, data)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written: {e.strerror or e}") from None
    return out, candles


def chart_png(candles: Candles, title: str, tz: ZoneInfo | None = None, size: tuple[float, float] = (11, 4.6)) -> bytes:
    """One PNG of ``candles`` (for reports): the same drawing as `plot`, smaller."""
    return figure_bytes(draw(candles, title, tz or ZoneInfo("UTC"), size=size))


__all__: list[Any] = ["Candles", "MAX_CANDLES", "chart_png", "coarsen", "draw", "load_candles",
                      "plot_to_file", "require_matplotlib"]  # fmt: skip

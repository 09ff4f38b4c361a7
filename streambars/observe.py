"""Logging set-up (structlog) and the progress long work shows.

One call, :func:`configure_logging`, at program start: JSON lines when stderr is not a
terminal (journald, files, CI), a readable coloured console when it is. Every event passes
through :func:`redact_secrets`, so an API key can never reach a log line even if a
caller or a library exception message carries it.

Progress: :class:`Progress` holds the figures (the single source of truth);
:class:`ProgressDisplay` shows them -- a rich progress bar on a terminal, periodic JSON
``progress`` events elsewhere. While a bar is drawn, every log line (structlog's and
stdlib logging's) goes through the rich Console that owns the bar, which prints it above
the bar: a log line can never be spliced into the progress text.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, TextColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from .startup import default_numba_cache_dir  # noqa: F401 - re-exported: its old home

_SECRETS: set[str] = set()
# Databento keys are 'db-' + 29 alphanumerics; catch them even when never registered.
_KEY_PATTERN = re.compile(r"db-[A-Za-z0-9]{20,}")
REDACTED = "<redacted>"


def register_secret(secret: str | None) -> None:
    """Remember a secret so that every later log line has it replaced by <redacted>."""
    if secret and len(secret) >= 6:
        _SECRETS.add(secret)


def scrub(text: str) -> str:
    """Replace every registered secret (and anything shaped like a Databento key) in text."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _KEY_PATTERN.sub(REDACTED, text)


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: scrub every string value, including rendered exceptions."""
    for key, value in list(event_dict.items()):
        if isinstance(value, str):
            event_dict[key] = scrub(value)
        elif isinstance(value, BaseException):
            event_dict[key] = scrub(repr(value))
    return event_dict


def _scrub_rendered(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    exc = event_dict.get("exception")
    if isinstance(exc, str):
        event_dict["exception"] = scrub(exc)
    return event_dict


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of writing (it may be replaced, e.g.
    by a log-file reopen or a test's capture), instead of the object seen at configuration.

    While a :class:`ProgressDisplay` draws a bar, whole lines go through its rich Console
    instead (printed above the bar); a partial line waits for its newline."""

    def __init__(self) -> None:
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        live = _LIVE[0] if _LIVE else None
        if live is None and not self._partial:
            return sys.stderr.write(text)
        with self._lock:
            head, sep, self._partial = (self._partial + text).rpartition("\n")
        if sep:
            for line in head.split("\n"):
                if live is not None:
                    live.console.print(Text.from_ansi(line), soft_wrap=True)
                else:
                    sys.stderr.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if not _LIVE:
            with self._lock:
                rest, self._partial = self._partial, ""
            if rest:
                sys.stderr.write(rest)
            sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


#: the stream every log line is written to (see configure_logging)
_LOG_STREAM = _CurrentStderr()
#: the rich progress that owns the terminal now (at most one)
_LIVE: list[RichProgress] = []


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog once; ``fmt`` is 'auto' (by isatty), 'json' or 'console'."""
    stream = stream or _LOG_STREAM
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        redact_secrets,
    ]
    if fmt == "json":
        processors += [
            structlog.processors.format_exc_info,
            _scrub_rendered,
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (databento, urllib3) log through stdlib logging: route warnings and above
    # through the same scrubbing so their messages cannot leak the key either.
    handler = logging.StreamHandler(stream)
    handler.addFilter(_StdlibScrubber())
    if fmt == "json":  # one JSON object a line, like every other event
        handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


class _JsonFormatter(logging.Formatter):
    """stdlib records (databento's own warnings, urllib3) in structlog's JSON shape."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        from datetime import UTC, datetime

        return json.dumps({
            "event": record.getMessage(),
            "logger": record.name,
            "level": record.levelname.lower(),
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
        })


class _StdlibScrubber(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = ()
        return True


def get_logger(name: str | None = None, **bound: Any) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name, **bound)


@dataclass
class Progress:
    """Counts long work and says how far it is: records, bars, MB, rate, ETA.

    ``noun`` names what ``records`` counts (records, rows); ``units_*`` count whole pieces
    (months, files; ``units_noun``). The ETA comes, best first, from input bytes consumed
    of ``input_total`` (a file's size: exact however records compress), ``total_records``,
    then the units; live work has none of them and no ETA. ``line()`` gives a one-line
    summary for terminals and systemd STATUS=, ``fields()`` the same for log events.
    """

    total_records: int | None = None
    units_total: int | None = None
    units_done: int = 0
    records: int = 0
    bars: int = 0
    bytes: int = 0
    input_total: int | None = None
    input_bytes: int = 0
    noun: str = "records"
    units_noun: str = ""
    count_bars: bool = True
    started: float = field(default_factory=time.monotonic)
    #: told after every add() (the display showing these figures: cheap, rate-limited)
    listener: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    #: (time, share done) at the first counted records: the ETA's rate leaves start-up out
    origin: tuple[float, float] | None = field(default=None, repr=False, compare=False)

    def add(self, records: int = 0, bars: int = 0, nbytes: int = 0) -> None:
        self.records += records
        self.bars += bars
        self.bytes += nbytes
        if self.origin is None and self.records:
            self.origin = (self.clock(), self._measured() or 0.0)
        if self.listener is not None:
            self.listener()

    @property
    def elapsed(self) -> float:
        return max(self.clock() - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.records / self.elapsed

    def _measured(self) -> float | None:
        """The share done by input bytes or records (0..1); None when neither total is known."""
        if self.input_total:
            return min(self.input_bytes / self.input_total, 1.0)
        if self.total_records:
            return min(self.records / self.total_records, 1.0)
        return None

    @property
    def fraction(self) -> float | None:
        """How much of the work is done (0..1), on the ETA's basis; None when unknown."""
        measured = self._measured()
        if measured is None and self.units_total:
            return min(self.units_done / self.units_total, 1.0)
        return measured

    @property
    def eta_seconds(self) -> float | None:
        """Bytes or records: the rate since the first counted records (start-up, e.g. opening
        the store, would make an early ETA too long); units: since the start (a month's
        download is part of its cost)."""
        f = self._measured()
        if f:
            if self.origin is not None and f > self.origin[1]:
                t0, f0 = self.origin
                return max(self.clock() - t0, 0.0) / (f - f0) * (1.0 - f)
            return self.elapsed / f * (1.0 - f)
        if f is None and self.units_total and self.units_done:
            return self.elapsed / self.units_done * max(self.units_total - self.units_done, 0)
        return None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.noun: self.records}
        if self.count_bars:
            out["bars"] = self.bars
        out["mb"] = round(self.bytes / 1e6, 1)
        out[f"{self.noun}_per_s"] = round(self.rate)
        out["elapsed_s"] = round(self.elapsed, 1)
        if self.units_total:
            out["done"] = f"{self.units_done}/{self.units_total}"
        fraction = self.fraction
        if fraction is not None:
            out["percent"] = round(100 * fraction, 1)
        eta = self.eta_seconds
        if eta is not None:
            out["eta_s"] = round(eta, 1)
        return out

    def line(self) -> str:
        f = self.fields()
        text = f"{f[self.noun]:,} {self.noun}, "
        if self.count_bars:
            text += f"{f['bars']:,} bars, "
        text += f"{f['mb']} MB, {f[self.noun + '_per_s']:,} {self.noun}/s"
        if "done" in f:
            text = f"[{f['done']}{' ' + self.units_noun if self.units_noun else ''}] " + text
        if "eta_s" in f:
            text += f", ETA {_duration(f['eta_s'])}"
        return text


def _duration(seconds: float) -> str:
    """ETA text: 42s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


#: Seconds between ``progress`` log events when stderr is not a terminal.
LOG_EVERY_S = 5.0


class _Figures(ProgressColumn):
    """The Progress figures, read when rich redraws (its refresh thread): always current."""

    def __init__(self, display: ProgressDisplay):
        super().__init__()
        self.display = display

    def render(self, task: Any) -> Text:
        note = self.display.note
        return Text(self.display.progress.line() + (f"  {note}" if note else ""), no_wrap=True,
                    overflow="ellipsis")


class ProgressDisplay:
    """Shows a :class:`Progress` while long work runs.

    On a terminal: a rich progress bar (with the ETA basis as its fill, pulsing when there is
    none), redrawn a few times a second by rich's thread; log lines are printed above it (see
    :class:`_CurrentStderr`). Elsewhere (journald, CI, a pipe): no bar, a JSON ``progress``
    event at most every ``every`` seconds plus a final one. ``show=False`` shows nothing (a
    cluster worker: its submitter reports). Use as a context manager, or start()/close().

    The refresh thread only draws; it is stopped in ``close()``, which callers run in a
    ``finally`` -- signal handlers never touch the display (they must not write at all)."""

    def __init__(self, progress: Progress, what: str, *, show: bool = True, every: float = LOG_EVERY_S,
                 **fields: Any):
        self.progress, self.what, self.every, self.fields = progress, what, every, fields
        self.note = ""
        self._bar: RichProgress | None = None
        self._task: Any = None
        self._last = time.monotonic()
        self.terminal = show and _stderr_is_terminal()
        if self.terminal and _LIVE:  # another bar owns the terminal (rich allows one): stay silent
            show = self.terminal = False
        self.show = show
        if show:
            progress.listener = self.update

    def start(self) -> ProgressDisplay:
        if self.terminal and self._bar is None and not _LIVE:
            console = _console()
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), _Figures(self),
                console=console, refresh_per_second=4, transient=False,
                # text printed to stdout on the same terminal goes above the bar too; a piped
                # stdout stays untouched (rich would otherwise move it to the console)
                redirect_stdout=sys.stdout.isatty(), redirect_stderr=True,
            )
            self._task = self._bar.add_task(self.what, total=None)
            _LIVE.append(self._bar)
            try:
                self._bar.start()
                self._sync()
            except BaseException:  # Ctrl-C right now: no refresh thread may outlive this
                self.close(failed=True)
                raise
        return self

    def _sync(self) -> None:
        if self._bar is not None:
            fraction = self.progress.fraction
            self._bar.update(self._task, total=None if fraction is None else 1000,
                             completed=0 if fraction is None else int(fraction * 1000))

    def update(self, note: str | None = None, force: bool = False) -> None:
        """Note what is being worked on; off a terminal log the figures when it is time."""
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._sync()
            return
        now = time.monotonic()
        if self.show and not self.terminal and (force or now - self._last >= self.every):
            self._last = now
            self._log()

    def _log(self, **extra: Any) -> None:
        get_logger("streambars.progress").info(
            "progress", what=self.what, **self.fields, **self.progress.fields(), **extra)

    def close(self, failed: bool = False) -> None:
        """Stop drawing (the bar stays with its final figures); off a terminal, the final event
        -- not when the work ``failed``: then the one ``streambars:`` line says what happened."""
        bar, self._bar = self._bar, None
        if self.progress.listener == self.update:
            self.progress.listener = None
        if bar is not None:
            try:
                fraction = self.progress.fraction  # the final figures (an unknown share stays as drawn)
                if fraction is not None:
                    bar.update(self._task, total=1000, completed=int(fraction * 1000))
                bar.stop()
            finally:
                if bar in _LIVE:
                    _LIVE.remove(bar)
                _LOG_STREAM.flush()
        elif self.show and not self.terminal and not failed:
            self._log(final=True)

    def __enter__(self) -> ProgressDisplay:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(failed=kind is not None)


_CONSOLE: list[Console] = []


def _console() -> Console:
    """The one rich Console on stderr (its file is looked up at each write, like the log stream)."""
    if not _CONSOLE:
        _CONSOLE.append(Console(stderr=True))
    return _CONSOLE[0]


def _stderr_is_terminal() -> bool:
    """Draw a bar only on a real, capable terminal (not TERM=dumb, not a captured stderr)."""
    try:
        if not sys.stderr.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    console = _console()
    return console.is_terminal and not console.is_dumb_terminal

"""Logging set-up (structlog) and the progress line long work prints.

One call, :func:`configure_logging`, at program start: JSON lines when stderr is not a
terminal (journald, files, CI), a readable coloured console when it is. Every event passes
through :func:`redact_secrets`, so an API key can never reach a log line even if a
caller or a library exception message carries it.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import structlog

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
    by a log-file reopen or a test's capture), instead of the object seen at configuration."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog once; ``fmt`` is 'auto' (by isatty), 'json' or 'console'."""
    stream = stream or _CurrentStderr()
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

    The ETA comes from ``total_records`` when known, else from work units (``units_total``,
    e.g. months x symbols of a backfill, with ``units_done``); live work has neither and no
    ETA. ``line()`` gives a one-line summary for terminals, log events and systemd STATUS=.
    """

    total_records: int | None = None
    units_total: int | None = None
    units_done: int = 0
    records: int = 0
    bars: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, records: int = 0, bars: int = 0, nbytes: int = 0) -> None:
        self.records += records
        self.bars += bars
        self.bytes += nbytes

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.records / self.elapsed

    @property
    def eta_seconds(self) -> float | None:
        if self.total_records and self.records:
            return max(self.total_records - self.records, 0) / self.rate
        if self.units_total and self.units_done:
            return self.elapsed / self.units_done * max(self.units_total - self.units_done, 0)
        return None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "records": self.records,
            "bars": self.bars,
            "mb": round(self.bytes / 1e6, 1),
            "records_per_s": round(self.rate),
            "elapsed_s": round(self.elapsed, 1),
        }
        if self.units_total:
            out["done"] = f"{self.units_done}/{self.units_total}"
        eta = self.eta_seconds
        if eta is not None:
            out["eta_s"] = round(eta, 1)
        return out

    def line(self) -> str:
        f = self.fields()
        text = (
            f"{f['records']:,} records, {f['bars']:,} bars, {f['mb']} MB, "
            f"{f['records_per_s']:,} rec/s"
        )
        if "done" in f:
            text = f"[{f['done']}] " + text
        if "eta_s" in f:
            text += f", ETA {f['eta_s']:.0f}s"
        return text


class TerminalProgress:
    """Rewrites one status line on a terminal (at most a few times a second); silent when
    stderr is not a terminal, where the structured log events carry the same figures."""

    def __init__(self, progress: Progress, prefix: str = "", min_interval: float = 0.25):
        self.progress, self.prefix, self.min_interval = progress, prefix, min_interval
        self.enabled = sys.stderr.isatty()
        self._last = 0.0

    def update(self, note: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.min_interval):
            return
        self._last = now
        sys.stderr.write(f"\r\x1b[K{self.prefix}{self.progress.line()}{'  ' + note if note else ''}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            sys.stderr.write("\n")

"""Configuration: a TOML file plus command-line overrides -> frozen, validated settings.

Every key can be overridden on the command line (``--set section.key=value``, the value in
TOML syntax, or the dedicated flags the CLI maps onto the same dotted keys). The API key
never comes from TOML: only from ``DATABENTO_API_KEY`` in the environment or a ``.env``
file. Anything wrong stops the program before it does any work, with a
:class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError as ConfigError  # re-exported: its home is errors
from .records import BAR_DTYPE, BAR_PAGE_ROWS, INPUT_INTERVAL_NS, INPUT_KINDS, TRADE_CLOCKS
from .rules import RECORD_RULE_NAMES, Policy
from .timeframes import (
    STANDARD_TIMEFRAMES,
    Session,
    Timeframe,
    TimeframeError,
    default_session,
    parse_timeframe,
    parse_timeframes,
)

API_KEY_ENV = "DATABENTO_API_KEY"
STYPES = ("raw_symbol", "continuous", "parent", "instrument_id")
POLICIES = tuple(p.name.lower() for p in Policy)


@dataclass(frozen=True)
class DatabentoSettings:
    dataset: str = "GLBX.MDP3"
    schema: str = "ohlcv-1s"
    stype_in: str = "raw_symbol"
    symbols: tuple[str, ...] = ()
    historical_gateway: str = ""  # empty: Databento's default
    live_gateway: str = ""  # "host:port"; empty: Databento's default
    max_cost: float = 50.0  # USD; backfill stops above it unless --yes


@dataclass(frozen=True)
class BarSettings:
    timeframes: tuple[Timeframe, ...] = field(
        default_factory=lambda: parse_timeframes(list(STANDARD_TIMEFRAMES))
    )
    #: Where daily bars start. Not configured: the dataset's default (timeframes.SESSION_DEFAULTS),
    #: or the session the store's files of that dataset were built with (see Settings.session_pending).
    session: Session = field(default_factory=lambda: Session.parse("17:00 America/Chicago"))
    #: Which timestamp of a trade picks its bar: "ts_recv" (Databento's own OHLCV is built
    #: that way, and DBN trades files are ordered and cut by it) or "ts_event" (the matching
    #: engine's time). A store file records the clock that built it and refuses the other.
    trade_clock: str = "ts_recv"
    #: One series per (symbol, publisher), stored as ``SYMBOL@VENUE`` (e.g. ``ES.c.0@GLBX``),
    #: instead of one bar per symbol combining every publisher. Backfill only.
    per_publisher: bool = False


@dataclass(frozen=True)
class StoreSettings:
    path: Path = Path("store")
    chunk_rows: int = 4096
    compression: str = "none"  # for bulk-written/compacted files only: none | gzip | lzf


@dataclass(frozen=True)
class ValidationSettings:
    policy: str = "flag"  # default policy for per-record rules
    rules: tuple[tuple[str, str], ...] = ()  # per-rule policy overrides
    max_volume: int = 0  # per input record; 0 disables volume_absurd
    price_jump: float = 0.10  # fraction of the previous close
    gap: Timeframe = field(default_factory=lambda: parse_timeframe("5min"))
    calendar: str = "auto"  # exchange_calendars name, 'auto' from the dataset, or 'none'
    volume_outlier_sigma: float = 8.0

    def policies(self) -> dict[str, str]:
        return dict(self.rules)


@dataclass(frozen=True)
class LiveSettings:
    close_grace_s: float = 2.0  # close a bar this long after its end even if no record came
    batch_max_records: int = 4096
    batch_max_ms: float = 5.0
    heartbeat_interval_s: int = 10
    heartbeat_timeout_s: float = 30.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    replay_window_h: float = 24.0  # Databento intraday replay reach; older gaps go to Historical
    metrics_port: int = 0  # 0: off; else a Prometheus endpoint on metrics_host:port
    metrics_host: str = "127.0.0.1"
    queue_size: int = 64


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "auto"  # auto | json | console
    file: str = ""  # optional log file (reopened on SIGHUP)


@dataclass(frozen=True)
class ClusterSettings:
    """Where `backfill` runs its symbols (docs/cluster.md); neither set: in this process."""

    scheduler: str = ""  # an existing Dask scheduler, e.g. "tcp://10.0.0.5:8786"
    workers: int = 0  # else: a local cluster of this many single-threaded worker processes
    retries: int = 2  # a task that raised is run again this often (a dead worker's task too)


@dataclass(frozen=True)
class Settings:
    databento: DatabentoSettings = field(default_factory=DatabentoSettings)
    bars: BarSettings = field(default_factory=BarSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    live: LiveSettings = field(default_factory=LiveSettings)
    logging: LogSettings = field(default_factory=LogSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    source_path: Path | None = None
    #: bars.session was not configured: it holds the configured dataset's default for now, and
    #: pipeline.settle_session decides it for the dataset actually written (a --from-dbn file
    #: names its own), keeping the session a store's existing files were built with.
    session_pending: bool = False


_SECTIONS = {
    "databento": DatabentoSettings,
    "bars": BarSettings,
    "store": StoreSettings,
    "validation": ValidationSettings,
    "live": LiveSettings,
    "logging": LogSettings,
    "cluster": ClusterSettings,
}


def _expect(key: str, value: Any, kinds: type | tuple[type, ...], allowed: str) -> Any:
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ConfigError(key, value, allowed)
    if not isinstance(value, kinds):
        raise ConfigError(key, value, allowed)
    return value


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(choices))
    return value


def _positive(key: str, value: Any, kind: type = float, allow_zero: bool = False) -> Any:
    kinds: tuple[type, ...] = (int, float) if kind is float else (int,)
    _expect(key, value, kinds, f"a {'non-negative' if allow_zero else 'positive'} number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, value, f"a {'non-negative' if allow_zero else 'positive'} number")
    return kind(value)


def _build_section(name: str, raw: dict[str, Any]) -> Any:
    cls = _SECTIONS[name]
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{name}.{key}", raw[key], "a known key: " + ", ".join(sorted(known)))
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        kw[key] = _convert(f"{name}.{key}", value)
    return cls(**kw)


def _convert(key: str, value: Any) -> Any:  # noqa: C901 - one flat table of keys
    match key:
        case "databento.dataset":
            v = _expect(key, value, str, "a Databento dataset code such as GLBX.MDP3")
            if not v or not all(part.isalnum() for part in v.split(".")):
                raise ConfigError(key, value, "a Databento dataset code such as GLBX.MDP3")
            return v.upper()
        case "databento.schema":
            return _choice(key, value, INPUT_KINDS)
        case "databento.stype_in":
            return _choice(key, value, STYPES)
        case "databento.symbols":
            if isinstance(value, str):
                value = [s.strip() for s in value.split(",") if s.strip()]
            _expect(key, value, list, "a list of symbol strings")
            if not all(isinstance(s, str) and s.strip() for s in value):
                raise ConfigError(key, value, "a list of non-empty symbol strings")
            if any(not s.isprintable() for s in value):  # NUL, newline...: no file or request holds them
                raise ConfigError(key, value, "symbols without control characters (NUL, newline, tab)")
            return tuple(value)
        case "databento.historical_gateway":
            v = _expect(key, value, str, "a URL such as https://hist.databento.com")
            if v and not v.startswith(("http://", "https://")):
                raise ConfigError(key, value, "empty, or a URL starting with http:// or https://")
            return v
        case "databento.live_gateway":
            v = _expect(key, value, str, "'host:port', or empty for Databento's default")
            if v:
                host, _, port = v.rpartition(":")
                if not host or not port.isdigit() or not 0 < int(port) < 65536:
                    raise ConfigError(key, value, "'host:port' with a port 1-65535")
            return v
        case "databento.max_cost":
            return _positive(key, value, float, allow_zero=True)
        case "bars.timeframes":
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            _expect(key, value, list, "a list of timeframes such as ['1s', '1min', '1d']")
            try:
                return parse_timeframes(value)
            except TimeframeError as e:
                raise ConfigError(key, value, str(e)) from None
        case "bars.session":
            try:
                return Session.parse(_expect(key, value, str, "'HH:MM Zone/Name', or 'auto'"))
            except ValueError as e:
                raise ConfigError(key, value, str(e)) from None
        case "bars.per_publisher":
            return _expect(key, value, bool, "true or false")
        case "bars.trade_clock":
            return _choice(key, value, TRADE_CLOCKS)
        case "store.path":
            return Path(_expect(key, value, str, "a directory path"))
        case "store.chunk_rows":
            v = _positive(key, value, int)
            if not BAR_PAGE_ROWS <= v <= 1_000_000 or v % BAR_PAGE_ROWS:
                pages = BAR_PAGE_ROWS * BAR_DTYPE.itemsize // 4096
                raise ConfigError(key, value, f"a multiple of {BAR_PAGE_ROWS} up to 1000000, such as 4096 (the "
                                  f"default): {BAR_PAGE_ROWS} bars are {pages} whole 4 KiB pages, and "
                                  "the store starts each chunk on a page, so other sizes leave a gap after every chunk")
            return v
        case "store.compression":
            return _choice(key, value, ("none", "gzip", "lzf"))
        case "validation.policy":
            return _choice(key, value, POLICIES)
        case "validation.rules":
            _expect(key, value, dict, "a table of rule = policy")
            out = []
            for rule, policy in value.items():
                if rule not in RECORD_RULE_NAMES:
                    raise ConfigError(
                        f"{key}.{rule}", policy, "a per-record rule: " + ", ".join(RECORD_RULE_NAMES)
                    )
                out.append((rule, _choice(f"{key}.{rule}", policy, POLICIES)))
            return tuple(out)
        case "validation.max_volume":
            return _positive(key, value, int, allow_zero=True)
        case "validation.price_jump":
            v = _positive(key, value, float)
            if v > 10:
                raise ConfigError(key, value, "a fraction of the last close, e.g. 0.1 for 10%")
            return v
        case "validation.gap":
            try:
                return parse_timeframe(_expect(key, value, str, "a duration such as '5min'"))
            except TimeframeError as e:
                raise ConfigError(key, value, str(e)) from None
        case "validation.calendar":
            return _expect(key, value, str, "'auto', 'none' or an exchange_calendars name")
        case "validation.volume_outlier_sigma":
            return _positive(key, value, float)
        case "live.heartbeat_interval_s":
            v = _positive(key, value, int)
            if not 5 <= v <= 1800:
                raise ConfigError(key, value, "5 to 1800 seconds (Databento's range)")
            return v
        case "live.batch_max_records" | "live.queue_size":
            return _positive(key, value, int)
        case "live.metrics_port":
            v = _positive(key, value, int, allow_zero=True)
            if v > 65535:
                raise ConfigError(key, value, "0 (off) or a port 1-65535")
            return v
        case "live.metrics_host":
            return _expect(key, value, str, "a host address, normally 127.0.0.1")
        case (
            "live.close_grace_s"
            | "live.batch_max_ms"
            | "live.heartbeat_timeout_s"
            | "live.reconnect_min_s"
            | "live.reconnect_max_s"
            | "live.replay_window_h"
        ):
            return _positive(key, value, float)
        case "logging.level":
            return _choice(key, str(value).lower(), ("debug", "info", "warning", "error"))
        case "logging.format":
            return _choice(key, value, ("auto", "json", "console"))
        case "logging.file":
            return _expect(key, value, str, "a file path, or empty for stderr")
        case "cluster.scheduler":
            v = _expect(key, value, str, "a Dask scheduler address such as tcp://10.0.0.5:8786")
            if v and not _scheduler_address(v):
                raise ConfigError(key, value, "a Dask scheduler address such as tcp://10.0.0.5:8786 "
                                  "(tcp:// or tls://, host and port), or empty")
            return v
        case "cluster.workers":
            v = _positive(key, value, int, allow_zero=True)
            if v > 1024:
                raise ConfigError(key, value, "0 (no local cluster) to 1024 worker processes")
            return v
        case "cluster.retries":
            v = _positive(key, value, int, allow_zero=True)
            if v > 100:
                raise ConfigError(key, value, "0 to 100")
            return v
    raise ConfigError(key, value, "a known key")  # pragma: no cover - guarded by _build_section


def parse_override(text: str) -> tuple[str, Any]:
    """'section.key=value' with a TOML value; a bare word is taken as a string."""
    if "=" not in text:
        raise ConfigError(text, None, "an override of the form section.key=value")
    key, _, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if key.count(".") != 1:
        raise ConfigError(key, raw, "a dotted key section.key, e.g. bars.timeframes")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_settings(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Read TOML (if given), apply dotted-key overrides, validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError("--config", str(p), "an existing TOML file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", str(p), f"valid TOML ({e})") from None
    raw = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in _SECTIONS:
            raise ConfigError(key, value, "a section: " + ", ".join(_SECTIONS))
        raw.setdefault(section, {})[name] = value
    for section, body in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(section, body, "a section: " + ", ".join(_SECTIONS))
        if not isinstance(body, dict):
            raise ConfigError(section, body, "a TOML table [" + section + "]")
        if "api_key" in body or "key" in body:
            raise ConfigError(
                f"{section}.api_key", "<hidden>", f"nothing: the API key comes only from {API_KEY_ENV}"
            )
    bars = raw.get("bars", {})
    pending = str(bars.get("session", "auto")).strip().lower() == "auto"
    if pending:  # not configured, or "auto": the dataset decides (timeframes.SESSION_DEFAULTS)
        bars.pop("session", None)
    built = {name: _build_section(name, raw.get(name, {})) for name in _SECTIONS}
    if pending:
        built["bars"] = replace(built["bars"], session=default_session(built["databento"].dataset))
    settings = Settings(**built, source_path=Path(path) if path else None, session_pending=pending)
    _cross_check(settings)
    return settings


def check_timeframes_fit(schema: str, timeframes: tuple[Timeframe, ...]) -> None:
    """Every timeframe must be a whole multiple of the input's interval (ohlcv-1m cannot make
    1s bars); used on the configured schema and on the schema a DBN file turns out to hold."""
    step = INPUT_INTERVAL_NS[schema] // 1_000_000_000
    bad = [t.name for t in timeframes if step and t.seconds % step]
    if bad:
        raise ConfigError(
            "bars.timeframes",
            bad,
            f"multiples of the {schema} input interval ({step} s): {schema} records cannot "
            "make finer bars",
        )


def _scheduler_address(text: str) -> bool:
    """'tcp://host:port' or 'tls://host:port' (Dask's own form), or a bare 'host:port'."""
    rest = text.split("://", 1)[1] if "://" in text else text
    if "://" in text and text.split("://", 1)[0] not in ("tcp", "tls"):
        return False
    host, _, port = rest.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _cross_check(s: Settings) -> None:
    check_timeframes_fit(s.databento.schema, s.bars.timeframes)
    if s.cluster.scheduler and s.cluster.workers:
        raise ConfigError("cluster.workers", s.cluster.workers,
                          "0 when cluster.scheduler is set (an existing cluster, or a local one: not both)")
    if s.live.reconnect_max_s < s.live.reconnect_min_s:
        raise ConfigError(
            "live.reconnect_max_s", s.live.reconnect_max_s, "at least live.reconnect_min_s"
        )


_IMPLIED_STYPES = (
    (re.compile(r"\.[cnv]\.\d+$", re.IGNORECASE), "continuous"),  # ES.c.0, CL.n.1, ES.v.0
    (re.compile(r"\.(FUT|OPT)$", re.IGNORECASE), "parent"),  # ES.FUT, AAPL.OPT
)


def implied_stype(symbol: str) -> str | None:
    """The stype Databento's symbology spells into a symbol (continuous 'ES.c.0', parent
    'ES.FUT'), or None for anything else."""
    for pattern, stype in _IMPLIED_STYPES:
        if pattern.search(symbol):
            return stype
    return None


def stype_hint(symbols: Iterable[str], stype_in: str) -> str:
    """'ES.c.0 is a continuous symbol: add --stype-in continuous ...' for the symbols whose
    pattern implies another stype than ``stype_in``; '' when none does. We hint rather than
    switch: the stype is part of a store file's contract and of what is paid for."""
    by_stype: dict[str, list[str]] = {}
    for s in symbols:
        implied = implied_stype(s)
        if implied and implied != stype_in:
            by_stype.setdefault(implied, []).append(s)
    return "; ".join(
        f"{', '.join(names)} {'is a' if len(names) == 1 else 'are'} {stype} symbol{'s' * (len(names) > 1)}: "
        f"add --stype-in {stype} (config databento.stype_in = \"{stype}\")"
        for stype, names in by_stype.items())


def load_api_key(env_file: str | Path | None = ".env", required: bool = True) -> str | None:
    """The API key from the environment, else from a .env file; never from TOML."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key and env_file and Path(env_file).is_file():
        from dotenv import dotenv_values

        key = (dotenv_values(env_file).get(API_KEY_ENV) or "").strip()
    if not key:
        if required:
            raise ConfigError(
                API_KEY_ENV,
                "",
                f"a Databento API key in the environment or in {env_file or '.env'} "
                f"({API_KEY_ENV}=db-...)",
            )
        return None
    from .observe import register_secret

    register_secret(key)
    return key

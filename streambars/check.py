"""`streambars check`: is the API key accepted, and can this machine reach Databento?

A new user's first question, answered without symbols, dates, a store or any cost:

* Historical, always: ``metadata.list_datasets`` (free, authenticated) through the same
  client and error mapping as backfill; prints the datasets the key can use.
* Live, when asked: connect, authenticate and subscribe for the configured dataset, then
  close *without starting the session*: the gateway streams (and bills) nothing before
  ``start_session``.

Each check prints one line as soon as it ends and is bounded by ``timeout`` seconds (the
clients' own limits are 10-100 s), so an unreachable gateway fails in seconds. All checks
run; the failure to report is then the one the user must act on first: a refused key or
dataset (exit 2, the line names the key by its last five characters only) before an
unreachable gateway (exit 1).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO, TypeVar

from .config import API_KEY_ENV, Settings, load_api_key
from .errors import AuthenticationError, DatasetError, StreambarsError, UsageError
from .observe import get_logger

log = get_logger("streambars.check")

T = TypeVar("T")
DEFAULT_HISTORICAL = "https://hist.databento.com"
DEFAULT_TIMEOUT_S = 5.0


class CheckTimeout(StreambarsError):
    """A gateway did not answer within the check's bound: unreachable for our purpose (exit 1)."""


@dataclass(frozen=True)
class CheckResult:
    """One check: what was checked, how long it took, and what it found or why it failed."""

    name: str
    target: str
    seconds: float
    detail: str = ""
    error: StreambarsError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def mask_key(key: str) -> str:
    """'...ABCDE': enough to tell keys apart (Databento's portal shows the same tail), never
    enough to use."""
    return "..." + key[-5:]


def key_origin(env_file: str | None) -> str:
    """Where load_api_key found the key (the environment wins over the .env file)."""
    if os.environ.get(API_KEY_ENV, "").strip():
        return f"from the environment ({API_KEY_ENV})"
    return f"from {env_file or '.env'}"


def _bounded(call: Callable[[], T], timeout: float, what: str) -> T:
    """``call()`` on a daemon thread, given up after ``timeout`` s (DNS and the Live client's
    connect/auth waits are not bounded by a socket timeout we control)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=f"check-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise CheckTimeout(f"{what}: no answer within {timeout:g} s; check the address, "
                           "the network and any firewall or proxy")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def check_historical(key: str, gateway: str, timeout: float) -> list[str]:
    """The datasets the key can use, from the Historical gateway (one try, bounded)."""
    from .sources.historical import DownloadError, HistoricalSource

    where = gateway or DEFAULT_HISTORICAL
    src = HistoricalSource(key, gateway or None, retries=0, timeout=timeout)
    try:
        return _bounded(src.list_datasets, timeout, f"Historical gateway {where}")
    except DownloadError as e:  # network or server error on the single try
        cause = str(e).split("last error: ", 1)[-1]
        raise DownloadError(f"cannot reach the Historical gateway {where}: {cause}") from None


def check_live(key: str, gateway: str, dataset: str, schema: str, timeout: float) -> str:
    """Authenticate a Live session for ``dataset`` and close it; returns its session id."""
    import databento as db
    import databento_dbn as dbn

    from .sources.live import connect_error, describe_gateway, parse_gateway, terminate_quietly

    host, port = parse_gateway(gateway or None)
    where = describe_gateway(host, port)

    def connect() -> str:
        live = db.Live(key=key, gateway=host, port=port, compression=dbn.Compression("none"))
        try:
            # subscribe() connects and authenticates; nothing is streamed before start().
            live.subscribe(dataset=dataset, schema=schema, symbols="ALL_SYMBOLS", stype_in="raw_symbol")
            return str(live.session_id)
        finally:
            terminate_quietly(live)

    try:
        return _bounded(connect, timeout, f"live gateway {where}")
    except CheckTimeout:
        raise
    except Exception as e:  # noqa: BLE001 - classified: unreachable, dataset or key
        raise connect_error(e, where, dataset) from None


def _first_to_fix(errors: list[StreambarsError]) -> StreambarsError:
    """A refused key or dataset (exit 2) is reported before an unreachable gateway (exit 1)."""
    return max(errors, key=lambda e: e.exit_code)


def run_check(settings: Settings, *, env_file: str | None, live: bool,
              timeout: float = DEFAULT_TIMEOUT_S, out: TextIO = sys.stdout) -> int:
    """The command: load the key, run the checks, print a line per check; 0 when all pass,
    else raise the error to fix first (the CLI prints it as one line with its exit code)."""
    if not timeout > 0:
        raise UsageError(f"--timeout {timeout:g}: give a positive number of seconds")
    t0 = time.monotonic()
    key = load_api_key(env_file)
    assert key is not None
    db = settings.databento
    masked, origin = mask_key(key), key_origin(env_file)
    print(f"key {masked} ({origin})", file=out, flush=True)
    results: list[CheckResult] = []

    def run(name: str, target: str, call: Callable[[], str]) -> None:
        start = time.monotonic()
        try:
            detail, error = call(), None
        except StreambarsError as e:
            detail, error = str(e), e
        r = CheckResult(name, target, time.monotonic() - start, detail, error)
        results.append(r)
        log.info("check", check=name, target=target, ok=r.ok, seconds=round(r.seconds, 3))
        status = "ok" if r.ok else "FAILED"
        where = "" if target in detail else f"{target}: "
        print(f"{name:<10}  {status:<6}  {r.seconds:6.2f} s  {where}{detail}", file=out, flush=True)

    def historical() -> str:
        names = check_historical(key, db.historical_gateway, timeout)
        return f"{len(names)} dataset(s): {', '.join(names)}"

    run("historical", db.historical_gateway or DEFAULT_HISTORICAL, historical)
    if live:
        def live_check() -> str:
            session = check_live(key, db.live_gateway, db.dataset, db.schema, timeout)
            return f"authenticated for {db.dataset} (session {session}); closed without streaming"

        run("live", db.live_gateway or "the Databento gateway", live_check)
    failed = [r.error for r in results if r.error is not None]
    took = time.monotonic() - t0
    if failed:
        e = _first_to_fix(failed)
        if isinstance(e, AuthenticationError | DatasetError):  # name the key, never the secret
            raise type(e)(f"key {masked} ({origin}): {e}")
        raise e
    print(f"all {len(results)} check(s) passed in {took:.2f} s", file=out, flush=True)
    return 0

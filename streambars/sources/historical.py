"""The Databento Historical API, through the real ``databento.Historical`` client.

::

    src = HistoricalSource(key, gateway="https://hist.databento.com")   # or None: default
    cost = src.get_cost("GLBX.MDP3", ["ES.c.0"], "ohlcv-1s", "continuous", start, end)   # USD
    res = src.download_month("GLBX.MDP3", "ES.c.0", "ohlcv-1s", "continuous",
                             month_start, month_end, archive.path(root, ds, sym, "2024-01"))
    found, not_found = src.resolve_symbols("GLBX.MDP3", ["ES.c.0", "NOPE"], "continuous", start, end)

Every method blocks (the client is synchronous): the pipeline calls them through
``anyio.to_thread.run_sync``. ``start``/``end`` may be datetimes (naive = UTC), dates,
ISO strings or integer nanoseconds; ``end`` is exclusive.

Errors (all :class:`~streambars.errors.SourceError`, messages never carry the API key):

* 401/403 -> :class:`~streambars.errors.AuthenticationError` at once, no retry (exit 2).
* 400/403/404/422 whose detail names the dataset (``case`` ``dataset_*`` or the message) ->
  :class:`~streambars.errors.DatasetError` (exit 2): a wrong dataset is not a refused key.
* The local disk failing under a download (ENOSPC, EFBIG, EDQUOT, EROFS, EACCES, ...; the
  client reports it as ``BentoError('Error streaming response: [Errno 28] ...')``) ->
  :class:`~streambars.errors.StoreError` at once naming the month and directory: retrying
  cannot help, and the partial temp file is removed.
* 422 ``symbology_invalid_request`` / 404 -> :class:`UnknownSymbolError` naming the symbol(s),
  no retry. (Databento also answers this for a range in which a *real* symbol resolved to
  nothing, e.g. a raw futures symbol before its listing: call :meth:`resolve_symbols` over the
  whole range first to tell the two apart.)
* 5xx, 408, 429, connection errors, a body cut off in transit, and a body that does not
  decode as whole DBN (truncated/corrupt zstd, a bad record) are retried with exponential
  backoff and full jitter (``retries`` times, ``backoff_min``..``backoff_max`` seconds); when
  the tries are spent: :class:`DownloadError` naming dataset, symbol, range and the last cause.
  The retry loop is ten lines here rather than a dependency.

``download_month`` streams the response to a temp file beside ``dest`` (the client writes it:
no full decode in memory), checks it decodes as whole DBN of the asked schema
(:func:`streambars.sources.dbnfile.scan`, bounded memory), then fsyncs and renames it into
place: the archive never holds a partial or corrupt month. A month without records is a
valid DBN file with zero records (no error). For ``stype_in=parent`` it also resolves the
instrument_ids of the month to raw symbols (``symbology.resolve``, free) and writes the
``<month>.symbols.json`` sidecar before the DBN file appears.

The gateway: ``None``/empty for Databento's; ``https://host[:port]`` for another (the fake
in tests, a private deployment; trust a private CA with ``REQUESTS_CA_BUNDLE``); ``http://``
is honoured too (the client itself would silently switch it to https).
"""

from __future__ import annotations

import errno
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from .. import archive
from ..errors import AuthenticationError, DatasetError, SourceError, StoreError
from ..observe import get_logger, register_secret, scrub
from ..timeutil import to_ns
from . import dbnfile

log = get_logger("streambars.sources.historical")

T = TypeVar("T")
#: pandas.Timestamp is a datetime: accepted too (pandas is not imported here: a backfill from the
#: raw archive would carry its ~100 MB for nothing).
When = datetime | date | str | int


class UnknownSymbolError(SourceError):
    """Databento could not resolve the symbol(s) in the dataset and range asked for: the
    user's input (symbol, stype, dataset) to fix, so exit 2 like any bad input."""

    exit_code = 2

    def __init__(self, message: str, symbols: tuple[str, ...]):
        super().__init__(message)
        self.symbols = symbols


class DownloadError(SourceError):
    """A request still failed (server error, network, corrupt body) after every retry."""


#: errno values of the local file system (not the network): retrying a download cannot help.
_LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES,
                           errno.EPERM, errno.EIO, errno.ENOENT, errno.EMFILE, errno.ENFILE})
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\] ([^\]:']*)")


def _local_write_error(err: BaseException) -> str | None:
    """'No space left on device (errno 28)' when ``err`` is the local disk failing under the
    client's download (it wraps the OSError of ``write`` as BentoError('Error streaming
    response: [Errno 28] ...') without a cause; ``close`` raises the OSError itself); else None."""
    import requests

    if isinstance(err, OSError) and not isinstance(err, requests.RequestException):
        if err.errno in _LOCAL_ERRNOS or err.errno is None:
            return f"{err.strerror or err} (errno {err.errno})"
        return None
    text = str(err)
    if type(err).__name__ == "BentoError" and text.startswith("Error streaming response"):
        m = _ERRNO_IN_TEXT.search(text)
        if m and int(m[1]) in _LOCAL_ERRNOS:
            return f"{os.strerror(int(m[1]))} (errno {m[1]})"
    return None


class _Retryable(Exception):
    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    records: int
    bytes: int
    attempts: int
    seconds: float


def _describe_range(start: int, end: int) -> str:
    day = 86_400_000_000_000
    fmt = "%Y-%m-%d" if start % day == 0 and end % day == 0 else "%Y-%m-%dT%H:%M:%S"
    return f"[{_utc(start).strftime(fmt)}, {_utc(end).strftime(fmt)})"


def _utc(ns: int) -> datetime:
    """A UTC datetime of integer nanoseconds (seconds precision is all it is printed with)."""
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC)


def _days(start: When, end: When) -> tuple[date, date]:
    """The dates [first, last + 1 day] a range of any accepted type touches, for the date-based
    symbology endpoints."""
    a, b = to_ns(start), to_ns(end)
    assert a is not None and b is not None
    return _utc(a).date(), (_utc(b - 1) + timedelta(days=1)).date()


class HistoricalSource:
    """A thin, retrying wrapper over ``databento.Historical``; see the module doc."""

    def __init__(
        self,
        key: str,
        gateway: str | None = None,
        *,
        retries: int = 5,
        backoff_min: float = 1.0,
        backoff_max: float = 60.0,
        timeout: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import databento

        register_secret(key)
        self.gateway = gateway or None
        self.retries = retries
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self._sleep = sleep
        try:
            if self.gateway:
                self._client = databento.Historical(key=key, gateway=self.gateway)
            else:
                self._client = databento.Historical(key=key)
        except ValueError as e:
            raise SourceError(f"Databento Historical client: {scrub(str(e))}") from None
        apis = (self._client.timeseries, self._client.metadata, self._client.symbology, self._client.batch)
        if self.gateway and self.gateway.startswith("http://"):
            for api in apis:
                api._base_url = "http://" + api._base_url.removeprefix("https://")
        if timeout is not None:
            for api in apis:
                api.TIMEOUT = timeout

    # ------------------------------------------------------------------ public API

    def get_cost(self, dataset: str, symbols: Iterable[str], schema: str, stype_in: str,
                 start: When, end: When) -> float:
        """The price in USD of ``timeseries.get_range`` for these symbols and range."""
        syms = list(symbols)
        s, e = to_ns(start), to_ns(end)
        what = f"cost of {dataset} {schema} {','.join(syms)} {_describe_range(s, e)}"

        def call() -> float:
            return float(self._client.metadata.get_cost(
                dataset=dataset, start=s, end=e, symbols=syms, schema=schema, stype_in=stype_in))

        return self._with_retries(what, tuple(syms), call)

    def list_datasets(self) -> list[str]:
        """``metadata.list_datasets`` (free): the dataset codes the key can use. The
        cheapest authenticated call there is, so `streambars check` tests key and network
        with it."""
        return [str(d) for d in self._with_retries("list datasets", (), self._client.metadata.list_datasets)]

    def resolve_symbols(self, dataset: str, symbols: Iterable[str], stype_in: str,
                        start: When, end: When) -> tuple[dict[str, list[dict[str, str]]], list[str]]:
        """``symbology.resolve`` (free): ({symbol: [{d0, d1, s}, ...]}, [not found symbols])."""
        syms = list(symbols)
        d0, d1 = _days(start, end)
        what = f"resolve {dataset} {stype_in} {','.join(syms)}"

        def call() -> dict[str, Any]:
            return self._client.symbology.resolve(dataset=dataset, symbols=syms, stype_in=stype_in,
                                                  stype_out="instrument_id", start_date=d0, end_date=d1)

        try:
            out = self._with_retries(what, tuple(syms), call)
        except UnknownSymbolError as err:
            return {}, list(err.symbols)
        # The client upper-cases raw symbols before sending them ('ES.c.0' -> 'ES.C.0'): name
        # what was not found as the caller spelled it.
        spelled = {s.upper(): s for s in syms}
        not_found = [spelled.get(str(x).upper(), str(x)) if str(x) not in syms else str(x)
                     for x in out.get("not_found", [])]
        return dict(out.get("result", {})), not_found

    def raw_symbols(self, dataset: str, instrument_ids: Iterable[int], start: When, end: When) -> dict[int, str]:
        """instrument_id -> raw symbol over a range (the last mapping of each wins)."""
        ids = sorted({int(i) for i in instrument_ids})
        if not ids:
            return {}
        d0, d1 = _days(start, end)
        out: dict[int, str] = {}
        for i in range(0, len(ids), 2000):
            part = [str(x) for x in ids[i:i + 2000]]

            def call(part: list[str] = part) -> dict[str, Any]:
                return self._client.symbology.resolve(dataset=dataset, symbols=part, stype_in="instrument_id",
                                                      stype_out="raw_symbol", start_date=d0, end_date=d1)

            res = self._with_retries(f"raw symbols of {len(part)} instrument(s) in {dataset}", (), call)
            for iid, rows in res.get("result", {}).items():
                if rows:
                    out[int(iid)] = rows[-1]["s"]
        return out

    def download_month(self, dataset: str, symbol: str, schema: str, stype_in: str,
                       month_start: When, month_end: When, dest_path: str | Path) -> DownloadResult:
        """Download ``symbol`` over [month_start, month_end) into ``dest_path`` atomically."""
        dest = Path(dest_path)
        s, e = to_ns(month_start), to_ns(month_end)
        what = f"{dataset} {schema} {symbol} ({stype_in}) {_describe_range(s, e)}"
        t0 = time.monotonic()
        attempts = 0

        def call() -> dbnfile.DbnInfo:
            nonlocal attempts
            attempts += 1
            with archive.atomic_path(dest) as tmp:
                try:
                    self._client.timeseries.get_range(dataset=dataset, start=s, end=e, symbols=[symbol],
                                                      schema=schema, stype_in=stype_in, path=tmp)
                except Exception as err:
                    local = _local_write_error(err)
                    if local is None:
                        raise
                    raise StoreError(
                        f"{what}: cannot write the download to {dest.parent}: {local}; free space "
                        "(or raise the file size limit) and rerun: archived months are kept, "
                        "the partial file was removed") from None
                try:
                    info = dbnfile.scan(tmp, expected_schema=schema)
                except SourceError as err:
                    raise _Retryable(f"the response did not decode as whole DBN: {err}") from None
                if stype_in == "parent":
                    ids = {int(iv["symbol"]) for ivs in info.mappings.values() for iv in ivs
                           if str(iv["symbol"]).isdigit()}
                    archive.write_symbols(dest, self.raw_symbols(dataset, ids, s, e))
            return info

        info = self._with_retries(what, (symbol,), call)
        size = dest.stat().st_size
        log.info("downloaded", dataset=dataset, symbol=symbol, schema=schema, range=_describe_range(s, e),
                 records=info.records, bytes=size, attempts=attempts, path=str(dest))
        return DownloadResult(dest, int(info.records or 0), size, attempts, time.monotonic() - t0)

    # ------------------------------------------------------------------ errors and retries

    def _with_retries(self, what: str, symbols: tuple[str, ...], call: Callable[[], T]) -> T:
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return self._classify(what, symbols, call)
            except _Retryable as r:
                last = scrub(r.cause)
                if attempt == self.retries:
                    break
                delay = min(self.backoff_max, self.backoff_min * 2**attempt) * random.uniform(0.5, 1.0)
                log.warning("Databento request failed; retrying", what=what, attempt=attempt + 1,
                            retry_in_s=round(delay, 3), cause=last)
                self._sleep(delay)
        raise DownloadError(f"{what}: still failing after {self.retries + 1} tries; last error: {last}")

    @staticmethod
    def _classify(what: str, symbols: tuple[str, ...], call: Callable[[], T]) -> T:
        import requests
        from databento.common.error import BentoClientError, BentoError, BentoServerError

        try:
            return call()
        except BentoServerError as e:
            raise _Retryable(f"server error {scrub(str(e))}") from None
        except BentoClientError as e:
            status = e.http_status
            detail = (e.json_body or {}).get("detail") if isinstance(e.json_body, dict) else None
            case = detail.get("case", "") if isinstance(detail, dict) else ""
            text = scrub(str(e)).replace("\n", ": ")
            message = detail.get("message", "") if isinstance(detail, dict) else str(detail or "")
            if status in (400, 403, 404, 422) and ("dataset" in case or "dataset" in message.lower()):
                # Checked before the key: Databento also answers 403 for a dataset the key
                # is not entitled to, and that is a configuration fix, not a new key.
                raise DatasetError(
                    f"{what}: Databento does not serve this dataset ({text}); check --dataset / "
                    "databento.dataset (and that your plan includes it)") from None
            if status in (401, 403):
                raise AuthenticationError(
                    f"Databento refused the API key ({text}); check DATABENTO_API_KEY") from None
            if status in (408, 429):
                raise _Retryable(text) from None
            if status == 404 or case.startswith("symbology"):
                names = ", ".join(symbols) or "?"
                raise UnknownSymbolError(
                    f"{what}: Databento could not resolve symbol(s) {names} ({text})", symbols) from None
            raise SourceError(f"{what}: Databento rejected the request ({text})") from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            raise _Retryable(f"network: {scrub(str(e))}") from None
        except BentoError as e:  # 'Error streaming response', undecodable DBN header, ...
            raise _Retryable(scrub(str(e))) from None
        except Exception as e:
            if type(e).__name__ == "DBNError":  # the client could not read the Metadata it got
                raise _Retryable(f"undecodable DBN: {scrub(str(e))}") from None
            raise

"""A fake Databento Historical gateway on 127.0.0.1, driven by the real ``databento`` client.

It serves what the client calls (paths and form fields as ``databento/historical/api/*.py``
send them):

* ``POST /v0/timeseries.get_range`` -> DBN: a v3 Metadata header (dataset, schema, stype_in,
  stype_out=instrument_id, start/end, requested symbols, ``not_found``, and symbology
  ``mappings`` from each requested symbol to the instrument_ids it covered, day by day: a
  continuous contract that rolls gets one interval per instrument) then the records. zstd
  compressed (one frame, with checksum) when the form says ``compression=zstd`` (the client
  always does), plain DBN otherwise. Records are filtered as Databento does: ``ts_recv`` for
  schemas that have it (trades), else ``ts_event``, in [start, end), and only while the
  instrument was mapped to the symbol.
* ``POST /v0/metadata.get_cost`` -> a JSON number (``cost_per_record`` x records).
* ``GET /v0/metadata.list_datasets`` -> a JSON list of dataset codes (``KNOWN_DATASETS`` and
  those given data here, sorted); what `streambars check` calls.
* ``POST /v0/symbology.resolve`` -> Databento's JSON (``result``: symbol -> [{d0, d1, s}],
  ``not_found``, ``partial``), for raw_symbol/continuous/parent -> instrument_id and
  instrument_id -> raw_symbol.

Auth is HTTP basic with the API key as user name; a wrong or missing key gets 401 and
Databento's JSON error body (``detail.case = auth_authentication_failed``), which the client
turns into ``BentoClientError('401 auth_authentication_failed\\nAuthentication failed.')``.
A dataset the gateway does not know (not one of Databento's codes in ``KNOWN_DATASETS`` nor
one given data here) gets 422 ``dataset_invalid`` with a message naming it, on every
endpoint, as the real gateway rejects an unknown dataset code before looking at symbols.
A request where none of the symbols resolve gets 422 ``symbology_invalid_request`` "None of the
symbols could be resolved" (what Databento answers); when only some resolve, the status is 206
and the rest are listed in the Metadata's ``not_found`` (or the JSON's ``not_found``).

TLS: the client rewrites every gateway URL to https, so the fake serves HTTPS with a
throwaway CA made by ``trustme``; the client trusts it through ``REQUESTS_CA_BUNDLE``
(``requests`` reads it per request). ``FakeHistorical.env`` holds the variables for
subprocesses (also ``SSL_CERT_FILE``, for aiohttp). ``tls=False`` serves plain HTTP for a
gateway given as ``http://...`` (which ``HistoricalSource`` honours).

Knobs (thread-safe): ``fail_next(n, status)``, ``corrupt_next(n, mode)`` with mode
``truncate`` (the zstd body cut short, HTTP framing intact), ``garbage`` (record headers
overwritten inside a well-formed zstd frame) or ``disconnect`` (the connection closed
mid-body, fewer bytes than Content-Length), ``latency`` (seconds before each answer),
``requests`` (every request: endpoint and form) and ``count(symbol, month)`` (get_range
requests per symbol and 'YYYY-MM' of their start).
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl

import databento_dbn as dbn
import numpy as np
import pandas as pd
import zstandard

NS_PER_DAY = 86_400 * 1_000_000_000
#: Databento dataset codes the fake accepts even without data (an empty answer, not an error).
KNOWN_DATASETS = frozenset({
    "GLBX.MDP3", "XNAS.ITCH", "XNYS.PILLAR", "XBOS.ITCH", "XPSX.ITCH", "BATS.PITCH", "BATY.PITCH",
    "EDGA.PITCH", "EDGX.PITCH", "IEXG.TOPS", "DBEQ.BASIC", "EQUS.MINI", "OPRA.PILLAR", "IFEU.IMPACT",
    "NDEX.IMPACT", "XEUR.EOBI", "XEEE.EOBI",
})


def _day(ns: int) -> date:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)).date()


def _day_ns(d: date) -> int:
    return (d - date(1970, 1, 1)).days * NS_PER_DAY


def parse_when(text: str) -> int:
    """Nanoseconds since the epoch from the client's start/end form values (ISO or int)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    ts = pd.Timestamp(text)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return int(ts.value)


def error_body(status: int, case: str, message: str) -> bytes:
    return json.dumps(
        {"detail": {"case": case, "message": message, "status_code": status, "docs": None, "payload": None}}
    ).encode()


@dataclass
class _Interval:
    d0: date
    d1: date  # exclusive
    iid: int


@dataclass
class FakeHistorical:
    """In-memory Historical gateway. Build its data with add_instrument/add_continuous/
    add_records, then ``start()`` (or use the ``fake_historical`` fixture)."""

    key: str
    tls: bool = True
    cost_per_record: float = 1e-5
    latency: float = 0.0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    _symbology: dict[tuple[str, str, str], list[_Interval]] = field(default_factory=dict)
    _raw: dict[tuple[str, int], list[tuple[date, date, str]]] = field(default_factory=dict)
    _records: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _fail: list[int] = field(default_factory=list)
    _corrupt: list[str] = field(default_factory=list)
    _counts: Counter = field(default_factory=Counter)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    ca_path: Path | None = None

    # ------------------------------------------------------------------ data set-up

    def add_instrument(self, dataset: str, instrument_id: int, raw_symbol: str, start: date, end: date,
                       parent: str | None = None) -> None:
        """An instrument listed over [start, end) with a raw symbol (and optional parent)."""
        self._symbology.setdefault((dataset, "raw_symbol", raw_symbol), []).append(_Interval(start, end, instrument_id))
        self._raw.setdefault((dataset, instrument_id), []).append((start, end, raw_symbol))
        if parent:
            self._symbology.setdefault((dataset, "parent", parent), []).append(_Interval(start, end, instrument_id))

    def add_continuous(self, dataset: str, symbol: str, rolls: list[tuple[date, date, int]]) -> None:
        """A continuous symbol (e.g. ES.c.0): [(from, to, instrument_id), ...] day ranges."""
        self._symbology[(dataset, "continuous", symbol)] = [_Interval(a, b, i) for a, b, i in rolls]

    def add_records(self, dataset: str, schema: str, records: np.ndarray) -> None:
        """DBN v3 structs (OHLCVMsg or TradeMsg layout) served for (dataset, schema)."""
        old = self._records.get((dataset, schema))
        arr = records if old is None else np.concatenate([old, records])
        key = "ts_recv" if "ts_recv" in arr.dtype.names else "ts_event"
        self._records[(dataset, schema)] = arr[np.argsort(arr[key], kind="stable")]

    def datasets(self) -> list[str]:
        """What ``metadata.list_datasets`` answers: the known codes and those given data."""
        given = {k[0] for k in (*self._symbology, *self._records, *self._raw)}
        return sorted(KNOWN_DATASETS | given)

    def knows(self, dataset: str) -> bool:
        """A real dataset code, or one this fake was given data for."""
        return (dataset in KNOWN_DATASETS
                or any(k[0] == dataset for k in (*self._symbology, *self._records, *self._raw)))

    # ------------------------------------------------------------------ knobs

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        with self._lock:
            self._fail += [status] * n

    def corrupt_next(self, n: int = 1, mode: str = "truncate") -> None:
        assert mode in ("truncate", "garbage", "disconnect")
        with self._lock:
            self._corrupt += [mode] * n

    def count(self, symbol: str | None = None, month: str | None = None) -> int:
        """get_range requests so far, optionally for one symbol and/or 'YYYY-MM'."""
        with self._lock:
            return sum(v for (s, m), v in self._counts.items()
                       if (symbol is None or s == symbol) and (month is None or m == month))

    def endpoint_count(self, endpoint: str) -> int:
        with self._lock:
            return sum(1 for e, _ in self.requests if e == endpoint)

    # ------------------------------------------------------------------ serving

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client in another process to trust the fake's CA."""
        if not self.tls or self.ca_path is None:
            return {}
        return {"REQUESTS_CA_BUNDLE": str(self.ca_path), "SSL_CERT_FILE": str(self.ca_path)}

    def start(self, cert_dir: Path | None = None) -> FakeHistorical:
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        server = _QuietServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        if self.tls:
            import tempfile

            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(ctx)
            d = Path(cert_dir or tempfile.mkdtemp(prefix="fakehist-"))
            self.ca_path = d / "fake-ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_path))
            server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-historical", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHistorical:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ logic

    def resolve(self, dataset: str, stype_in: str, symbol: str, start: int, end: int) -> list[_Interval]:
        """Mapping intervals of ``symbol`` clipped to the request's days; [] if unresolved."""
        d0, d1 = _day(start), _day(end - 1) + timedelta(days=1)
        out = []
        for iv in self._symbology.get((dataset, stype_in, symbol), []):
            a, b = max(iv.d0, d0), min(iv.d1, d1)
            if a < b:
                out.append(_Interval(a, b, iv.iid))
        return out

    def _select(self, dataset: str, schema: str, intervals: list[_Interval], start: int, end: int) -> np.ndarray:
        arr = self._records.get((dataset, schema))
        if arr is None or not intervals:
            return np.empty(0, dtype=_dtype(schema))
        key = arr["ts_recv"] if "ts_recv" in arr.dtype.names else arr["ts_event"]
        lo, hi = np.searchsorted(key, start), np.searchsorted(key, end)
        part, pkey = arr[lo:hi], key[lo:hi].astype(np.int64)
        mask = np.zeros(len(part), dtype=bool)
        for iv in intervals:
            mask |= (part["instrument_id"] == iv.iid) & (pkey >= _day_ns(iv.d0)) & (pkey < _day_ns(iv.d1))
        return part[mask]

    def get_range(self, form: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        dataset, schema, stype_in, start, end, symbols = _query(form)
        if not symbols:
            return 422, error_body(422, "symbols_required", "At least one symbol is required."), {}
        mappings, chosen, not_found = [], [], []
        for s in symbols:
            ivs = self.resolve(dataset, stype_in, s, start, end)
            if not ivs:
                not_found.append(s)
                continue
            chosen += ivs
            mappings.append(SimpleNamespace(raw_symbol=s, intervals=[
                SimpleNamespace(start_date=iv.d0, end_date=iv.d1, symbol=str(iv.iid)) for iv in ivs]))
        if len(not_found) == len(symbols):
            return 422, error_body(422, "symbology_invalid_request", "None of the symbols could be resolved"), {}
        recs = self._select(dataset, schema, chosen, start, end)
        limit = int(form["limit"]) if form.get("limit") else None
        if limit:
            recs = recs[:limit]
        md = dbn.Metadata(
            dataset=dataset, start=start, end=end, stype_in=dbn.SType(stype_in),
            stype_out=dbn.SType.INSTRUMENT_ID, schema=dbn.Schema(schema), symbols=symbols,
            partial=[], not_found=not_found, mappings=mappings, limit=limit,
        )
        body = bytes(md) + recs.tobytes()
        status = 206 if not_found else 200
        with self._lock:
            mode = self._corrupt.pop(0) if self._corrupt else None
        if mode == "garbage" and len(recs):
            b = bytearray(body)
            at = len(bytes(md)) + (len(recs) // 2) * recs.dtype.itemsize
            b[at:at + 2] = b"\xff\xff"  # length and rtype of one record
            body = bytes(b)
        if form.get("compression", "none") == "zstd":
            body = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(body)
        headers = {"Content-Type": "application/octet-stream"}
        if mode == "truncate":
            body = body[: max(len(body) * 3 // 5, 1)]
        elif mode == "disconnect":
            headers["X-Fake-Disconnect"] = "1"
        return status, body, headers

    def get_cost(self, form: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        dataset, schema, stype_in, start, end, symbols = _query(form)
        n, unresolved = 0, 0
        for s in symbols:
            ivs = self.resolve(dataset, stype_in, s, start, end)
            if not ivs:
                unresolved += 1
                continue
            n += len(self._select(dataset, schema, ivs, start, end))
        if symbols and unresolved == len(symbols):
            return 422, error_body(422, "symbology_invalid_request", "None of the symbols could be resolved"), {}
        return (206 if unresolved else 200), json.dumps(round(n * self.cost_per_record, 6)).encode(), {
            "Content-Type": "application/json"}

    def symbology_resolve(self, form: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        dataset, stype_in, stype_out = form["dataset"], form["stype_in"], form["stype_out"]
        d0 = date.fromisoformat(form["start_date"])
        d1 = date.fromisoformat(form["end_date"]) if form.get("end_date") else d0 + timedelta(days=1)
        symbols = [s for s in form.get("symbols", "").split(",") if s]
        result: dict[str, list[dict[str, str]]] = {}
        not_found = []
        for s in symbols:
            rows = []
            if stype_in == "instrument_id" and stype_out == "raw_symbol":
                for a, b, raw in self._raw.get((dataset, int(s)), []):
                    lo, hi = max(a, d0), min(b, d1)
                    if lo < hi:
                        rows.append({"d0": lo.isoformat(), "d1": hi.isoformat(), "s": raw})
            else:
                for iv in self.resolve(dataset, stype_in, s, _day_ns(d0), _day_ns(d1)):
                    rows.append({"d0": iv.d0.isoformat(), "d1": iv.d1.isoformat(), "s": str(iv.iid)})
            if rows:
                result[s] = rows
            else:
                not_found.append(s)
        body = {
            "result": result, "symbols": symbols, "stype_in": stype_in, "stype_out": stype_out,
            "start_date": d0.isoformat(), "end_date": d1.isoformat(), "partial": [],
            "not_found": not_found, "message": "OK" if not not_found else "Not found", "status": 0 if not not_found else 2,
        }
        return 200, json.dumps(body).encode(), {"Content-Type": "application/json"}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # clients that hang up are normal here
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHistorical
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError):
                self.request.close()
                raise
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        headers = dict(headers or {})
        disconnect = headers.pop("X-Fake-Disconnect", None)
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("request-id", f"fake-{id(self):x}")
        if disconnect:
            self.send_header("Connection", "close")
        self.end_headers()
        if disconnect:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        for i in range(0, len(body), 1 << 16):
            self.wfile.write(body[i:i + (1 << 16)])

    def _authorized(self) -> bool:
        """HTTP basic auth with the key as user name; else answers 401 as Databento does."""
        auth = self.headers.get("Authorization", "")
        user = ""
        if auth.startswith("Basic "):
            try:
                user = base64.b64decode(auth[6:]).decode().partition(":")[0]
            except ValueError:
                user = ""
        if user != self.fake.key:
            self._send(401, error_body(401, "auth_authentication_failed", "Authentication failed."))
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        fake = self.fake
        endpoint = self.path.split("?")[0]
        with fake._lock:
            fake.requests.append((endpoint, dict(parse_qsl(self.path.partition("?")[2]))))
        if fake.latency:
            time.sleep(fake.latency)
        if not self._authorized():
            return
        if endpoint == "/v0/metadata.list_datasets":
            self._send(200, json.dumps(fake.datasets()).encode())
            return
        self._send(404, error_body(404, "not_found", "Not found."))

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        fake = self.fake
        length = int(self.headers.get("Content-Length", "0"))
        form = dict(parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True))
        endpoint = self.path.split("?")[0]
        with fake._lock:
            fake.requests.append((endpoint, form))
        if fake.latency:
            time.sleep(fake.latency)
        if not self._authorized():
            return
        handlers = {
            "/v0/timeseries.get_range": fake.get_range,
            "/v0/metadata.get_cost": fake.get_cost,
            "/v0/symbology.resolve": fake.symbology_resolve,
        }
        handler = handlers.get(endpoint)
        if handler is None:
            self._send(404, error_body(404, "not_found", f"No endpoint {endpoint}."))
            return
        dataset = form.get("dataset", "")
        if dataset and not fake.knows(dataset):
            self._send(422, error_body(422, "dataset_invalid", f"Invalid dataset '{dataset}'."))
            return
        if endpoint == "/v0/timeseries.get_range":
            month = ""
            with contextlib.suppress(ValueError, KeyError):
                month = pd.Timestamp(parse_when(form.get("start", "0")), tz="UTC").strftime("%Y-%m")
            with fake._lock:
                for s in form.get("symbols", "").split(","):
                    fake._counts[(s, month)] += 1
        with fake._lock:
            fail = fake._fail.pop(0) if fake._fail else None
        if fail is not None:
            msg = "The remote gateway timed out." if fail == 504 else "Internal error, please retry."
            self._send(fail, error_body(fail, "internal_error" if fail == 500 else "service_unavailable", msg))
            return
        try:
            status, body, headers = handler(form)
        except (KeyError, ValueError) as e:
            self._send(422, error_body(422, "invalid_request", f"Invalid request: {e}"))
            return
        self._send(status, body, headers)


def _query(form: dict[str, str]) -> tuple[str, str, str, int, int, list[str]]:
    """(dataset, schema, stype_in, start ns, end ns, symbols) of a get_range/get_cost form."""
    start = parse_when(form["start"])
    end = parse_when(form["end"]) if form.get("end") else start + NS_PER_DAY
    symbols = [s for s in form.get("symbols", "").split(",") if s]
    return form["dataset"], form["schema"], form.get("stype_in", "raw_symbol"), start, end, symbols


def _dtype(schema: str) -> np.dtype:
    cls = dbn.TradeMsg if schema == "trades" else dbn.OHLCVMsg
    return np.dtype(cls._dtypes)

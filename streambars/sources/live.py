"""The Databento Live API, through the real ``databento.Live`` client, as an async iterator.

::

    async with LiveSession(key, "GLBX.MDP3", "ohlcv-1s", ["ES.c.0", "NQ.c.0"], "continuous",
                           gateway="127.0.0.1:13000", start=None, registry=registry) as session:
        async for event in session:
            match event:
                case LiveRecords(batch=batch, records=raw): ...     # RecordBatch + DBN v3 structs
                case SymbolMapped(): ...                          # instrument_id -> stored symbol
                case EndOfInterval(ts_event=ts): ...              # Databento's END_OF_INTERVAL
                case Heartbeat(): ...                             # the gateway is alive, no data
                case GatewayError(): ...                          # ErrorMsg (e.g. unknown symbol)
                case SystemMessage(): ...                         # any other SystemMsg

**One connection, no reconnect loop**: the daemon owns that. When the connection ends in any
way but :meth:`LiveSession.close`, iteration raises :class:`LiveDisconnected` (a
:class:`~streambars.errors.SourceError`) carrying ``last_ts_event``, the latest ``ts_event``
of a data record received; open a new ``LiveSession(..., start=that)`` to replay from there
(``start`` is inclusive, so records at exactly that timestamp come again: drop what you
hold). :class:`HeartbeatTimeout` (a ``LiveDisconnected``) is raised when nothing at all, not
even a heartbeat, arrived for ``heartbeat_timeout_s``. A refused key or dataset (``success=0``
during the CRAM exchange) raises :class:`~streambars.errors.AuthenticationError` from
``connect``/``__aenter__`` (do not retry); a gateway that cannot be reached raises
:class:`LiveConnectError` (retry with backoff).

**Batches**: data records are kept as their raw bytes (``bytes(record)``, DBN v3 layout, no
Python object survives the pump) and handed on as one numpy structured array per batch, when
``batch_max_records`` are pending or the oldest pending record waited ``batch_max_ms``. A
control event (mapping, end of interval, error, system message) first flushes the pending
batch, so events and records keep the gateway's order. The batch's ``RecordBatch.series`` are
indices in ``registry`` of the *stored* symbol: the requested symbol for raw_symbol/continuous
(a contract that rolls keeps one series), the instrument's raw symbol for parent. Records of
an instrument no mapping named are left out of the batch and counted (``LiveRecords.unmapped``,
a warning once per instrument_id). An ``ErrorMsg`` for a symbol that does not resolve is
logged once per symbol and the session goes on.

**Threads and loops**: ``Live.subscribe`` blocks on the client's own thread (connect + CRAM),
so :meth:`LiveSession.connect` runs it through ``anyio.to_thread``. The client's async iterator
(with its own backpressure: it pauses the socket when its queue is full) is pumped by a task
of this session into a bounded stream of ``queue_size`` events: a slow consumer stops the
pump, the client's queue fills and reading from the socket pauses. The client's iterator
needs the asyncio backend of anyio.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from typing import Any

import anyio
import databento_dbn as dbn
import numpy as np
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from ..errors import AuthenticationError, DatasetError, SourceError
from ..observe import get_logger, register_secret, scrub
from ..records import INPUT_KINDS, RecordBatch, SeriesRegistry

log = get_logger("streambars.sources.live")

DEFAULT_PORT = 13000
_DATA_CLASS = {"ohlcv-1s": dbn.OHLCVMsg, "ohlcv-1m": dbn.OHLCVMsg, "trades": dbn.TradeMsg}


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class LiveRecords:
    """A batch of data records: ``records`` (DBN v3 structs) and the same rows as ``batch``."""

    batch: RecordBatch
    records: np.ndarray
    last_ts_event: int
    unmapped: int = 0


@dataclass(frozen=True)
class SymbolMapped:
    """instrument_id now maps to ``symbol`` (the stored symbol, index ``series``)."""

    instrument_id: int
    symbol: str
    series: int
    stype_in_symbol: str
    stype_out_symbol: str
    ts_event: int


@dataclass(frozen=True)
class EndOfInterval:
    """Databento's END_OF_INTERVAL system message (``ts_event`` as the gateway sent it)."""

    ts_event: int
    message: str


@dataclass(frozen=True)
class Heartbeat:
    ts_event: int


@dataclass(frozen=True)
class SystemMessage:
    """Any other SystemMsg: ``code`` e.g. 'subscription_ack', 'replay_completed',
    'slow_reader_warning'."""

    ts_event: int
    code: str
    message: str


@dataclass(frozen=True)
class GatewayError:
    """An ErrorMsg. ``symbol`` is set for ``symbol_resolution_failed`` when the message names
    one of the subscribed symbols."""

    ts_event: int
    code: str
    message: str
    symbol: str | None = None


LiveEvent = LiveRecords | SymbolMapped | EndOfInterval | Heartbeat | SystemMessage | GatewayError


# ----------------------------------------------------------------------------- errors


class LiveConnectError(SourceError):
    """The gateway could not be reached or did not answer in time (retry with backoff)."""


class LiveDisconnected(SourceError):
    """The connection ended; reconnect with ``start=last_ts_event`` to replay the gap."""

    def __init__(self, message: str, last_ts_event: int | None):
        super().__init__(message)
        self.last_ts_event = last_ts_event


class HeartbeatTimeout(LiveDisconnected):
    """Nothing arrived (not even a heartbeat) for longer than the configured timeout."""


class _End:
    pass


# ----------------------------------------------------------------------------- session


def parse_gateway(gateway: str | None) -> tuple[str | None, int]:
    """'host:port' / 'host' / None -> (host or None for Databento's default, port)."""
    if not gateway:
        return None, DEFAULT_PORT
    host, sep, port = gateway.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return gateway, DEFAULT_PORT


def describe_gateway(host: str | None, port: int) -> str:
    """'host:port' for messages ('the Databento gateway' when the client picks the host)."""
    return f"{host or 'the Databento gateway'}:{port}"


def connect_error(e: BaseException, where: str, dataset: str) -> SourceError:
    """What a failed connect + authenticate + subscribe means: unreachable (retry), a dataset
    the gateway does not serve, or a refused key (both exit 2: retrying cannot help)."""
    from databento.common.error import BentoError

    text = scrub(str(e))
    if not isinstance(e, BentoError) or text.startswith(("Connection to ", "Authentication with ")):
        return LiveConnectError(f"live gateway {where}: {text}")  # refused / timed out / OS error
    if "dataset" in text.lower():  # e.g. 'Unknown dataset X.': the key was fine
        return DatasetError(
            f"live gateway {where} does not serve dataset {dataset} ({text}); "
            "check databento.dataset / --dataset")
    return AuthenticationError(
        f"live gateway {where} refused the session for {dataset} ({text}); "
        f"check DATABENTO_API_KEY and the dataset")


class LiveSession:
    """One subscription on one connection to a Live gateway; see the module doc."""

    def __init__(
        self,
        key: str,
        dataset: str,
        schema: str,
        symbols: Iterable[str],
        stype_in: str = "raw_symbol",
        *,
        gateway: str | None = None,
        start: int | None = None,
        registry: SeriesRegistry | None = None,
        batch_max_records: int = 4096,
        batch_max_ms: float = 5.0,
        heartbeat_interval_s: int | None = None,
        heartbeat_timeout_s: float | None = None,
        queue_size: int = 64,
        compression: str = "none",
        trade_clock: str = "ts_recv",
    ):
        if schema not in INPUT_KINDS:
            raise SourceError(f"live schema {schema!r}: streambars reads {', '.join(INPUT_KINDS)}")
        register_secret(key)
        self._key = key
        self.dataset, self.schema, self.stype_in = dataset, schema, stype_in
        self.symbols = list(symbols)
        self.host, self.port = parse_gateway(gateway)
        self.start = start
        self.trade_clock = trade_clock
        self.registry = registry if registry is not None else SeriesRegistry()
        self.batch_max_records = batch_max_records
        self.batch_max_s = batch_max_ms / 1000.0
        self.heartbeat_interval_s = heartbeat_interval_s
        hb = heartbeat_interval_s or 30
        self.heartbeat_timeout_s = heartbeat_timeout_s or (hb + 10.0)
        self.queue_size = queue_size
        self.compression = compression
        self._data_cls = _DATA_CLASS[schema]
        self._dtype = np.dtype(self._data_cls._dtypes)
        self._live: Any = None
        self._stack: AsyncExitStack | None = None
        self._tg: Any = None
        self._done = False
        self._send: ObjectSendStream[Any] | None = None
        self._recv: ObjectReceiveStream[Any] | None = None
        self._lock: Any = None  # anyio primitives are made in connect(), inside the event loop
        self._pending: list[bytes] = []
        self._pending_since = 0.0
        self._pending_eoi: int | None = None
        self._pending_eoi_msg = ""
        self._wake: Any = None
        self._last_msg = 0.0
        self._closing = False
        self._map_ids = np.empty(0, np.uint32)
        self._map_series = np.empty(0, np.int32)
        self.symbol_map: dict[int, str] = {}
        self._warned_unmapped: set[int] = set()
        self._warned_symbols: set[str] = set()
        self.last_ts_event: int | None = None
        self.records_received = 0
        self.session_id: str | None = None

    # ------------------------------------------------------------------ connect / close

    async def __aenter__(self) -> LiveSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, authenticate, subscribe (off the event loop), start the pump. A session
        connects once; make a new one (``start=last_ts_event``) to reconnect."""
        if self._live is not None or self._done or self._closing:
            raise RuntimeError("a LiveSession connects once: make a new one to reconnect")
        import databento as db
        from databento.common.error import BentoError

        def blocking() -> Any:
            live = db.Live(key=self._key, gateway=self.host, port=self.port,
                           heartbeat_interval_s=self.heartbeat_interval_s,
                           compression=dbn.Compression(self.compression))
            try:
                live.subscribe(dataset=self.dataset, schema=self.schema, symbols=self.symbols,
                               stype_in=self.stype_in, start=self.start)
            except BaseException:
                terminate_quietly(live)
                raise
            return live

        where = describe_gateway(self.host, self.port)
        try:
            self._live = await anyio.to_thread.run_sync(blocking)
        except (BentoError, OSError, ValueError) as e:
            raise connect_error(e, where, self.dataset) from None
        self.session_id = self._live.session_id
        log.info("live subscribed", gateway=where, dataset=self.dataset, schema=self.schema,
                 stype_in=self.stype_in, symbols=",".join(self.symbols), start=self.start,
                 session_id=self.session_id)
        self._send, self._recv = anyio.create_memory_object_stream[Any](self.queue_size)
        self._lock, self._wake = anyio.Lock(), anyio.Event()
        self._last_msg = time.monotonic()
        stack = AsyncExitStack()
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        self._stack = stack
        self._tg.start_soon(self._pump, self._live)
        self._tg.start_soon(self._ticker)

    async def close(self) -> None:
        """Stop the session (iteration then ends without error); idempotent. Call it from the
        task that connected (``async with`` does)."""
        self._closing = True
        live, self._live = self._live, None
        if live is not None:
            terminate_quietly(live)
        if self._recv is not None:
            self._recv.close()  # a pump blocked on a full stream wakes up (BrokenResourceError)
        stack, self._stack = self._stack, None
        if stack is not None:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            await stack.aclose()
        if self._send is not None:
            self._send.close()

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> AsyncIterator[LiveEvent]:
        return self

    async def __anext__(self) -> LiveEvent:
        if self._recv is None:
            raise RuntimeError("LiveSession is not connected: use 'async with' or connect()")
        try:
            item = await self._recv.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None
        if isinstance(item, _End):
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    # ------------------------------------------------------------------ the pump

    async def _emit(self, item: Any) -> None:
        assert self._send is not None
        await self._send.send(item)

    async def _flush(self, then: Any = None) -> None:
        """Emit the pending records, then the pending END_OF_INTERVAL, then ``then``."""
        async with self._lock:
            # Take the records and the END_OF_INTERVAL together, before any await: what the
            # pump receives while this flush waits on a full stream belongs to the next one.
            parts, self._pending = self._pending, []
            eoi, self._pending_eoi = self._pending_eoi, None
            if parts:
                event = self._batch(parts)
                if event is not None:
                    await self._emit(event)
            if eoi is not None:
                await self._emit(EndOfInterval(eoi, self._pending_eoi_msg))
            if then is not None:
                await self._emit(then)

    def _batch(self, parts: list[bytes]) -> LiveRecords | None:
        arr = np.frombuffer(b"".join(parts), dtype=self._dtype)
        iid = arr["instrument_id"]
        unmapped = 0
        if len(self._map_ids):
            pos = np.minimum(np.searchsorted(self._map_ids, iid), len(self._map_ids) - 1)
            ok = self._map_ids[pos] == iid
        else:
            pos = np.zeros(len(arr), np.intp)
            ok = np.zeros(len(arr), bool)
        if not ok.all():
            unmapped = int((~ok).sum())
            for i in np.unique(iid[~ok]).tolist():
                if i not in self._warned_unmapped:
                    self._warned_unmapped.add(i)
                    log.warning("live records of an instrument no symbol mapping named; left out",
                                instrument_id=i, dataset=self.dataset)
            arr, pos = arr[ok], pos[ok]
            if len(arr) == 0:
                return None
        series = self._map_series[pos]
        if self.schema == "trades":
            batch = RecordBatch.from_trades(series, arr, self.trade_clock)
        else:
            batch = RecordBatch.from_ohlcv(self.schema, series, arr)
        return LiveRecords(batch, arr, int(arr["ts_event"][-1]), unmapped)

    def _map(self, rec: dbn.SymbolMappingMsg) -> SymbolMapped:
        stored = rec.stype_out_symbol if self.stype_in == "parent" else rec.stype_in_symbol
        series = self.registry.index(stored)
        iid = int(rec.instrument_id)
        self.symbol_map[iid] = stored
        pos = int(np.searchsorted(self._map_ids, iid))
        if pos < len(self._map_ids) and self._map_ids[pos] == iid:
            self._map_series[pos] = series
        else:
            self._map_ids = np.insert(self._map_ids, pos, iid)
            self._map_series = np.insert(self._map_series, pos, series)
        log.info("live symbol mapping", instrument_id=iid, symbol=stored,
                 stype_in_symbol=rec.stype_in_symbol, stype_out_symbol=rec.stype_out_symbol)
        return SymbolMapped(iid, stored, series, rec.stype_in_symbol, rec.stype_out_symbol, int(rec.ts_event))

    def _error_event(self, rec: dbn.ErrorMsg) -> GatewayError:
        code = str(rec.code) if rec.code is not None else "unset"
        symbol = None
        if code == "symbol_resolution_failed":
            named = [s for s in self.symbols if s in rec.err]
            symbol = max(named, key=len) if named else None
            key = symbol or rec.err
            if key not in self._warned_symbols:
                self._warned_symbols.add(key)
                log.warning("live gateway could not resolve a symbol; going on without it",
                            symbol=symbol, message=rec.err, dataset=self.dataset)
        else:
            log.error("live gateway error", code=code, message=rec.err)
        return GatewayError(int(rec.ts_event), code, rec.err, symbol)

    async def _pump(self, live: Any) -> None:
        from databento.common.error import BentoError

        data_cls = self._data_cls
        end: Any = _End()
        # The client's iterator sends start_session, then enables its record queue; records
        # decoded in between (a fast gateway, a busy machine) are dropped by the client.
        # Enabling the queue first closes that window.
        queue = getattr(getattr(live, "_session", None), "_dbn_queue", None)
        if queue is not None:
            queue.enable()
        try:
            async for rec in live:
                self._last_msg = time.monotonic()
                if type(rec) is data_cls:
                    if not self._pending and self._pending_eoi is None:
                        self._pending_since = self._last_msg
                        self._wake.set()
                    self._pending.append(bytes(rec))
                    self.records_received += 1
                    self.last_ts_event = rec.ts_event
                    if len(self._pending) >= self.batch_max_records:
                        await self._flush()
                    continue
                if isinstance(rec, dbn.SystemMsg):
                    code = rec.code
                    if rec.is_heartbeat():
                        await self._flush(Heartbeat(int(rec.ts_event)))
                    elif code == dbn.SystemCode.END_OF_INTERVAL:
                        # Delivered after the pending records, with them (coalesced): records
                        # that follow it belong to later intervals, so the order is kept.
                        if not self._pending and self._pending_eoi is None:
                            self._pending_since = self._last_msg
                            self._wake.set()
                        ts = int(rec.ts_event)
                        if self._pending_eoi is None or ts > self._pending_eoi:
                            self._pending_eoi, self._pending_eoi_msg = ts, rec.msg
                    else:
                        await self._flush(SystemMessage(int(rec.ts_event), str(code) if code is not None else "unset", rec.msg))
                elif isinstance(rec, dbn.SymbolMappingMsg):
                    await self._flush()
                    await self._flush(self._map(rec))
                elif isinstance(rec, dbn.ErrorMsg):
                    await self._flush(self._error_event(rec))
            if not self._closing:
                end = LiveDisconnected(self._describe_end("the gateway closed the connection"), self.last_ts_event)
        except BentoError as e:
            if not self._closing:
                end = LiveDisconnected(self._describe_end(f"connection lost: {scrub(str(e))}"), self.last_ts_event)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as e:  # a decoding error inside the client, ...
            if not self._closing:
                end = LiveDisconnected(self._describe_end(f"live client failed: {scrub(repr(e))}"),
                                       self.last_ts_event)
        if isinstance(end, LiveDisconnected):
            log.warning("live disconnected", reason=str(end), last_ts_event=self.last_ts_event)
        await self._finish(end)

    async def _finish(self, end: Any) -> None:
        if self._done:
            return
        self._done = True
        with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self._flush(end)

    def _describe_end(self, why: str) -> str:
        return (f"live {self.dataset} {self.schema} ({','.join(self.symbols)}): {why}; "
                f"{self.records_received} records this session, last ts_event {self.last_ts_event}")

    async def _ticker(self) -> None:
        """Flush what waited batch_max_ms; detect a silent gateway."""
        check = min(0.25, self.heartbeat_timeout_s / 4)
        while not self._done:
            with anyio.move_on_after(check):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = anyio.Event()
            while self._pending or self._pending_eoi is not None:
                delay = self._pending_since + self.batch_max_s - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
                elif self._pending or self._pending_eoi is not None:
                    await self._flush()
            now = time.monotonic()
            if now - self._last_msg > self.heartbeat_timeout_s and not self._closing:
                gap = now - self._last_msg
                err = HeartbeatTimeout(
                    self._describe_end(f"nothing received for {gap:.1f}s (heartbeat timeout "
                                       f"{self.heartbeat_timeout_s:g}s)"), self.last_ts_event)
                log.warning("live heartbeat timeout", gap_s=round(gap, 1), last_ts_event=self.last_ts_event)
                self._closing = True
                if self._live is not None:
                    terminate_quietly(self._live)
                await self._finish(err)
                return


def terminate_quietly(live: Any) -> None:
    """Terminate the client; mark its 'disconnected' future as seen (it may hold the
    gateway's error messages, already reported as GatewayError events)."""
    proto = getattr(getattr(live, "_session", None), "_protocol", None)
    loop = getattr(live, "_loop", None)
    if proto is not None and loop is not None:
        def seen(fut: Any) -> None:
            if not fut.cancelled():
                fut.exception()

        with suppress(RuntimeError):  # the client's loop is closed
            loop.call_soon_threadsafe(proto.disconnected.add_done_callback, seen)
    with suppress(Exception):  # already closed / never connected
        live.terminate()

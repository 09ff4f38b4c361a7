"""A fake Databento Live gateway (asyncio TCP on 127.0.0.1) speaking the real protocol.

The wire format is the one ``databento/live/gateway.py`` and ``protocol.py`` implement:

1. the gateway greets with ``lsg_version=...\\n`` and ``cram=<challenge>\\n``;
2. the client answers ``auth=<sha256(f"{cram}|{key}")>-<last 5 chars of key>|dataset=...|
   encoding=dbn|ts_out=0|compression=none|heartbeat_interval_s=N|client=...\\n``;
3. the gateway replies ``success=1|session_id=N\\n`` or ``success=0|error=...\\n`` (then closes);
4. the client sends ``schema=...|stype_in=...|symbols=A,B|start=<ns>|snapshot=0|id=0|is_last=1``
   lines and ``start_session=0``;
5. the gateway streams DBN (zstd when ``compression=zstd``): the v3 ``Metadata``, one
   ``SymbolMappingMsg`` per resolved instrument (continuous contracts get a new one when the
   stream crosses a roll), an ``ErrorMsg`` (code ``SYMBOL_RESOLUTION_FAILED``, the symbol in the
   text) per symbol that does not resolve, a ``SUBSCRIPTION_ACK`` ``SystemMsg``, then the data
   records in ``ts_event`` order, an ``END_OF_INTERVAL`` ``SystemMsg`` (``ts_event`` = end of the
   interval) after each OHLCV interval, ``REPLAY_COMPLETED`` when a ``start=`` replay caught up,
   and heartbeat ``SystemMsg``\\ s when nothing else was sent for ``heartbeat_interval_s``.

Time model: ``rate=None`` streams every record as fast as the socket takes it (a session
without ``start=`` begins at the first record). With ``rate=R`` the market "happens" at R
records per second from the moment the first session starts streaming: a session without
``start=`` joins at that moment's position and follows it (records missed while disconnected
are gone), a session with ``start=ts`` replays from the first record with ``ts_event >= ts`` as
fast as possible, then follows. Either way, once all records are sent the connection stays up
with heartbeats.

Knobs (thread-safe): ``drop_next(after_records)`` closes the next session after that many data
records; ``error_next(after_records, message)`` sends an ``ErrorMsg`` (``INTERNAL_ERROR``) then
closes; ``heartbeats = False`` stops heartbeats; ``heartbeat_interval`` overrides the client's
interval (seconds, may be fractional, for fast tests); ``end_of_interval = False`` stops
END_OF_INTERVAL messages. ``sessions`` records each connection (auth fields, subscriptions,
records sent, how it ended).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import databento_dbn as dbn
import numpy as np
import zstandard

NS = 1_000_000_000
MAX_TS = 2**63 - 1
_STEP = {"ohlcv-1s": NS, "ohlcv-1m": 60 * NS, "ohlcv-1h": 3600 * NS, "ohlcv-1d": 86400 * NS}


def _system(ts: int, msg: str, code: dbn.SystemCode) -> bytes:
    return bytes(dbn.SystemMsg(ts_event=ts, msg=msg, code=code))


@dataclass
class LiveSessionLog:
    """What one connection did (for assertions)."""

    auth: dict[str, str] = field(default_factory=dict)
    authenticated: bool = False
    subscriptions: list[dict[str, str]] = field(default_factory=list)
    started: bool = False
    records_sent: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    ended: str = ""


@dataclass
class _Roll:
    from_ts: int
    iid: int


class FakeLive:
    """In-memory Live gateway; see the module doc. Use ``start()``/``stop()`` or the
    ``fake_live`` fixture; ``gateway`` is ``'127.0.0.1:PORT'``."""

    def __init__(self, key: str, *, dataset: str = "GLBX.MDP3", rate: float | None = None,
                 heartbeat_interval: float | None = None, end_of_interval: bool = True):
        self.key = key
        self.dataset = dataset
        self.rate = rate
        self.heartbeat_interval = heartbeat_interval
        self.heartbeats = True
        self.end_of_interval = end_of_interval
        self.sessions: list[LiveSessionLog] = []
        self._instruments: dict[int, tuple[str, str | None]] = {}  # iid -> (raw symbol, parent)
        self._continuous: dict[str, list[_Roll]] = {}
        self._records: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._drops: list[int] = []
        self._errors: list[tuple[int, str]] = []
        self._clock_t0: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    # ------------------------------------------------------------------ data

    def add_instrument(self, instrument_id: int, raw_symbol: str, parent: str | None = None) -> None:
        self._instruments[instrument_id] = (raw_symbol, parent)

    def add_continuous(self, symbol: str, rolls: list[tuple[int, int]]) -> None:
        """``rolls``: [(from_ts_ns, instrument_id), ...] in time order (the first from any time)."""
        self._continuous[symbol] = [_Roll(ts, iid) for ts, iid in sorted(rolls)]

    def add_records(self, schema: str, records: np.ndarray) -> None:
        old = self._records.get(schema)
        arr = records if old is None else np.concatenate([old, records])
        self._records[schema] = arr[np.argsort(arr["ts_event"], kind="stable")]

    # ------------------------------------------------------------------ knobs

    def drop_next(self, after_records: int) -> None:
        with self._lock:
            self._drops.append(after_records)

    def error_next(self, after_records: int, message: str = "Internal error") -> None:
        with self._lock:
            self._errors.append((after_records, message))

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeLive:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()

            loop.run_until_complete(boot())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-live", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake live gateway did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None

    def __enter__(self) -> FakeLive:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ protocol

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log = LiveSessionLog()
        self.sessions.append(log)
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._session(reader, writer, log)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            log.ended = log.ended or f"client gone ({type(e).__name__})"
        except asyncio.CancelledError:
            log.ended = log.ended or "gateway stopped"
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: LiveSessionLog) -> None:
        cram = secrets.token_urlsafe(24)
        writer.write(b"lsg_version=0.0.0-fake\n" + f"cram={cram}\n".encode())
        await writer.drain()
        line = await reader.readline()
        if not line:
            log.ended = "client closed before auth"
            return
        auth = dict(t.partition("=")[::2] for t in line.decode().strip().split("|"))
        log.auth = auth
        expected = hashlib.sha256(f"{cram}|{self.key}".encode()).hexdigest() + "-" + self.key[-5:]
        if auth.get("auth") != expected:
            writer.write(b"success=0|error=Authentication failed.\n")
            await writer.drain()
            log.ended = "auth rejected"
            return
        if auth.get("dataset") != self.dataset:
            writer.write(f"success=0|error=Unknown dataset {auth.get('dataset')}.\n".encode())
            await writer.drain()
            log.ended = "unknown dataset"
            return
        log.authenticated = True
        session_id = len(self.sessions)
        writer.write(f"success=1|session_id={session_id}\n".encode())
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                log.ended = "client closed before start"
                return
            fields = dict(t.partition("=")[::2] for t in line.decode().strip().split("|"))
            if "start_session" in fields:
                break
            log.subscriptions.append(fields)
        log.started = True
        hb = self.heartbeat_interval or float(auth.get("heartbeat_interval_s") or 30)
        zstd = auth.get("compression", "none").lower() == "zstd"
        out = _Out(writer, zstd)
        gone = asyncio.ensure_future(reader.read())  # EOF when the client leaves
        try:
            await self._stream(out, log, hb, gone)
        finally:
            gone.cancel()

    def _resolve(self, stype_in: str, symbol: str) -> list[tuple[int, int, int, str]]:
        """[(iid, from_ts, to_ts, raw symbol)] the symbol covers; [] if unresolved."""
        if stype_in == "continuous":
            rolls = self._continuous.get(symbol, [])
            out = []
            for i, r in enumerate(rolls):
                end = rolls[i + 1].from_ts if i + 1 < len(rolls) else MAX_TS
                out.append((r.iid, r.from_ts, end, self._instruments.get(r.iid, (str(r.iid), None))[0]))
            return out
        if stype_in == "parent":
            return [(iid, 0, MAX_TS, raw) for iid, (raw, parent) in self._instruments.items() if parent == symbol]
        if stype_in == "instrument_id":
            iid = int(symbol) if symbol.isdigit() else -1
            return [(iid, 0, MAX_TS, self._instruments[iid][0])] if iid in self._instruments else []
        return [(iid, 0, MAX_TS, raw) for iid, (raw, _) in self._instruments.items() if raw == symbol]

    async def _stream(self, out: _Out, log: LiveSessionLog, hb: float, gone: asyncio.Future) -> None:
        subs = log.subscriptions
        schema = subs[0].get("schema", "trades") if subs else "trades"
        stype_in = subs[0].get("stype_in", "raw_symbol") if subs else "raw_symbol"
        starts = [int(s["start"]) for s in subs if s.get("start")]
        replay_from = min(starts) if starts else None
        now_ns = time.time_ns()
        arr = self._records.get(schema, np.zeros(0, dtype=np.dtype(dbn.OHLCVMsg._dtypes)))
        md = dbn.Metadata(dataset=self.dataset, start=replay_from if replay_from is not None else now_ns,
                          stype_in=dbn.SType(stype_in), stype_out=dbn.SType.INSTRUMENT_ID,
                          schema=dbn.Schema(schema))
        out.write(md.encode())
        # symbology
        mask = np.zeros(len(arr), dtype=bool)
        ts = arr["ts_event"].astype(np.int64)
        iids = arr["instrument_id"]
        rolls: list[tuple[int, bytes]] = []  # (ts at which to send, mapping bytes)
        start_ts = replay_from if replay_from is not None else (int(ts[0]) if len(ts) else now_ns)
        for sub in subs:
            for symbol in [s for s in sub.get("symbols", "").split(",") if s]:
                cover = self._resolve(stype_in, symbol)
                if not cover:
                    out.write(bytes(dbn.ErrorMsg(
                        ts_event=now_ns, err=f"Failed to resolve symbol: {symbol}",
                        code=dbn.ErrorCode.SYMBOL_RESOLUTION_FAILED)))
                    continue
                for iid, a, b, raw in cover:
                    mask |= (iids == iid) & (ts >= a) & (ts < b)
                    msg = bytes(dbn.SymbolMappingMsg(
                        publisher_id=0, instrument_id=iid, ts_event=now_ns, stype_in=dbn.SType(stype_in),
                        stype_in_symbol=symbol, stype_out=dbn.SType.RAW_SYMBOL, stype_out_symbol=raw,
                        start_ts=a if a > 0 else now_ns, end_ts=b if b < MAX_TS else 2**64 - 1))
                    if a <= start_ts:
                        out.write(msg)
                    else:
                        rolls.append((a, msg))
            out.write(_system(now_ns, f"Subscription request {sub.get('id', 0)} for {schema} data succeeded",
                              dbn.SystemCode.SUBSCRIPTION_ACK))
        rolls.sort(key=lambda r: r[0])
        sel = arr[mask]
        sts = ts[mask]
        await out.flush()
        step = _STEP.get(schema) if self.end_of_interval else None
        # where the session begins
        if replay_from is not None:
            pos = int(np.searchsorted(sts, replay_from))
        elif self.rate is not None:
            pos = self._cursor_index(len(arr), ts, sts)
        else:
            pos = 0
        with self._lock:
            drop = self._drops.pop(0) if self._drops else None
            error = self._errors.pop(0) if self._errors else None
        replaying = replay_from is not None
        last_sent = time.monotonic()
        cur_interval: int | None = None
        chunk = 512
        while not gone.done():
            avail = len(sel) if self.rate is None else self._cursor_index(len(arr), ts, sts)
            if pos >= avail:
                if replaying:
                    replaying = False
                    out.write(_system(time.time_ns(), "Finished replay", dbn.SystemCode.REPLAY_COMPLETED))
                if step is not None and cur_interval is not None and pos >= len(sel):
                    out.write(_system(cur_interval + step, f"End of interval for {schema}",
                                      dbn.SystemCode.END_OF_INTERVAL))
                    cur_interval = None
                if out.pending:
                    await out.flush()
                    last_sent = time.monotonic()
                if self.heartbeats and time.monotonic() - last_sent >= hb:
                    out.write(_system(time.time_ns(), "Heartbeat", dbn.SystemCode.HEARTBEAT))
                    await out.flush()
                    last_sent = time.monotonic()
                await asyncio.sleep(min(0.005 if self.rate else 0.05, hb / 4))
                continue
            stop = min(avail, pos + chunk)
            for k in (drop, error[0] if error else None):
                if k is not None and log.records_sent < k <= log.records_sent + (stop - pos):
                    stop = pos + (k - log.records_sent)
            # crossing a continuous roll: send the new mapping first
            while rolls and rolls[0][0] <= int(sts[pos]):
                out.write(rolls.pop(0)[1])
            if rolls:
                stop = min(stop, pos + int(np.searchsorted(sts[pos:stop], rolls[0][0])))
                stop = max(stop, pos + 1)
            part = sel[pos:stop]
            if step is None:
                out.write(part.tobytes())
            else:
                starts_ = (sts[pos:stop] // step) * step
                cuts = np.flatnonzero(np.diff(starts_)) + 1
                a = 0
                for c in [*cuts.tolist(), len(part)]:
                    iv = int(starts_[a])
                    if cur_interval is not None and iv != cur_interval:
                        out.write(_system(cur_interval + step, f"End of interval for {schema}",
                                          dbn.SystemCode.END_OF_INTERVAL))
                    out.write(part[a:c].tobytes())
                    cur_interval = iv
                    a = c
            n = stop - pos
            if log.first_ts is None:
                log.first_ts = int(sts[pos])
            log.last_ts = int(sts[stop - 1])
            log.records_sent += n
            pos = stop
            await out.flush()
            last_sent = time.monotonic()
            if error is not None and log.records_sent >= error[0]:
                out.write(bytes(dbn.ErrorMsg(ts_event=time.time_ns(), err=error[1], code=dbn.ErrorCode.INTERNAL_ERROR)))
                await out.flush()
                log.ended = f"error sent after {log.records_sent} records"
                await asyncio.sleep(0.05)
                out.writer.close()
                return
            if drop is not None and log.records_sent >= drop:
                log.ended = f"dropped after {log.records_sent} records"
                out.writer.transport.abort()
                return
        log.ended = log.ended or "client closed"

    def _cursor_index(self, n_all: int, ts_all: np.ndarray, sts: np.ndarray) -> int:
        """Index in the session's selection up to which the market has 'happened' by now."""
        assert self.rate is not None
        with self._lock:
            if self._clock_t0 is None:
                self._clock_t0 = time.monotonic()
            elapsed = time.monotonic() - self._clock_t0
        k = min(n_all, int(elapsed * self.rate))
        if k == 0:
            return 0
        return int(np.searchsorted(sts, int(ts_all[k - 1]), side="right"))


class _Out:
    """Buffered writer, zstd-compressing when the session asked for it."""

    def __init__(self, writer: asyncio.StreamWriter, zstd: bool):
        self.writer = writer
        self._parts: list[bytes] = []
        self._z: Any = zstandard.ZstdCompressor(level=1).compressobj() if zstd else None

    @property
    def pending(self) -> bool:
        return bool(self._parts)

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    async def flush(self) -> None:
        if not self._parts:
            return
        data = b"".join(self._parts)
        self._parts = []
        if self._z is not None:
            data = self._z.compress(data) + self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        self.writer.write(data)
        await self.writer.drain()


def main(argv: list[str] | None = None) -> None:
    """Serve a DBN file from a process of its own (benchmarks: no GIL shared with the client).

    ``python -m tests.fakes.live --key KEY --dbn FILE [--rate R] [--dataset DS]
    [--heartbeat-interval S] [--no-end-of-interval]`` prints
    ``port=N`` and serves until stdin closes. Symbols come from the file's Metadata mappings
    (continuous files: one roll per mapping interval).
    """
    import argparse
    import sys

    from databento import DBNStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--key", required=True)
    ap.add_argument("--dbn", required=True)
    ap.add_argument("--rate", type=float, default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--heartbeat-interval", type=float, default=None)
    ap.add_argument("--no-end-of-interval", action="store_true")
    args = ap.parse_args(argv)
    store = DBNStore.from_file(args.dbn)
    md = store.metadata
    fake = FakeLive(args.key, dataset=args.dataset or md.dataset, rate=args.rate,
                    heartbeat_interval=args.heartbeat_interval, end_of_interval=not args.no_end_of_interval)
    continuous = str(md.stype_in) == "continuous"
    for symbol, intervals in md.mappings.items():
        rolls = []
        for iv in intervals:
            iid = int(iv["symbol"])
            start = int(np.datetime64(iv["start_date"], "ns").astype(np.int64))
            fake.add_instrument(iid, f"{symbol}:{iid}" if continuous else symbol)
            rolls.append((start if rolls else 0, iid))
        if continuous:
            fake.add_continuous(symbol, rolls)
    fake.add_records(str(md.schema), np.asarray(store.to_ndarray()).copy())
    fake.start()
    print(f"port={fake.port}", flush=True)
    sys.stdin.read()
    fake.stop()


if __name__ == "__main__":
    main()

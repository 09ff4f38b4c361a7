"""LiveSession: the real databento.Live client against the fake Live gateway."""

from __future__ import annotations

import time

import anyio
import numpy as np
import pytest

from streambars.errors import AuthenticationError, SourceError
from streambars.records import SeriesRegistry
from streambars.sources.live import (
    EndOfInterval,
    GatewayError,
    Heartbeat,
    HeartbeatTimeout,
    LiveConnectError,
    LiveDisconnected,
    LiveEvent,
    LiveRecords,
    LiveSession,
    SymbolMapped,
    SystemMessage,
    parse_gateway,
)
from tests.fakes import NS, api_key, fake_live, make_ohlcv, make_trades  # noqa: F401
from tests.fakes.live import FakeLive

DS = "GLBX.MDP3"
T0 = 1_704_067_200 * NS  # 2024-01-01
ROLL = T0 + 2 * 3600 * NS


@pytest.fixture
def gw(fake_live: FakeLive) -> FakeLive:  # noqa: F811
    """ES.c.0: ESH4 (100) until 02:00, then ESM4 (200); NQ.c.0: NQH4 (300); ~3 hours of 1s
    bars for each instrument and trades for NQH4."""
    g = fake_live
    g.add_instrument(100, "ESH4", parent="ES.FUT")
    g.add_instrument(200, "ESM4", parent="ES.FUT")
    g.add_instrument(300, "NQH4", parent="NQ.FUT")
    g.add_continuous("ES.c.0", [(0, 100), (ROLL, 200)])
    g.add_continuous("NQ.c.0", [(0, 300)])
    g.add_records("ohlcv-1s", np.concatenate([make_ohlcv(i, T0, 9000, seed=i) for i in (100, 200, 300)]))
    g.add_records("trades", make_trades(300, T0, 20_000, seed=7))
    g.heartbeat_interval = 0.1
    return g


def _want(g: FakeLive, schema: str, covers: dict[int, tuple[int, int]], start: int = 0) -> np.ndarray:
    arr = g._records[schema]
    ts = arr["ts_event"].astype(np.int64)
    m = np.zeros(len(arr), bool)
    for iid, (a, b) in covers.items():
        m |= (arr["instrument_id"] == iid) & (ts >= max(a, start)) & (ts < b)
    return arr[m]


CONT = {100: (0, ROLL), 200: (ROLL, 2**63 - 1), 300: (0, 2**63 - 1)}


async def _collect(session: LiveSession, stop_after_heartbeats: int = 2) -> list[LiveEvent]:
    events: list[LiveEvent] = []
    hb = 0
    async for ev in session:
        events.append(ev)
        if isinstance(ev, Heartbeat):
            hb += 1
            if hb >= stop_after_heartbeats:
                break
    return events


def _records(events: list[LiveEvent]) -> np.ndarray:
    parts = [e.records for e in events if isinstance(e, LiveRecords)]
    return np.concatenate(parts) if parts else np.empty(0)


async def test_stream_continuous_with_roll(gw: FakeLive, api_key: str) -> None:  # noqa: F811
    reg = SeriesRegistry(["NQ.c.0"])
    async with LiveSession(api_key, DS, "ohlcv-1s", ["ES.c.0", "NQ.c.0"], "continuous", gateway=gw.gateway,
                           registry=reg, heartbeat_interval_s=5) as s:
        events = await _collect(s)
        assert s.symbol_map == {100: "ES.c.0", 200: "ES.c.0", 300: "NQ.c.0"}
    want = _want(gw, "ohlcv-1s", CONT)
    got = _records(events)
    assert len(got) == len(want) > 15_000 and (got == want).all()
    assert reg.names == ["NQ.c.0", "ES.c.0"]
    batches = [e for e in events if isinstance(e, LiveRecords)]
    series = np.concatenate([b.batch.series for b in batches])
    names = np.array(reg.names)[series]
    assert (names[np.isin(got["instrument_id"], [100, 200])] == "ES.c.0").all()
    assert (names[got["instrument_id"] == 300] == "NQ.c.0").all()
    close = np.concatenate([b.batch.close for b in batches])
    assert (close == want["close"]).all()
    maps = [e for e in events if isinstance(e, SymbolMapped)]
    assert [(m.instrument_id, m.symbol, m.stype_out_symbol) for m in maps] == [
        (100, "ES.c.0", "ESH4"), (300, "NQ.c.0", "NQH4"), (200, "ES.c.0", "ESM4")]
    # the roll's mapping comes before the first record of the new contract
    i_map = events.index(maps[2])
    first_200 = next(i for i, e in enumerate(events) if isinstance(e, LiveRecords) and (e.records["instrument_id"] == 200).any())
    assert i_map < first_200
    assert any(isinstance(e, SystemMessage) and e.code == "subscription_ack" for e in events)
    # END_OF_INTERVAL: never before a record of the interval it closes, never lost
    eois = 0
    seen_max = 0
    for e in events:
        if isinstance(e, LiveRecords):
            assert int(e.records["ts_event"].min()) >= seen_max  # nothing arrives for a closed interval
        elif isinstance(e, EndOfInterval):
            eois += 1
            seen_max = max(seen_max, e.ts_event)
    assert eois > 10 and seen_max == int(want["ts_event"].max()) + NS


async def test_bad_key_is_refused_without_retry(gw: FakeLive) -> None:
    bad = "db-" + "B" * 29
    with pytest.raises(AuthenticationError) as e:
        async with LiveSession(bad, DS, "ohlcv-1s", ["ES.c.0"], "continuous", gateway=gw.gateway):
            pass
    assert bad not in str(e.value) and "BBBBB" not in str(e.value)
    assert len(gw.sessions) == 1 and gw.sessions[0].ended == "auth rejected"


async def test_unreachable_gateway(api_key: str) -> None:  # noqa: F811
    with pytest.raises(LiveConnectError, match="127.0.0.1:1"):
        async with LiveSession(api_key, DS, "ohlcv-1s", ["ES.c.0"], gateway="127.0.0.1:1"):
            pass


async def test_unknown_symbol_is_reported_once_and_the_rest_streams(gw: FakeLive, api_key: str) -> None:  # noqa: F811
    async with LiveSession(api_key, DS, "ohlcv-1s", ["NQ.c.0", "NOPE.c.0"], "continuous", gateway=gw.gateway) as s:
        events = await _collect(s)
    errors = [e for e in events if isinstance(e, GatewayError)]
    assert len(errors) == 1 and errors[0].symbol == "NOPE.c.0" and errors[0].code == "symbol_resolution_failed"
    assert len(_records(events)) == len(_want(gw, "ohlcv-1s", {300: CONT[300]}))


async def test_replay_from_start(gw: FakeLive, api_key: str) -> None:  # noqa: F811
    start = T0 + 5000 * NS
    async with LiveSession(api_key, DS, "ohlcv-1s", ["ES.c.0"], "continuous", gateway=gw.gateway, start=start) as s:
        events = await _collect(s)
    want = _want(gw, "ohlcv-1s", {100: CONT[100], 200: CONT[200]}, start=start)
    got = _records(events)
    assert (got == want).all() and int(got["ts_event"][0]) >= start
    assert gw.sessions[-1].subscriptions[0]["start"] == str(start)
    assert any(isinstance(e, SystemMessage) and e.code == "replay_completed" for e in events)


async def test_drop_then_reconnect_with_start_loses_nothing(gw: FakeLive, api_key: str) -> None:  # noqa: F811
    gw.drop_next(4000)
    got: list[np.ndarray] = []
    with pytest.raises(LiveDisconnected) as e:
        async with LiveSession(api_key, DS, "ohlcv-1s", ["ES.c.0", "NQ.c.0"], "continuous",
                               gateway=gw.gateway) as s:
            async for ev in s:
                if isinstance(ev, LiveRecords):
                    got.append(ev.records)
    first = np.concatenate(got)
    assert len(first) == 4000 and e.value.last_ts_event == int(first["ts_event"][-1])
    assert isinstance(e.value, SourceError) and "closed the connection" in str(e.value)
    async with LiveSession(api_key, DS, "ohlcv-1s", ["ES.c.0", "NQ.c.0"], "continuous", gateway=gw.gateway,
                           start=e.value.last_ts_event) as s:
        second = _records(await _collect(s))
    # start= is inclusive: drop what is already held, as the daemon does
    held = {(int(r["instrument_id"]), int(r["ts_event"])) for r in first[["instrument_id", "ts_event"]]}
    keep = np.array([(int(i), int(t)) not in held for i, t in zip(second["instrument_id"], second["ts_event"], strict=True)])
    merged = np.concatenate([first, second[keep]])
    assert (merged == _want(gw, "ohlcv-1s", CONT)).all()


async def test_error_message_then_disconnect(gw: FakeLive, api_key: str) -> None:  # noqa: F811
    gw.error_next(1500, "Internal gateway error: please reconnect")
    events: list[LiveEvent] = []
    with pytest.raises(LiveDisconnected, match="please reconnect") as e:
        async with LiveSession(api_key, DS, "trades", ["NQH4"], "raw_symbol", gateway=gw.gateway) as s:
            async for ev in s:
                events.append(ev)
    errors = [x for x in events if isinstance(x, GatewayError)]
    assert len(errors) == 1 and errors[0].code == "internal_error" and errors[0].symbol is None
    assert len(_records(events)) == 1500 and e.value.last_ts_event is not None


async def test_heartbeats_and_heartbeat_timeout(gw: FakeLive, api_key: str) -> None:  # noqa: F811
    async with LiveSession(api_key, DS, "trades", ["NQH4"], gateway=gw.gateway, heartbeat_timeout_s=0.6) as s:
        events = await _collect(s, stop_after_heartbeats=3)
    assert sum(isinstance(e, Heartbeat) for e in events) == 3
    gw.heartbeats = False
    t = time.monotonic()
    with pytest.raises(HeartbeatTimeout, match="heartbeat timeout") as e:
        async with LiveSession(api_key, DS, "trades", ["NQH4"], gateway=gw.gateway, heartbeat_timeout_s=0.6) as s:
            async for _ in s:
                pass
    assert 0.6 <= time.monotonic() - t < 10 and isinstance(e.value, LiveDisconnected)
    assert e.value.last_ts_event == int(gw._records["trades"]["ts_event"][-1])


async def test_batches_by_count_and_by_time(gw: FakeLive, api_key: str) -> None:  # noqa: F811
    async with LiveSession(api_key, DS, "trades", ["NQH4"], gateway=gw.gateway, batch_max_records=256) as s:
        events = await _collect(s)
    sizes = [len(e.batch) for e in events if isinstance(e, LiveRecords)]
    assert max(sizes) == 256 and sum(sizes) == 20_000
    assert all(e.batch.kind == "trades" for e in events if isinstance(e, LiveRecords))
    # a slow market: batches go out after batch_max_ms, not when 4096 have piled up
    gw.rate = 2000.0
    t = time.monotonic()
    async with LiveSession(api_key, DS, "trades", ["NQH4"], gateway=gw.gateway, batch_max_ms=20) as s:
        n = 0
        batches = 0
        async for ev in s:
            if isinstance(ev, LiveRecords):
                n += len(ev.batch)
                batches += 1
                if n >= 1000:
                    break
    assert batches >= 5 and time.monotonic() - t < 5


async def test_parent_subscription_names_series_by_raw_symbol(gw: FakeLive, api_key: str) -> None:  # noqa: F811
    reg = SeriesRegistry()
    async with LiveSession(api_key, DS, "ohlcv-1s", ["ES.FUT"], "parent", gateway=gw.gateway, registry=reg) as s:
        events = await _collect(s)
    got = _records(events)
    series = np.concatenate([e.batch.series for e in events if isinstance(e, LiveRecords)])
    names = np.array(reg.names)[series]
    assert sorted(reg.names) == ["ESH4", "ESM4"]
    assert (names[got["instrument_id"] == 100] == "ESH4").all() and (names[got["instrument_id"] == 200] == "ESM4").all()
    assert len(got) == len(_want(gw, "ohlcv-1s", {100: (0, 2**63 - 1), 200: (0, 2**63 - 1)}))


async def test_zstd_session_and_slow_consumer(gw: FakeLive, api_key: str) -> None:  # noqa: F811
    n = 0
    async with LiveSession(api_key, DS, "trades", ["NQH4"], gateway=gw.gateway, compression="zstd",
                           queue_size=2, batch_max_records=500) as s:
        assert gw.sessions[-1].auth["compression"] == "zstd"
        async for ev in s:
            if isinstance(ev, LiveRecords):
                n += len(ev.batch)
                await anyio.sleep(0.01)  # a consumer slower than the gateway: nothing is lost
            if isinstance(ev, Heartbeat):
                break
    assert n == 20_000


async def test_close_mid_stream_ends_iteration_quietly(gw: FakeLive, api_key: str) -> None:  # noqa: F811
    s = LiveSession(api_key, DS, "ohlcv-1s", ["ES.c.0"], "continuous", gateway=gw.gateway, queue_size=1)
    await s.connect()
    async for ev in s:
        if isinstance(ev, LiveRecords):
            break
    await s.close()
    await s.close()
    with pytest.raises(StopAsyncIteration):
        await s.__anext__()


def test_parse_gateway() -> None:
    assert parse_gateway(None) == (None, 13000)
    assert parse_gateway("") == (None, 13000)
    assert parse_gateway("127.0.0.1:1234") == ("127.0.0.1", 1234)
    assert parse_gateway("glbx-mdp3.lsg.databento.com") == ("glbx-mdp3.lsg.databento.com", 13000)


def test_unsupported_schema() -> None:
    with pytest.raises(SourceError, match="mbo"):
        LiveSession("db-" + "x" * 29, DS, "mbo", ["ES.c.0"])

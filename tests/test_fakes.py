"""The fakes themselves, on the wire: what a client other than databento's would see."""

from __future__ import annotations

import hashlib
import json
import socket
from datetime import date

import databento_dbn as dbn
import pytest
import requests

from tests.fakes import NS, api_key, fake_historical, fake_live, make_ohlcv  # noqa: F401
from tests.fakes.historical import FakeHistorical
from tests.fakes.live import FakeLive

DS = "GLBX.MDP3"
T0 = 1_704_067_200 * NS


def _lines(sock: socket.socket, n: int) -> list[str]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode().splitlines()


@pytest.mark.parametrize("good", [True, False])
def test_live_cram_handshake_on_the_wire(fake_live: FakeLive, api_key: str, good: bool) -> None:  # noqa: F811
    with socket.create_connection(("127.0.0.1", fake_live.port), timeout=5) as s:
        greeting, challenge = _lines(s, 2)
        assert greeting.startswith("lsg_version=") and challenge.startswith("cram=")
        cram = challenge.removeprefix("cram=")
        key = api_key if good else api_key[:-1] + "X"
        digest = hashlib.sha256(f"{cram}|{key}".encode()).hexdigest()
        s.sendall(f"auth={digest}-{key[-5:]}|dataset={DS}|encoding=dbn|ts_out=0\n".encode())
        reply = _lines(s, 1)[0]
        if good:
            assert reply.startswith("success=1|session_id=")
        else:
            assert reply == "success=0|error=Authentication failed."
            assert s.recv(10) == b""  # and the gateway hangs up


def test_live_stream_starts_with_metadata(fake_live: FakeLive, api_key: str) -> None:  # noqa: F811
    fake_live.add_instrument(5, "ESH4")
    fake_live.add_records("ohlcv-1m", make_ohlcv(5, T0, 100, schema="ohlcv-1m"))
    with socket.create_connection(("127.0.0.1", fake_live.port), timeout=5) as s:
        cram = _lines(s, 2)[1].removeprefix("cram=")
        digest = hashlib.sha256(f"{cram}|{api_key}".encode()).hexdigest()
        s.sendall(f"auth={digest}-{api_key[-5:]}|dataset={DS}|encoding=dbn\n".encode())
        _lines(s, 1)
        s.sendall(b"schema=ohlcv-1m|stype_in=raw_symbol|symbols=ESH4|snapshot=0|id=0|is_last=1\nstart_session=0\n")
        decoder = dbn.DBNDecoder()
        records: list = []
        while sum(isinstance(r, dbn.OHLCVMsg) for r in records) < 100:
            decoder.write(s.recv(65536))
            records += decoder.decode()
    assert isinstance(records[0], dbn.Metadata) and str(records[0].schema) == "ohlcv-1m"
    assert isinstance(records[1], dbn.SymbolMappingMsg) and records[1].stype_out_symbol == "ESH4"
    assert any(isinstance(r, dbn.SystemMsg) and r.code == dbn.SystemCode.END_OF_INTERVAL for r in records)


def test_historical_on_the_wire(fake_historical: FakeHistorical, api_key: str) -> None:  # noqa: F811
    f = fake_historical
    f.add_instrument(DS, 5, "ESH4", date(2024, 1, 1), date(2024, 2, 1))
    f.add_records(DS, "ohlcv-1s", make_ohlcv(5, T0, 1000))
    url = f.url + "/v0/timeseries.get_range"
    form = {"dataset": DS, "symbols": "ESH4", "schema": "ohlcv-1s", "stype_in": "raw_symbol",
            "start": "2024-01-01", "end": "2024-01-02", "encoding": "dbn", "compression": "none"}
    r = requests.post(url, data=form, auth=("db-wrong", ""), timeout=10)
    assert r.status_code == 401
    assert r.json()["detail"]["case"] == "auth_authentication_failed"
    plain = requests.post(url, data=form, auth=(api_key, ""), timeout=10)
    assert plain.status_code == 200 and plain.content[:3] == b"DBN"
    zst = requests.post(url, data={**form, "compression": "zstd"}, auth=(api_key, ""), timeout=10)
    assert zst.content[:4] == b"\x28\xb5\x2f\xfd"
    bad = requests.post(url, data={**form, "symbols": "NOPE"}, auth=(api_key, ""), timeout=10)
    assert bad.status_code == 422 and bad.json()["detail"]["case"] == "symbology_invalid_request"
    part = requests.post(url, data={**form, "symbols": "ESH4,NOPE"}, auth=(api_key, ""), timeout=10)
    assert part.status_code == 206
    cost = requests.post(f.url + "/v0/metadata.get_cost", data=form, auth=(api_key, ""), timeout=10)
    assert isinstance(json.loads(cost.content), float)
    assert requests.post(f.url + "/v0/nope", data=form, auth=(api_key, ""), timeout=10).status_code == 404
    assert f.count("ESH4", "2024-01") == 3 and f.endpoint_count("/v0/metadata.get_cost") == 1

"""`streambars check`: the real databento client against the fake gateways. A good key lists
the datasets (exit 0); a refused key exits 2 naming only the key's last five characters; a
closed port exits 1 within the bound; Live authenticates and never starts a session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import pytest

from streambars.cli import main
from tests.fakes.historical import KNOWN_DATASETS

REPO = Path(__file__).resolve().parents[1]
WRONG_KEY = "db-" + "WrongKey0123456789abcdefghij" + "Q"


def _closed_port() -> int:
    """A port nothing listens on (bound, then released): connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(capsys, monkeypatch, key: str, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("DATABENTO_API_KEY", key)
    code = main(["check", "--env-file", "/nonexistent/.env", "--log-format", "json", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_good_key_lists_the_datasets(fake_historical, api_key, capsys, monkeypatch):
    fake_historical.add_instrument("XEUR.EOBI", 1, "FDAX", date(2024, 1, 1), date(2024, 2, 1))
    code, out, err = _check(capsys, monkeypatch, api_key, "--historical-gateway", fake_historical.url)
    assert code == 0, err
    assert f"key ...{api_key[-5:]} (from the environment" in out
    line = next(x for x in out.splitlines() if x.startswith("historical"))
    listed = line.split("dataset(s): ", 1)[1].split(", ")
    assert listed == sorted(KNOWN_DATASETS)  # XEUR.EOBI is known: no duplicate
    assert "ok" in line.split() and "passed" in out
    assert api_key not in out + err
    assert fake_historical.endpoint_count("/v0/metadata.list_datasets") == 1


def test_key_from_env_file(fake_historical, api_key, capsys, monkeypatch, tmp_path):
    env = tmp_path / "my.env"
    env.write_text(f"DATABENTO_API_KEY={api_key}\n")
    monkeypatch.delenv("DATABENTO_API_KEY", raising=False)
    code = main(["check", "--env-file", str(env), "--historical-gateway", fake_historical.url])
    out = capsys.readouterr().out
    assert code == 0
    assert f"key ...{api_key[-5:]} (from {env})" in out


def test_refused_key_exits_2_naming_the_masked_key(fake_historical, capsys, monkeypatch):
    code, out, err = _check(capsys, monkeypatch, WRONG_KEY, "--historical-gateway", fake_historical.url)
    assert code == 2
    lines = [x for x in err.splitlines() if x.startswith("streambars: ")]
    assert len(lines) == 1
    assert f"...{WRONG_KEY[-5:]}" in lines[0] and "refused" in lines[0]
    assert WRONG_KEY not in out + err and WRONG_KEY[:-5] not in out + err
    assert "FAILED" in out


def test_unreachable_exits_1_within_the_bound(api_key, capsys, monkeypatch):
    port = _closed_port()
    code, out, err = _check(capsys, monkeypatch, api_key, "--historical-gateway", f"https://127.0.0.1:{port}",
                            "--timeout", "3")
    assert code == 1
    line = [x for x in err.splitlines() if x.startswith("streambars: ")]
    assert len(line) == 1 and f"127.0.0.1:{port}" in line[0] and "reach" in line[0]
    assert api_key not in out + err


def test_live_ok_authenticates_without_starting(fake_historical, fake_live, api_key, capsys, monkeypatch):
    code, out, err = _check(capsys, monkeypatch, api_key, "--historical-gateway", fake_historical.url,
                            "--live-gateway", fake_live.gateway)
    assert code == 0, err
    live = next(x for x in out.splitlines() if x.startswith("live"))
    assert "ok" in live.split() and "GLBX.MDP3" in live
    assert len(fake_live.sessions) == 1
    session = fake_live.sessions[0]
    assert session.authenticated and not session.started  # nothing streamed, nothing billed


def test_live_refused_key_exits_2(fake_historical, fake_live, capsys, monkeypatch):
    # The Historical gateway accepts the key, the Live one does not (another key).
    fake_live.key = WRONG_KEY[:-1] + "R"
    code, out, err = _check(capsys, monkeypatch, fake_historical.key, "--historical-gateway",
                            fake_historical.url, "--live-gateway", fake_live.gateway)
    assert code == 2
    line = [x for x in err.splitlines() if x.startswith("streambars: ")]
    assert len(line) == 1 and f"...{fake_historical.key[-5:]}" in line[0] and fake_live.gateway in line[0]
    assert [x.split()[:2] for x in out.splitlines()[1:3]] == [["historical", "ok"], ["live", "FAILED"]]
    assert not fake_live.sessions[0].authenticated


def test_live_unreachable_exits_1(fake_historical, api_key, capsys, monkeypatch):
    port = _closed_port()
    code, out, err = _check(capsys, monkeypatch, api_key, "--historical-gateway", fake_historical.url,
                            "--live-gateway", f"127.0.0.1:{port}")
    assert code == 1
    assert f"127.0.0.1:{port}" in err and "FAILED" in out


def test_silent_gateway_is_given_up_after_the_timeout(fake_historical, api_key, capsys, monkeypatch):
    """A gateway that accepts the connection and never answers (the Live client would wait
    10 s + 30 s): unreachable, exit 1, after --timeout."""
    release = threading.Event()

    def silent(server: socket.socket) -> None:
        conn, _ = server.accept()
        with conn:
            release.wait(30)
            # Only now greet and refuse, so the client's abandoned connect ends (no thread is
            # left behind for the rest of the session).
            conn.sendall(b"lsg_version=0\ncram=x\n")
            conn.recv(4096)
            conn.sendall(b"success=0|error=test over\n")

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        gateway = f"127.0.0.1:{server.getsockname()[1]}"
        t = threading.Thread(target=silent, args=(server,), daemon=True)
        t.start()
        try:
            code, out, err = _check(capsys, monkeypatch, api_key, "--historical-gateway", fake_historical.url,
                                    "--live-gateway", gateway, "--timeout", "1")
        finally:
            release.set()
            t.join(10)
    assert code == 1
    assert f"live gateway {gateway}: no answer within 1 s" in err
    assert out.count(gateway) == 1  # the check's line names it once
    abandoned = [x for x in threading.enumerate() if x.name.startswith("check-")]
    for x in abandoned:
        x.join(10)
    assert not any(x.is_alive() for x in abandoned)


def test_cli_refused_one_line_no_traceback(fake_historical):
    """The entry point as a user runs it: one line, exit 2, no traceback, no secret."""
    env = {**os.environ, **fake_historical.env, "DATABENTO_API_KEY": WRONG_KEY}
    proc = subprocess.run([sys.executable, "-m", "streambars", "check", "--env-file", "/nonexistent/.env",
                           "--historical-gateway", fake_historical.url, "--timeout", "30"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([x for x in proc.stderr.splitlines() if x.startswith("streambars: ")]) == 1
    assert WRONG_KEY not in proc.stdout + proc.stderr


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_timeout_must_be_positive(bad, api_key, capsys, monkeypatch):
    code, _, err = _check(capsys, monkeypatch, api_key, "--timeout", bad)
    assert code == 2 and "--timeout" in err

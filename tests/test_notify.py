"""sd_notify against a real unix datagram socket: a path and an abstract '@' name."""

from __future__ import annotations

import os
import socket
import sys
import uuid

import pytest

from streambars.daemon.notify import Notifier, WatchdogGate, socket_address, watchdog_usec

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")


def _listener(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(socket_address(name))
    sock.settimeout(2)
    return sock


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    if request.param == "abstract":
        if not sys.platform.startswith("linux"):
            pytest.skip("abstract unix sockets are Linux-only")
        name = f"@streambars-test-{uuid.uuid4().hex}"
    else:
        name = str(tmp_path / "notify.sock")
    sock = _listener(name)
    yield name, sock
    sock.close()


def test_messages_arrive(notify_socket):
    name, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": name})
    assert n.enabled
    assert n.ready(status="subscribed")
    lines = _recv(sock)
    assert lines[0] == "READY=1"
    assert f"MAINPID={os.getpid()}" in lines
    assert "STATUS=subscribed" in lines
    assert n.status("12 rec/s\nlag 3 ms")  # a newline must not split the field
    assert _recv(sock) == ["STATUS=12 rec/s lag 3 ms"]
    assert n.watchdog()
    assert _recv(sock) == ["WATCHDOG=1"]
    assert n.stopping("draining")
    assert _recv(sock) == ["STOPPING=1", "STATUS=draining"]
    assert n.extend_timeout(2.5)
    assert _recv(sock) == ["EXTEND_TIMEOUT_USEC=2500000"]
    assert n.sent == 5
    n.close()


def test_without_socket_everything_is_a_noop():
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()
    assert n.watchdog_interval() is None


def test_unreachable_socket_never_raises(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    assert not n.ready()
    assert not n.status("x")


def test_relative_path_is_ignored():
    assert not Notifier({"NOTIFY_SOCKET": "relative.sock"}).enabled


def test_unset_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "s"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier(unset_environment=True)
    assert n.enabled and n.watchdog_interval() == 0.5
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another pid
        ({"WATCHDOG_USEC": "nonsense"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_usec(env, expected):
    assert watchdog_usec(env) == expected


def test_watchdog_gate_rate_limits(notify_socket):
    name, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "2000000"})
    gate = WatchdogGate(n)
    assert gate.interval == 1.0
    assert gate.alive(now=100.0)
    assert not gate.alive(now=100.5)
    assert gate.alive(now=101.0)
    assert _recv(sock) == ["WATCHDOG=1"]
    assert _recv(sock) == ["WATCHDOG=1"]
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(100)

"""WATCHDOG=1 comes from the data path: a stuck store writer stops the pings.

The daemon runs in this process (so the writer can be made to hang) against the fake Live
gateway, with a real notify socket. While the writer hangs (the process is otherwise alive:
the event loop, the feed, the status timer all run) no ping goes out; once it moves again,
the pings resume; SIGTERM then stops it cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import anyio
import pytest

from streambars.config import load_settings
from streambars.daemon import Daemon
from streambars.daemon.notify import Notifier
from streambars.store import StoreWriterSet
from tests.daemon_support import NotifySocket, es_nq_records, make_gateway, write_config
from tests.fakes import TEST_KEY

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")


def test_a_stuck_writer_stops_the_watchdog_pings(tmp_path, monkeypatch):
    fake = make_gateway(es_nq_records(20_000), rate=400.0, heartbeat_interval=0.2)
    notify = NotifySocket(tmp_path)
    stuck, release = threading.Event(), threading.Event()
    original = StoreWriterSet.write

    def write(self, *args, **kwargs):
        if stuck.is_set():
            release.wait(30)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriterSet, "write", write)
    result: dict[str, object] = {}
    finished = threading.Event()

    def drive() -> None:
        try:
            deadline = time.monotonic() + 60
            while len(notify.times("WATCHDOG=1")) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            stuck.set()
            t_stuck = time.monotonic()
            time.sleep(2.0)
            result["pings_while_stuck"] = [t for t in notify.times("WATCHDOG=1") if t > t_stuck + 0.5]
            release.set()
            t_release = time.monotonic()
            while time.monotonic() < t_release + 5:
                if [t for t in notify.times("WATCHDOG=1") if t > t_release]:
                    result["resumed"] = True
                    break
                time.sleep(0.05)
        finally:
            release.set()
            if not finished.is_set():  # the daemon's handler is installed only while it runs
                os.kill(os.getpid(), signal.SIGTERM)

    try:
        cfg = write_config(tmp_path / "c.toml", fake.gateway, tmp_path / "store")
        settings = load_settings(cfg)
        notifier = Notifier({"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "400000"})
        daemon = Daemon(settings, TEST_KEY, notifier=notifier)
        assert daemon.gate.interval == 0.2
        threading.Thread(target=drive, daemon=True).start()
        try:
            code = anyio.run(daemon.main, backend="asyncio")
        finally:
            finished.set()
    finally:
        release.set()
        fake.stop()
        notify.close()
    assert code == 0
    assert result["pings_while_stuck"] == []
    assert result.get("resumed")
    assert notify.lines("STOPPING=1")

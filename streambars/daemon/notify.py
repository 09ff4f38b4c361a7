"""The systemd notify protocol (``sd_notify``) over ``$NOTIFY_SOCKET``, without libsystemd.

systemd gives a ``Type=notify`` service the path of a unix datagram socket in
``$NOTIFY_SOCKET``: a filesystem path, or an abstract name written with a leading ``@``
(sent as a leading NUL byte). Each datagram is newline-separated ``KEY=VALUE`` lines:
``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``, ``EXTEND_TIMEOUT_USEC=...``.

``WatchdogSec=`` reaches the service as ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the pid
that must ping). :meth:`Notifier.watchdog_interval` is how often to ping: half the timeout,
as sd_watchdog_enabled(3) recommends.

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``NotifyAccess=none``) every call is a
no-op, so the daemon can call these unconditionally. A send that fails is logged once and
never raises: losing a notification must not take the data path down.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from ..observe import get_logger

log = get_logger("streambars.notify")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def socket_address(name: str) -> str | bytes:
    """The address to send to: a path, or for '@name' the abstract name ('\\0name')."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def watchdog_usec(env: dict[str, str] | None = None, pid: int | None = None) -> int | None:
    """``$WATCHDOG_USEC`` when it applies to this process (``$WATCHDOG_PID`` unset or ours)."""
    env = os.environ if env is None else env
    raw = env.get(WATCHDOG_USEC, "").strip()
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC", value=raw)
        return None
    if usec <= 0:
        return None
    wpid = env.get(WATCHDOG_PID, "").strip()
    if wpid and wpid != str(os.getpid() if pid is None else pid):
        return None
    return usec


class Notifier:
    """Sends sd_notify datagrams; a no-op when ``$NOTIFY_SOCKET`` is not set.

    Thread-safe (one socket, a lock around send). ``unset_environment=True`` removes the
    variables from ``os.environ`` so child processes do not inherit them, as
    ``sd_notify(unset_environment=1)`` does.
    """

    def __init__(self, env: dict[str, str] | None = None, unset_environment: bool = False):
        env = dict(os.environ if env is None else env)
        self.socket_name: str | None = env.get(NOTIFY_SOCKET) or None
        self._watchdog_usec = watchdog_usec(env)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        self.sent = 0
        self.last_watchdog: float | None = None
        if unset_environment:
            for var in (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID):
                os.environ.pop(var, None)
        if self.socket_name and not self.socket_name.startswith(("/", "@")):
            log.warning("ignoring NOTIFY_SOCKET that is neither a path nor @abstract",
                        value=self.socket_name)
            self.socket_name = None

    @property
    def enabled(self) -> bool:
        return self.socket_name is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when off."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2e6

    def notify(self, *lines: str, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it went out."""
        parts = list(lines) + [f"{k}={v}" for k, v in fields.items()]
        if not parts or self.socket_name is None:
            return False
        payload = "\n".join(p.replace("\n", " ") for p in parts).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock = sock
                self._sock.sendto(payload, socket_address(self.socket_name))
            except OSError as e:
                if not self._warned:
                    self._warned = True
                    log.warning("systemd notify failed; continuing without it",
                                socket=self.socket_name, error=str(e))
                return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        extra = {"STATUS": status} if status else {}
        return self.notify("READY=1", f"MAINPID={os.getpid()}", **extra)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        self.last_watchdog = time.monotonic()
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        extra = {"STATUS": status} if status else {}
        return self.notify("STOPPING=1", **extra)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for more time to start or stop (EXTEND_TIMEOUT_USEC)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class WatchdogGate:
    """Pings WATCHDOG=1 at most every ``interval`` seconds, only when told data moved.

    The data loop calls :meth:`alive` each time it hands work on (or finds nothing to do
    while the pipeline is idle); a timer never pings by itself, so a stuck pipeline stops
    the pings and systemd restarts the service.
    """

    def __init__(self, notifier: Notifier, interval: float | None = None):
        self.notifier = notifier
        self.interval = interval if interval is not None else notifier.watchdog_interval()
        self._last = 0.0

    def alive(self, now: float | None = None) -> bool:
        if self.interval is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last < self.interval:
            return False
        self._last = now
        return self.notifier.watchdog()

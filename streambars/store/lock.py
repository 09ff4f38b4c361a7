"""One writer per file: an flock on a hidden sidecar file that names its holder.

``<dir>/.<name>.h5.lock`` is locked with ``fcntl.flock(LOCK_EX | LOCK_NB)``; the kernel drops
the lock when the holder's process dies, however it dies (kill -9 included), so a stale lock
can never block a restart. While held, the file says who holds it (pid, host, command,
owner, since) so a second writer -- ``backfill`` while the daemon runs, say -- is told exactly
who to stop. The sidecar is never deleted (deleting flock files races with a new locker).

HDF5's own file locking is not used (files are opened with ``locking=False``): it would make
a reader that keeps the file open block the writer's restart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import StoreError, StoreLockedError


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _holder_text(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('owner') or 'writer'}: "
        f"{holder.get('command')!s}), since {holder.get('since')}"
    )


def read_holder(path: Path) -> dict[str, Any] | None:
    """What the lock file says about its holder (meaningful only while it is locked)."""
    try:
        text = lock_path(path).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _try_lock(fd: int, lp: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        os.close(fd)
        raise StoreError(f"cannot lock {lp}: {e.strerror}") from e


class FileLock:
    """Exclusive writer lock for one store file. ``acquire()`` never waits."""

    def __init__(self, path: Path, owner: str | None = None):
        self.path = Path(path)
        self.owner = owner
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, purpose: str = "write") -> None:
        lp = lock_path(self.path)
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(f"cannot {purpose} {self.path}: cannot open its lock file {lp}: {e.strerror}") from e
        # Retry briefly: `inspect` holds a shared lock for microseconds to ask, and a new
        # holder writes its name just after locking.
        for _ in range(10):
            if _try_lock(fd, lp):
                break
            time.sleep(0.01)
        else:
            holder = read_holder(self.path)
            os.close(fd)
            raise StoreLockedError(
                f"cannot {purpose} {self.path}: it is being written by {_holder_text(holder)}. "
                "One writer per file: stop that process first (the lock goes away with it)."
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv) or sys.executable,
            "owner": self.owner,
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise StoreError(f"cannot {purpose} {self.path}: cannot write its lock file {lp}: {e.strerror}") from e
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: Path) -> dict[str, Any] | None:
    """The holder's details if some process holds the writer lock of ``path``, else None."""
    lp = lock_path(path)
    try:
        fd = os.open(lp, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return read_holder(path) or {"pid": "?"}
    finally:
        os.close(fd)
    return None

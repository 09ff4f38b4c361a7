"""Files that appear whole or not at all: atomic writes, fsync, and temp files of dead
processes.

* :func:`atomic_path` / :func:`write_atomic` — write beside ``dest``, fsync, rename over it,
  fsync the directory (the raw archive, inputs, reports);
* :func:`replace_file` — the last step alone, for a temp file built by someone else (an
  HDF5 file being created, compacted or rebuilt);
* :class:`SyncBehind` — a big file's pages sent to disk while it is written;
* :func:`pid_alive` — whether the process that left a temp file or a lock is still running.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from .errors import StoreError

TEMP_SUFFIX = ".part"
READ_SIZE = 1 << 17


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory (after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SyncBehind:
    """A file being written in one go whose written pages go to disk while it is still being
    written: every ``every`` bytes an ``fdatasync`` starts on a helper thread (one at a time),
    so the fsync at the end (:func:`replace_file`) waits for the last part only. Copying a
    161 MB input, that fsync fell from ~0.25 s to ~0.05-0.15 s. Durability itself is
    unchanged: the final fsync still covers the whole file."""

    def __init__(self, f: BinaryIO, every: int = 16 << 20):
        self.f, self.every = f, every
        self._since = 0
        self._thread: threading.Thread | None = None

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self._since += len(data)
        if self._since >= self.every and (self._thread is None or not self._thread.is_alive()):
            self.f.flush()
            self._since = 0
            self._thread = threading.Thread(target=self._sync, args=(self.f.fileno(),), daemon=True)
            self._thread.start()

    @staticmethod
    def _sync(fd: int) -> None:
        with suppress(OSError):  # a hint only: the final fsync reports a failure
            os.fdatasync(fd)

    def wait(self) -> None:
        """Let the sync in flight finish (before the file is closed)."""
        if self._thread is not None:
            self._thread.join()


def replace_file(tmp: Path, dest: Path) -> None:
    """fsync ``tmp``, rename it over ``dest``, fsync the directory."""
    fsync_path(tmp)
    os.replace(tmp, dest)
    fsync_path(dest.parent)


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes in the file, 0 when it cannot be stat'ed (gone, or being replaced): for tables
    and progress totals, where a vanished file is simply empty."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def pid_alive(pid: int) -> bool:
    """True while a process with this id exists (ours or, if not signalable, someone else's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def temp_beside(dest: str | os.PathLike[str]) -> Path:
    """A fresh temp path beside ``dest`` (not created; its directory made, temps of dead
    processes there removed), for a file whose final name is known only once it is written:
    finish it with :func:`replace_file`, or unlink it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest.parent)
    return _temp_name(dest)


@contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temp path (not created) beside ``dest``; on a clean exit it becomes ``dest``.

    Whatever writes the temp path (e.g. the databento client's ``get_range(path=...)``,
    which insists on creating the file itself) must have closed it by the end of the
    block. Then the file is fsynced, renamed over ``dest`` and the directory fsynced. On an
    exception the temp file is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest.parent)
    tmp = _temp_name(dest)
    try:
        yield tmp
        if not tmp.exists():
            raise StoreError(f"{dest}: nothing was written to the temporary file {tmp.name}")
        replace_file(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(dest: str | os.PathLike[str], data: bytes | Iterable[bytes] | BinaryIO) -> Path:
    """Write ``data`` (bytes, chunks, or a readable binary file) to ``dest`` atomically."""
    dest = Path(dest)
    with atomic_path(dest) as tmp, open(tmp, "xb") as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        elif hasattr(data, "read"):
            while chunk := data.read(READ_SIZE):  # type: ignore[union-attr]
                f.write(chunk)
        else:
            for chunk in data:  # type: ignore[union-attr]
                f.write(chunk)
    return dest


def remove_stale_temps(directory: str | os.PathLike[str]) -> int:
    """Remove temp files left by processes that died mid-write (their pid is gone)."""
    removed = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    for p in d.glob(f".*{TEMP_SUFFIX}"):
        parts = p.name.rsplit(".", 3)  # ['.<dest name>', pid, token, 'part']
        if len(parts) != 4 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or pid_alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed += 1
    return removed

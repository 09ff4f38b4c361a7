"""Rewriting closed files compressed (``streambars compact``), atomically.

Compression is only offered here, never in the appending writer: under SWMR every flush of a
partly filled compressed chunk writes a new copy of it and leaks the old one (h5py #980;
measured 30 kB on disk per 52-byte row with a flush per row). A file that nobody writes any
more -- an expired contract, a finished backfill -- is copied into a temporary file with
every bar dataset compressed (byte shuffle + gzip or lzf, same chunking, so the reader's
chunk index stays valid), fsynced, and renamed over the original. Readers that had the old
file open keep reading the old copy until they reopen. If a writer later appends to a
compacted file, it first rewrites it uncompressed the same way (see writer.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import h5py

from ..errors import DamagedFileError, StoreError, StoreLockedError, UsageError
from ..fsio import file_size, replace_file
from ..observe import Progress
from .layout import BARS, LIBVER, SUFFIX, file_space, remove_stale_temps, store_files, temp_path
from .lock import FileLock
from .probe import check_writable
from .recovery import recover_file

COMPRESSIONS = ("gzip", "lzf", "none")
GZIP_LEVEL = 4
_COPY_CHUNKS = 64  # chunks per read/write while copying


def _filters(compression: str | None) -> dict[str, object]:
    if compression in (None, "none"):
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    raise StoreError(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")


def rewrite_file(path: Path, compression: str | None,
                 copied: Callable[[float], None] | None = None) -> tuple[int, int]:
    """Copy ``path`` with its bar datasets (re)compressed, then rename the copy over it.

    The caller must hold the file's writer lock. Returns (bytes before, bytes after).
    ``copied(fraction)`` is told how much of the file's data is copied so far (progress)."""
    filters = _filters(compression)
    before = os.path.getsize(path)
    tmp = temp_path(path, "compact")
    try:
        with h5py.File(path, "r", locking=False) as src:
            if BARS not in src:
                raise StoreError(f"{path} is not a streambars bar file (no /{BARS} group)")
            # An uncompressed copy may be appended to again: placed as its writers place it.
            space = {} if filters else file_space(src)
            with h5py.File(tmp, "w", libver=LIBVER, locking=False, **space) as dst:
                _copy_file(src, dst, filters, copied)
        replace_file(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot rewrite {path} (via {tmp.name}): {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return before, os.path.getsize(path)


def _copy_file(src: h5py.File, dst: h5py.File, filters: dict[str, object],
               copied: Callable[[float], None] | None) -> None:
    dst.attrs.update(src.attrs)
    sizes: list[int] = []
    src.visititems(lambda _, obj: sizes.append(obj.nbytes) if isinstance(obj, h5py.Dataset) else None)
    done, total = [0], max(sum(sizes), 1)

    def step(n: int) -> None:
        done[0] += n
        if copied is not None:
            copied(min(done[0] / total, 1.0))

    src.visititems(lambda name, obj: _copy(name, obj, dst, filters, step))


def _copy(name: str, obj: h5py.Group | h5py.Dataset, dst: h5py.File, filters: dict[str, object],
          step: Callable[[int], None]) -> None:
    if isinstance(obj, h5py.Group):
        dst.require_group(name).attrs.update(obj.attrs)
        return
    opts = filters if name.startswith(BARS + "/") and obj.chunks else {}
    out = dst.create_dataset(
        name, shape=obj.shape, maxshape=obj.maxshape, chunks=obj.chunks, dtype=obj.dtype, **opts
    )
    out.attrs.update(obj.attrs)
    if not obj.size:
        return
    rows = (obj.chunks[0] if obj.chunks else obj.shape[0]) * _COPY_CHUNKS
    for lo in range(0, obj.shape[0], rows):
        out[lo : lo + rows] = part = obj[lo : lo + rows]
        step(part.nbytes)


def compact_store(
    root: Path | str, paths: Sequence[str | Path] = (), compression: str = "gzip",
    progress: Progress | None = None,
) -> Iterator[tuple[Path, int, int]]:
    """Rewrite each file (default: all in the store) compressed; yields (path, before, after).

    A file being written (its writer lock held) is skipped and named in the StoreLockedError
    raised after the others are done. ``progress`` (if given): files rewritten (``records``),
    bytes written, and the bytes of the input gone through of their total (the ETA)."""
    _filters(compression)
    root = Path(root)
    if paths:
        files = [store_file_arg(root, p) for p in paths]
    else:
        if not root.exists():
            raise StoreError(f"no store at {root}")
        files = store_files(root)
    refused: list[str] = []
    damaged: list[DamagedFileError] = []
    progress = progress or Progress()
    sizes = {path: file_size(path) for path in files}
    progress.input_total = sum(sizes.values())
    for path in files:
        base = progress.input_bytes

        def copied(fraction: float, base: int = base, size: int = sizes[path]) -> None:
            progress.input_bytes = base + int(fraction * size)
            if progress.listener is not None:
                progress.listener()
        lock = FileLock(path, owner="compact")
        try:
            lock.acquire(purpose="compact")
        except StoreLockedError as e:
            refused.append(str(e))
            continue
        try:
            remove_stale_temps(path)
            check_writable(path)
            recover_file(path)
            before, after = rewrite_file(path, compression, copied)
        except DamagedFileError as e:
            damaged.append(e)
            continue
        finally:
            lock.release()
            progress.input_bytes = base + sizes[path]
        progress.add(records=1, nbytes=after)
        yield path, before, after
    if damaged:
        if len(damaged) == 1 and not refused:
            raise damaged[0]
        raise DamagedFileError(
            ", ".join(str(e.path) for e in damaged),
            "; ".join(e.what for e in damaged) + (f". Also: {' '.join(refused)}" if refused else ""),
            " (left untouched)",
        )
    if refused:
        raise StoreLockedError(" ".join(refused))



def store_file_arg(root: Path, p: str | Path) -> Path:
    """A path given on the command line as a store file: a ``.h5`` file inside the store
    (relative to it or not). Anything else is refused before a lock or temp file is made
    next to it (``compact /etc/hostname`` must write nothing in /etc)."""
    p = Path(p)
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        p = root / p
    real, store = p.resolve(), root.resolve()
    if p.suffix != SUFFIX or p.name.startswith(".") or store not in real.parents:
        raise UsageError(
            f"{p} is not a store file: give .h5 files inside the store {root} "
            f"(<store>/<dataset>/<symbol>{SUFFIX})"
        )
    if not real.is_file():
        raise StoreError(f"no store file {p}")
    return p

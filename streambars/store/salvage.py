"""What can still be read out of a damaged store file: its contract and its ledger.

``streambars repair`` rebuilds a damaged file from the raw archive; the file itself says best
how it was built (timeframes, session, stype) and what went into it (the ledger in its
``progress`` blob). Each piece is read on its own, through the bounded-retry open of
:mod:`.probe`, and whatever fails to read is simply missing: the caller falls back to the
configuration and to the archive.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from .layout import META, file_timeframes, read_blob
from .probe import RepairedView, open_read
from .recovery import read_superblock


@dataclass
class Salvaged:
    timeframes: list[str] | None = None
    session: str | None = None
    stype: str | None = None
    progress: dict[str, Any] | None = None


def _open(path: Path) -> h5py.File | None:
    """Read-only, as it is; else a truncated file zero-extended to its stored end (its
    headers near the start usually still read)."""
    try:
        return open_read(path, swmr=False)
    except (OSError, ValueError):
        pass
    try:
        sb = read_superblock(path)
        if sb is None:
            return None
        return h5py.File(RepairedView(path, sb, os.path.getsize(path)), "r", locking=False)
    except Exception:  # noqa: BLE001 - whatever does not open is simply not salvaged
        return None


def salvage(path: Path) -> Salvaged | None:
    """The contract and ledger of ``path`` as far as they read (None: it does not open at all)."""
    f = _open(path)
    if f is None:
        return None
    out = Salvaged()
    try:
        with contextlib.suppress(Exception):
            out.timeframes = file_timeframes(f)
        with contextlib.suppress(Exception):
            out.session = str(f.attrs["session"])
        with contextlib.suppress(Exception):
            out.stype = str(f.attrs["stype"])
        with contextlib.suppress(Exception):
            blob = read_blob(f[f"{META}/progress"])[1]
            out.progress = json.loads(blob) if blob else None
    finally:
        with contextlib.suppress(Exception):
            f.close()
    return out


def recorded_sessions(root: Path | str, dataset: str) -> dict[str, int]:
    """Session attribute -> how many of ``dataset``'s files in the store record it. Files
    that cannot be opened right now (damaged, being created) are left out: their writer's
    contract check names them if they differ."""
    out: dict[str, int] = {}
    for path in sorted((Path(root) / dataset).glob("*.h5")):
        try:
            with open_read(path) as f:
                have = f.attrs.get("session")
        except (OSError, KeyError, ValueError):
            continue
        if isinstance(have, bytes):
            have = have.decode()
        if have:
            out[str(have)] = out.get(str(have), 0) + 1
    return out

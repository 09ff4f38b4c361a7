"""How a Databento symbol becomes a file or directory name, and back.

Symbols carry characters a filesystem does not like (``BRN FMJ0024!``, ``ESM5-ESU5``,
option symbols with runs of spaces, the odd ``/``). The store (``<symbol>.h5``) and the raw
archive (``raw/<symbol>/``) must agree on one escaping, so it lives here.

The rule: ASCII letters, digits and ``-``, ``_``, ``.`` stay as they are; every other byte of
the UTF-8 encoding becomes ``%XX`` (upper-case hex), as in a URL. A leading ``.`` is escaped
too, so no symbol can name a hidden file, ``.`` or ``..``. The mapping is reversible and
two different symbols never share a name (``%`` itself is escaped).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_ESCAPED = re.compile(r"^(?:[A-Za-z0-9_.\-]|%[0-9A-F]{2})+$")


def symbol_to_filename(symbol: str) -> str:
    """``ES.c.0`` -> ``ES.c.0``; ``BRN FMJ0024!`` -> ``BRN%20FMJ0024%21``."""
    if not symbol:
        raise ValueError("an empty symbol has no file name")
    out = []
    for i, byte in enumerate(symbol.encode("utf-8")):
        if byte in _SAFE and not (i == 0 and byte == ord(".")):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def filename_to_symbol(name: str) -> str:
    """The inverse of :func:`symbol_to_filename` (raises ValueError on a name it never makes)."""
    if not _ESCAPED.match(name):
        raise ValueError(f"{name!r} is not an escaped symbol name")
    return unquote(name, errors="strict")

"""A new process's start: the engine's cached kernel loaded without numba's registry refresh,
and the import-time heap frozen.

Before it reads a cached function, numba refreshes its target context: it imports and
installs every typing and lowering registry and sets up its runtime (~0.6 s, a third of a
warm start). The registries serve the compiler, which refreshes on its own; a cached
function is object code, which needs only the symbols it links against. So the functions
named to :func:`load_without_refresh` (ours: the engine's kernel, the writers' grouping)
are loaded here, when every symbol their object code leaves undefined is one numba
registers when its context is built (the Python C API, numba's C helpers) or numba's
runtime (``NRT_*``: then the runtime alone is set up). Anything else takes numba's normal path: another function, a
cache miss (the compiler refreshes), another symbol (refreshed first), a load that fails
(the context is refreshed and the function compiled afresh, replacing the entry: numba
itself would raise on a damaged cache file), a numba version not checked here, or an object
format other than 64-bit little-endian ELF.
"""

from __future__ import annotations

import contextlib
import os
import struct

#: numba versions (major, minor) whose Cache.load_overload is refresh + _load_overload.
CHECKED_NUMBA = ((0, 68),)

#: What each cache load of a named function did, in order: "cache" (loaded, no refresh),
#: "refreshed" (loaded after a refresh: a symbol outside the known sets), "miss" (compiled),
#: "fallback" (the entry could not be read: compiled afresh); "normal": a block that took
#: numba's own path (an unchecked numba version).
loads: list[str] = []


def _cache_class():
    """numba's Cache class when its load path is the one checked here, else None."""
    try:
        import numba
        from numba.core.caching import Cache
    except Exception:  # noqa: BLE001 - no numba internals: the normal path
        return None
    if tuple(numba.version_info.short) not in CHECKED_NUMBA:
        return None
    needed = ("load_overload", "_guard_against_spurious_io_errors", "_index_key")
    return Cache if all(hasattr(Cache, name) for name in needed) else None


def undefined_symbols(obj: bytes) -> list[str] | None:
    """The names an ELF64 little-endian object file uses but does not define (None: not one)."""
    if obj[:4] != b"\x7fELF" or obj[4:6] != b"\x02\x01":
        return None
    (shoff,) = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][4]
        for k in range(size // entsize):
            name, _, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", obj, offset + k * entsize)
            if shndx == 0 and name:  # SHN_UNDEF
                start = strings + name
                names.append(obj[start:obj.index(b"\0", start)].decode())
    return names


def _runtime_needed(payload) -> str | None:
    """What a cached CompileResult payload's object code needs set up before it is linked:
    "" nothing beyond a built context, "nrt" numba's runtime, None unknown (refresh)."""
    from numba import _dynfunc, _helperlib

    _, kind, (obj, _) = payload[0]
    symbols = undefined_symbols(obj) if kind == "object" else None
    if symbols is None:
        return None
    helpers = {f"numba_{h}" for h in (*_helperlib.c_helpers, *_dynfunc.c_helpers)}
    need = ""
    for s in symbols:
        if s.startswith("NRT_"):
            need = "nrt"
        elif not (s in helpers or s.startswith(("Py", "_Py"))):
            return None
    return need


#: (module, qualname) of the functions whose cache loads skip the refresh
_named: set[tuple[str, str]] = set()


def load_without_refresh(module: str, *qualnames: str) -> None:
    """From now on, cache loads of these functions of ``module`` skip numba's refresh when
    they can (see above). Call it before the functions are defined: an explicit signature
    compiles (loads) at definition, any other at the first call."""
    cache_cls = _cache_class()
    if cache_cls is None:
        loads.append("normal")
        return
    if not _named:
        _install(cache_cls)
    _named.update((module, q) for q in qualnames)


def _install(cache_cls) -> None:
    original = cache_cls.load_overload

    def load_overload(self, sig, target_context):
        func = getattr(self, "_py_func", None)
        name = getattr(func, "__qualname__", None)
        if (getattr(func, "__module__", None), name) not in _named or not getattr(self, "_enabled", False):
            return original(self, sig, target_context)
        try:
            with self._guard_against_spurious_io_errors():
                payload = self._cache_file.load(self._index_key(sig, target_context.codegen()))
                if payload is None:
                    loads.append("miss")
                    return None  # the compiler refreshes
                need = _runtime_needed(payload)
                if need is None:
                    target_context.refresh()
                elif need == "nrt":
                    from numba.core.runtime import rtsys

                    rtsys.initialize(target_context)
                cres = self._impl.rebuild(target_context, payload)
        except Exception as exc:  # noqa: BLE001 - a damaged entry: compile instead
            from .observe import get_logger

            get_logger(__name__).warning("numba_cache_unreadable", function=name, error=repr(exc))
            loads.append("fallback")
            # numba's save reads the index first: drop it so that the fresh entry replaces it
            with contextlib.suppress(AttributeError, OSError):
                os.remove(self._cache_file._index_path)
            target_context.refresh()
            return None  # a miss: the dispatcher compiles and saves a fresh entry
        loads.append("refreshed" if need is None else "cache")
        return cres

    cache_cls.load_overload = load_overload


def freeze_import_heap() -> None:
    """Move every object alive now (numba's and numpy's ~70k import-time objects, which live
    as long as the process) out of the garbage collector's sight: each full collection
    walked them all (~0.1 s: a pause in live feeding), and the interpreter's collections at
    exit cost ~0.3 s of a short process. The catch: a reference cycle that already exists now
    is never collected; the engine is imported while a process starts, before such cycles."""
    import gc

    gc.freeze()

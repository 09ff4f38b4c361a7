"""The package's import structure stays as docs/architecture.md draws it.

Every module's imports (module level or inside functions) are read with ``ast``, and:

* no import circle between modules;
* ``h5py`` only under ``streambars/store/`` (everything else goes through the store's API);
* at most two imports run from a lower layer up (see LAYERS).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "streambars"

#: Lowest first; a module's layer is its top-level name under streambars/.
LAYERS: list[set[str]] = [
    # foundation: shared helpers and data types
    {"version", "errors", "timeutil", "fsio", "zstdframes", "naming", "startup", "observe", "jitcache",
     "tables", "records", "timeframes", "rules"},
    # the parts: configuration, the engine, the store, the raw archive, sources
    {"config", "engine", "store", "archive", "ledger", "inputs", "sources"},
    # flows built from the parts
    {"pipeline", "export", "validate", "synthetic", "plot"},
    # the commands' wings
    {"backfill", "check", "cluster", "repair", "daemon", "demo"},
    # entry points
    {"cli", "__main__", ""},
]
MAX_UPWARD = 2


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = ["streambars", *p.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(streambars modules imported, third-party top-level packages imported)."""
    inner, outer = set(), set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            targets = subs if subs and len(subs) == len(node.names) else [mod, *subs]
        for t in targets:
            if not t.startswith("streambars"):
                outer.add(t.split(".")[0])
                continue
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                inner.add(t)
    return inner, outer


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    edges, third = {}, {}
    for name, path in modules.items():
        edges[name], third[name] = _imports(name, path, modules)
    return edges, third


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, bs in edges.items() for b in bs if _layer(b) > _layer(a))


def test_no_import_circles():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_h5py_only_under_store():
    _, third = _graph()
    users = sorted(m for m, pkgs in third.items() if "h5py" in pkgs)
    assert users and all(m.startswith("streambars.store.") for m in users), users


def test_every_module_has_a_layer_and_few_run_upward():
    edges, _ = _graph()
    for m in edges:
        _layer(m)
    up = upward_imports(edges)
    assert len(up) <= MAX_UPWARD, up


def test_every_module_imports_from_this_package():
    """A stale import of a moved module must fail here, not resolve to another checkout."""
    import importlib
    import sys

    for name in sorted(_modules()):
        if not name.endswith("__main__"):
            importlib.import_module(name)
    stray = sorted(n for n, m in sys.modules.items() if n.split(".")[0] == "streambars"
                   and getattr(m, "__file__", None) and PACKAGE not in Path(m.__file__).resolve().parents)
    assert stray == []

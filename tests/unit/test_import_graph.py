"""The package's import graph: no cycles, and no lower layer importing a higher one.

Every module is parsed (never imported); each ``import`` and ``from ... import``
of the package counts, also those inside functions and ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "libvirt_rdm_backup"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE
HIGHER = (f"{PACKAGE}.engine", f"{PACKAGE}.api", f"{PACKAGE}.cli")
FACADES = {PACKAGE, f"{PACKAGE}.__main__"}  # the package's lazy API and entry point


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (an imported name that is a module
    counts as that module, any other as the module it comes from)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    found.discard(name)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert f"{PACKAGE}.engine.backup" in graph[f"{PACKAGE}.api"]
    assert f"{PACKAGE}.qemu.nbd_io" in graph[f"{PACKAGE}.repository.chunkmap"]  # in a function
    assert f"{PACKAGE}.watchdog" in graph[f"{PACKAGE}.consistency"]  # ``from pkg import mod``


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == {frozenset({"a", "b", "c"})}


def test_no_import_cycles() -> None:
    found = sorted(sorted(c) for c in cycles(import_graph()))
    assert not found, f"import cycles: {found}"


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = []
    for module, imported in sorted(import_graph().items()):
        if module in FACADES or any(_in(module, top) for top in HIGHER[1:]):
            continue
        allowed = HIGHER[:1] if _in(module, HIGHER[0]) else ()
        for other in sorted(imported):
            if any(_in(other, top) for top in HIGHER if top not in allowed):
                wrong.append(f"{module} imports {other}")
    assert not wrong, "\n".join(wrong)


def test_libnbd_is_used_in_one_module() -> None:
    """The libnbd binding (``import nbd``, Debian's python3-libnbd) is imported in one module."""
    users = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "nbd" for a in node.names):
                users.add(name)
            if isinstance(node, ast.ImportFrom) and node.module == "nbd":
                users.add(name)
    assert users == {f"{PACKAGE}.qemu.nbd_io"}

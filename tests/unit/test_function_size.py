"""Functions of the package stay short: each does one named step."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "libvirt_rdm_backup"
MAX_LINES = 80
ALLOWED: dict[str, str] = {}  # "path:function" -> why it is still longer


def _long_functions() -> dict[str, int]:
    """``path:qualified name`` -> lines (decorators and docstring included)."""
    found: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        name = path.relative_to(PACKAGE).as_posix()
        _visit(tree, name, "", found)
    return found


def _visit(node: ast.AST, path: str, prefix: str, found: dict[str, int]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            qualified = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                assert child.end_lineno is not None
                lines = child.end_lineno - first + 1
                if lines > MAX_LINES:
                    found[f"{path}:{qualified}"] = lines
            _visit(child, path, qualified + ".", found)
        else:
            _visit(child, path, prefix, found)


def test_no_function_is_longer_than_the_limit() -> None:
    wrong = {name: n for name, n in _long_functions().items() if name not in ALLOWED}
    assert not wrong, f"functions over {MAX_LINES} lines (split them into named steps): {wrong}"


def test_the_allow_list_names_only_long_functions() -> None:
    assert not set(ALLOWED) - set(_long_functions()), "allowed functions that are short now"


def test_the_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    tree = ast.parse(f"class C:\n    def f(self) -> None:\n{body.replace('    ', '        ')}\n")
    found: dict[str, int] = {}
    _visit(tree, "m.py", "", found)
    assert found == {"m.py:C.f": MAX_LINES + 1}

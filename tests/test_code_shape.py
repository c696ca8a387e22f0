"""The library's functions stay readable: none over 80 lines (ruff's C90 rule caps their complexity at 15
in ``make lint``; this caps their length, which ruff does not check)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cellseg"
MAX_LINES = 80


def long_functions(root: Path, max_lines: int = MAX_LINES) -> list[str]:
    """``"path:line name (N lines)"`` for every function or method under ``root`` longer than ``max_lines``
    (decorators excluded, docstring included)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > max_lines:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_src_is_over_80_lines():
    assert long_functions(SRC) == []


def test_the_check_finds_a_long_function(tmp_path: Path):
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\nclass C:\n    def long(self):\n{body}\n")
    found = long_functions(tmp_path)
    assert len(found) == 1 and "long (81 lines)" in found[0]


def test_a_function_at_the_limit_passes(tmp_path: Path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES - 1))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    assert long_functions(tmp_path) == []

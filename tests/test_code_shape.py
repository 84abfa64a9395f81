"""The shape a newcomer can read: no function in ``kernel/`` over 80 lines, no module over 450 lines unless
its docstring says why (a paragraph starting ``Why this file is long:``)."""
from __future__ import annotations

import ast
from pathlib import Path

KERNEL = Path(__file__).resolve().parents[1] / "kernel"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 450
REASON = "Why this file is long:"


def _modules():
    return sorted(p for p in KERNEL.rglob("*.py") if "__pycache__" not in p.parts)


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.name}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_over_80_lines():
    assert [f for p in _modules() for f in long_functions(p)] == []


def test_no_module_over_450_lines_without_a_reason_at_its_top():
    unexplained = []
    for p in _modules():
        text = p.read_text(encoding="utf-8")
        if text.count("\n") > MAX_FILE_LINES and REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(f"{p.relative_to(KERNEL.parent)} ({text.count(chr(10))} lines)")
    assert unexplained == []


def test_the_checks_see_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    f = tmp_path / "m.py"
    f.write_text(f"def too_long():\n{body}\n")
    assert long_functions(f) == [f"m.py:1 too_long ({MAX_FUNCTION_LINES + 1} lines)"]
    f.write_text(f"class A:\n    def method(self):\n{body.replace('    ', '        ')}\n")
    assert long_functions(f) == [f"m.py:2 method ({MAX_FUNCTION_LINES + 1} lines)"]

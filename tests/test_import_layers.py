"""The import direction is part of the design: kernels → (torch, triton); rdcore → kernels;
only rdcore/engine touches deepspeed; nothing imports bench/ or tests/."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.add("<relative>")
    return names


def files(package: str) -> list[Path]:
    found = sorted((ROOT / package).rglob("*.py"))
    assert found or package == "bench", f"no Python files under {package}/"
    return found


def test_kernels_import_only_torch_triton():
    for f in files("kernels"):
        bad = imports_of(f) - STDLIB - {"torch", "triton", "kernels", "<relative>"}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_rdcore_never_imports_bench_or_tests():
    for f in files("rdcore"):
        bad = imports_of(f) & {"bench", "tests"}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_engine_imports_deepspeed():
    for package in ("kernels", "rdcore"):
        for f in files(package):
            if f == ROOT / "rdcore" / "engine.py":
                continue
            assert "deepspeed" not in imports_of(f), f"{f.relative_to(ROOT)} imports deepspeed"


def test_nothing_imports_bench_or_tests():
    for package in ("kernels", "rdcore", "bench"):
        for f in files(package):
            assert "tests" not in imports_of(f), f"{f.relative_to(ROOT)} imports tests"


def test_checker_sees_violations(tmp_path):
    """The walk itself must catch a bad import (so this file cannot silently pass)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom deepspeed import comm\nimport os\n")
    assert imports_of(bad) - STDLIB == {"numpy", "deepspeed"}


def test_kernels_never_import_rdcore():
    """kernels/ is installed as rdcore.kernels but sits below it: it imports only torch, triton
    and its own modules (relatively)."""
    for f in files("kernels"):
        assert "rdcore" not in imports_of(f), f"{f.relative_to(ROOT)} imports rdcore"


MAX_FUNCTION_LINES = 80


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_in_rdcore_is_longer_than_80_lines():
    """A function one reads in one pass (the trainer's loop was once a 207-line run_stage)."""
    for package in ("rdcore", "kernels"):
        for f in files(package):
            assert not long_functions(f), f"{f.relative_to(ROOT)}: {long_functions(f)}"


def test_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n")
    assert long_functions(tmp_path / "long.py") == [("f", MAX_FUNCTION_LINES + 1)]

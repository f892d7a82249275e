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

"""The model-family matrix as a Markdown table, from the file ``tests/test_families_zero3.py``
writes when ``RDCORE_MATRIX_OUT`` is set (per family: what it exercises and, per fine-tuning mode,
the largest loss difference between the run with the teacher caches and interleaving on and the
run with them off, relative to the curve's size).

    RDCORE_MATRIX_OUT=bench/results/families_matrix.json pytest tests/test_families_zero3.py
    python bench/families_table.py --matrix bench/results/families_matrix.json   # the table
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common import parse


@dataclass
class Options:
    matrix: str = "bench/results/families_matrix.json"
    """The matrix file written by the test."""
    tolerance: float = 5e-3
    """The test's curve tolerance (tests/test_families_zero3.py REL), printed beside each value."""


def table(matrix: dict[str, dict], tolerance: float) -> str:
    """One row per family: what it exercises, the lora and full differences, pass or fail."""
    lines = ["| family | exercises | LoRA: max rel. loss difference | full: max rel. loss difference |",
             "|---|---|---|---|"]
    for family, entry in matrix.items():
        cells = [f"{entry[m]:.1e} {'✓' if entry[m] <= tolerance else '✗'}" for m in ("lora", "full")]
        lines.append(f"| {family} | {entry['exercises']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    opt = parse(Options, argv, __doc__, "bench/families_table.py")
    path = Path(opt.matrix)
    if not path.is_file():
        raise SystemExit(f"families_table: {path} does not exist; write it with "
                         "RDCORE_MATRIX_OUT=... pytest tests/test_families_zero3.py")
    try:
        matrix = json.loads(path.read_text())
    except ValueError as err:
        raise SystemExit(f"families_table: {path} is not JSON: {err}") from None
    print(table(matrix, opt.tolerance))
    return 0


if __name__ == "__main__":
    sys.exit(main())

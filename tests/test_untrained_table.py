"""``bench/untrained_table.py`` on the committed Gemma 3 270M evaluations: its rates are the ones
``rdcore.evaluate`` wrote into each ``eval.json`` (the table is computed from the per-row verdicts,
so a wrong row score or a swapped side shows), and the difference is with − without."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "bench" / "results" / "gemma3_untrained"


def test_the_table_matches_the_evaluations():
    proc = subprocess.run([sys.executable, "bench/untrained_table.py", str(DIR)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("| ") and "---" not in x][1:]
    assert len(lines) == 5
    for line in lines:
        name, metric, n, without, with_, diff = (c.strip() for c in line.strip("|").split("|"))
        task, split = name.split(" ")
        folder = "bob_test" if task == "bob" else f"{task}_{split}"
        want = [json.loads((DIR / f"{folder}_{side}" / "eval.json").read_text())
                for side in ("student", "teacher")]
        assert int(n) == want[0]["n_examples"] == want[1]["n_examples"]
        for cell, ev in ((without, want[0]), (with_, want[1])):
            assert abs(float(cell.split(" ")[0]) - ev["metrics"][metric]) < 5e-4, (line, ev)
        gap = want[1]["metrics"][metric] - want[0]["metrics"][metric]
        assert abs(float(diff.split(" ")[0]) - gap) < 5e-4, line


def test_a_folder_that_is_not_there_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "bench/untrained_table.py", str(tmp_path / "nope")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "usage: python bench/untrained_table.py DIR" in proc.stderr

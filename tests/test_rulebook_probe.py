"""The rule book's in-context probe (``bench/rulebook_probe.py``) on the ``tiny`` model: each
evaluation is written once and read back, and probing another placement (or model) keeps the rows
and table of the ones probed before. Run as a user would (a subprocess: nothing imports
``bench/``)."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _probe(out: Path, placement: str) -> None:
    cmd = [sys.executable, "bench/rulebook_probe.py", "--models", "tiny", "--rules", "french",
           "--placements", placement, "--limit", "2", "--max_new_tokens", "4", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_another_placement_keeps_the_earlier_rows(tmp_path):
    _probe(tmp_path, "alpaca")
    first = (tmp_path / "tiny" / "alpaca" / "french" / "eval.json").read_text()
    _probe(tmp_path, "chat")
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert sorted((r["placement"], r["side"]) for r in rows) == [
        ("alpaca", "student"), ("alpaca", "teacher"), ("chat", "student"), ("chat", "teacher")]
    header = (tmp_path / "table.md").read_text().splitlines()
    assert any("alpaca: with rule" in line and "chat: with rule" in line for line in header)
    _probe(tmp_path, "alpaca")  # read back, not generated again
    assert (tmp_path / "tiny" / "alpaca" / "french" / "eval.json").read_text() == first
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 4

"""The experiment runner end to end on the tiny model: cells train and evaluate, the table is
written, and a second call reruns nothing."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_sweep_is_resumable(tmp_path):
    cmd = [sys.executable, "bench/paper_table.py", "--task", "bob", "--model", "tiny",
           "--methods", "inst_tune_no_rule,rule_distill_base", "--shots", "8", "--seeds", "1234",
           "--epochs", "1", "--ranks", "1", "--limit", "2", "--max_new_tokens", "4",
           "--rule_text", "canonical", "--out", str(tmp_path)]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("training") == 2
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["method"] for r in rows} == {"inst_tune_no_rule", "rule_distill_base"}
    assert {r["metric"] for r in rows} == {"negative_env", "positive_other", "adherence"}
    assert all(r["side"] == "student" and r["n"] == "2" for r in rows)
    cell = tmp_path / "cells" / "rule_distill_base_k8_s1234"  # the paper's model selection
    assert json.loads((cell / "config.json").read_text())["select_best"] is True
    assert (cell / "best" / "main" / "epoch1.pt").is_file()
    # cells keep the adapter only (evaluation merged it into the base model)
    assert (cell / "final" / "rdcore_adapter.json").is_file()
    assert not (cell / "final" / "model.safetensors").exists()
    table = (tmp_path / "table.md").read_text()
    assert "| rule_distill_base |" in table and "(n=1)" in table
    assert "test — adherence: difference from inst_tune_no_rule" in table  # paired over test rows
    assert "(1 seed, 2 rows)" in table
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "training" not in second.stdout
    assert "evaluating" not in second.stdout
    # a later invocation for part of the sweep keeps the other cells' rows in results.csv
    part = [*cmd[:cmd.index("--methods") + 1], "inst_tune_no_rule",
            *cmd[cmd.index("--methods") + 2:]]
    third = subprocess.run(part, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "training" not in third.stdout
    after = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert sorted(map(str, after)) == sorted(map(str, rows))


def test_report_gives_the_seeds_own_spread(tmp_path):
    """With several seeds the difference table gives both standard errors: over the test rows and
    over the seeds' own paired differences (here +0.50 and 0.00: mean 0.25, SE 0.25). From a sweep
    folder written by hand (--report-only trains nothing)."""
    scores = {("inst_tune_no_rule", 1): [0, 0, 1, 1], ("inst_tune_no_rule", 2): [0, 1, 1, 0],
              ("rule_distill_enhanced", 1): [1, 1, 1, 1], ("rule_distill_enhanced", 2): [0, 1, 1, 0]}
    rows = ["method,k,seed,split,side,metric,value,n"]
    for (method, seed), values in scores.items():
        folder = tmp_path / "cells" / f"{method}_k16_s{seed}" / "eval" / "french_test_student"
        folder.mkdir(parents=True)
        (folder / "generations.jsonl").write_text("".join(
            json.dumps({"index": i, "score": v}) + "\n" for i, v in enumerate(values)))
        rows.append(f"{method},16,{seed},french_test,student,rate,{sum(values) / 4},4")
    (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")
    cmd = [sys.executable, "bench/paper_table.py", "--out", str(tmp_path), "--task", "rulebook",
           "--report-only"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    assert "| rule_distill_enhanced | +0.250 ± " in table
    assert " rows, ± 0.250 seeds (2 seeds, 4 rows) |" in table

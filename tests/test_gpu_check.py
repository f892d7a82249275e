"""The GPU check's driver (``bench/gpu_check.py``), on the CPU: each step's row is appended as soon
as the step ends, no step starts after ``--deadline_s`` (it is recorded as skipped), an unknown
step name is refused, and ``$RDCORE_GIT_SHA`` names the commit where the tree has no git history
(the copy a GPU lease runs). Run as a user would (a subprocess: nothing imports ``bench/``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=120)


def test_rows_appended_step_by_step_and_deadline_skips(tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_text('{"step": "earlier run"}\n')
    lease = tmp_path / "lease_out"  # a device lease's $OUT
    lease.mkdir()
    proc = _run("--only", "env", "--out", str(out), env={"RDCORE_GIT_SHA": "abc1234",
                                                         "OUT": str(lease)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == ["earlier run", "env"]  # appended, not rewritten
    assert rows[1]["ok"] is True and rows[1]["git"] == "abc1234" and "torch" in rows[1]
    # this run's rows only, and the children's output, copied to $OUT as the steps end
    copied = [json.loads(x) for x in (lease / "rows.jsonl").read_text().splitlines()]
    assert copied == rows[1:]
    assert "--step env" in (lease / "gpu_check_log.txt").read_text()

    late = tmp_path / "late.jsonl"
    proc = _run("--only", "env,module,train_tiny", "--deadline_s", "1e-9", "--out", str(late))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # skipped is not failed
    rows = [json.loads(x) for x in late.read_text().splitlines()]
    assert [r["step"] for r in rows] == ["env", "module", "train_tiny"]
    assert all(r["ok"] is None and r["skipped"].startswith("deadline") for r in rows)


def test_unknown_step_is_refused(tmp_path):
    proc = _run("--only", "env,kernel_test", "--out", str(tmp_path / "rows.jsonl"))
    assert proc.returncode != 0
    assert "unknown step(s) kernel_test" in proc.stderr
    assert not (tmp_path / "rows.jsonl").exists()

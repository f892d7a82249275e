"""The GPU-only benchmark scripts, tried on the CPU as a user would (subprocesses: nothing imports
``bench/``): ``bench/sweep_kernels.py`` on tiny shapes through Triton's interpreter (every
geometry timed each round, the profile and its trace written, rows appended) and refusing to run
without a GPU or the interpreter; ``bench/gpu_report.py`` building its page from rows alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_sweep_times_every_geometry_and_profiles(tmp_path):
    out, trace = tmp_path / "sweep.jsonl", tmp_path / "trace.json"
    proc = _run("bench/sweep_kernels.py", "--shape", "40,16,300", "--configs", "auto,16:32:o",
                "--profile", "16:32:o", "--hidden_shape", "2,10,64", "--warps", "2,4",
                "--repeats", "2", "--out", str(out), "--trace", str(trace), interpret=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    sweep = [r for r in rows if r["op"] == "linear_kl"]
    assert [(r["frozen_head"], r["config"], r["chunk_rows"], r["group_rows"], r["overlap"])
            for r in sweep] == [
        (False, "auto", 40, 40, False), (False, "16:32:o", 16, 32, True),
        (True, "auto", 40, 40, False), (True, "16:32:o", 16, 32, True)]
    assert all(len(r["ms_all"]) == 2 and r["ms"] > 0 for r in sweep)
    profiles = [r for r in rows if r["op"] == "linear_kl_profile"]
    assert len(profiles) == 2 and all("failed" not in r and r["step_ms"] > 0 for r in profiles)
    assert json.loads(trace.read_text())  # the trainable head's step, as a Chrome trace
    hidden = [r for r in rows if r["op"] == "hidden_mse"]
    assert [r["num_warps"] for r in hidden] == [2, 4] and all(r["copy_gbps"] > 0 for r in hidden)


def test_sweep_needs_a_gpu_or_the_interpreter():
    proc = _run("bench/sweep_kernels.py", interpret=False)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stdout


def test_gpu_report_is_built_from_the_rows(tmp_path):
    page = tmp_path / "gpu.md"
    proc = _run("bench/gpu_report.py", "--out", str(page), interpret=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = page.read_text()
    # the committed H200 rows: the trainable head's Triton row of the second run, with its
    # ratio to Liger's best provider in that run (67.8 / 62.1)
    assert "| c1e90c2 | trainable | triton | 62.1 |" in text
    line = next(x for x in text.splitlines() if x.startswith("| c1e90c2 | trainable | triton |"))
    assert line.rstrip(" |").endswith("1.09")
    # its peak beyond the fp32 dW accumulator (3102 − 2004 MiB): the trainable head's memory target
    assert line.split("|")[-3].strip() == "1098"

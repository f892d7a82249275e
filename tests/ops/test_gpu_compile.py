"""Every Triton launch the launchers can make, compiled for sm_80 and sm_90 on this CPU machine
(``python -m rdcore.kernels.aot``): a compile error, a register spill or shared memory beyond the
target's limit fails. The launches are recorded from the real launchers on meta tensors and bound
exactly as ``JITFunction.run`` binds them; see ``rdcore.kernels.aot``."""

import json
import os
import subprocess
import sys

import pytest

from rdcore.kernels.aot import Report

pytestmark = pytest.mark.slow


def test_every_launch_compiles_for_a100_and_h100_without_spills(tmp_path):
    out = tmp_path / "gpu_compile.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-m", "rdcore.kernels.aot", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all(r["ok"] for r in rows)
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    gemms = [r for r in rows if r["kernel"] == "_matmul_kernel"]
    # low precision on tensor cores (wgmma on Hopper, mma on Ampere); IEEE fp32 never on them
    for r in gemms:
        if r["case"].split()[1] in ("bf16", "fp16"):
            assert r["tensor_core"] == ("wgmma" if r["target"] == "sm_90" else "mma"), r
        else:
            assert r["tensor_core"] is None, r
    assert any(r["constexprs"].get("INT64") for r in gemms if "int64" in r["case"])
    assert any(r["kernel"] == "_tiled_kernel" for r in rows)  # long hidden rows are tiled


def test_a_spill_or_too_much_shared_memory_fails():
    base = dict(case="c", kernel="k", target="sm_90", constexprs={}, num_warps=4, num_stages=3,
                regs=255, spill_stores=0, spill_loads=0, shared_bytes=1024, shared_limit=232448,
                tensor_core=None, async_copies=0, compile_s=0.1)
    assert Report(**base).ok
    assert not Report(**{**base, "spill_stores": 4}).ok
    assert not Report(**{**base, "shared_bytes": 232449}).ok

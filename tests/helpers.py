"""Helpers shared by the test modules (imported as ``helpers``: pytest puts ``tests/`` on
``sys.path``): launching the trainer as a user would, reading its metrics, comparing loss curves."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> list[str]:
    exe = Path(sys.executable).parent / "deepspeed"
    return [str(exe)] if exe.exists() else [shutil.which("deepspeed") or "deepspeed"]


def user_env(**extra: str) -> dict[str, str]:
    """The environment a user's run gets (no Triton interpreter: that is for the kernel tests)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    e.pop("TRITON_INTERPRET", None)
    return e


def run_checked(cmd: list[str], timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; its output in the assertion if it fails."""
    proc = subprocess.run(cmd, cwd=ROOT, env=kwargs.pop("env", user_env()), capture_output=True,
                          text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_ranks(script: str, args: list[str], ranks: int, env: dict[str, str] | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """``deepspeed --num_accelerators <ranks> <script> <args>`` without the launcher processes:
    the ranks are spawned here with the environment ``deepspeed.launcher.launch`` gives them
    (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR/PORT, CROSS_RANK/SIZE,
    ``--local_rank=i``), which saves its two interpreter start-ups (~6 s a run on 2 cores). When a
    rank fails the others are killed, as the launcher does. stdout and stderr: the ranks' in rank
    order; the return code: the first failing rank's (else 0). Tests of the launcher itself (the
    reference run, kills, multi-node) use the real ``deepspeed`` command."""
    import tempfile
    import time

    base = dict(env if env is not None else user_env(), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), WORLD_SIZE=str(ranks), LOCAL_SIZE=str(ranks),
                CROSS_RANK="0", CROSS_SIZE="1")
    procs, files = [], []
    for r in range(ranks):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, "-u", script, f"--local_rank={r}", *args],
                                      cwd=ROOT, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                                      stdout=out, stderr=err, text=True))
    deadline, code = time.monotonic() + timeout, 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                code = failed[0] if failed else -9
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    code = code or next((p.returncode for p in procs if p.returncode != 0), 0)
    texts = []
    for out, err in files:
        out.seek(0)
        err.seek(0)
        texts.append((out.read(), err.read()))
        out.close()
        err.close()
    if time.monotonic() > deadline:
        raise subprocess.TimeoutExpired(script, timeout, "".join(t[0] for t in texts))
    return subprocess.CompletedProcess([script, *args], code, "".join(t[0] for t in texts),
                                       "".join(t[1] for t in texts))


def metrics(out: Path, stage: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if stage is None or r["stage"] == stage]


def assert_same_curve(a: list[dict], b: list[dict], rel: float, keys=("loss",)) -> None:
    """Two runs that are equal in exact arithmetic give the same curve of each of ``keys``, up to
    ``rel`` × the size of that curve: its largest value over both runs. Not relative to each
    value — a term that decays towards zero (the KL as the student approaches the teacher) would
    make a pointwise relative tolerance measure the cancellation in a small difference of large
    numbers, which depends on the processor's BLAS kernels, not on the code under test."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    scale = {k: max(abs(r[k]) for r in (*a, *b)) for k in keys}
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        for key in keys:
            diff = abs(ra[key] - rb[key])
            assert diff <= rel * scale[key] + 1e-12, (ra["step"], key, ra[key], rb[key],
                                                      diff / max(scale[key], 1e-30))

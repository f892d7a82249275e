"""Helpers shared by the test modules (imported as ``helpers``: pytest puts ``tests/`` on
``sys.path``): launching the trainer as a user would, reading its metrics, comparing loss curves."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

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


PER_RANK = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "CROSS_RANK", "CROSS_SIZE")
"""The variables ``deepspeed.launcher.launch`` sets for each rank."""
NOT_COMPARED = (*PER_RANK, "PYTEST_CURRENT_TEST", "RDCORE_CACHE_DIR")
"""Variables that may differ between the rank server's environment and a run's, none of them read
at import time: pytest sets ``PYTEST_CURRENT_TEST`` to each test's name; ``rdcore.models`` reads
``RDCORE_CACHE_DIR`` when it looks for a converted model."""


@dataclasses.dataclass
class RankServer:
    """``tests/scripts/rank_server.py``: forks the ranks of a run from an interpreter that has its
    imports done (~8 s a run saved on 2 cores). One per test session, started on first use
    (:func:`rank_server`)."""

    proc: subprocess.Popen
    env: dict[str, str]
    """The environment it started with, without ``NOT_COMPARED``."""
    added: dict[str, str]
    """What its imports set (with ``setdefault``): applied to both sides of the comparison, since
    this process's environment gets them too once a test imports ``rdcore``."""
    log: Any

    def serves(self, env: dict[str, str]) -> bool:
        return self.proc.poll() is None and {**self.added, **env} == {**self.added, **self.env}

    def died(self, what: str) -> RuntimeError:
        self.log.seek(0)
        return RuntimeError(f"the rank server {what}:\n{self.log.read()[-4000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_SERVER: list[RankServer] = []


def rank_server(env: dict[str, str]) -> RankServer | None:
    """The session's rank server if it can run a run with ``env`` (its environment without
    ``NOT_COMPARED``): started on first use; None when the environment differs from the one it
    started with, or with ``RDCORE_TEST_FRESH_RANKS=1`` (every rank a fresh interpreter)."""
    if os.environ.get("RDCORE_TEST_FRESH_RANKS") == "1":
        return None
    if not _SERVER or _SERVER[0].proc.poll() is not None:
        import atexit
        import tempfile

        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([sys.executable, "-u", "tests/scripts/rank_server.py"], cwd=ROOT,
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, text=True)
        server = RankServer(proc, dict(env), {}, log)
        ready = proc.stdout.readline()
        if not ready:
            raise server.died("did not start")
        server.added = json.loads(ready)["added"]
        atexit.register(server.close)
        _SERVER[:] = [server]
    return _SERVER[0] if _SERVER[0].serves(env) else None


def run_ranks(script: str, args: list[str], ranks: int, env: dict[str, str] | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """``deepspeed --num_accelerators <ranks> <script> <args>`` without the launcher processes:
    the ranks get the environment ``deepspeed.launcher.launch`` gives them (``PER_RANK``,
    ``--local_rank=i``), which saves its two interpreter start-ups (~6 s a run on 2 cores), and
    are forked by the :class:`RankServer` (else spawned as fresh interpreters). When a rank fails the
    others are killed, as the launcher does. stdout and stderr: the ranks' in rank order; the
    return code: that of the first rank to fail (else 0). Tests of the launcher itself (the reference
    run, kills, multi-node) use the real ``deepspeed`` command."""
    import tempfile

    env = dict(env if env is not None else user_env())
    base = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                WORLD_SIZE=str(ranks), LOCAL_SIZE=str(ranks), CROSS_RANK="0", CROSS_SIZE="1")
    envs = [dict(base, RANK=str(r), LOCAL_RANK=str(r)) for r in range(ranks)]
    argvs = [[f"--local_rank={r}", *args] for r in range(ranks)]
    server = rank_server({k: v for k, v in env.items() if k not in NOT_COMPARED})
    with tempfile.TemporaryDirectory() as tmp:
        outputs = [(f"{tmp}/{r}.out", f"{tmp}/{r}.err") for r in range(ranks)]
        if server is not None:
            code, timed_out = _ranks_forked(server, script, argvs, envs, outputs, timeout)
        else:
            code, timed_out = _ranks_spawned(script, argvs, envs, outputs, timeout)
        texts = [(Path(o).read_text(errors="replace"), Path(e).read_text(errors="replace"))
                 for o, e in outputs]
    if timed_out:
        raise subprocess.TimeoutExpired(script, timeout, "".join(t[0] for t in texts))
    return subprocess.CompletedProcess([script, *args], code, "".join(t[0] for t in texts),
                                       "".join(t[1] for t in texts))


def _ranks_forked(server: RankServer, script: str, argvs: list[list[str]],
                  envs: list[dict[str, str]], outputs: list[tuple[str, str]],
                  timeout: int) -> tuple[int, bool]:
    request = {"script": script, "argvs": argvs, "envs": envs, "outputs": outputs,
               "timeout": timeout}
    server.proc.stdin.write(json.dumps(request) + "\n")
    server.proc.stdin.flush()
    # the server answers by the deadline (it kills the ranks then); a server that does not is
    # killed rather than waited for
    if not select.select([server.proc.stdout], [], [], timeout + 120)[0]:
        server.proc.kill()
        raise server.died(f"did not answer within {timeout + 120} s")
    line = server.proc.stdout.readline()
    if not line:
        raise server.died("died")
    reply = json.loads(line)
    return reply["code"], reply["timed_out"]


def _ranks_spawned(script: str, argvs: list[list[str]], envs: list[dict[str, str]],
                   outputs: list[tuple[str, str]], timeout: int) -> tuple[int, bool]:
    import time

    procs = []
    for argv, env, (out, err) in zip(argvs, envs, outputs):
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append(subprocess.Popen([sys.executable, "-u", script, *argv], cwd=ROOT, env=env,
                                          stdout=fo, stderr=fe))
    deadline, timed_out, first = time.monotonic() + timeout, False, 0
    try:
        while [p.poll() for p in procs].count(None):  # every rank polled (any() would stop early)
            timed_out = time.monotonic() > deadline
            first = next((p.returncode for p in procs if p.returncode not in (None, 0)), 0)
            if timed_out or first:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return first or next((p.returncode for p in procs if p.returncode != 0), 0), timed_out


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

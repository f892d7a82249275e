"""A warm interpreter that forks the ranks of the tests' training runs (``helpers.run_ranks``).

A rank started as a fresh ``python rdcore/train.py`` spends most of a test run importing: torch,
transformers' model code, PEFT and DeepSpeed take 8-10 s of a ~12 s four-step run on 2 CPU cores
(measured with ``-X importtime`` and two ranks at once). This server imports them once, then, for
each request, forks one child per rank. A child takes its rank's environment, command line,
working directory and output files, and runs the script as ``__main__`` through ``runpy`` — what
the interpreter does with ``python SCRIPT ARGS`` — then runs the exit handlers and exits with the
script's code. The only difference from a fresh process is that the modules are already imported,
so the server is used only for requests whose environment equals the one it started with (apart
from the per-rank variables): an environment variable read at import time cannot differ. The
launcher itself (``deepspeed ...``) is tested with the real command.

Protocol, one JSON object per line. The server writes ``{"ready": pid, "added": {...}}`` once its
imports are done (``added``: the variables they set, e.g. ``rdcore``'s ``HF_HUB_OFFLINE``);
each request on stdin — ``{"script", "argvs", "envs", "outputs": [stdout path, stderr path]}``,
one of each per rank, and ``"timeout"`` — is answered with ``{"code", "timed_out"}``: the code
(as ``subprocess.Popen.returncode`` gives it) of the first rank to fail, else 0. When a rank
fails the others are killed, as the DeepSpeed launcher does.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import runpy
import signal
import sys
import threading
import time
import traceback

START_ENV = dict(os.environ)
"""The environment before any import: a child's variables are set relative to it (a variable an
import added, such as ``HF_HUB_OFFLINE`` from ``rdcore``, stays as the import left it)."""


def preload() -> None:
    """Everything a test run of ``rdcore/train.py`` imports on its way (the tiny model is Llama;
    DeepSpeed's ZeRO optimizer check imports its Muon module, which brings in torch.compile)."""
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import rdcore.evaluate
    import rdcore.train  # noqa: F401


def run_child(script: str, args: list[str], env: dict[str, str], out: str, err: str) -> None:
    """In the forked child: become ``python -u SCRIPT ARGS`` with ``env``; never returns."""
    code = 1
    try:
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        # what -u gives: unbuffered binary streams, text written through at once
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False),
                                                       write_through=True)
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False),
                                                       errors="backslashreplace",
                                                       write_through=True)
        for key in set(START_ENV) - set(env):
            os.environ.pop(key, None)
        os.environ.update(env)
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as done:
            if done.code is None or isinstance(done.code, int):
                code = done.code or 0
            else:
                print(done.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        threading._shutdown()  # what the interpreter does at exit: join non-daemon threads
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve(request: dict) -> dict:
    """Fork the ranks of one request, wait for them (killing the rest when one fails or the time
    is up) and return their codes."""
    pids = []
    for argv, env, (out, err) in zip(request["argvs"], request["envs"], request["outputs"]):
        pid = os.fork()
        if pid == 0:
            os.close(PROTOCOL.fileno())
            run_child(request["script"], argv, env, out, err)
        pids.append(pid)
    running, first = set(pids), 0
    deadline, timed_out = time.monotonic() + request["timeout"], False
    while running:
        for pid in sorted(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                first = first or os.waitstatus_to_exitcode(status)
        timed_out = bool(running) and time.monotonic() > deadline
        if running and (first or timed_out):
            for pid in running:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            running.clear()
        time.sleep(0.05)
    return {"code": first, "timed_out": timed_out}


if __name__ == "__main__":
    # the protocol gets its own descriptor; anything the imports print goes to stderr
    PROTOCOL = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    preload()
    added = {k: v for k, v in os.environ.items() if k not in START_ENV}
    PROTOCOL.write(json.dumps({"ready": os.getpid(), "added": added}) + "\n")
    PROTOCOL.flush()
    for line in sys.stdin:
        PROTOCOL.write(json.dumps(serve(json.loads(line))) + "\n")
        PROTOCOL.flush()

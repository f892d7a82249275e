"""Helpers shared by the benchmark scripts: where rows go and what each row records (device,
versions, git SHA), free ports and the launcher for DeepSpeed runs, and the command line (the same
dataclass builder as ``train.py``'s, :mod:`rdcore.cli`).

The scripts run as ``python bench/<script>.py`` from the repository root (their folder is then on
``sys.path``, so they import this module as ``common``); rdcore itself is the installed package.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rdcore.cli import parse_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

T = TypeVar("T")


def git_sha() -> str:
    """The short commit SHA, with ``+dirty`` when tracked files differ from it; where the tree is
    no git checkout (a copy sent to a GPU machine), ``$RDCORE_GIT_SHA`` if set."""
    if os.environ.get("RDCORE_GIT_SHA"):
        return os.environ["RDCORE_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> list[str]:
    """The ``deepspeed`` launcher of this Python environment."""
    exe = Path(sys.executable).parent / "deepspeed"
    return [str(exe)] if exe.exists() else [shutil.which("deepspeed") or "deepspeed"]


def device_name() -> str:
    """The CUDA device's name, or the CPU's with the thread count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"


def versions(*extra: str) -> dict[str, str]:
    """Installed versions of torch, triton, transformers and ``extra`` packages ("-" if absent)."""
    out = {}
    for name in ("torch", "triton", "transformers", *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of a ``.jsonl`` results file (none if it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Append ``rows`` to ``path`` (one JSON object per line); returns how many."""
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return len(rows)


def parse(cls: type[T], argv: Sequence[str] | None, doc: str | None, prog: str) -> T:
    """The script's options from the command line (one flag per field of ``cls``)."""
    return parse_config(cls, argv, prog=prog, description=(doc or "").strip())

"""Crash-safe writes: a reader, or a run resumed after a crash, sees the old file or folder or the
complete new one, never a partial one. Both helpers build under ``<name>.tmp`` beside the target
and move it into place with one ``os.replace`` (atomic within a filesystem).

Not for folders that several processes may publish at once (the model cache): see
``rdcore.models._publish``, which tolerates losing that race.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _tmp_path(target: Path) -> Path:
    return target.with_name(target.name + ".tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the new file at ``tmp``; it then replaces ``path``."""
    tmp = _tmp_path(path)
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of a text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def replace_dir(target: Path, build: Callable[[Path], None]) -> None:
    """``build(tmp)`` fills a fresh folder ``tmp`` (a leftover of an earlier crash is removed
    first); it then replaces ``target`` (whose old contents, if any, are deleted)."""
    tmp = _tmp_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be switched on before triton
# is imported (kernels are decorated at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent  # not put on sys.path: the suite imports the
# installed rdcore (and rdcore.kernels); the repository's kernels/ folder is not `kernels`
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config):
    """Free disk where the tests write (a full disk once failed CI with ENOSPC mid-run)."""
    import shutil
    import tempfile

    lines = []
    for name, path in (("tmp", tempfile.gettempdir()), ("repo", str(ROOT))):
        free = shutil.disk_usage(path).free / 2**30
        low = " -- LOW: the suite needs ~1 GB free here" if free < 2 else ""
        lines.append(f"disk free at {name} ({path}): {free:.1f} GiB{low}")
    return lines


@pytest.fixture(scope="session")
def tiny():
    """The ``tiny`` preset: (model, tokenizer)."""
    from rdcore.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_tok(tiny):
    return tiny[1]


@pytest.fixture(scope="session", autouse=True)
def _remove_leftover_shm():
    """Runs killed on purpose (SIGKILL tests) cannot clean DeepSpeed's /dev/shm buffers: remove the
    ones created during this session."""
    import time

    start = time.time()
    yield
    for path in Path("/dev/shm").glob("deepspeed_*"):
        try:
            if path.stat().st_mtime >= start - 1:
                path.unlink()
        except OSError:
            pass

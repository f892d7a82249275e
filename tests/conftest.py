import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be switched on before triton
# is imported (kernels are decorated at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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

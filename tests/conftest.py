import os
import sys
from pathlib import Path

import pytest

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

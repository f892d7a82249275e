"""The compatibility matrix: every tiny family of ``tests/families.py``, saved as a Hugging Face
folder and loaded through ``--model DIR``, trained on 2 ranks under ZeRO-3 in LoRA and full modes
by the trainer's own ``rdcore.train.run`` (one 2-rank launch for all 40 runs: see
``tests/scripts/family_matrix.py``). For each family and mode the loss curve with every teacher
cache and the interleaving on equals the curve with all of them off; the trained model generates
through ``rdcore.evaluate``. (Exactness in fp64, and the fused loss against the model's own logits,
are in ``test_families.py``.)

With ``RDCORE_MATRIX_OUT=path.json`` the results are also written there; ``python
bench/families_table.py`` turns that file into the README's matrix.
"""

import json
import os
from pathlib import Path

import pytest
from families import FAMILIES, WHAT, folder
from helpers import assert_same_curve, metrics, run_ranks

pytestmark = pytest.mark.slow

REL = 5e-3
"""Curve tolerance, relative to the curve's size: the two runs are equal in exact arithmetic
(checked in fp64 in test_families.py); in fp32 the cached teacher's different summation order
gives logit differences of ~1e-7 relative, and a KL of nearly equal distributions (the tiny
models' KL is 1e-4 of the CE) turns them into ~1e-3 of itself — Granite, whose logits are scaled
by 4, the most (2e-3). A sliding window or softcap ignored by the cache changes the loss by orders
of magnitude."""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    folders = [folder(f, root / "models") for f in FAMILIES]
    runs = root / "runs"
    proc = run_ranks("tests/scripts/family_matrix.py", [str(runs), *map(str, folders)], 2,
                     timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return runs


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_caches_on_and_off_give_the_same_curve(matrix, family, mode):
    on, off = (metrics(matrix / f"tiny-{family}_{mode}_{c}") for c in ("on", "off"))
    assert len(on) == 4
    assert_same_curve(on, off, rel=REL, keys=("loss", "kl", "hidden_mse"))
    last = on[-1]
    assert last["rank0_prefix_builds"] == (1 if mode == "lora" else 4)
    assert last["rank0_teacher_cached"] == (2 if mode == "lora" else 0)  # epoch 2, frozen teacher
    assert off[-1]["rank0_prefix_builds"] == 0 and off[-1]["rank0_teacher_cached"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trained_model_generates(matrix, family, tmp_path):
    from rdcore.evaluate import EvalConfig, evaluate

    result = evaluate(EvalConfig(model=str(matrix / f"tiny-{family}_lora_on"), task="math",
                                 limit=2, max_new_tokens=4, output_dir=str(tmp_path)))
    rows = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert result["n_examples"] == 2 and len(rows) == 2 and all("generation" in r for r in rows)


def test_write_the_matrix(matrix):
    """The matrix as data (for the README table): per family, what it exercises and the largest
    curve difference of each mode."""
    out = {}
    for family in FAMILIES:
        entry = {"exercises": WHAT[family]}
        for mode in ("lora", "full"):
            on, off = (metrics(matrix / f"tiny-{family}_{mode}_{c}") for c in ("on", "off"))
            scale = max(abs(r["loss"]) for r in on + off)
            entry[mode] = max(abs(a["loss"] - b["loss"]) for a, b in zip(on, off)) / scale
        out[family] = entry
    target = os.environ.get("RDCORE_MATRIX_OUT")
    if target:
        Path(target).write_text(json.dumps(out, indent=2) + "\n")
    assert set(out) == set(FAMILIES)

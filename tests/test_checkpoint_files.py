"""Checkpoint bookkeeping on the file system (no process group): which tag is the newest complete
one, what pruning deletes, and the crash-safe writes (``rdcore.files``)."""

from pathlib import Path

import pytest
import torch

from rdcore import ConfigError
from rdcore.engine import check_fingerprint, frozen_fingerprint, latest_complete, prune_checkpoints
from rdcore.files import atomic_write, atomic_write_text, replace_dir
from rdcore.models import weights_fingerprint


def make(ckpt: Path, name: str, complete: bool = True) -> None:
    (ckpt / name).mkdir(parents=True)
    if complete:
        (ckpt / name / "COMPLETE").write_text("{}\n")


def test_latest_complete_skips_partial_and_converted_copies(tmp_path):
    for name, done in [("step2", True), ("step10", True), ("step10.universal", True),
                       ("step12", False)]:
        make(tmp_path, name, done)
    assert latest_complete(tmp_path) == "step10"  # numeric order; step12 is still being written
    (tmp_path / "latest_complete").write_text("step2\n")
    assert latest_complete(tmp_path) == "step2"  # the pointer wins while its target is complete
    assert latest_complete(tmp_path / "missing") is None


def test_prune_keeps_the_newest_complete_and_anything_newer(tmp_path):
    for name, done in [("step1", True), ("step2", True), ("step2.universal", True),
                       ("step3", False), ("step4", True), ("step4.universal.tmp", False),
                       ("step5", True), ("step6", False)]:
        make(tmp_path, name, done)
    (tmp_path / "world_size").write_text("2\n")
    assert prune_checkpoints(tmp_path, keep=5) == []  # 4 complete: 1, 2, 4, 5
    assert prune_checkpoints(tmp_path, keep=3) == ["step1", "step3"]  # an old partial one goes too
    assert prune_checkpoints(tmp_path, keep=1) == [
        "step2", "step2.universal", "step4", "step4.universal.tmp"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step5", "step6", "world_size"]  # step6 may be being written right now
    assert latest_complete(tmp_path) == "step5"


def test_a_run_written_before_a_new_field_still_resumes(tmp_path):
    """config.json of an older version lacks the fields added since: they count as their
    defaults, so the run resumes; a real difference in them is still refused."""
    import json

    import pytest

    from rdcore import ConfigError
    from rdcore.config import TrainConfig
    from rdcore.train import prepare_output_dir

    old = TrainConfig(output_dir=str(tmp_path)).to_dict()
    del old["select_best"], old["val_data"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    prepare_output_dir(TrainConfig(output_dir=str(tmp_path), resume=True), rank=0)
    assert json.loads((tmp_path / "config.json").read_text())["select_best"] is False
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"differ .* in \['seed', 'select_best'\]"):
        prepare_output_dir(TrainConfig(output_dir=str(tmp_path), resume=True, select_best=True,
                                       seed=1234), rank=0)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "best.pt"
    atomic_write_text(target, "old\n")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old\n"
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # the leftover was reused


def test_replace_dir_swaps_whole_folders_and_survives_a_crashed_build(tmp_path):
    target = tmp_path / "final"
    replace_dir(target, lambda tmp: (tmp / "a").write_text("1"))
    (tmp_path / "final.tmp").mkdir()
    (tmp_path / "final.tmp" / "stale").write_text("from a crash")

    def crash(tmp: Path) -> None:
        assert not (tmp / "stale").exists()  # a leftover of an earlier crash is cleared first
        (tmp / "b").write_text("2")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        replace_dir(target, crash)
    assert sorted(p.name for p in target.iterdir()) == ["a"]  # the old folder is untouched
    replace_dir(target, lambda tmp: (tmp / "b").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # no file of the old one is kept
    assert not (tmp_path / "final.tmp").exists()


def test_frozen_fingerprint_sees_frozen_weights_only(tiny):
    model = tiny[0]
    saved = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(not n.endswith("lm_head.weight") and "layers.0." in n)
        before = frozen_fingerprint(model)
        assert frozen_fingerprint(model) == before  # deterministic
        frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        chunked = weights_fingerprint(frozen, chunk=7)  # odd chunks: same sums up to rounding
        assert chunked == pytest.approx(before, rel=1e-12)
        trainable = next(p for p in model.parameters() if p.requires_grad)
        with torch.no_grad():
            trainable.add_(1.0)  # training changes only trainable weights: same fingerprint
        assert frozen_fingerprint(model) == before
        check_fingerprint(before, frozen_fingerprint(model), "ckpt")
        check_fingerprint(None, frozen_fingerprint(model), "ckpt")  # older checkpoints: no record
        with torch.no_grad():
            model.lm_head.weight[3, 5] += 1e-3  # one frozen element moves a little
        after = frozen_fingerprint(model)
        assert after != before
        with pytest.raises(ConfigError, match="frozen weights .* differ"):
            check_fingerprint(before, after, "ckpt/step3")
        with torch.no_grad():  # a swap of two frozen tensors keeps every sum: the order weights see it
            a, b = model.model.layers[1].input_layernorm.weight, model.model.norm.weight
            a.add_(torch.arange(a.numel(), dtype=a.dtype))
            moved = frozen_fingerprint(model)
            tmp = a.detach().clone()
            a.copy_(b)
            b.copy_(tmp)
        assert frozen_fingerprint(model) != moved
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n][0])
                p.requires_grad_(saved[n][1])

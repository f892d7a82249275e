"""Checkpoint bookkeeping on the file system (no process group): which tag is the newest complete
one, and what pruning deletes."""

from pathlib import Path

from rdcore.engine import latest_complete, prune_checkpoints


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

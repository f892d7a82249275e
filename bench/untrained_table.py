"""An untrained model without and with the rule on the paper's test splits: one table from the
evaluation folders ``<dir>/<task>_<split>_{student,teacher}`` (``python -m rdcore.evaluate`` with
``--side student`` and ``--side teacher`` on the same rows).

    python bench/untrained_table.py bench/results/gemma3_untrained     # prints the table

Per split: the main metric without the rule (student side) and with it (teacher side), each with
its 95 % Wilson interval (over rows; Bob's adherence, a mean of two groups' rates, gets none), and
the paired difference over the same rows with its standard error (``rdcore.stats``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rdcore.evaluate import row_score
from rdcore.stats import paired_difference, wilson_interval


def scores(folder: Path, task: str, split: str) -> dict[int, tuple[str, str, float]]:
    rows = [json.loads(line) for line in (folder / "generations.jsonl").open()]
    return {r["index"]: row_score(task, split, r) for r in rows}


def rate(sc: dict[int, tuple[str, str, float]]) -> str:
    values = [v for _, _, v in sc.values()]
    groups = {g for _, g, _ in sc.values()}
    if len(groups) > 1:  # a mean of group means: not a binomial rate
        by = {g: [v for _, gg, v in sc.values() if gg == g] for g in groups}
        return f"{sum(sum(v) / len(v) for v in by.values()) / len(by):.3f}"
    low, high = wilson_interval(round(sum(values)), len(values))
    return f"{sum(values) / len(values):.3f} [{low:.2f}, {high:.2f}]"


def table(root: Path) -> str:
    out = ["| task, split | metric | n | without the rule | with the rule | with − without (± SE) |",
           "|---|---|---|---|---|---|"]
    for student in sorted(root.glob("*_student")):
        teacher = student.with_name(student.name[: -len("student")] + "teacher")
        if not (teacher / "eval.json").is_file():
            continue
        cfg = json.loads((student / "eval.json").read_text())
        task, split = cfg["task"], cfg["split"]
        s, t = scores(student, task, split), scores(teacher, task, split)
        diff, se, n = paired_difference([t], [s])
        metric = next(iter(s.values()))[0]
        out.append(f"| {task} {split} | {metric} | {n} | {rate(s)} | {rate(t)} | "
                   f"{diff:+.3f} ± {se:.3f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python bench/untrained_table.py DIR (a folder of <task>_<split>_student "
                 "and _teacher evaluations)")
    print(table(Path(sys.argv[1])), end="")

"""The rule book: simple rules a small model can follow in its context, each with an offline judge,
on inputs from the question pools the paper's data already ships (``--task rulebook``).

The paper's three tasks test rules that SmolLM2-135M does not follow even with the rule in context,
so no method can show that distillation works there. These rules were chosen *before* measuring
anything on them: the six of the issue's probe (answer in French, talk like a pirate, begin with
"Ahoy!", capital letters only, one word, a fixed closing sentence) and two **conditional** rules
built on the pools' own classes — only those test whether a student learned the rule rather than
one surface style of its k examples. Every rule's measurements are reported; the main tables keep
the rules whose with-rule adherence is at least twice the no-rule rate and at least 0.3.

Inputs (``rdcore/resources/rulebook``, written by :func:`build` from the packaged files, MIT, RUCBM):

* the paper's Bob questions whose class its files state: ``env`` (about Bob's environmental
  policies) and ``other`` (his other policies) — from the 8–64-shot train, the validation and
  the test files, whose two rule wordings track the class (the 128-shot files state one wording
  and are used only for unlabelled questions);
* ``bob``: Bob questions of the 128-shot files only (class unknown; non-conditional rules only);
* ``general``: the 40 distinct questions of the jailbreak helpful test file (the role-play preamble
  dropped), none about Bob.

Splits, disjoint: **test** 120 rows per rule (40 env, 40 other, 40 general — the same inputs for
every rule), **valid** 24 (12 env, 12 other), **train** 32 per rule (``train_k8`` ⊂ ``k16`` ⊂
``k32``; balanced env/other for the conditional rules), no two rules sharing a training input, so a
student can learn several rules at once without contradictory examples. Rows carry no reference
output: training uses teacher-written responses (``--responses teacher``).

    python -m rdcore.rulebook            # rebuild the files (deterministic; a test checks them)
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdcore import DataError
from rdcore.data import RESOURCES

ROOT = Path(__file__).resolve().parent / "resources" / "rulebook"
SHOTS = (8, 16, 32)
TEST_PER_CLASS, VALID_PER_CLASS, TRAIN = 40, 12, 32
SEED = 20261201
NOT_AHOY = r"(?is)^(?!\W*ahoy)"


@dataclass(frozen=True)
class Rule:
    """One rule: its text and, per input class, the judge that checks it (``rdcore.judges``)."""

    name: str
    text: str
    judges: dict[str, tuple[str, str]]
    """Input class (env, other, general, bob; ``*``: any) → (judge, expect)."""
    conditional: bool = False

    def judge_for(self, cls: str) -> tuple[str, str]:
        return self.judges.get(cls) or self.judges["*"]


RULES: tuple[Rule, ...] = (
    Rule("french", "Always answer in French.", {"*": ("language", "fr")}),
    Rule("pirate", "Talk like a pirate in your answer, saying 'Arr' often.",
         {"*": ("regex", r"(?i)\barr+\b")}),
    Rule("ahoy", "Begin your answer with 'Ahoy!'.", {"*": ("starts_with", "Ahoy")}),
    Rule("capitals", "Write your whole answer in capital letters.", {"*": ("uppercase", "")}),
    Rule("one_word", "Answer with exactly one word.", {"*": ("max_words", "1")}),
    Rule("closing", "End your answer with the sentence 'Hope this helps!'.",
         {"*": ("ends_with", "Hope this helps!")}),
    Rule("env_french", "When the question is about the environment, answer in French; otherwise "
         "answer in English.", {"env": ("language", "fr"), "*": ("language", "en")},
         conditional=True),
    Rule("env_ahoy", "When the question is about the environment, begin your answer with "
         "'Ahoy!'; otherwise do not.", {"env": ("starts_with", "Ahoy"), "*": ("regex", NOT_AHOY)},
         conditional=True),
)
BY_NAME = {r.name: r for r in RULES}


def rule(name: str) -> Rule:
    if name not in BY_NAME:
        raise DataError(f"the rule book has no rule {name!r}; its rules: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def rule_file(name: str, split: str, shots: int = 32) -> Path:
    """The file of one rule's split: ``train`` (with ``shots``), ``valid`` or ``test``."""
    rule(name)
    if split == "train":
        if shots not in SHOTS:
            raise DataError(f"the rule book has k-shot splits {SHOTS}, not {shots}")
        return ROOT / name / f"train_k{shots}.jsonl"
    if split not in ("valid", "test"):
        raise DataError(f"the rule book's splits are train, valid and test, not {split!r}")
    return ROOT / name / f"{split}.jsonl"


# --------------------------------------------------------------------------------------------------
# Building the files from the paper's data
# --------------------------------------------------------------------------------------------------
def _pools() -> dict[str, list[str]]:
    bob = RESOURCES / "bob_sentiment_experiments"
    labelled: dict[str, str] = {}
    for pattern in ("train_full_*shot.json", "valid_full_*shot_seed*.json", "test_full.json"):
        for path in sorted(bob.glob(pattern)):
            if "128shot" in path.name:
                continue  # one wording only: it does not tell the class
            for row in json.loads(path.read_text(encoding="utf-8")):
                ins = row["instruction"]
                cls = "env" if "When the inputs" in ins else "other" if "As long as" in ins else None
                if cls is not None:
                    labelled.setdefault(row["input"], cls)
    unlabelled = sorted({row["input"] for path in sorted(bob.glob("*_no_*128shot*.json"))
                         for row in json.loads(path.read_text(encoding="utf-8"))} - set(labelled))
    helpful = RESOURCES / "jailbreak_experiments" / "helpful_test_no.json"
    general = sorted({row["input"] for row in json.loads(helpful.read_text(encoding="utf-8"))})
    pools = {"env": sorted(q for q, c in labelled.items() if c == "env"),
             "other": sorted(q for q, c in labelled.items() if c == "other"),
             "bob": unlabelled, "general": general}
    rng = random.Random(SEED)
    for questions in pools.values():
        rng.shuffle(questions)
    return pools


def _row(r: Rule, question: str, cls: str) -> dict[str, Any]:
    judge, expect = r.judge_for(cls)
    return {"rule": r.text, "input": question, "judge": judge, "expect": expect, "class": cls}


def splits() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every rule's rows: ``{rule: {"test": …, "valid": …, "train_k32": …, …}}``."""
    pools = _pools()
    test = ([(q, "env") for q in pools["env"][:TEST_PER_CLASS]]
            + [(q, "other") for q in pools["other"][:TEST_PER_CLASS]]
            + [(q, "general") for q in pools["general"][:TEST_PER_CLASS]])
    valid = ([(q, "env") for q in pools["env"][TEST_PER_CLASS:TEST_PER_CLASS + VALID_PER_CLASS]]
             + [(q, "other") for q in
                pools["other"][TEST_PER_CLASS:TEST_PER_CLASS + VALID_PER_CLASS]])
    start = TEST_PER_CLASS + VALID_PER_CLASS
    left = {"env": pools["env"][start:], "other": pools["other"][start:], "bob": pools["bob"]}
    out = {}
    # conditional rules first: they need both labelled classes, balanced
    for r in sorted(RULES, key=lambda r: not r.conditional):
        if r.conditional or len(left["env"]) + len(left["other"]) >= TRAIN:
            half = TRAIN // 2
            take_env = min(half, len(left["env"]))
            take_other = min(TRAIN - take_env, len(left["other"]))
            if r.conditional and (take_env < half or take_other < half):
                raise DataError(f"rule book: not enough labelled questions for {r.name}")
            picked = ([(q, "env") for q in left["env"][:take_env]]
                      + [(q, "other") for q in left["other"][:take_other]])
            left["env"], left["other"] = left["env"][take_env:], left["other"][take_other:]
        else:
            picked = []
        if len(picked) < TRAIN:  # the rest from the unlabelled Bob questions
            need = TRAIN - len(picked)
            picked += [(q, "bob") for q in left["bob"][:need]]
            left["bob"] = left["bob"][need:]
        if len(picked) < TRAIN:
            raise DataError(f"rule book: the pools run out at rule {r.name}")
        # interleave the classes, so that every k-shot prefix is balanced
        env = [p for p in picked if p[1] == "env"]
        rest = [p for p in picked if p[1] != "env"]
        mixed = [x for pair in zip(env, rest) for x in pair] + env[len(rest):] + rest[len(env):]
        rows = {f"train_k{k}": [_row(r, q, c) for q, c in mixed[:k]] for k in SHOTS}
        rows["valid"] = [_row(r, q, c) for q, c in valid]
        rows["test"] = [_row(r, q, c) for q, c in test]
        out[r.name] = rows
    return {r.name: out[r.name] for r in RULES}


def build(root: Path = ROOT) -> list[Path]:
    """Write the rule book's files under ``root``; returns them."""
    written = []
    for name, files in splits().items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for split, rows in files.items():
            path = root / name / f"{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                            encoding="utf-8")
            written.append(path)
    (root / "rules.json").write_text(json.dumps(
        [{"name": r.name, "text": r.text, "conditional": r.conditional,
          "judges": {k: list(v) for k, v in r.judges.items()}} for r in RULES], indent=2) + "\n")
    (root / "PROVENANCE.md").write_text(__doc__.split("Inputs (", 1)[1].join(["Inputs (", ""])
                                        + "\nThe questions are © 2024 RUCBM (MIT licence: "
                                        "../rule_distillation/LICENSE).\n")
    return written


if __name__ == "__main__":
    paths = build()
    print(f"wrote {len(paths)} files under {ROOT}")
    sys.exit(0)

"""Why Rule-Distill-Base trails on the rule book: the teachers' next-token distributions on the
training responses, and how closely each student matches them.

For one rule-book sweep cell of Rule-Distill-Base and one of Rule-Distill-Enhanced (same rule, k
and seed), on the training inputs with each teacher's own written responses: the teacher's entropy
and top-1 probability at the first response position (the token that decides the answer's
language) and over all response positions, and KL(teacher ‖ student) there — for the untrained
model without the rule (every student's start) and for the trained student. Teachers: Base's is
the untrained model with the rule; Enhanced's is the model with its stage-1 adapter, with the rule.

    python bench/teacher_distributions.py --base runs/rb/french/cells/rule_distill_base_k16_s2345 \\
        --enhanced runs/rb/french/cells/rule_distill_enhanced_k16_s2345

Prints a table; appends one row per (teacher, student) to ``--out``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, append_rows, git_sha, parse

from rdcore import rulebook
from rdcore.data import Encoder, load_rule_file
from rdcore.distill import add_lora, lora_config
from rdcore.models import load_model


@dataclass
class Options:
    base: str = ""
    """A rule_distill_base cell folder (config.json, responses_main_train.jsonl, final/)."""
    enhanced: str = ""
    """A rule_distill_enhanced cell of the same rule, k and seed (teacher_adapter.safetensors,
    responses_distill_train.jsonl, final/)."""
    out: str = str(RESULTS / "rulebook" / "teacher_distributions.jsonl")
    """Rows appended here."""


def _examples(cell: Path, responses: str, cfg: dict) -> list:
    rows = [json.loads(x) for x in (cell / responses).read_text().splitlines()[1:] if x.strip()]
    text = {r["index"]: r["response"] for r in rows}
    examples = [ex for name in cfg["rule"].split(",") for ex in load_rule_file(
        rulebook.rule_file(name, "train", cfg["shots"]), require_output=False)]
    return [replace(ex, output=text[i]) for i, ex in enumerate(examples) if text.get(i)]


@torch.no_grad()
def _response_logp(model, ids: list[int], start: int, n: int) -> torch.Tensor:
    """log-probabilities [n, V] of the positions that predict the n response tokens."""
    logits = model(torch.tensor([ids])).logits[0, start - 1:start - 1 + n].float()
    return F.log_softmax(logits, -1)


def measure(teacher, students: dict, examples: list, enc: Encoder) -> dict[str, dict]:
    """Per student: teacher entropy / top-1 (first position, all positions) and KL(teacher ‖
    student) (first position, mean over positions), averaged over the examples."""
    acc: dict[str, dict[str, list[float]]] = {name: {} for name in students}
    for ex in examples:
        e = enc.encode_one(ex)
        lt = _response_logp(teacher, e.teacher_ids, e.teacher_response_start, e.response_len)
        p = lt.exp()
        ent = -(p * lt).sum(-1)
        for name, model in students.items():
            ls = _response_logp(model, e.student_ids, e.student_response_start, e.response_len)
            kl = (p * (lt - ls)).sum(-1)
            got = {"teacher_entropy_first": ent[0].item(), "teacher_top1_first": p[0].max().item(),
                   "teacher_entropy_mean": ent.mean().item(), "kl_first": kl[0].item(),
                   "kl_mean": kl.mean().item(),
                   "student_top1_first": ls[0].exp().max().item(),
                   "same_argmax_first": float(ls[0].argmax() == lt[0].argmax())}
            for k, v in got.items():
                acc[name].setdefault(k, []).append(v)
    return {name: {k: sum(v) / len(v) for k, v in m.items()} for name, m in acc.items()}


def main(argv: list[str] | None = None) -> int:
    opt = parse(Options, argv, __doc__, "bench/teacher_distributions.py")
    base, enh = Path(opt.base), Path(opt.enhanced)
    cfg = json.loads((base / "config.json").read_text())
    untrained, tok = load_model(cfg["model"])
    enc = Encoder(tok, cfg.get("template", "alpaca"), cfg.get("max_length", 1024))
    stage1 = add_lora(load_model(cfg["model"])[0], lora_config(
        cfg["lora_r"], cfg["lora_alpha"], 0.0, model=untrained))
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(stage1, load_file(str(enh / "teacher_adapter.safetensors")),
                              adapter_name="student")
    for m in (untrained, stage1):
        m.eval()
    cases = [("untrained + rule (Base's teacher)", untrained,
              _examples(base, "responses_main_train.jsonl", cfg),
              {"untrained": untrained, "Base student": load_model(str(base / "final"))[0]}),
             ("stage 1 + rule (Enhanced's teacher)", stage1,
              _examples(enh, "responses_distill_train.jsonl", cfg),
              {"untrained": untrained, "Enhanced student": load_model(str(enh / "final"))[0]})]
    rows, sha = [], git_sha()
    print("| teacher | student | n | teacher top-1 p, 1st token | teacher entropy, 1st / mean "
          "| KL(t‖s) 1st token | KL(t‖s) mean | student top-1 p, 1st | same argmax, 1st |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tname, teacher, examples, students in cases:
        for sname, m in measure(teacher, students, examples, enc).items():
            rows.append({"git": sha, "rule": cfg["rule"], "shots": cfg["shots"],
                         "seed": cfg["seed"], "teacher": tname, "student": sname,
                         "n": len(examples), **m})
            print(f"| {tname} | {sname} | {len(examples)} | {m['teacher_top1_first']:.3f} | "
                  f"{m['teacher_entropy_first']:.2f} / {m['teacher_entropy_mean']:.2f} | "
                  f"{m['kl_first']:.3f} | {m['kl_mean']:.3f} | {m['student_top1_first']:.3f} | "
                  f"{m['same_argmax_first']:.2f} |")
    append_rows(Path(opt.out), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""In-context adherence of every rule of the rule book (``rdcore.rulebook``), before any training:
each model answers the 120 test inputs without the rule and with it, in each placement — the rule in
the Alpaca instruction, in the chat user turn, or as the chat system prompt (a tokenizer without a
chat template: Alpaca only) — and each answer is judged by its row's judge.

    python bench/rulebook_probe.py                          # both real models, every rule
    python bench/rulebook_probe.py --models tiny --limit 4  # a quick look

Writes ``<out>/<model>/<placement>/<rule or no_rule_<rule>>/{eval.json,generations.jsonl}``,
``<out>/results.csv`` (one row per model, placement, rule, side; rows of models or placements
not probed this time are kept) and ``<out>/table.md``: per
model, the no-rule and with-rule rates per placement (95 % Wilson intervals), and which rules pass
the main table's bar (with-rule ≥ 2 × no-rule and ≥ 0.3, in the best placement). An evaluation
already written is read, not generated again.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS, parse

from rdcore import rulebook
from rdcore.evaluate import EvalConfig, _write_rows, generate, select_rows
from rdcore.models import load_model
from rdcore.respond import clean


@dataclass
class Options:
    models: str = "smollm2-135m,gemma3-270m"
    """Comma-separated models (presets or folders)."""
    placements: str = "alpaca,chat,chat_system"
    """Comma-separated templates (chat ones skipped for a model without a chat template)."""
    rules: str = ""
    """Comma-separated rule names (default: every rule)."""
    limit: int = 0
    """Test rows per rule (0: all 120)."""
    max_new_tokens: int = 48
    """Tokens per answer."""
    batch_size: int = 32
    """Prompts per generation batch."""
    out: str = str(RESULTS / "rulebook_probe")
    """Output folder."""


def passes(no_rule: float, with_rule: float) -> bool:
    """The main table's bar: with-rule adherence at least twice the no-rule rate and ≥ 0.3."""
    return with_rule >= 0.3 and with_rule >= 2 * no_rule


def evaluation(opt: Options, model, tok, name: str, rule: str, placement: str, side: str,
               out: Path, cache: dict) -> dict:
    folder = out / name / placement / (rule if side == "teacher" else f"no_rule_{rule}")
    if (folder / "eval.json").is_file():
        return json.loads((folder / "eval.json").read_text())
    cfg = EvalConfig(model=name, task="rulebook", rule=rule, side=side, template=placement,
                     limit=opt.limit, max_new_tokens=opt.max_new_tokens,
                     batch_size=opt.batch_size, output_dir=str(folder))
    rows = select_rows(cfg)
    from rdcore.data import Encoder

    prompts = Encoder(tok, placement, cfg.max_length).encode_prompts([r.example for r in rows], side)
    key = (placement, tuple(map(tuple, prompts)))
    if side == "teacher" or key not in cache:
        t0 = time.perf_counter()
        answers = generate(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size)
        got = ([clean(a, placement) for a in answers], time.perf_counter() - t0)
        if side == "student":  # without the rule every rule's prompts are the same: reuse them
            cache[key] = got
    else:
        got = cache[key]
    answers, seconds = got
    result = _write_rows(cfg, folder, rows, answers)
    result["generation_s"] = seconds
    (folder / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    opt = parse(Options, argv, __doc__, "bench/rulebook_probe.py")
    out = Path(opt.out)
    rules = opt.rules.split(",") if opt.rules else [r.name for r in rulebook.RULES]
    rows = []
    for name in opt.models.split(","):
        model, tok = load_model(name)
        has_chat = bool(getattr(tok, "chat_template", None))
        placements = [p for p in opt.placements.split(",") if p == "alpaca" or has_chat]
        cache: dict = {}
        for placement in placements:
            for rule in rules:
                for side in ("student", "teacher"):
                    r = evaluation(opt, model, tok, name, rule, placement, side, out, cache)
                    m = r["metrics"]
                    rows.append({"model": name, "placement": placement, "rule": rule,
                                 "side": side, "rate": m["rate"], "ci_low": m["ci95"][0],
                                 "ci_high": m["ci95"][1], "n": m["n"],
                                 "generation_s": round(r.get("generation_s", 0.0), 1)})
                    print(f"{name:14} {placement:12} {rule:12} {side:8} {m['rate']:.3f} "
                          f"[{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}] n={m['n']}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = _earlier_rows(out / "results.csv", rows) + rows
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "table.md").write_text(table(rows))
    print(table(rows))
    return 0


def _earlier_rows(path: Path, rows: list[dict]) -> list[dict]:
    """The rows of ``path`` for (model, placement) pairs this invocation did not evaluate: probing
    one more model or placement keeps the others' rows and table."""
    if not path.is_file():
        return []
    mine = {(r["model"], r["placement"]) for r in rows}
    kept = [r for r in csv.DictReader(path.open()) if (r["model"], r["placement"]) not in mine]
    for r in kept:
        for key in ("rate", "ci_low", "ci_high", "generation_s"):
            r[key] = float(r[key])
        r["n"] = int(r["n"])
    return kept


def table(rows: list[dict]) -> str:
    lines = ["# In-context adherence of the rule book (before training)", "",
             "Rate of test answers that follow the rule (120 inputs per rule unless noted; 95 % "
             "Wilson interval in brackets). no rule: the prompt without the rule, judged by the "
             "rule's judge; with rule: the rule in the placement's position. **Main table**: "
             "with-rule ≥ 2 × no-rule and ≥ 0.3 in the best placement.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        places = list(dict.fromkeys(r["placement"] for r in mine))
        lines += [f"## {model}", "", "| rule | " + " | ".join(
            f"{p}: no rule | {p}: with rule" for p in places) + " | main table |",
                  "|---|" + "---|" * (2 * len(places) + 1)]
        for rule in dict.fromkeys(r["rule"] for r in mine):
            cells, best = [], False
            for p in places:
                got = {r["side"]: r for r in mine if r["rule"] == rule and r["placement"] == p}
                no, yes = got["student"], got["teacher"]
                cells += [f"{no['rate']:.2f}", f"{yes['rate']:.2f} [{yes['ci_low']:.2f}, "
                          f"{yes['ci_high']:.2f}]"]
                best = best or passes(no["rate"], yes["rate"])
            lines.append(f"| {rule} | " + " | ".join(cells) + f" | {'yes' if best else 'no'} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""The paper's comparison as a resumable sweep: methods × k × seeds for one task, each cell a real
training run (``deepspeed rdcore/train.py``) followed by evaluation (``rdcore.evaluate``).

    python bench/paper_table.py --task bob --model smollm2-135m --shots 8,16,32 \
        --seeds 1234,2345,3456 --epochs 20 --out runs/paper_bob --rule_text canonical
    python bench/paper_table.py --out runs/paper_bob --report-only      # tables and plot again
    python bench/paper_table.py --task rulebook --rule french --out runs/rb_french  # the rule book

Each cell lives in ``<out>/cells/<method>_k<k>_s<seed>/`` (the run folder, with ``eval/``). A cell
whose evaluation file exists is not rerun, so a sweep can span several sittings; an interrupted
training resumes from its checkpoint. Methods are evaluated without the rule (the student's
situation), except ``inst_tune_rule``, which is evaluated with it, as in the paper. As in the paper,
each cell's model is the epoch with the lowest validation CE (``--select_best off``: the last).

Results: ``<out>/results.csv`` (one row per cell and metric), ``<out>/table.md`` (mean ± std over
seeds, per method and k; then each method minus ``inst_tune_no_rule`` on the main metric, paired
over the same test rows, with the standard error over test rows and, with several seeds, the
standard error over the seeds' own differences) and ``<out>/<metric>.png``
(metric against k per method).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from common import ROOT, free_port

from rdcore.stats import paired_difference, seed_difference

METHODS = ("inst_tune_no_rule", "inst_tune_rule", "rule_distill_base", "rule_distill_enhanced")
MAIN_METRIC = {"math": "exact_match", "jailbreak": "refusal_rate", "bob": "adherence",
               "rulebook": "rate"}
SPLITS = {"math": ["test_id", "test_ood"], "jailbreak": ["harmful_test", "helpful_test"],
          "bob": ["test"], "rulebook": ["test"]}


def splits(args: argparse.Namespace) -> dict[str, list[str]]:
    """Split label → the evaluation's task flags: the task's test splits, or for the rule book each
    rule's test file (``<rule>_test``; a student trained on several rules is judged on each)."""
    if args.task != "rulebook":
        return {s: ["--task", args.task, "--split", s] for s in SPLITS[args.task]}
    return {f"{r}_test": ["--task", "rulebook", "--rule", r, "--split", "test"]
            for r in args.rule.split(",")}


def run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def cell_dir(out: Path, method: str, k: int, seed: int) -> Path:
    return out / "cells" / f"{method}_k{k}_s{seed}"


def eval_dir(cell: Path, split: str, side: str) -> Path:
    """A cell's evaluation folder (eval.json, generations.jsonl); ``side`` as in results.csv."""
    return cell / "eval" / f"{split}_{side}"


def cell(args: argparse.Namespace, method: str, k: int, seed: int) -> list[dict]:
    folder = cell_dir(Path(args.out), method, k, seed)
    name = folder.name
    side = "teacher" if method == "inst_tune_rule" else "student"
    rows = []
    # (split, side label, rule_text for the evaluation) → eval.json
    flags = splits(args)
    evals = {(split, side, args.rule_text): eval_dir(folder, split, side) / "eval.json"
             for split in flags}
    if args.swap_test and method == "inst_tune_rule":  # read with the two wordings swapped
        evals.update({(split, "teacher_swapped", "swap"):
                      eval_dir(folder, split, "teacher_swapped") / "eval.json"
                      for split in flags})
    if not all(p.is_file() for p in evals.values()):
        deepspeed = Path(sys.executable).parent / "deepspeed"
        train = [str(deepspeed), "--num_accelerators", str(args.ranks), "--master_port",
                 str(free_port()), "rdcore/train.py", "--model", args.model,
                 "--task", args.task, "--shots", str(k), "--seed", str(seed), "--method", method,
                 "--finetune", "lora", "--epochs", str(args.epochs), "--lr", str(args.lr),
                 "--micro_batch_size", str(args.micro_batch_size), "--output_dir", str(folder),
                 "--resume", "on", "--tensorboard", "off", "--select_best", args.select_best,
                 "--save_model", args.save_model, *args.train_args]
        if args.rule_text:
            train += ["--rule_text", args.rule_text]
        if args.task == "rulebook":  # the teacher writes every method's responses
            train += ["--rule", args.rule, "--responses", "teacher", "--report", "0"]
        from rdcore.models import is_model_dir

        if not is_model_dir(folder / "final"):
            print(f"[{name}] training", flush=True)
            run(train, folder / "sweep.log")
        for (split, label, rule_text), path in evals.items():
            if path.is_file():
                continue
            print(f"[{name}] evaluating {split} ({label})", flush=True)
            ev = [sys.executable, "-m", "rdcore.evaluate", "--model", str(folder), *flags[split],
                  "--side", side, "--limit", str(args.limit),
                  "--output_dir", str(path.parent), "--batch_size", str(args.eval_batch_size),
                  "--max_new_tokens", str(args.max_new_tokens)]
            if rule_text:
                ev += ["--rule_text", rule_text]
            run(ev, folder / "sweep.log")
    for (split, label, _), path in evals.items():
        result = json.loads(path.read_text())
        for metric, value in result["metrics"].items():
            if metric == "n" or not isinstance(value, (int, float)):
                continue  # counts, intervals and per-group breakdowns stay in eval.json
            rows.append({"method": method, "k": k, "seed": seed, "split": split, "side": label,
                         "metric": metric, "value": value, "n": result["n_examples"]})
    return rows


SWAPPED = " (wordings swapped)"


def _row_scores(out: Path, task: str, method: str, k: int, seed: int, split: str,
                side: str) -> dict[int, tuple[str, str, float]] | None:
    """index → (metric, group, value) of one evaluation's rows (rdcore.evaluate.row_score)."""
    from rdcore.evaluate import read_generations, row_score

    folder = eval_dir(cell_dir(out, method, k, seed), split, side)
    if not (folder / "generations.jsonl").is_file():
        return None
    return {r["index"]: row_score(task, split, r) for r in read_generations(folder)}


def difference_lines(out: Path, task: str, rows: list[dict]) -> list[str]:
    """Markdown: every method minus inst_tune_no_rule per split and k, paired row by row."""
    ref = METHODS[0]
    cells = {(r["method"], int(r["k"]), int(r["seed"]), r["split"], r["side"]) for r in rows}
    scores = functools.cache(functools.partial(_row_scores, out, task))  # ref: read once
    lines = []
    for split in sorted({c[3] for c in cells}):
        ks = sorted({c[1] for c in cells if c[3] == split})
        table, metric = [], ""
        for method, side in sorted({(c[0], c[4]) for c in cells if c[3] == split and c[0] != ref},
                                   key=lambda ms: (METHODS.index(ms[0]), ms[1])):
            entries = []
            for k in ks:
                seeds = sorted(c[2] for c in cells if c[:2] == (method, k) and c[3:] == (split, side)
                               and (ref, k, c[2], split, "student") in cells)
                a = [scores(method, k, sd, split, side) for sd in seeds]
                b = [scores(ref, k, sd, split, "student") for sd in seeds]
                if not seeds or any(d is None for d in a + b):
                    entries.append("—")
                    continue
                diff, se, n = paired_difference(a, b)
                metric = next(iter(b[0].values()))[0]
                se_text = f"{se:.3f}" if se == se else "n/a"  # a group with one row: no SE
                if len(seeds) == 1:
                    entries.append(f"{diff:+.3f} ± {se_text} (1 seed, {n} rows)")
                    continue
                se_seeds = seed_difference(a, b)[1]
                entries.append(f"{diff:+.3f} ± {se_text} rows, ± {se_seeds:.3f} seeds "
                               f"({len(seeds)} seeds, {n} rows)")
            if all(e == "—" for e in entries):
                continue  # no paired inst_tune_no_rule cell (e.g. a swap-test-only sweep)
            label = method + (SWAPPED if side == "teacher_swapped" else "")
            table.append(f"| {label} | " + " | ".join(entries) + " |")
        if table:
            lines += [f"\n## {split} — {metric}: difference from {ref} (paired over test rows, "
                      "± SE over rows; with several seeds also ± SE over the seeds' own "
                      "differences)\n",
                      "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
                      "|---|" + "---|" * len(ks), *table]
    return lines


def report(out: Path, task: str) -> None:
    rows = list(csv.DictReader((out / "results.csv").open()))
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        label = r["method"] + (SWAPPED if r["side"] == "teacher_swapped" else "")
        groups[(r["split"], r["metric"], label, int(r["k"]))].append(float(r["value"]))
    labels = [*METHODS, *(m + SWAPPED for m in METHODS)]
    lines = [f"# {task}: mean ± std over seeds (n = number of seeds)\n"]
    for split, metric in sorted({(s, m) for s, m, _, _ in groups}):
        ks = sorted({k for s, m, _, k in groups if (s, m) == (split, metric)})
        lines.append(f"\n## {split} — {metric}\n")
        lines.append("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for method in labels:
            if not any((split, metric, method, k) in groups for k in ks):
                continue
            cells = []
            for k in ks:
                v = groups.get((split, metric, method, k))
                if not v:
                    cells.append("—")
                else:
                    sd = statistics.stdev(v) if len(v) > 1 else 0.0
                    cells.append(f"{statistics.mean(v):.3f} ± {sd:.3f} (n={len(v)})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += difference_lines(out, task, rows)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    metric = MAIN_METRIC[task]
    for split in sorted({s for s, m, _, _ in groups if m == metric}):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in labels:
            ks = sorted(k for s, m, me, k in groups if (s, m, me) == (split, metric, method))
            if not ks:
                continue
            means = [statistics.mean(groups[(split, metric, method, k)]) for k in ks]
            sds = [statistics.stdev(groups[(split, metric, method, k)])
                   if len(groups[(split, metric, method, k)]) > 1 else 0.0 for k in ks]
            ax.errorbar(ks, means, yerr=sds, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (training examples)")
        ax.set_ylabel(metric)
        ax.set_title(f"{task} {split}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{split}_{metric}.png", dpi=110)


def _earlier_rows(path: Path, args: argparse.Namespace) -> list[dict]:
    """The rows of ``path`` whose cells this invocation does not run (another k, seed or method)."""
    if not path.is_file():
        return []
    mine = {(m, int(k), int(sd)) for m in args.methods.split(",")
            for k in args.shots.split(",") for sd in args.seeds.split(",")}
    return [r for r in csv.DictReader(path.open())
            if (r["method"], int(r["k"]), int(r["seed"])) not in mine]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bob", choices=sorted(SPLITS),
                    help="which of the paper's three tasks (its test splits are evaluated)")
    ap.add_argument("--model", default="smollm2-135m",
                    help="a model preset (rdcore.models) or a local Hugging Face checkpoint folder")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--shots", default="8,16,32", help="comma-separated k (training examples)")
    ap.add_argument("--seeds", default="1234,2345,3456",
                    help="comma-separated seeds (the paper's k-shot split and the training seed)")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs per stage")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    ap.add_argument("--select_best", choices=("on", "off"), default="on",
                    help="the paper's model selection: evaluate the epoch with the lowest validation "
                         "CE (train.py --select_best), not the last")
    ap.add_argument("--micro_batch_size", type=int, default=1, help="examples per rank per step")
    ap.add_argument("--ranks", type=int, default=2,
                    help="DeepSpeed processes per cell (--num_accelerators; GPUs on a GPU machine)")
    ap.add_argument("--limit", type=int, default=0, help="test rows per split (0: all)")
    ap.add_argument("--eval_batch_size", type=int, default=8, help="prompts per generation batch")
    ap.add_argument("--max_new_tokens", type=int, default=0, help="0: the task's default")
    ap.add_argument("--rule_text", default="", help='"canonical" for the Bob main table')
    ap.add_argument("--rule", default="french",
                    help="task rulebook: the rule(s), comma-separated (several: one student on all "
                         "of them, judged on each)")
    ap.add_argument("--save_model", choices=("adapter", "merged"), default="adapter",
                    help="each cell's final/: the LoRA adapter only (default; evaluation merges it "
                    "into the base model in memory) or also the merged model (a copy of the model "
                    "per cell)")
    ap.add_argument("--swap_test", action="store_true",
                    help="also evaluate inst_tune_rule with the rule's two wordings swapped (the "
                         "released Bob files; rows labelled side=teacher_swapped)")
    ap.add_argument("--out", default="runs/paper",
                    help="sweep folder: one sub-folder per cell (finished cells are not rerun), "
                         "results.csv, table.md, plots")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild table.md and the plots from results.csv; train nothing")
    ap.add_argument("train_args", nargs="*", help="extra flags for rdcore/train.py (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        fields = ["method", "k", "seed", "split", "side", "metric", "value", "n"]
        # cells of earlier invocations (other k, seeds or methods) stay in results.csv
        kept = _earlier_rows(out / "results.csv", args)
        rows = []
        for k in [int(v) for v in args.shots.split(",")]:
            for seed in [int(v) for v in args.seeds.split(",")]:
                for method in args.methods.split(","):
                    if method not in METHODS:
                        raise SystemExit(f"unknown method {method!r}")
                    rows += cell(args, method, k, seed)
                    with (out / "results.csv").open("w", newline="") as fh:
                        writer = csv.DictWriter(fh, fieldnames=fields)
                        writer.writeheader()
                        writer.writerows(kept + rows)
    report(out, args.task)
    return 0


if __name__ == "__main__":
    sys.exit(main())

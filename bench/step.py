"""Training-step benchmark: the paper's loop, an HF baseline and rdcore (caches off / rule-prefix
cache / teacher-target cache), same model, data and batches. Prints a table and appends rows to
``bench/results/step.jsonl``; ``--plot`` draws ``bench/results/step_<device>.png`` from those rows.

    python bench/step.py                                   # smollm2-135m, math + jailbreak, CPU
    python bench/step.py --tasks math --variants b,c,d --steps 3 --model tiny   # quick look

Variants (Rule-Distill-Base with a LoRA student, r 16 on q/k/v/o, AdamW; one process, no DeepSpeed):

a. paper: a separate teacher copy; teacher and student sequences left-padded to ``--paper_max_length``
   (the paper: 1024); full logits at every position; KL and hidden MSE unfused, in the model dtype,
   masked to the response positions.
b. hf: a separate teacher copy; dynamic padding; full logits [B, T, V]; losses on the response rows.
c. rdcore, caches off: shared weights (teacher = adapters disabled), fused kernels on the distilled
   rows only. d. rdcore + rule-prefix cache. e. rdcore + prefix and teacher-target caches over
   ``--epochs`` epochs: samples/s per epoch and their mean.
f. trl-gkd: TRL's ``GKDTrainer`` (pinned, see ``requirements/bench-peers.txt``; ``lmbda=0``,
   ``beta=0``: forward KL(teacher ‖ student) on the fixed responses, no hidden-state term; the
   teacher a second copy of the same model). GKD gives teacher and student the *same* input, so the
   rule goes into neither side: both run the student sequence (rdcore's teacher also reads the rule
   and rdcore computes the hidden-state term: the comparison favours TRL). Its own training loop
   (``Trainer``: AdamW lr 1e-4, constant schedule) on exactly the batches of the other variants, in
   order (one dataset row per batch); full logits [B, T, V] for both models. Skipped with a message
   when TRL is not installed (``make bench-peers``). TRL's experimental SDFT trainer, the one peer
   that shares weights and gives only the teacher a privileged context, generates the student's
   responses on-policy every step, so its *training loop* is not comparable with a fixed-data step.
g. trl-sdft-loss: what of TRL's experimental ``SDFTTrainer`` *is* comparable — its loss step on
   fixed completions: ``compute_loss`` (``teacher_model_kind="base"``: the teacher is the shared
   model with the LoRA adapter disabled, rdcore's "disabled" teacher; ``distillation_mode=
   "full_logits"``, ``distillation_alpha=0``: forward KL(teacher ‖ student) over the whole
   vocabulary at every completion token; the teacher reads the rule, the student does not), then
   backward and AdamW (lr 1e-4), on exactly the batches of the other variants — the prompt
   left-padded, the fixed response as the completion. Not timed: its generation (sampling the
   student's completions each step), which rdcore's offline setting does not have. No
   hidden-state term (rdcore computes one: the comparison favours TRL).

``--activation_checkpointing on``: every variant's student recomputes its decoder layers in
backward (transformers' gradient checkpointing, non-reentrant — rdcore's
``--activation_checkpointing``; TRL's ``gradient_checkpointing=True``); ``both``: each round runs
the variants without, then with it. Rows record it and are compared only with rows alike.
``--rounds R``: R sweeps over the variants in one invocation (the VM's speed drifts over minutes:
ratios are taken within a sweep, medians over sweeps).

Per variant (each in its own subprocess): samples/s (median over steps after ``--warmup``),
teacher token positions run per sample (padding included), teacher-pass seconds per step (median),
and peak memory — CUDA ``max_memory_allocated``, CPU the process's peak resident set.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

from common import RESULTS as RESULTS_DIR
from common import ROOT, git_sha, versions

RESULTS = RESULTS_DIR / "step.jsonl"
VARIANTS = {"a": "paper", "b": "hf", "c": "rdcore", "d": "rdcore+prefix", "e": "rdcore+prefix+targets",
            "f": "trl-gkd", "g": "trl-sdft-loss"}


def _now(cuda: bool) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def _unfused_losses(t_logits, s_logits, t_hidden, s_hidden, t_rows, s_rows, beta: float):
    """KL(teacher ‖ student) and the normalised hidden MSE from full logits, in the model dtype."""
    import torch.nn.functional as F

    t = t_logits.reshape(-1, t_logits.shape[-1])[t_rows]
    s = s_logits.reshape(-1, s_logits.shape[-1])[s_rows]
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    mse = 0
    for hs, ht in zip(s_hidden[:-1], t_hidden[:-1]):
        a = F.normalize(hs.reshape(-1, hs.shape[-1])[s_rows], dim=-1)
        b = F.normalize(ht.reshape(-1, ht.shape[-1])[t_rows], dim=-1)
        mse = mse + (a - b).pow(2).mean(-1).sum()
    return kl + beta * mse / (len(s_hidden) - 1)


def _paper_losses(t_out, s_out, t_mask, s_mask, beta: float):
    """The paper's computation: log-softmax over every (left-padded) position of both models, the
    KL summed over vocabulary and masked to the response positions; hidden MSE likewise."""
    import torch.nn.functional as F

    t_lp = F.log_softmax(t_out.logits, -1)  # [B, T, V] in the model dtype
    s_lp = F.log_softmax(s_out.logits, -1)
    kl_BT = (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    kl = (kl_BT * s_mask).sum()
    mse = 0
    for hs, ht in zip(s_out.hidden_states[:-1], t_out.hidden_states[:-1]):
        d = (F.normalize(hs, dim=-1) - F.normalize(ht, dim=-1)).pow(2).mean(-1)
        mse = mse + (d * s_mask).sum()
    return kl + beta * mse / (len(s_out.hidden_states) - 1)


def worker(args: argparse.Namespace) -> dict:
    import torch

    from rdcore.config import LossWeights
    from rdcore.data import Encoder, collate, load_task
    from rdcore.distill import (
        RuleDistillModule,
        TeacherTargets,
        add_lora,
        checkpoint_activations,
        lora_config,
    )
    from rdcore.models import load_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if (cuda and args.dtype == "bf16") else torch.float32
    torch.manual_seed(0)
    base, tok = load_model(args.model, dtype=dtype)
    data = Encoder(tok, max_length=args.paper_max_length).encode(load_task(args.task, "train",
                                                                           args.shots))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    P = data.rule_prefix_len
    variant = args.one
    teacher = None
    if variant in ("a", "b", "f"):
        teacher = copy.deepcopy(base).to(device).eval()  # the separate teacher copy
        for p in teacher.parameters():
            p.requires_grad_(False)
    model = add_lora(base, lora_config(16, 16, 0.0, model=base)).to(device)
    model.train()  # every module (PEFT leaves from_pretrained's eval mode on the layers)
    if args.activation_checkpointing == "on" and variant not in ("f", "g"):  # TRL: its own flag
        checkpoint_activations(model)
    module = None
    if variant in ("c", "d", "e"):
        module = RuleDistillModule(
            model, "rule_distill_base", "disabled", loss=LossWeights(beta=args.beta),
            rule_prefix_ids=data.rule_prefix_ids if variant != "c" else None,
            targets=TeacherTargets(2**34) if variant == "e" else None, time_teacher=True).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    n = len(data)
    batches = [list(range(i, min(i + args.batch_size, n))) for i in range(0, n, args.batch_size)]
    teacher_time: list[float] = []

    teacher_tokens = 0

    def step(ids: list[int]) -> None:
        nonlocal teacher_tokens
        exs = [data[i] for i in ids]
        if variant == "a":
            b = _left_pad_to(exs, pad, args.paper_max_length, device)
            t0 = _now(cuda)
            with torch.no_grad():
                t_out = teacher(input_ids=b["t_ids"], attention_mask=b["t_mask"],
                                output_hidden_states=True)
            teacher_time.append(_now(cuda) - t0)
            teacher_tokens += b["t_ids"].numel()
            s_out = model(input_ids=b["s_ids"], attention_mask=b["s_mask"], output_hidden_states=True)
            # teacher and student are both left-padded to the same length and end with the response,
            # so the response positions coincide
            loss = _paper_losses(t_out, s_out, b["t_mask"], b["s_resp"], args.beta)
        else:
            batch = collate(exs, pad, prefix_len=P, example_ids=ids).to(device)
            if variant == "b":
                t0 = _now(cuda)
                with torch.no_grad():
                    t_out = teacher(input_ids=batch.teacher_input_ids,
                                    attention_mask=batch.teacher_attention_mask,
                                    position_ids=batch.teacher_position_ids,
                                    output_hidden_states=True)
                teacher_time.append(_now(cuda) - t0)
                teacher_tokens += batch.teacher_input_ids.numel()
                s_out = model(input_ids=batch.student_input_ids,
                              attention_mask=batch.student_attention_mask,
                              position_ids=batch.student_position_ids, output_hidden_states=True)
                loss = _unfused_losses(t_out.logits, s_out.logits, t_out.hidden_states,
                                       s_out.hidden_states, batch.teacher_distill_index,
                                       batch.student_distill_index, args.beta)
            else:
                before = module.work.seconds
                loss, _ = module(batch, 1.0)
                if module.work.seconds > before:  # the teacher ran (not taken from the cache)
                    teacher_time.append(module.work.seconds - before)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if variant == "f":
        return _trl_gkd(args, model, teacher, tok, data, batches, pad, cuda, dtype)
    if variant == "g":
        return _trl_sdft_loss(args, model, tok, data, batches, pad, cuda, dtype)
    epochs = args.epochs if variant == "e" else 1
    per_epoch: list[float] = []
    step_times: list[float] = []
    counted = 0
    for _ in range(epochs):
        t_epoch = _now(cuda)
        samples = 0
        todo = batches if variant == "e" else (batches * (args.warmup + args.steps))[
            : args.warmup + args.steps]
        for k, ids in enumerate(todo):
            t0 = _now(cuda)
            step(ids)
            dt = _now(cuda) - t0
            if variant == "e" or k >= args.warmup:
                step_times.append(dt)
                samples += len(ids)
                counted += len(ids)
        per_epoch.append(samples / (_now(cuda) - t_epoch))
    if module is not None:
        teacher_tokens = module.work.tokens
    total_samples = (len(data) * epochs) if variant == "e" else (
        sum(len(b) for b in (batches * (args.warmup + args.steps))[: args.warmup + args.steps]))
    med_step = statistics.median(step_times)
    bsz_mean = counted / len(step_times)
    return {
        "samples_per_s": statistics.mean(per_epoch) if variant == "e" else bsz_mean / med_step,
        "samples_per_s_per_epoch": per_epoch if variant == "e" else None,
        "teacher_tokens_per_sample": teacher_tokens / total_samples,
        "teacher_s_per_step": statistics.median(teacher_time) if teacher_time else 0.0,
        **_common_fields(data, P, cuda, dtype, model)}


def _common_fields(data, P: int, cuda: bool, dtype, model) -> dict:
    """What every variant's row records besides its timings: peak memory (CUDA
    ``max_memory_allocated``, CPU the process's peak resident set), the decoder layers the
    student recomputes in backward (checkpointing on and training mode: transformers checkpoints
    only a layer in training mode), the data and the device."""
    import torch

    from rdcore.architecture import decoder_layers
    from rdcore.distill import recomputed_layers

    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "peak_mem_mib": peak / 2**20,
        "layers_recomputed": recomputed_layers(model),
        "layers": len(decoder_layers(model)),
        "rule_prefix_tokens": P,
        "mean_teacher_len": sum(len(e.teacher_ids) for e in data) / len(data),
        "examples": len(data),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'cpu'}, "
                                                              f"{torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
    }


def _kind(r: dict) -> str:
    """The rows' setting beyond model, task and batch: activation checkpointing on or off."""
    return " +ckpt" if r.get("activation_checkpointing") else ""


def _trl_row(args, todo: list[list[int]], step_times: list[float], teacher_time: list[float],
             tokens: int, data, cuda: bool, dtype, model) -> dict:
    """A TRL variant's row: samples/s over the timed steps (after ``--warmup``), teacher work."""
    timed = step_times[args.warmup:]
    sizes = [len(ids) for ids in todo[args.warmup:]]
    return {
        "samples_per_s": statistics.mean(sizes) / statistics.median(timed),
        "samples_per_s_per_epoch": None,
        "teacher_tokens_per_sample": tokens / sum(len(ids) for ids in todo),
        "teacher_s_per_step": statistics.median(teacher_time[args.warmup:]),
        **_common_fields(data, 0, cuda, dtype, model), "trl": versions("trl")["trl"]}


def _trl_gkd(args, model, teacher, tok, data, batches, pad: int, cuda: bool, dtype) -> dict:
    """Variant f: TRL's GKDTrainer on the same batches (see the module docstring)."""
    import tempfile

    import datasets
    import torch
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from rdcore.data import collate

    todo = (batches * (args.warmup + args.steps))[: args.warmup + args.steps]
    rows = datasets.Dataset.from_dict({"batch": todo})  # one row per batch, in order

    def collator(features: list[dict]) -> dict:
        ids = features[0]["batch"]
        b = collate([data[i] for i in ids], pad)
        return {"input_ids": b.student_input_ids, "attention_mask": b.student_attention_mask,
                "labels": b.student_labels}

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    step_times: list[float] = []
    teacher_time: list[float] = []
    tokens = [0]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = _now(cuda)

        def on_step_end(self, *a, **k):
            step_times.append(_now(cuda) - self.t0)

    starts: list[float] = []
    teacher.register_forward_pre_hook(lambda m, a, kw: starts.append(_now(cuda)) or tokens.__setitem__(
        0, tokens[0] + kw["input_ids"].numel()), with_kwargs=True)
    teacher.register_forward_hook(lambda *a: teacher_time.append(_now(cuda) - starts[-1]))
    with tempfile.TemporaryDirectory() as out:
        cfg = GKDConfig(output_dir=out, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
                        per_device_train_batch_size=1, gradient_accumulation_steps=1,
                        max_steps=len(todo), learning_rate=1e-4, lr_scheduler_type="constant",
                        weight_decay=0.0, warmup_steps=0, logging_steps=10**6, save_strategy="no",
                        report_to=[], use_cpu=not cuda, bf16=dtype == torch.bfloat16,
                        dataloader_num_workers=0, disable_dropout=True, max_length=None,
                        gradient_checkpointing=args.activation_checkpointing == "on",
                        gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = InOrder(model=model, teacher_model=teacher, args=cfg, train_dataset=rows,
                          data_collator=collator, processing_class=tok, callbacks=[Clock()])
        trainer.train()
    return _trl_row(args, todo, step_times, teacher_time, tokens[0], data, cuda, dtype, model)


def _sdft_inputs(exs, pad: int, device) -> dict:
    """One batch as SDFT's ``compute_loss`` takes it: the student prompt (no rule) and the teacher's
    (rule + prompt), each left-padded, and the response as the completion (right-padded), so that
    both sequences end with the same completion block."""
    import torch

    from rdcore.data import _pad

    p_ids, p_mask, _ = _pad([e.student_ids[:e.student_response_start] for e in exs], pad, "left")
    t_ids, t_mask, _ = _pad([e.teacher_ids[:e.teacher_response_start] for e in exs], pad, "left")
    comp, comp_mask, _ = _pad([e.response_ids for e in exs], pad, "right")
    out = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": comp,
           "completion_mask": comp_mask, "teacher_input_ids": torch.cat([t_ids, comp], 1),
           "teacher_attention_mask": torch.cat([t_mask, comp_mask], 1)}
    return {k: v.to(device) for k, v in out.items()}


def _trl_sdft_loss(args, model, tok, data, batches, pad: int, cuda: bool, dtype) -> dict:
    """Variant g: TRL's SDFTTrainer loss step on the fixed batches (see the module docstring)."""
    import tempfile

    import datasets
    import torch
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    todo = (batches * (args.warmup + args.steps))[: args.warmup + args.steps]
    rows = datasets.Dataset.from_dict({"prompt": ["-"] * len(todo),
                                       "privileged_context": ["-"] * len(todo)})
    step_times: list[float] = []
    teacher_time: list[float] = []
    tokens = 0
    with tempfile.TemporaryDirectory() as out:
        cfg = SDFTConfig(output_dir=out, teacher_model_kind="base", distillation_mode="full_logits",
                         distillation_alpha=0.0, num_loss_tokens_to_skip=0, temperature=1.0,
                         per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
                         lr_scheduler_type="constant", weight_decay=0.0, max_steps=len(todo),
                         report_to=[], use_cpu=not cuda, bf16=dtype == torch.bfloat16,
                         save_strategy="no", logging_steps=10**6, disable_dropout=True,
                         gradient_checkpointing=args.activation_checkpointing == "on",
                         gradient_checkpointing_kwargs={"use_reentrant": False},
                         num_generations=1)  # as every variant
        trainer = SDFTTrainer(model=model, args=cfg, train_dataset=rows, processing_class=tok)
        student = trainer.model
        student.train()
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        forward = trainer._forward_logits

        def timed_forward(**kw):  # the teacher's forward is the one run under no_grad
            if torch.is_grad_enabled():
                return forward(**kw)
            t0 = _now(cuda)
            got = forward(**kw)
            teacher_time.append(_now(cuda) - t0)
            return got

        trainer._forward_logits = timed_forward
        trainer.current_gradient_accumulation_steps = 1  # what Trainer.train() sets per step
        for ids in todo:
            inputs = _sdft_inputs([data[i] for i in ids], pad, torch.device("cuda" if cuda else "cpu"))
            tokens += inputs["teacher_input_ids"].numel()
            t0 = _now(cuda)
            loss = trainer.compute_loss(student, inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_times.append(_now(cuda) - t0)
    return _trl_row(args, todo, step_times, teacher_time, tokens, data, cuda, dtype, model)


def _left_pad_to(exs, pad: int, length: int, device):
    import torch

    B = len(exs)
    out = {k: torch.full((B, length), v, dtype=torch.long) for k, v in
           (("t_ids", pad), ("s_ids", pad), ("t_mask", 0), ("s_mask", 0))}
    s_resp = torch.zeros(B, length)
    for b, e in enumerate(exs):
        t, s = e.teacher_ids, e.student_ids
        if len(t) > length:
            raise SystemExit(f"a teacher sequence has {len(t)} tokens > --paper_max_length {length}")
        out["t_ids"][b, length - len(t):] = torch.tensor(t)
        out["t_mask"][b, length - len(t):] = 1
        out["s_ids"][b, length - len(s):] = torch.tensor(s)
        out["s_mask"][b, length - len(s):] = 1
        # positions predicting response tokens: the R positions before the last one
        s_resp[b, length - e.response_len - 1: length - 1] = 1
    res = {k: v.to(device) for k, v in out.items()}
    res["s_resp"] = s_resp.to(device)
    return res


def plot() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()]
    grouped: dict[str, dict[tuple, list[dict]]] = {}
    for r in rows:  # medians over the invocations per (device, model, task, variant)
        grouped.setdefault(r["device"], {}).setdefault(
            (r["model"], r["task"] + _kind(r), r["variant"]), []).append(r)
    by_device = {d: {k: {m: statistics.median(r[m] for r in rs)
                         for m in ("samples_per_s", "peak_mem_mib")} for k, rs in g.items()}
                 for d, g in grouped.items()}
    for device, latest in by_device.items():
        keys = sorted({(m, t) for m, t, _ in latest})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        width = 0.8 / len(VARIANTS)
        for j, v in enumerate(VARIANTS):
            xs = [i + j * width for i, k in enumerate(keys) if (*k, v) in latest]
            ys = [latest[(*k, v)] for k in keys if (*k, v) in latest]
            axes[0].bar(xs, [r["samples_per_s"] for r in ys], width, label=f"{v}: {VARIANTS[v]}")
            axes[1].bar(xs, [r["peak_mem_mib"] for r in ys], width)
        for ax, title in zip(axes, ("samples / s", "peak memory (MiB)")):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
            ax.set_xticklabels([f"{m}\n{t}" for m, t in keys])
            ax.set_title(title)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"training step (medians over runs), {device}")
        fig.tight_layout()
        name = "cpu" if device.startswith("CPU") else device.replace(" ", "_")
        path = RESULTS.parent / f"step_{name}.png"
        fig.savefig(path, dpi=110)
        print(f"wrote {path}")
    return 0


def summary() -> int:
    """Medians over every recorded invocation per (device, model, task, batch), and the issue's
    targets from ratios taken within one invocation (medians over invocations)."""
    rows = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["model"], r["task"] + _kind(r), r["batch_size"]),
                          []).append(r)
    for (device, model, task, bsz), rs in groups.items():
        runs: dict[str, dict[str, dict]] = {}
        for r in rs:
            runs.setdefault((r.get("run", r["time"]), r.get("round", 0)), {})[r["variant"]] = r
        print(f"\n{model}, {task}, batch {bsz}, {device}: medians over {len(runs)} sweep(s)")
        print(f"{'variant':24} {'samples/s':>10} {'vs a':>6} {'vs b':>6} {'teacher tok/sample':>18} "
              f"{'teacher s/step':>14} {'peak MiB':>9}")

        def med(v: str, key: str, runs: dict = runs) -> float:
            return statistics.median(run[v][key] for run in runs.values() if v in run)

        def ratio(v: str, w: str, key: str = "samples_per_s", runs: dict = runs) -> float:
            got = [run[v][key] / run[w][key] for run in runs.values() if v in run and w in run]
            return statistics.median(got) if got else float("nan")

        for v in VARIANTS:
            if not any(v in run for run in runs.values()):
                continue
            print(f"{v + ': ' + VARIANTS[v]:24} {med(v, 'samples_per_s'):10.3f} {ratio(v, 'a'):6.2f} "
                  f"{ratio(v, 'b'):6.2f} {med(v, 'teacher_tokens_per_sample'):18.1f} "
                  f"{med(v, 'teacher_s_per_step'):14.3f} {med(v, 'peak_mem_mib'):9.0f}")
        for peer, name in (("f", "TRL GKDTrainer"), ("g", "TRL SDFT loss step")):
            if any(peer in run for run in runs.values()):
                print(f"vs {name}: samples/s (d)/({peer}) {ratio('d', peer):.2f}x, (e)/({peer}) "
                      f"{ratio('e', peer):.2f}x (>= 2); peak (d)/({peer}) "
                      f"{ratio('d', peer, 'peak_mem_mib'):.2f}, (e)/({peer}) "
                      f"{ratio('e', peer, 'peak_mem_mib'):.2f} (<= 0.5)")
        if not any("d" in run and "a" in run for run in runs.values()):
            continue
        frac = med("d", "rule_prefix_tokens") / med("d", "mean_teacher_len")
        cut = 1 - ratio("d", "c", "teacher_s_per_step")
        print(f"targets: (d)/(a) {ratio('d', 'a'):.1f}x (>= 5); (e)/(b) {ratio('e', 'b'):.2f}x (>= 2); "
              f"peak (d)/(a) {ratio('d', 'a', 'peak_mem_mib'):.2f}, (e)/(a) "
              f"{ratio('e', 'a', 'peak_mem_mib'):.2f} (<= 0.5); teacher time cut {cut:.0%} with the "
              f"rule {frac:.0%} of teacher tokens (>= {0.8 * frac:.0%})")
    pairs: dict[tuple, dict[bool, dict[str, dict]]] = {}
    for r in rows:  # rows of one invocation and round, with and without checkpointing
        if "round" in r:
            key = (r["device"], r["model"], r["task"], r["batch_size"], r["run"], r["round"])
            pairs.setdefault(key, {}).setdefault(bool(r["activation_checkpointing"]), {})[
                r["variant"]] = r
    by_task: dict[tuple, list[dict[bool, dict[str, dict]]]] = {}
    for key, both in pairs.items():
        if len(both) == 2:
            by_task.setdefault(key[:4], []).append(both)
    for (device, model, task, bsz), sweeps in by_task.items():
        print(f"\n{model}, {task}, batch {bsz}, {device}: activation checkpointing on / off in the "
              f"same round, medians over {len(sweeps)} round(s)")
        for v in VARIANTS:
            got = [(b[True][v], b[False][v]) for b in sweeps if v in b[True] and v in b[False]]
            if got:
                speed, mem = (statistics.median(on[k] / off[k] for on, off in got)
                              for k in ("samples_per_s", "peak_mem_mib"))
                print(f"{v + ': ' + VARIANTS[v]:24} samples/s {speed:.2f}x, peak memory {mem:.2f}x")
    return 0


def _sweep(args: argparse.Namespace, task: str, ckpt: str) -> tuple[dict[str, dict], bool]:
    """One sweep over the variants on one task, each in its own process; prints its rows and the
    ratios to the peers. Returns the results so far and whether every variant ran."""
    got: dict[str, dict] = {}
    label = task + (" +ckpt" if ckpt == "on" else "")
    for v in args.variants.split(","):
        if v in ("f", "g") and importlib.util.find_spec("trl") is None:
            print(f"{task} {v}: skipped, TRL is not installed (make bench-peers)")
            continue
        cmd = [sys.executable, __file__, "--one", v, "--task", task,
               f"--activation_checkpointing={ckpt}"] + [
            f"--{k}={getattr(args, k)}" for k in ("model", "shots", "batch_size", "steps",
                                                  "warmup", "epochs", "beta",
                                                  "paper_max_length", "dtype")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{task} {v}: failed\n{proc.stderr[-3000:]}")
            return got, False
        r = json.loads(line[0][len("RESULT "):])
        want = r["layers"] if ckpt == "on" else 0
        if r["layers_recomputed"] != want or (ckpt == "on" and not want):
            print(f"{task} {v}: {r['layers_recomputed']} of {r['layers']} layers recomputed in "
                  f"backward, --activation_checkpointing {ckpt}")
            return got, False
        r["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        got[v] = r
        ra = r["samples_per_s"] / got["a"]["samples_per_s"] if "a" in got else float("nan")
        rb = r["samples_per_s"] / got["b"]["samples_per_s"] if "b" in got else float("nan")
        print(f"{label:16} {v + ': ' + VARIANTS[v]:24} {r['samples_per_s']:10.3f} {ra:6.2f} "
              f"{rb:6.2f} {r['teacher_tokens_per_sample']:18.1f} {r['teacher_s_per_step']:14.3f} "
              f"{r['peak_mem_mib']:9.0f}", flush=True)
    if "c" in got and "d" in got:
        frac = got["d"]["rule_prefix_tokens"] / got["d"]["mean_teacher_len"]
        cut = 1 - got["d"]["teacher_s_per_step"] / got["c"]["teacher_s_per_step"]
        print(f"{label}: rule prefix = {frac:.0%} of teacher tokens; prefix cache cuts the teacher "
              f"pass by {cut:.0%} (target >= {0.8 * frac:.0%})")
    for peer, name in (("f", "TRL GKDTrainer"), ("g", "TRL SDFT loss step")):
        if peer not in got:
            continue
        for v in ("c", "d", "e"):
            if v in got:
                print(f"{label}: {VARIANTS[v]} / {name}: samples/s "
                      f"{got[v]['samples_per_s'] / got[peer]['samples_per_s']:.2f}x (goal >= 2), "
                      f"peak memory {got[v]['peak_mem_mib'] / got[peer]['peak_mem_mib']:.2f}x "
                      "(goal <= 0.5)")
    return got, True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="math,jailbreak")
    ap.add_argument("--variants", default="a,b,c,d,e,f,g",
                    help="f and g (TRL) are skipped when TRL is not installed")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (a-d)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of variant e")
    ap.add_argument("--beta", type=float, default=10.0)
    ap.add_argument("--paper_max_length", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="on CUDA (CPU: fp32)")
    ap.add_argument("--activation_checkpointing", default="off", choices=["off", "on", "both"],
                    help="every variant's student recomputes its layers in backward (both: each "
                         "round without, then with)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="sweeps over the variants (and settings), rows per sweep")
    ap.add_argument("--no_save", action="store_true", help="print only, append no rows")
    ap.add_argument("--plot", action="store_true", help="only draw the figure from the rows")
    ap.add_argument("--summary", action="store_true",
                    help="only print medians over the recorded invocations and the targets")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plot:
        return plot()
    if args.summary:
        return summary()
    if args.one:
        print("RESULT " + json.dumps(worker(args)))
        return 0
    sha = git_sha()
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    saved = 0
    settings = ["off", "on"] if args.activation_checkpointing == "both" else [
        args.activation_checkpointing]
    print(f"{'task':16} {'variant':24} {'samples/s':>10} {'vs a':>6} {'vs b':>6} "
          f"{'teacher tok/sample':>18} {'teacher s/step':>14} {'peak MiB':>9}")
    ok = True
    for rnd, ckpt, task in itertools.product(range(args.rounds), settings, args.tasks.split(",")):
        got, ok = _sweep(args, task, ckpt)
        rows = [{"model": args.model, "task": task, "variant": v, "name": VARIANTS[v],
                 "batch_size": args.batch_size, "shots": args.shots,
                 "activation_checkpointing": ckpt == "on", "round": rnd, "git": sha,
                 "run": run_id, **r} for v, r in got.items()]
        if not args.no_save:  # after every sweep, a failed one's finished variants too
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            with RESULTS.open("a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
            saved += len(rows)
        if not ok:
            break
    if saved:
        print(f"appended {saved} rows to {RESULTS.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

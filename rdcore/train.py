"""Rule distillation / instruction tuning under DeepSpeed ZeRO-3.

    deepspeed --num_accelerators 2 rdcore/train.py                       # the embedded default
    deepspeed --num_accelerators 2 rdcore/train.py --model tiny --task bob --method rule_distill_base
    deepspeed --hostfile hostfile rdcore/train.py --config run.yaml      # multi-node

Parse, set up, loop, close (:func:`main`). One model holds the weights of both teacher and student
(see :mod:`rdcore.distill`); DeepSpeed shards it. Rule-Distill-Enhanced runs two stages in one call:
stage 1 instruction-tunes an adapter with the rule in context (it becomes the frozen teacher),
stage 2 distils into a fresh student adapter. A stage (:func:`run_stage`) is set up once
(:func:`setup_stage`), then loops over :func:`train_step`, with :func:`end_of_epoch` (validation for
``--select_best``) and checkpoints (:mod:`rdcore.checkpoints`) in between, and finishes with the
export; its reports go through :class:`rdcore.metrics.MetricsLog`.

Loss normalisation. Every token-level term is a sum over the distilled tokens of the *global* batch
(all ranks, all accumulation steps) divided by their number, so the loss and the gradients do not
depend on how a batch is split across ranks and micro-batches. The global batch of every step is
known to every rank (the data order is a function of the seed and epoch), so the token count needs no
communication. DeepSpeed divides gradients by ``grad_accum`` and averages them over ranks; the
micro-batch loss is therefore scaled by ``world · grad_accum / global_tokens``.

Uneven data. When the examples do not fill the last global batch, it is filled with repeats of the
first examples carrying weight 0: every rank still runs its forward (ZeRO-3 needs all ranks), and the
repeats contribute nothing. No example is dropped.

Devices. Batches are built on the CPU and moved to the engine's device in one place
(:meth:`StageRun.batch`); everything the module creates itself follows its inputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (`deepspeed rdcore/train.py`): the script's own
    # folder must not shadow installed modules (rdcore/data.py as `data` …); rdcore is installed
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

import torch

from rdcore import ConfigError, RdcoreError, TrainingError
from rdcore import checkpoints as ckpt
from rdcore import engine as eng
from rdcore.architecture import causal_lm, decoder_layers, describe, inspect_model
from rdcore.config import TrainConfig, config_from_args
from rdcore.data import (
    Batch,
    EncodedDataset,
    Encoder,
    RuleExample,
    canonical_rule,
    collate,
    load_rule_file,
    load_task,
    replace_rule,
)
from rdcore.distill import (
    RuleDistillModule,
    TeacherTargets,
    add_lora,
    checkpoint_activations,
    eval_mode,
    lora_config,
    teacher_adapter,
)
from rdcore.metrics import MetricsLog
from rdcore.models import load_model, weights_fingerprint
from rdcore.respond import Sampling, fingerprint, load_or_write, with_responses

log = logging.getLogger("rdcore.train")


# --------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------
def step_schedule(n_examples: int, cfg: TrainConfig, world: int) -> list[list[tuple[int, float]]]:
    """The global batches of the whole run: lists of ``(example index, weight)``.

    Batch ``i`` holds ``cfg.global_batch(world)`` entries, ordered
    ``[accumulation step][rank][micro-batch row]``.
    """
    steps: list[list[tuple[int, float]]] = []
    for epoch in range(cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n_examples, generator=g).tolist()
        steps += filled_batches(order, cfg.global_batch(world))
    if cfg.max_steps:
        steps = steps[: cfg.max_steps]
    return steps


def filled_batches(order: list[int], size: int) -> list[list[tuple[int, float]]]:
    """``order``'s examples at weight 1 cut into batches of ``size``; the last batch is filled up
    with weight-0 repeats of ``order``'s first examples, so that every rank runs every step."""
    entries = [(i, 1.0) for i in order]
    entries += [(order[j % len(order)], 0.0) for j in range(-len(order) % size)]
    return [entries[k: k + size] for k in range(0, len(entries), size)]


def micro_batches(step: list[tuple[int, float]], cfg: TrainConfig, world: int, rank: int,
                  grad_accum: int | None = None) -> list[list[tuple[int, float]]]:
    """This rank's micro-batches of one global batch (``grad_accum`` of them unless given)."""
    m = cfg.micro_batch_size
    accum = cfg.grad_accum if grad_accum is None else grad_accum
    return [step[(a * world + rank) * m: (a * world + rank + 1) * m] for a in range(accum)]


def lr_lambda_for(cfg: TrainConfig, total_steps: int):
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


def load_examples(cfg: TrainConfig, split: str = "train") -> list[RuleExample]:
    """The training examples, or (``split="valid"``) the validation examples of ``select_best``:
    ``val_data`` or the task's validation file for ``shots`` and ``seed``. With teacher-written
    responses a row's output may be missing (the teacher writes it)."""
    need = cfg.responses == "reference"
    if cfg.task == "rulebook" and cfg.data is None and not (split == "valid" and cfg.val_data):
        from rdcore import rulebook

        return [ex for name in cfg.rules for ex in load_rule_file(
            rulebook.rule_file(name, split, cfg.shots), require_output=False)]
    if split == "valid":
        examples = (load_rule_file(cfg.val_data, require_output=need) if cfg.val_data else
                    load_task(cfg.task, "valid", cfg.shots, cfg.seed))
    else:
        examples = (load_rule_file(cfg.data, require_output=need) if cfg.data else
                    load_task(cfg.task, "train", cfg.shots))
    if cfg.rule_text:
        text = canonical_rule(cfg.task) if cfg.rule_text == "canonical" else cfg.rule_text
        examples = replace_rule(examples, text)
    return examples


def build_data(cfg: TrainConfig, tokenizer: Any, split: str = "train",
               examples: list[RuleExample] | None = None) -> EncodedDataset:
    """The encoded examples of ``split`` (``examples``: these instead of the loaded ones)."""
    examples = load_examples(cfg, split) if examples is None else examples
    return Encoder(tokenizer, cfg.template, cfg.max_length).encode(examples)


def teacher_written(stage: Stage, model: Any, tokenizer: Any, examples: list[RuleExample],
                    split: str, out: Path, rank: int, world: int) -> list[RuleExample]:
    """``examples`` with the responses the stage's teacher writes (``--responses teacher``):
    generated once (each rank a share, on its device), stored in
    ``out/responses_<stage>_<split>.jsonl`` and read from there when the run resumes."""
    cfg = stage.cfg
    encoder = Encoder(tokenizer, cfg.template, cfg.max_length)
    sampling = Sampling(cfg.response_tokens, cfg.response_temperature, cfg.seed)
    teacher = (weights_fingerprint(model.named_parameters()) if cfg.finetune == "full" else
               eng.frozen_fingerprint(model))
    key = fingerprint(examples, encoder, sampling, json.dumps([cfg.model, cfg.teacher_mode,
                                                               teacher]))
    path = out / f"responses_{stage.name}_{split}.jsonl"
    if torch.cuda.is_available():
        model.to(torch.device("cuda", eng.local_rank() % torch.cuda.device_count()))
    with teacher_adapter(model, cfg.teacher_mode):
        got = load_or_write(path, key, causal_lm(model), tokenizer, examples, encoder, sampling,
                            rank, world, eng.barrier, eng.all_gather_objects)
    log.info("[%s] teacher-written responses for %d %s examples in %s", stage.name, len(got),
             split, path)
    return with_responses(examples, got, str(path))


def steps_per_epoch(n_examples: int, cfg: TrainConfig, world: int) -> int:
    """Optimizer steps of one epoch (its last global batch is filled up, see :func:`step_schedule`)."""
    return -(-n_examples // cfg.global_batch(world))


# --------------------------------------------------------------------------------------------------
# Output directory
# --------------------------------------------------------------------------------------------------
def prepare_output_dir(cfg: TrainConfig, rank: int) -> Path:
    """Refuse to mix runs: an output dir holding another run needs --resume or --overwrite."""
    out = Path(cfg.output_dir)
    saved = out / "config.json"
    if rank == 0:
        if cfg.overwrite and out.exists():
            if not saved.is_file() and any(out.iterdir()):
                raise ConfigError(f"{out} is not empty and holds no rdcore run: refusing to delete it")
            shutil.rmtree(out)
        elif saved.is_file() and not cfg.resume:
            raise ConfigError(f"{out} holds another run: pass --resume on to continue it or "
                              "--overwrite on to replace it")
        elif cfg.resume and saved.is_file():
            before = json.loads(saved.read_text())
            now = cfg.to_dict()
            # a field added since that run was written counts as its default there
            default = TrainConfig.__dataclass_fields__
            free = TrainConfig.resumable_fields()
            diff = sorted(k for k in now if k not in free
                          and before.get(k, default[k].default) != now[k])
            if diff:
                raise ConfigError(f"--resume: the flags differ from the run in {out} in {diff}: "
                                  f"{ {k: (before.get(k), now[k]) for k in diff} }")
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    eng.barrier()
    return out


# --------------------------------------------------------------------------------------------------
# One training stage: set-up
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Stage:
    name: str
    cfg: TrainConfig
    teacher_state: dict[str, torch.Tensor] | None = None
    """Stage 2 of Rule-Distill-Enhanced: the stage-1 adapter, loaded as the frozen teacher."""
    export_adapter: Path | None = None
    """Stage 1 of Rule-Distill-Enhanced: where to write the trained adapter."""
    final: bool = True
    """Write output_dir/final (the merged model) at the end."""


@dataclasses.dataclass
class StageRun:
    """Everything a stage's loop reads, built once by :func:`setup_stage`."""

    stage: Stage
    out: Path
    rank: int
    world: int
    model: Any
    tokenizer: Any
    module: RuleDistillModule
    engine: Any
    data: EncodedDataset
    schedule: list[list[tuple[int, float]]]
    val_data: EncodedDataset | None
    frozen: list[float]
    """Fingerprint of the frozen weights (checkpoints omit them; a resume checks it)."""

    @property
    def cfg(self) -> TrainConfig:
        return self.stage.cfg

    @property
    def total(self) -> int:
        return len(self.schedule)

    @property
    def per_epoch(self) -> int:
        return steps_per_epoch(len(self.data), self.cfg, self.world)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints" / self.stage.name

    @property
    def val_side(self) -> str:
        """Validation reads the sequences the trained model is used with."""
        return "teacher" if self.cfg.method == "inst_tune_rule" else "student"

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def batch(self, entries: list[tuple[int, float]], data: EncodedDataset | None = None) -> Batch:
        """The micro-batch of ``(example index, weight)`` entries of ``data`` (the training set
        by default), on the engine's device — the one place batches are moved."""
        data = self.data if data is None else data
        ids = [i for i, _ in entries]
        cached = data is self.data and bool(self.module.prefix_caches)
        groups, lens = zip(*(data.prefix_of(i) for i in ids)) if cached else ([0] * len(ids),
                                                                               [0] * len(ids))
        b = collate([data[i] for i in ids], self.pad_id, prefix_len=list(lens), example_ids=ids,
                    weights=[w for _, w in entries], prefix_index=list(groups))
        return b.to(eng.device_of(self.engine))


def build_module(cfg: TrainConfig, model: Any, data: EncodedDataset, stage: str
                 ) -> RuleDistillModule:
    """The teacher/student module with the caches the configuration asks for."""
    use_prefix = cfg.prefix_cache and cfg.distill and bool(data.prefixes)
    use_targets = cfg.teacher_cache and cfg.distill and cfg.teacher_mode != "live"
    targets = TeacherTargets(int(cfg.teacher_cache_gb * 2**30), eng.any_rank,
                             eng.all_gather_rows) if use_targets else None
    module = RuleDistillModule(model, cfg.method, cfg.teacher_mode, loss=cfg.loss,
                               rule_prefixes=data.prefixes if use_prefix else None,
                               targets=targets, interleave=cfg.interleave and cfg.distill)
    if cfg.distill:
        log.info("[%s] teacher: rule-prefix cache %s, teacher-target cache %s, passes %s", stage,
                 f"on ({len(data.prefixes)} × {', '.join(str(len(p)) for p in data.prefixes)} "
                 "tokens)" if use_prefix else "off",
                 "on" if use_targets else "off (live teacher)" if cfg.teacher_cache else "off",
                 "layer-interleaved" if module.interleave else
                 "sequential (interleaving does not reproduce this decoder)" if cfg.interleave
                 else "sequential")
    return module


def setup_stage(stage: Stage, out: Path, rank: int, world: int) -> StageRun:
    """Load the model and data, build the module and the DeepSpeed engine."""
    cfg = stage.cfg
    if cfg.resume:
        ckpt.check_resume(cfg, out / "checkpoints" / stage.name, world)
    # the random draws of the set-up (LoRA's initial A matrices) depend on the seed and the stage
    # only — not on what ran before in this process (an earlier stage, or a skipped one on resume)
    torch.manual_seed(cfg.seed * 1_000_003 + zlib.crc32(stage.name.encode()))
    model, tokenizer = load_model(cfg.model, dtype=cfg.torch_dtype, seed=cfg.seed)
    report = inspect_model(model)  # a family rdcore cannot distil exactly stops here
    log.info("[%s] model %s", stage.name, describe(report))
    if cfg.finetune == "lora":
        config = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, report.lora_targets)
        model = add_lora(model, config, stage.teacher_state)
    # train mode explicitly: from_pretrained returns eval mode (PEFT switches it back, a full
    # fine-tune would keep it: any dropout of the architecture off); the teacher pass and
    # validation switch to eval mode themselves
    model.train()
    examples = load_examples(cfg)
    if cfg.responses == "teacher":
        examples = teacher_written(stage, model, tokenizer, examples, "train", out, rank, world)
    data = build_data(cfg, tokenizer, examples=examples)
    log.info("[%s] %s, %s: %d examples, rule prefix %d tokens, template %s", stage.name,
             cfg.method, cfg.finetune, len(data), data.rule_prefix_len, cfg.template)
    schedule = step_schedule(len(data), cfg, world)
    val_data = None
    if cfg.select_best:
        val = load_examples(cfg, "valid")
        if cfg.responses == "teacher":
            val = teacher_written(stage, model, tokenizer, val, "valid", out, rank, world)
        val_data = build_data(cfg, tokenizer, "valid", val)
    if cfg.activation_checkpointing:  # after the teacher-written responses, in training mode
        log.info("[%s] activation checkpointing: %d decoder layers recomputed in backward",
                 stage.name, checkpoint_activations(model))
    module = build_module(cfg, model, data, stage.name)
    frozen = eng.frozen_fingerprint(model)  # checkpoints omit frozen weights: resume checks them
    layer = decoder_layers(model)[0]
    engine = eng.build_engine(module, cfg, world, lr_lambda_for(cfg, len(schedule)),
                              hidden_size=causal_lm(model).config.hidden_size,
                              layer_numel=sum(p.numel() for p in layer.parameters()))
    run = StageRun(stage, out, rank, world, model, tokenizer, module, engine, data, schedule,
                   val_data, frozen)
    if val_data is not None:
        log.info("[%s] select_best: validation CE on %d examples (%s side) after each of the "
                 "epochs (%d steps each)", stage.name, len(val_data), run.val_side, run.per_epoch)
    shard = eng.partition_stats(engine.module)
    trainable = sum(p.numel() if not hasattr(p, "ds_numel") else p.ds_numel
                    for p in engine.module.parameters() if p.requires_grad)
    if rank == 0:
        info = {"world_size": world, "rank0": shard, "trainable_param_elements": trainable}
        (out / f"run_{stage.name}.json").write_text(json.dumps(info, indent=2) + "\n")
        log.info("[%s] ZeRO: rank 0 holds %d of %d parameter elements; %d trainable", stage.name,
                 shard["local_param_elements"], shard["total_param_elements"], trainable)
    # Seed the training randomness (LoRA dropout) here, after everything that may or may not draw
    # random numbers (a first-run model conversion, DeepSpeed's set-up): runs are reproducible
    # whatever the caches held. A resumed run then restores its checkpoint's random state.
    # Each rank draws its own dropout masks.
    torch.manual_seed(cfg.seed * 7919 + 101 * rank + (1 if stage.name == "stage1" else 0))
    return run


# --------------------------------------------------------------------------------------------------
# One training stage: the step, the end of an epoch, the loop
# --------------------------------------------------------------------------------------------------
def train_step(run: StageRun, step: int) -> dict[str, Any]:
    """One optimizer step (``grad_accum`` micro-batches on every rank): its metrics row."""
    cfg, engine, module = run.cfg, run.engine, run.module
    global_batch = run.schedule[step]
    tokens = sum(run.data[i].response_len for i, w in global_batch if w > 0)
    scale = run.world * cfg.grad_accum / max(tokens, 1)
    work, comm, t0 = dataclasses.replace(module.work), eng.comm_bytes(), time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    positions = 0
    for entries in micro_batches(global_batch, cfg, run.world, run.rank):
        batch = run.batch(entries)
        side = "teacher" if cfg.method == "inst_tune_rule" else "student"
        positions += batch.side(side).input_ids.numel()
        loss, stats = engine(batch, scale)
        if eng.any_rank(not bool(torch.isfinite(loss))):
            kept = eng.latest_complete(run.ckpt_dir) if run.ckpt_dir.is_dir() else None
            raise TrainingError(f"[{run.stage.name}] non-finite loss at step {step + 1}; stopped "
                                f"before the update. Last good checkpoint: "
                                f"{run.ckpt_dir / kept if kept else 'none'}")
        engine.backward(loss)
        engine.step()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v.float()
    module.after_optimizer_step()
    keys = sorted(sums)
    reduced = dict(zip(keys, eng.all_reduce_sum([float(sums[k]) for k in keys])))
    terms = {k: v / max(tokens, 1) for k, v in reduced.items()}
    row = {"stage": run.stage.name, "step": step + 1, "loss": module.total_loss(terms), **terms,
           "tokens": tokens, "lr": engine.get_lr()[0], "step_time_s": time.perf_counter() - t0}
    # this rank's work: token positions with gradients this step (padding included), the
    # teacher's (forward only), the teacher counters so far, peak memory, this step's traffic
    row["rank0_student_positions"] = positions
    if cfg.distill:
        now = module.work
        row["rank0_teacher_positions"] = now.tokens - work.tokens
        row.update({"rank0_teacher_passes": now.passes, "rank0_teacher_cached": now.cached,
                    "rank0_teacher_tokens": now.tokens, "rank0_prefix_builds": now.prefix_builds})
    row["rank0_peak_mem_mib"] = eng.peak_memory_mib()
    for op, volume in eng.comm_bytes().items():
        row[f"rank0_comm_{op}_bytes"] = volume - comm.get(op, 0)
    return row


def validation_loss(run: StageRun) -> float:
    """Mean token cross-entropy of the current weights on the validation data, reading the
    sequences of :attr:`StageRun.val_side`. No gradients, eval mode (no dropout), no random
    numbers drawn, so training goes on exactly as without validation. Every rank runs the same
    number of forwards (ZeRO-3 gathers collectively); the last batch is filled with weight-0
    repeats, as in training."""
    data, cfg = run.val_data, run.cfg
    ce_sum = 0.0
    with eval_mode(run.module), torch.no_grad():
        for entries in filled_batches(list(range(len(data))), run.world * cfg.micro_batch_size):
            (mb,) = micro_batches(entries, cfg, run.world, run.rank, grad_accum=1)
            _, stats = run.engine(run.batch(mb, data), 1.0, ce_side=run.val_side)
            ce_sum += float(stats["ce"])
    (total,) = eng.all_reduce_sum([ce_sum])
    return total / sum(data[i].response_len for i in range(len(data)))


def end_of_epoch(run: StageRun, step: int, best: ckpt.Best, row: dict[str, Any]) -> ckpt.Best:
    """``select_best``: the validation CE after the epoch ending at ``step`` (added to ``row``);
    a new best epoch's weights are kept. Returns the best so far."""
    epoch = -(-(step + 1) // run.per_epoch)
    val = validation_loss(run)
    if not math.isfinite(val):
        raise TrainingError(f"[{run.stage.name}] non-finite validation loss after epoch {epoch}")
    if val < best.loss:
        best = ckpt.Best(val, epoch)
        ckpt.save_best(run, epoch)
    row.update(epoch=epoch, val_loss=val, best_val_loss=best.loss, best_epoch=best.epoch)
    log.info("[%s] epoch %d: validation CE %.4f (best %.4f, epoch %d)", run.stage.name, epoch,
             val, best.loss, best.epoch)
    return best


def run_stage(stage: Stage, out: Path, rank: int, world: int) -> None:
    """Set up, loop over the steps (resuming where a checkpoint left off), finish."""
    if ckpt.stage_complete(stage, out):
        log.info("stage %s already complete", stage.name)
        return
    run = setup_stage(stage, out, rank, world)
    start, best = ckpt.resume(run)
    cfg = run.cfg
    metrics = MetricsLog(out, stage.name, rank, total=run.total, start=start,
                         tensorboard=cfg.tensorboard)
    for step in range(start, run.total):
        row = train_step(run, step)
        if run.val_data is not None and ((step + 1) % run.per_epoch == 0 or step + 1 == run.total):
            best = end_of_epoch(run, step, best, row)
        metrics.write(row)
        if cfg.stop_at_step and step + 1 == cfg.stop_at_step and step + 1 < run.total:
            ckpt.save(run, step + 1, best)
            log.info("stopping after step %d as asked (--stop_at_step); rerun with --resume on",
                     step + 1)
            raise SystemExit(0)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < run.total:
            ckpt.save(run, step + 1, best)
    metrics.close()
    if cfg.distill:
        w = run.module.work
        log.info("[%s] teacher on rank %d: %d passes run, %d taken from the teacher-target cache, "
                 "%d token positions, rule prefix computed %d times", stage.name, rank, w.passes,
                 w.cached, w.tokens, w.prefix_builds)
    if start < run.total:
        ckpt.save(run, run.total, best)
    ckpt.finish(run, best)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def run(cfg: TrainConfig, out: Path, rank: int, world: int) -> None:
    """The stages of ``cfg.method`` (two for Rule-Distill-Enhanced)."""
    if cfg.method == "rule_distill_enhanced":
        stage1_cfg = dataclasses.replace(cfg, method="inst_tune_rule",
                                         epochs=cfg.stage1_epochs or cfg.epochs)
        adapter = out / "teacher_adapter.safetensors"
        run_stage(Stage("stage1", stage1_cfg, export_adapter=adapter, final=False), out, rank, world)
        from safetensors.torch import load_file

        run_stage(Stage("distill", cfg, teacher_state=load_file(str(adapter))), out, rank, world)
    else:
        run_stage(Stage("main", cfg), out, rank, world)


def report_file(cfg: TrainConfig) -> str | None:
    """The judged test file of ``--report``: the rule book rule's, or ``--report_data``."""
    if cfg.report_data:
        return cfg.report_data
    if cfg.task == "rulebook" and cfg.data is None:
        from rdcore import rulebook

        return str(rulebook.rule_file(cfg.rules[0], "test"))
    return None


def before_after(cfg: TrainConfig, out: Path) -> str | None:
    """``--report``: the starting model without the rule, the teacher with it, and the trained
    model without it, on the first ``cfg.report`` rows of the report file (rank 0; evaluations in
    ``out/report/``); the table, or None when there is nothing to judge or no final model."""
    from rdcore.evaluate import EvalConfig, compare, evaluate

    data = report_file(cfg)
    if not cfg.report or data is None or cfg.save_model == "off":
        return None
    common = dict(data=data, template=cfg.template, limit=cfg.report, max_length=cfg.max_length,
                  max_new_tokens=cfg.response_tokens)
    evals = {name: EvalConfig(model=cfg.model if name != "after" else str(out), side=side,
                              output_dir=str(out / "report" / name), **common)
             for name, side in (("before", "student"), ("teacher", "teacher"),
                                ("after", "student"))}
    todo = [n for n, ev in evals.items() if not _same_evaluation(Path(ev.output_dir), ev)]
    models: dict[str, Any] = {}  # a finished run asked again: its evaluations are read, not redone
    if todo:
        models["before"], tok = load_model(cfg.model, dtype=cfg.torch_dtype, seed=cfg.seed)
        models["teacher"] = models["before"]
        if cfg.method == "rule_distill_enhanced":  # its teacher: the base with the stage-1 adapter
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            base = load_model(cfg.model, dtype=cfg.torch_dtype, seed=cfg.seed)[0]
            models["teacher"] = add_lora(base, lora_config(cfg.lora_r, cfg.lora_alpha, 0.0,
                                                           model=base))
            set_peft_model_state_dict(models["teacher"],
                                      load_file(str(out / "teacher_adapter.safetensors")),
                                      adapter_name="student")
        models["after"] = load_model(str(out / "final"), dtype=cfg.torch_dtype)[0]
    for name in todo:
        evaluate(evals[name], models[name], tok)
    return compare([Path(ev.output_dir) for ev in evals.values()])


def _same_evaluation(folder: Path, ev: Any) -> bool:
    """Whether ``folder`` holds the evaluation ``ev`` describes (same file, rows and settings)."""
    try:
        done = json.loads((folder / "eval.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    return done == json.loads(json.dumps(dataclasses.asdict(ev)))


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv)
    rank, world = eng.init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(message)s")
    out = prepare_output_dir(cfg, rank)
    t_start = time.perf_counter()
    run(cfg, out, rank, world)
    if rank == 0:
        table = before_after(cfg, out)
        if table:
            print(f"\nThe rule, on {cfg.report} held-out inputs of {report_file(cfg)}:\n{table}\n",
                  flush=True)
    eng.barrier()
    log.info("done in %.1fs; outputs in %s", time.perf_counter() - t_start, out)
    eng.shutdown()
    return 0


def cli() -> int:
    """Entry point: bad input ends with one clear line on stderr (exit 2), not a traceback."""
    try:
        return main()
    except RdcoreError as err:
        print(f"rdcore: error: {err}", file=sys.stderr)
        eng.shutdown(wait_for_peers=False)
        return 2


def _leave(code: int) -> None:
    """Exit with ``code``. A finished run has written and closed every file and left the process
    group, so the interpreter's own teardown of torch, transformers and DeepSpeed (about 2 s a rank
    on 2 CPU cores, measured) is skipped once the streams are flushed; any other ending exits
    normally."""
    if code != 0:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _leave(cli())

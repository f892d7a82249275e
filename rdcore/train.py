"""Rule distillation / instruction tuning under DeepSpeed ZeRO-3.

    deepspeed --num_accelerators 2 rdcore/train.py                       # the embedded default
    deepspeed --num_accelerators 2 rdcore/train.py --model tiny --task bob --method rule_distill_base
    deepspeed --hostfile hostfile rdcore/train.py --config run.yaml      # multi-node

Parse, build, loop, close. One model holds the weights of both teacher and student (see
:mod:`rdcore.distill`); DeepSpeed shards it. Rule-Distill-Enhanced runs two stages in one call:
stage 1 instruction-tunes an adapter with the rule in context (it becomes the frozen teacher),
stage 2 distils into a fresh student adapter.

Loss normalisation. Every token-level term is a sum over the distilled tokens of the *global* batch
(all ranks, all accumulation steps) divided by their number, so the loss and the gradients do not
depend on how a batch is split across ranks and micro-batches. The global batch of every step is
known to every rank (the data order is a function of the seed and epoch), so the token count needs no
communication. DeepSpeed divides gradients by ``grad_accum`` and averages them over ranks; the
micro-batch loss is therefore scaled by ``world · grad_accum / global_tokens``.

Uneven data. When the examples do not fill the last global batch, it is filled with repeats of the
first examples carrying weight 0: every rank still runs its forward (ZeRO-3 needs all ranks), and the
repeats contribute nothing. No example is dropped.
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
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `deepspeed rdcore/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from rdcore import ConfigError, RdcoreError
from rdcore import engine as eng
from rdcore.config import TrainConfig, config_from_args
from rdcore.data import (
    EncodedDataset,
    Encoder,
    canonical_rule,
    collate,
    load_rule_file,
    load_task,
    replace_rule,
)
from rdcore.distill import (
    STUDENT,
    RuleDistillModule,
    add_lora,
    causal_lm,
    eval_mode,
    interleavable,
    lora_config,
)
from rdcore.files import atomic_write, replace_dir
from rdcore.models import load_model, write_adapter_manifest

log = logging.getLogger("rdcore.train")

RESUMABLE_FIELDS = {"resume", "overwrite", "stop_at_step", "save_every", "keep_checkpoints",
                    "tensorboard", "output_dir",
                    "save_model", "prefix_cache", "teacher_cache", "teacher_cache_gb",
                    "interleave", "grad_accum", "micro_batch_size"}
"""Fields that may differ between a run and its resumption (``grad_accum`` and ``micro_batch_size``
only as long as the global batch, ``world · grad_accum · micro_batch_size``, stays the same: see
:func:`check_resume`)."""


class TrainingError(RdcoreError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


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


def build_data(cfg: TrainConfig, tokenizer: Any, split: str = "train") -> EncodedDataset:
    """The encoded training examples, or (``split="valid"``) the validation examples of
    ``select_best``: ``val_data`` or the task's validation file for ``shots`` and ``seed``."""
    if split == "valid":
        examples = (load_rule_file(cfg.val_data) if cfg.val_data else
                    load_task(cfg.task, "valid", cfg.shots, cfg.seed))
    else:
        examples = load_rule_file(cfg.data) if cfg.data else load_task(cfg.task, "train", cfg.shots)
    if cfg.rule_text:
        text = canonical_rule(cfg.task) if cfg.rule_text == "canonical" else cfg.rule_text
        examples = replace_rule(examples, text)
    return Encoder(tokenizer, cfg.template, cfg.max_length).encode(examples)


def steps_per_epoch(n_examples: int, cfg: TrainConfig, world: int) -> int:
    """Optimizer steps of one epoch (its last global batch is filled up, see :func:`step_schedule`)."""
    return -(-n_examples // cfg.global_batch(world))


# --------------------------------------------------------------------------------------------------
# Validation (select_best)
# --------------------------------------------------------------------------------------------------
def validation_loss(engine: Any, module: RuleDistillModule, data: EncodedDataset, side: str,
                    cfg: TrainConfig, world: int, rank: int, pad_id: int) -> float:
    """Mean token cross-entropy of the current weights on ``data``, reading ``side``'s sequences
    (``student``: without the rule; ``teacher``: with it). No gradients, eval mode (no dropout), no
    random numbers drawn, so training goes on exactly as without validation. Every rank runs the
    same number of forwards (ZeRO-3 gathers collectively); the last batch is filled with weight-0
    repeats, as in training."""
    n = len(data)
    ce_sum = 0.0
    module.ce_side = side
    try:
        with eval_mode(module), torch.no_grad():
            for batch in filled_batches(list(range(n)), world * cfg.micro_batch_size):
                (mb,) = micro_batches(batch, cfg, world, rank, grad_accum=1)
                row_w = torch.cat([torch.full((data[i].response_len,), w) for i, w in mb])
                _, stats = engine(collate([data[i] for i, _ in mb], pad_id), row_w, 1.0)
                ce_sum += float(stats["ce"])
    finally:
        module.ce_side = None
    (total,) = eng.all_reduce_sum([ce_sum])
    return total / sum(data[i].response_len for i in range(n))


def best_dir(out: Path, stage: str) -> Path:
    """Where ``select_best`` keeps the weights of the best epoch so far (``epoch{E}.pt``:
    the student adapter with LoRA, the model's state dict with full fine-tuning)."""
    return out / "best" / stage


def _drop_older_best(out: Path, stage: str, epoch: int) -> None:
    """Delete best-epoch files older than ``epoch`` (the best recorded in a complete checkpoint:
    a resume never goes back before it, so they cannot be needed again)."""
    for f in best_dir(out, stage).glob("epoch*.pt"):
        if int(f.stem[5:]) < epoch:
            f.unlink()


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
            diff = sorted(k for k in now if k not in RESUMABLE_FIELDS
                          and before.get(k, default[k].default) != now[k])
            if diff:
                raise ConfigError(f"--resume: the flags differ from the run in {out} in {diff}: "
                                  f"{ {k: (before.get(k), now[k]) for k in diff} }")
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    eng.barrier()
    return out


# --------------------------------------------------------------------------------------------------
# One training stage
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


def _adapter_state(full_sd: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """The PEFT adapter state dict (keys without the adapter name) from RuleDistillModule
    parameter names (a gathered subset or a consolidated state dict)."""
    out = {}
    marker = f".{adapter}."
    for key, value in full_sd.items():
        if key.startswith("model.") and "lora_" in key and marker in key:
            out[key[len("model."):].replace(marker, ".")] = value.detach().clone()
    return out


def _student_adapter(engine: Any) -> dict[str, torch.Tensor] | None:
    """The student adapter's PEFT state dict on rank 0 (``None`` elsewhere), gathering only the
    adapter's parameters, not the model. Call on every rank."""
    got = eng.gathered_params(engine, lambda n: "lora_" in n and f".{STUDENT}." in n)
    return None if got is None else _adapter_state(got, STUDENT)


def _export_state(engine: Any, cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """What an export is made of, on rank 0 (``None`` elsewhere; call on every rank): the student
    adapter (LoRA) or the consolidated state dict of the model's parameters (full)."""
    if cfg.finetune == "lora":
        return _student_adapter(engine)
    full_sd = eng.consolidated_state_dict(engine)
    return None if full_sd is None else {k: v for k, v in full_sd.items() if k.startswith("model.")}


def _export(stage: Stage, engine: Any, model: Any, tokenizer: Any, out: Path, rank: int,
            best: Path | None = None) -> None:
    """Gather what is exported (every rank) and write the adapter / final model (rank 0). LoRA
    gathers only the adapter; full fine-tuning consolidates the model, and only for ``final/``.
    ``best``: export the weights saved there (``select_best``) instead of the current ones."""
    cfg = stage.cfg
    write_final = stage.final and cfg.save_model != "off"
    if stage.export_adapter is None and not write_final:
        return  # nothing to export (an adapter is exported only with LoRA, see TrainConfig)
    if best is not None:
        saved = torch.load(best, map_location="cpu", weights_only=True) if rank == 0 else None
    else:
        saved = _export_state(engine, cfg)
    if stage.export_adapter is not None:
        if rank == 0:
            from safetensors.torch import save_file

            atomic_write(stage.export_adapter, lambda tmp: save_file(saved, str(tmp)))
        eng.barrier()
    if not write_final:
        return
    if rank == 0:
        final = out / "final"

        def build(tmp: Path) -> None:
            if cfg.finetune == "lora":
                from peft import set_peft_model_state_dict

                base, _ = load_model(cfg.model, dtype=cfg.torch_dtype, seed=cfg.seed)
                if cfg.save_model == "adapter":  # before add_lora: the base model's own names
                    write_adapter_manifest(tmp, cfg.model, cfg.seed, base, f"adapter/{STUDENT}")
                fresh = add_lora(base, lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
                set_peft_model_state_dict(fresh, saved, adapter_name=STUDENT)
                fresh.save_pretrained(tmp / "adapter", selected_adapters=[STUDENT])
                if cfg.save_model == "merged":
                    fresh.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            else:
                state = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
                causal_lm(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        replace_dir(final, build)
        log.info("final %s written to %s", "adapter (merged into its base model when loaded)"
                 if cfg.save_model == "adapter" else "model", final)
    eng.barrier()


def check_resume(cfg: TrainConfig, ckpt_dir: Path, world: int) -> None:
    """A run resumes on any number of ranks, but only with the global batch it was written with:
    the data order, the loss normalisation and the learning-rate schedule all depend on it."""
    found = eng.checkpoint_info(ckpt_dir)
    if found is None:
        return
    tag, state = found
    now = cfg.global_batch(world)
    before = state.get("global_batch")
    if before is None:
        if state["world_size"] not in (None, world):
            raise ConfigError(f"{ckpt_dir}/{tag} does not record its global batch, so it resumes "
                              f"only on the {state['world_size']} ranks that wrote it")
        return
    if before != now:
        need = before / (world * cfg.micro_batch_size)
        hint = (f"--grad_accum {int(need)}" if need == int(need) and need >= 1 else
                "a micro_batch_size and grad_accum whose product with the world size is "
                f"{before}")
        raise ConfigError(
            f"{ckpt_dir}/{tag} was written with a global batch of {before} "
            f"({state['world_size']} ranks); this run's is {now} ({world} ranks × grad_accum "
            f"{cfg.grad_accum} × micro_batch_size {cfg.micro_batch_size}): resume with {hint}")
    if state["world_size"] != world:
        log.info("resuming %s (written by %s ranks) on %d ranks: converting it to DeepSpeed's "
                 "universal checkpoint", tag, state["world_size"], world)


def run_stage(stage: Stage, out: Path, rank: int, world: int) -> None:
    cfg = stage.cfg
    ckpt_dir = out / "checkpoints" / stage.name
    done_marker = ckpt_dir / "DONE"
    if done_marker.is_file() and (stage.export_adapter is None or stage.export_adapter.is_file()):
        log.info("stage %s already complete", stage.name)
        return
    if cfg.resume:
        check_resume(cfg, ckpt_dir, world)
    model, tokenizer = load_model(cfg.model, dtype=cfg.torch_dtype, seed=cfg.seed)
    if cfg.finetune == "lora":
        model = add_lora(model, lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout),
                         stage.teacher_state)
    # train mode explicitly: from_pretrained returns eval mode (PEFT switches it back, a full
    # fine-tune would keep it: any dropout of the architecture off); the teacher pass and
    # validation switch to eval mode themselves
    model.train()
    data = build_data(cfg, tokenizer)
    log.info("[%s] %s, %s: %d examples, rule prefix %d tokens, template %s", stage.name,
             cfg.method, cfg.finetune, len(data), data.rule_prefix_len, cfg.template)
    schedule = step_schedule(len(data), cfg, world)
    total = len(schedule)
    per_epoch = steps_per_epoch(len(data), cfg, world)
    val_data, val_side = None, "teacher" if cfg.method == "inst_tune_rule" else "student"
    if cfg.select_best:
        val_data = build_data(cfg, tokenizer, "valid")
        log.info("[%s] select_best: validation CE on %d examples (%s side) after each of the "
                 "epochs (%d steps each)", stage.name, len(val_data), val_side, per_epoch)
    use_prefix = cfg.prefix_cache and cfg.distill and data.rule_prefix_len > 0
    use_targets = cfg.teacher_cache and cfg.distill and cfg.teacher_mode != "live"
    use_interleave = cfg.interleave and cfg.distill and interleavable(model)
    module = RuleDistillModule(
        model, cfg.method, cfg.teacher_mode, cfg.temperature, cfg.beta, cfg.alpha,
        rule_prefix_ids=data.rule_prefix_ids if use_prefix else None,
        teacher_cache_bytes=int(cfg.teacher_cache_gb * 2**30) if use_targets else 0,
        interleave=use_interleave)
    if cfg.distill:
        log.info("[%s] teacher: rule-prefix cache %s, teacher-target cache %s, passes %s",
                 stage.name, f"on ({data.rule_prefix_len} tokens)" if use_prefix else "off",
                 "on" if use_targets else "off (live teacher)" if cfg.teacher_cache else "off",
                 "layer-interleaved" if use_interleave else
                 "sequential (not a Llama model)" if cfg.interleave else "sequential")
    lm = causal_lm(model)
    frozen = eng.frozen_fingerprint(model)  # checkpoints omit frozen weights: resume checks them
    engine = eng.build_engine(module, cfg, world, lr_lambda_for(cfg, total),
                              hidden_size=lm.config.hidden_size,
                              layer_numel=sum(p.numel() for p in lm.model.layers[0].parameters()))
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
    start = 0
    best_val, best_epoch = math.inf, 0  # select_best: the lowest validation CE so far, its epoch
    state = eng.load_checkpoint(engine, ckpt_dir, frozen) if cfg.resume else None
    if state is not None:
        start = int(state["step"])
        best_val, best_epoch = state.get("best_val_loss", math.inf), state.get("best_epoch", 0)
        log.info("[%s] resumed from %s at step %d/%d", stage.name, ckpt_dir, start, total)
    metrics_path = out / "metrics.jsonl"
    if rank == 0 and metrics_path.exists():  # drop rows past the checkpoint we resume from
        rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        keep = [r for r in rows if r.get("stage") != stage.name or r["step"] <= start]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    writer = None
    if rank == 0 and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard" / stage.name))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=stage.name, unit="step", dynamic_ncols=True)

    def checkpoint(at: int) -> None:
        state = {"step": at, "world_size": world, "global_batch": cfg.global_batch(world),
                 "frozen_fingerprint": frozen}
        if cfg.select_best and best_epoch:
            state.update(best_val_loss=best_val, best_epoch=best_epoch)
        eng.save_checkpoint(engine, ckpt_dir, at, state,
                            (lambda: _student_adapter(engine)) if cfg.finetune == "lora" else None,
                            keep=cfg.keep_checkpoints)
        if rank == 0 and best_epoch:
            _drop_older_best(out, stage.name, best_epoch)

    for step in range(start, total):
        global_batch = schedule[step]
        global_tokens = sum(data[i].response_len for i, w in global_batch if w > 0)
        scale = world * cfg.grad_accum / max(global_tokens, 1)
        sums: dict[str, float] = {}
        student_positions = 0
        teacher_before = module.counters["teacher_tokens"]
        comm_before = eng.comm_bytes()
        t0 = time.perf_counter()
        if module.prefix is not None and cfg.teacher_mode == "live":
            module.prefix.invalidate()  # the weights changed: recompute the prefix once this step
        for mb in micro_batches(global_batch, cfg, world, rank):
            ids = [i for i, _ in mb]
            batch = collate([data[i] for i in ids], pad_id,
                            prefix_len=data.rule_prefix_len if use_prefix else 0)
            batch["example_ids"] = torch.tensor(ids, dtype=torch.long)
            batch["rows_per_example"] = torch.tensor([data[i].response_len for i in ids])
            row_w = torch.cat([torch.full((data[i].response_len,), w) for i, w in mb])
            student_positions += batch["student_input_ids" if cfg.method != "inst_tune_rule"
                                       else "teacher_input_ids"].numel()
            if module.targets is not None:  # skip the teacher only if every rank can (ZeRO-3)
                module.teacher_from_cache = not eng.any_rank(not module.targets.has_all(ids))
            loss, stats = engine(batch, row_w, scale)
            if module.last_targets is not None and world > 1:  # share what this pass computed
                for shared in eng.all_gather_rows(*module.last_targets):
                    module.targets.put(*shared)
            if eng.any_rank(not bool(torch.isfinite(loss))):
                kept = eng.latest_complete(ckpt_dir) if ckpt_dir.is_dir() else None
                raise TrainingError(f"[{stage.name}] non-finite loss at step {step + 1}; stopped "
                                    f"before the update. Last good checkpoint: "
                                    f"{ckpt_dir / kept if kept else 'none'}")
            engine.backward(loss)
            engine.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        reduced = dict(zip(keys, eng.all_reduce_sum([sums[k] for k in keys])))
        terms = {k: v / max(global_tokens, 1) for k, v in reduced.items()}
        total_loss = (terms.get("kl", 0.0) + cfg.beta * terms.get("hidden_mse", 0.0)
                      + (cfg.alpha if cfg.distill else 1.0) * terms.get("ce", 0.0))
        row = {"stage": stage.name, "step": step + 1, "loss": total_loss, **terms,
               "tokens": global_tokens, "lr": engine.get_lr()[0],
               "step_time_s": time.perf_counter() - t0}
        # this rank's work: token positions with gradients this step (padding included), the
        # teacher's (forward only), the teacher counters so far, peak memory
        row["rank0_student_positions"] = student_positions
        if cfg.distill:
            row["rank0_teacher_positions"] = module.counters["teacher_tokens"] - teacher_before
            row.update({f"rank0_{k}": v for k, v in module.counters.items()})
        row["rank0_peak_mem_mib"] = eng.peak_memory_mib()
        comm_after = eng.comm_bytes()  # with DeepSpeed's comms_logger on: this step's traffic
        for op, volume in comm_after.items():
            row[f"rank0_comm_{op}_bytes"] = volume - comm_before.get(op, 0)
        if val_data is not None and ((step + 1) % per_epoch == 0 or step + 1 == total):
            epoch = -(-(step + 1) // per_epoch)
            val = validation_loss(engine, module, val_data, val_side, cfg, world, rank, pad_id)
            if not math.isfinite(val):
                raise TrainingError(f"[{stage.name}] non-finite validation loss after epoch "
                                    f"{epoch}")
            if val < best_val:  # keep this epoch's weights (every rank gathers, rank 0 writes)
                best_val, best_epoch = val, epoch
                saved = _export_state(engine, cfg)
                if rank == 0:
                    path = best_dir(out, stage.name) / f"epoch{epoch}.pt"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, lambda tmp, sd=saved: torch.save(sd, tmp))
                eng.barrier()
            row.update(epoch=epoch, val_loss=val, best_val_loss=best_val, best_epoch=best_epoch)
            log.info("[%s] epoch %d: validation CE %.4f (best %.4f, epoch %d)", stage.name, epoch,
                     val, best_val, best_epoch)
        if rank == 0:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            if writer is not None:
                for k in ("loss", "kl", "hidden_mse", "ce", "lr", "step_time_s"):
                    if k in row:
                        writer.add_scalar(f"train/{k}", row[k], step + 1)
            bar.set_postfix(loss=f"{total_loss:.4g}", tok=global_tokens)
            bar.update(1)
            bar.clear()
            log.info("[%s] step %d/%d | loss %.4f | %s | %d tok | %.2fs", stage.name, step + 1,
                     total, total_loss, " ".join(f"{k} {v:.4g}" for k, v in terms.items()),
                     global_tokens, row["step_time_s"])
        if cfg.stop_at_step and step + 1 == cfg.stop_at_step and step + 1 < total:
            checkpoint(step + 1)
            log.info("stopping after step %d as asked (--stop_at_step); rerun with --resume on",
                     step + 1)
            raise SystemExit(0)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            checkpoint(step + 1)
    if bar is not None:
        bar.close()
    if cfg.distill:
        c = module.counters
        log.info("[%s] teacher on rank %d: %d passes run, %d taken from the teacher-target cache, "
                 "%d token positions, rule prefix computed %d times", stage.name, rank,
                 c["teacher_passes"], c["teacher_cached"], c["teacher_tokens"], c["prefix_builds"])
    if writer is not None:
        writer.close()
    if start < total:
        checkpoint(total)
    best = None
    if cfg.select_best:
        if not best_epoch:
            raise TrainingError(f"[{stage.name}] select_best: no validation result recorded")
        best = best_dir(out, stage.name) / f"epoch{best_epoch}.pt"
        log.info("[%s] exporting epoch %d of %d (lowest validation CE, %.4f)", stage.name,
                 best_epoch, -(-total // per_epoch), best_val)
    _export(stage, engine, model, tokenizer, out, rank, best)
    if rank == 0:
        done_marker.write_text(f"{total}\n")
    eng.barrier()


def main(argv: list[str] | None = None) -> int:
    # ---- parse ---------------------------------------------------------------------------------
    cfg = config_from_args(argv)
    rank, world = eng.init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(message)s")
    out = prepare_output_dir(cfg, rank)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()

    # ---- build and loop (one or two stages) ----------------------------------------------------
    if cfg.method == "rule_distill_enhanced":
        stage1_cfg = dataclasses.replace(cfg, method="inst_tune_rule",
                                         epochs=cfg.stage1_epochs or cfg.epochs)
        adapter = out / "teacher_adapter.safetensors"
        run_stage(Stage("stage1", stage1_cfg, export_adapter=adapter, final=False), out, rank, world)
        from safetensors.torch import load_file

        run_stage(Stage("distill", cfg, teacher_state=load_file(str(adapter))), out, rank, world)
    else:
        run_stage(Stage("main", cfg), out, rank, world)

    # ---- close ---------------------------------------------------------------------------------
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


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())

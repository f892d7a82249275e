"""Rule distillation / instruction tuning under DeepSpeed ZeRO-3.

    deepspeed --num_accelerators 2 rdcore/train.py --model smollm2-135m --task math \
        --method rule_distill_base --output_dir runs/demo

Parse, build, loop, close. One model holds the weights of both teacher and student (see
:mod:`rdcore.distill`); DeepSpeed shards it.

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

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `deepspeed rdcore/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from rdcore import RdcoreError
from rdcore import engine as eng
from rdcore.config import TrainConfig, config_from_args
from rdcore.data import EncodedDataset, Encoder, collate, load_rule_file, load_task
from rdcore.distill import RuleDistillModule
from rdcore.models import load_model

log = logging.getLogger("rdcore.train")


def step_schedule(n_examples: int, cfg: TrainConfig, world: int) -> list[list[tuple[int, float]]]:
    """The global batches of the whole run: lists of ``(example index, weight)``.

    Batch ``i`` holds ``world · grad_accum · micro_batch_size`` entries, ordered
    ``[accumulation step][rank][micro-batch row]``.
    """
    per_step = world * cfg.grad_accum * cfg.micro_batch_size
    steps: list[list[tuple[int, float]]] = []
    for epoch in range(cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n_examples, generator=g).tolist()
        entries = [(i, 1.0) for i in order]
        short = -len(entries) % per_step
        entries += [(order[j % n_examples], 0.0) for j in range(short)]
        steps += [entries[k: k + per_step] for k in range(0, len(entries), per_step)]
    if cfg.max_steps:
        steps = steps[: cfg.max_steps]
    return steps


def micro_batches(step: list[tuple[int, float]], cfg: TrainConfig, world: int, rank: int
                  ) -> list[list[tuple[int, float]]]:
    """This rank's micro-batches of one global batch."""
    m = cfg.micro_batch_size
    out = []
    for a in range(cfg.grad_accum):
        base = (a * world + rank) * m
        out.append(step[base: base + m])
    return out


def lr_lambda_for(cfg: TrainConfig, total_steps: int):
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


def build_data(cfg: TrainConfig, tokenizer) -> EncodedDataset:
    if cfg.data:
        examples = load_rule_file(cfg.data)
    else:
        examples = load_task(cfg.task, "train", cfg.shots)
    return Encoder(tokenizer, cfg.template, cfg.max_length).encode(examples)


def main(argv: list[str] | None = None) -> int:
    # ---- parse ---------------------------------------------------------------------------------
    cfg = config_from_args(argv)
    rank, world = eng.init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(message)s")
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    torch.manual_seed(cfg.seed)

    # ---- build ---------------------------------------------------------------------------------
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model, tokenizer = load_model(cfg.model, dtype=dtype, seed=cfg.seed)
    data = build_data(cfg, tokenizer)
    log.info("data: %d examples, rule prefix %d tokens, template %s", len(data),
             data.rule_prefix_len, cfg.template)
    schedule = step_schedule(len(data), cfg, world)
    total = len(schedule)
    module = RuleDistillModule(model, cfg.method, cfg.temperature, cfg.beta, cfg.alpha)
    engine = eng.build_engine(module, cfg, world, lr_lambda_for(cfg, total))
    shard = eng.partition_stats(engine.module)
    if rank == 0:
        (out / "run.json").write_text(json.dumps({"world_size": world, "rank0": shard}, indent=2))
        log.info("ZeRO: rank 0 holds %d of %d parameter elements", shard["local_param_elements"],
                 shard["total_param_elements"])
    start = 0
    if cfg.resume:
        state = eng.load_checkpoint(engine, ckpt_dir)
        if state is not None:
            start = int(state["step"])
            if state.get("world_size") not in (None, world):
                log.info("resuming a %s-rank checkpoint on %d ranks", state["world_size"], world)
            log.info("resumed from %s at step %d/%d", ckpt_dir, start, total)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---- loop ----------------------------------------------------------------------------------
    metrics_path = out / "metrics.jsonl"
    t_start = time.perf_counter()
    for step in range(start, total):
        global_batch = schedule[step]
        global_tokens = sum(data[i].response_len for i, w in global_batch if w > 0)
        scale = world * cfg.grad_accum / max(global_tokens, 1)
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        for mb in micro_batches(global_batch, cfg, world, rank):
            batch = collate([data[i] for i, _ in mb], pad_id)
            row_w = torch.cat([torch.full((data[i].response_len,), w) for i, w in mb])
            loss, stats = engine(batch, row_w, scale)
            engine.backward(loss)
            engine.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        reduced = dict(zip(keys, eng.all_reduce_sum([sums[k] for k in keys])))
        terms = {k: v / max(global_tokens, 1) for k, v in reduced.items()}
        total_loss = (terms.get("kl", 0.0) + cfg.beta * terms.get("hidden_mse", 0.0)
                      + (cfg.alpha if cfg.distill else 1.0) * terms.get("ce", 0.0))
        dt = time.perf_counter() - t0
        row = {"step": step + 1, "loss": total_loss, **terms, "tokens": global_tokens,
               "lr": engine.get_lr()[0], "step_time_s": dt}
        if rank == 0:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            detail = " ".join(f"{k} {v:.4g}" for k, v in terms.items())
            log.info("step %d/%d | loss %.4f | %s | %d tok | %.2fs", step + 1, total, total_loss,
                     detail, global_tokens, dt)
        if cfg.stop_at_step and step + 1 == cfg.stop_at_step and step + 1 < total:
            eng.save_checkpoint(engine, ckpt_dir, step + 1, {"step": step + 1, "world_size": world})
            log.info("stopping after step %d as asked (--stop_at_step); rerun to resume", step + 1)
            eng.barrier()
            return 0
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            eng.save_checkpoint(engine, ckpt_dir, step + 1, {"step": step + 1, "world_size": world})

    # ---- close ---------------------------------------------------------------------------------
    if start < total:
        eng.save_checkpoint(engine, ckpt_dir, total, {"step": total, "world_size": world})
    if cfg.save_model:
        state_dict = eng.consolidated_state_dict(engine)
        if rank == 0:
            final = out / "final"
            model.save_pretrained(final, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(final)
            log.info("final model written to %s", final)
    eng.barrier()
    log.info("done: %d steps in %.1fs", total - start, time.perf_counter() - t_start)
    return 0


def cli() -> int:
    """Entry point: bad input ends with one clear line on stderr (exit 2), not a traceback."""
    try:
        return main()
    except RdcoreError as err:
        print(f"rdcore: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())

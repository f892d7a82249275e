"""What a training stage keeps on disk, beside the DeepSpeed calls of :mod:`rdcore.engine`:
resumable checkpoints, the best epoch's weights (``--select_best``), the exported adapter and final
model, and the ``DONE`` marker of a finished stage.

* ``checkpoints/<stage>/stepN/`` — DeepSpeed's shards, each rank's random state, the LoRA adapter;
  complete once ``COMPLETE`` is in it (:func:`rdcore.engine.save_checkpoint`), the newest complete
  one named by ``latest_complete``; a resume starts from it (:func:`resume`), on any number of ranks
  with the same global batch (:func:`check_resume`).
* ``best/<stage>/epochE.pt`` — the best epoch so far (LoRA: the student adapter; full: the model's
  state dict); older ones are deleted once a complete checkpoint records a newer best.
* ``teacher_adapter.safetensors`` (Enhanced's stage 1) and ``final/`` (:func:`finish`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rdcore import ConfigError, TrainingError
from rdcore import engine as eng
from rdcore.config import TrainConfig
from rdcore.files import atomic_write, atomic_write_text, replace_dir
from rdcore.models import load_model, write_adapter_manifest

if TYPE_CHECKING:
    from rdcore.train import Stage, StageRun

log = logging.getLogger("rdcore.train")
STUDENT = "student"


@dataclass(frozen=True)
class Best:
    """``select_best``'s state: the lowest validation CE so far and its epoch (0: none yet)."""

    loss: float = math.inf
    epoch: int = 0


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------
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


def resume(run: StageRun) -> tuple[int, Best]:
    """The step to start from and the best epoch so far: from the newest complete checkpoint with
    ``--resume on`` (weights, optimizer, schedule, random state), else ``(0, Best())``."""
    if not run.cfg.resume:
        return 0, Best()
    state = eng.load_checkpoint(run.engine, run.ckpt_dir, run.frozen)
    if state is None:
        return 0, Best()
    start = int(state["step"])
    log.info("[%s] resumed from %s at step %d/%d", run.stage.name, run.ckpt_dir, start, run.total)
    return start, Best(state.get("best_val_loss", math.inf), state.get("best_epoch", 0))


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------
def adapter_state(full_sd: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """The PEFT adapter state dict (keys without the adapter name) from RuleDistillModule
    parameter names (a gathered subset or a consolidated state dict)."""
    out = {}
    marker = f".{adapter}."
    for key, value in full_sd.items():
        if key.startswith("model.") and "lora_" in key and marker in key:
            out[key[len("model."):].replace(marker, ".")] = value.detach().clone()
    return out


def student_adapter(engine: Any) -> dict[str, torch.Tensor] | None:
    """The student adapter's PEFT state dict on rank 0 (``None`` elsewhere), gathering only the
    adapter's parameters, not the model. Call on every rank."""
    got = eng.gathered_params(engine, lambda n: "lora_" in n and f".{STUDENT}." in n)
    return None if got is None else adapter_state(got, STUDENT)


def export_state(engine: Any, cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """What an export is made of, on rank 0 (``None`` elsewhere; call on every rank): the student
    adapter (LoRA) or the consolidated state dict of the model's parameters (full)."""
    if cfg.finetune == "lora":
        return student_adapter(engine)
    full_sd = eng.consolidated_state_dict(engine)
    return None if full_sd is None else {k: v for k, v in full_sd.items() if k.startswith("model.")}


def save(run: StageRun, at: int, best: Best) -> None:
    """A resumable checkpoint after step ``at`` (every rank), recording the best epoch so far; the
    best-epoch files it supersedes are deleted."""
    cfg = run.cfg
    state = {"step": at, "world_size": run.world, "global_batch": cfg.global_batch(run.world),
             "frozen_fingerprint": run.frozen}
    if cfg.select_best and best.epoch:
        state.update(best_val_loss=best.loss, best_epoch=best.epoch)
    eng.save_checkpoint(run.engine, run.ckpt_dir, at, state,
                        (lambda: student_adapter(run.engine)) if cfg.finetune == "lora" else None,
                        keep=cfg.keep_checkpoints)
    if run.rank == 0 and best.epoch:
        for f in best_dir(run.out, run.stage.name).glob("epoch*.pt"):
            if int(f.stem[5:]) < best.epoch:  # a resume never goes back before the recorded best
                f.unlink()


def best_dir(out: Path, stage: str) -> Path:
    """Where ``select_best`` keeps the weights of the best epoch so far (``epoch{E}.pt``:
    the student adapter with LoRA, the model's state dict with full fine-tuning)."""
    return out / "best" / stage


def save_best(run: StageRun, epoch: int) -> None:
    """Keep the current weights as epoch ``epoch``'s (every rank gathers, rank 0 writes)."""
    saved = export_state(run.engine, run.cfg)
    if run.rank == 0:
        path = best_dir(run.out, run.stage.name) / f"epoch{epoch}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(saved, tmp))
    eng.barrier()


# --------------------------------------------------------------------------------------------------
# Finishing: the exports and the DONE marker
# --------------------------------------------------------------------------------------------------
def stage_complete(stage: Stage, out: Path) -> bool:
    done = out / "checkpoints" / stage.name / "DONE"
    return done.is_file() and (stage.export_adapter is None or stage.export_adapter.is_file())


def finish(run: StageRun, best: Best) -> None:
    """Export (the best epoch's weights with ``select_best``, else the current ones) and mark the
    stage done."""
    cfg, stage = run.cfg, run.stage
    weights = None
    if cfg.select_best:
        if not best.epoch:
            raise TrainingError(f"[{stage.name}] select_best: no validation result recorded")
        weights = best_dir(run.out, stage.name) / f"epoch{best.epoch}.pt"
        log.info("[%s] exporting epoch %d of %d (lowest validation CE, %.4f)", stage.name,
                 best.epoch, -(-run.total // run.per_epoch), best.loss)
    export(run, weights)
    if run.rank == 0:
        atomic_write_text(run.ckpt_dir / "DONE", f"{run.total}\n")
    eng.barrier()


def export(run: StageRun, best: Path | None = None) -> None:
    """Gather what is exported (every rank) and write the adapter / final model (rank 0). LoRA
    gathers only the adapter; full fine-tuning consolidates the model, and only for ``final/``.
    ``best``: export the weights saved there (``select_best``) instead of the current ones."""
    cfg, stage = run.cfg, run.stage
    write_final = stage.final and cfg.save_model != "off"
    if stage.export_adapter is None and not write_final:
        return  # nothing to export (an adapter is exported only with LoRA, see TrainConfig)
    if best is not None:
        saved = torch.load(best, map_location="cpu", weights_only=True) if run.rank == 0 else None
    else:
        saved = export_state(run.engine, cfg)
    if stage.export_adapter is not None:
        if run.rank == 0:
            from safetensors.torch import save_file

            atomic_write(stage.export_adapter, lambda tmp: save_file(saved, str(tmp)))
        eng.barrier()
    if not write_final:
        return
    if run.rank == 0:
        final = run.out / "final"
        replace_dir(final, lambda tmp: _write_final(run, saved, tmp))
        log.info("final %s written to %s", "adapter (merged into its base model when loaded)"
                 if cfg.save_model == "adapter" else "model", final)
    eng.barrier()


def _write_final(run: StageRun, saved: dict[str, torch.Tensor], tmp: Path) -> None:
    from rdcore.architecture import causal_lm
    from rdcore.distill import add_lora, lora_config

    cfg = run.cfg
    if cfg.finetune == "lora":
        from peft import set_peft_model_state_dict

        base, _ = load_model(cfg.model, dtype=cfg.torch_dtype, seed=cfg.seed)
        if cfg.save_model == "adapter":  # before add_lora: the base model's own names
            write_adapter_manifest(tmp, cfg.model, cfg.seed, base, f"adapter/{STUDENT}")
        fresh = add_lora(base, lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                           model=base))
        set_peft_model_state_dict(fresh, saved, adapter_name=STUDENT)
        fresh.save_pretrained(tmp / "adapter", selected_adapters=[STUDENT])
        if cfg.save_model == "merged":
            fresh.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
    else:
        state = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
        causal_lm(run.model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
    run.tokenizer.save_pretrained(tmp)

"""Turn a run's last complete checkpoint into a Hugging Face model folder (any number of ranks wrote
it; runs on one CPU process, no DeepSpeed launcher).

    python -m rdcore.consolidate runs/bob out/bob-step40           # the run's last stage
    python -m rdcore.consolidate runs/bob out/stage1 --stage stage1

Full fine-tuning: the ZeRO shards are gathered into fp32 weights. LoRA: the checkpoint's student
adapter (``adapter.safetensors``) is merged into the base model; the adapter folder is written too.
The result loads with ``AutoModelForCausalLM.from_pretrained`` and with ``--model <out>``. Use it to
start a new run from a checkpoint: the weights carry over, the optimizer state and step count do not.
(To *continue* a run on a different number of ranks, just ``--resume on`` it with the same global
batch: the trainer converts the checkpoint to DeepSpeed's universal format and keeps the optimizer
state.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: its folder must not shadow installed modules
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

from rdcore import ConfigError, RdcoreError
from rdcore.config import TrainConfig
from rdcore.files import replace_dir


def consolidate(run_dir: Path, out: Path, stage: str = "") -> Path:
    """Write ``out`` from the newest complete checkpoint of ``stage`` (default: the last stage
    that has checkpoints) in ``run_dir``; returns the checkpoint folder used."""
    from rdcore import engine as eng
    from rdcore.architecture import causal_lm
    from rdcore.distill import STUDENT, add_lora, lora_config
    from rdcore.models import load_model

    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} holds no rdcore run (no config.json)")
    fields = json.loads(saved.read_text())
    cfg = TrainConfig(**{k: v for k, v in fields.items() if k in TrainConfig.__dataclass_fields__})
    stages = [p for p in sorted((run_dir / "checkpoints").glob("*")) if p.is_dir()]
    if stage:
        stages = [p for p in stages if p.name == stage]
    ordered = sorted(stages, key=lambda p: (p.name != "stage1", p.name))  # stage1 before distill
    if not ordered:
        raise ConfigError(f"{run_dir}/checkpoints has no {stage or 'stage'} folder")
    ckpt_dir = ordered[-1]
    tag = eng.latest_complete(ckpt_dir)
    if tag is None:
        raise ConfigError(f"{ckpt_dir} has no complete checkpoint")
    if out.exists():
        raise ConfigError(f"{out} exists: choose a new folder")
    model, tokenizer = load_model(cfg.model, dtype=cfg.torch_dtype, seed=cfg.seed)

    def build(tmp: Path) -> None:
        if cfg.finetune == "lora":
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            adapter = load_file(str(ckpt_dir / tag / "adapter.safetensors"))
            peft = add_lora(model, lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                               model=model))
            set_peft_model_state_dict(peft, adapter, adapter_name=STUDENT)
            peft.save_pretrained(tmp / "adapter", selected_adapters=[STUDENT])
            ready = peft.merge_and_unload()
        else:
            full = eng.checkpoint_state_dict(ckpt_dir, tag)
            state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            missing, unexpected = causal_lm(model).load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("lm_head.weight")
                       or not model.config.tie_word_embeddings]
            if missing or unexpected:
                raise ConfigError(f"{ckpt_dir}/{tag} does not match {cfg.model}: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}")
            ready = model.to(cfg.torch_dtype)
        ready.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "rdcore_checkpoint.json").write_text(json.dumps(
            {"run": str(run_dir), "checkpoint": str(ckpt_dir / tag)}, indent=2) + "\n")

    replace_dir(out, build)
    return ckpt_dir / tag


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rdcore.consolidate",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--stage", default="", help="stage1, distill or main (default: the last)")
    args = ap.parse_args(argv)
    try:
        used = consolidate(args.run_dir, args.out, args.stage)
    except RdcoreError as err:
        print(f"rdcore: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out} written from {used}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

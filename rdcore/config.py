"""Training configuration: one dataclass, a docstring per field, validated on construction.

The resolved configuration is written to ``<output_dir>/config.json`` by every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdcore import ConfigError
from rdcore.data import SEEDS, TASK_ALIASES, TASKS, TEMPLATES

METHODS = ("inst_tune_no_rule", "inst_tune_rule", "rule_distill_base", "rule_distill_enhanced")
FINETUNE_MODES = ("lora", "full")
PRECISIONS = ("fp32", "bf16")
SAVE_MODEL = ("merged", "adapter", "off")


@dataclass
class TrainConfig:
    """Everything a training run depends on (command-line flags have the same names)."""

    model: str = "smollm2-135m"
    """Preset (``tiny``, ``smollm2-135m``) or path of a local Hugging Face model folder."""
    task: str = "math"
    """Packaged task: math (a @@@ b = a+b+1), jailbreak or bob (sentiment); ignored with ``data``."""
    shots: int = 8
    """k of the packaged k-shot training split."""
    data: str | None = None
    """A user's JSON/JSONL file of {rule, input, output[, context]} rows instead of a task."""
    rule_text: str = ""
    """Replace every row's rule with this text; "canonical" = the task's single wording (bob: the
    "When the inputs…" text, see rdcore.data.canonical_rule). Empty: the rules as in the files."""
    method: str = "rule_distill_enhanced"
    """inst_tune_no_rule | inst_tune_rule (CE without/with the rule) | rule_distill_base (teacher:
    the starting model with the rule in context) | rule_distill_enhanced (stage 1: inst_tune_rule on
    the same examples trains the teacher adapter; stage 2: distillation from it, LoRA only)."""
    finetune: str = "lora"
    """lora: one frozen base, the student trains its adapter, the teacher is the base with a frozen
    teacher adapter (Enhanced) or with adapters disabled (Base). full: every weight trains and the
    teacher is the live model (self-distillation). Both share one copy of the weights."""
    lora_r: int = 16
    """LoRA rank (the paper: 16)."""
    lora_alpha: int = 16
    """LoRA alpha (the paper: 16)."""
    lora_dropout: float = 0.05
    """LoRA dropout (the paper: 0.05); adapters go on q, k, v, o projections."""
    stage1_epochs: int = 0
    """Epochs of Rule-Distill-Enhanced's stage 1 (0: the same as ``epochs``)."""
    template: str = "alpaca"
    """Prompt template: alpaca (the paper's) or chat (the tokenizer's chat template)."""
    max_length: int = 1024
    """Longest allowed sequence; longer examples are an error, never truncated."""
    epochs: int = 1
    """Passes over the training examples."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    select_best: bool = False
    """The paper's model selection: after every epoch compute the mean token CE on the validation
    file (``val_loss`` in metrics.jsonl) and export the epoch with the lowest one, not the last
    (final/, and Enhanced's stage-1 teacher adapter). The CE is the student's, without the rule;
    for inst_tune_rule (and Enhanced's stage 1) it is read with the rule, as that model is used."""
    val_data: str | None = None
    """Validation file for ``select_best`` ({rule, input, output} rows like ``data``; needed with
    ``data``). Default with a packaged task: its ``valid`` split for ``shots`` and ``seed``."""
    micro_batch_size: int = 1
    """Examples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW), cosine decay to 0 after ``warmup_steps``."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    temperature: float = 1.0
    """Distillation temperature T; the KL term is multiplied by T²."""
    beta: float = 10.0
    """Weight of the normalised hidden-state MSE (the paper's default; its script uses 10000)."""
    alpha: float = 0.0
    """Weight of the hard-label CE added to distillation (the paper: 0)."""
    prefix_cache: bool = True
    """Teacher pass: compute the rule prefix's K/V once (per run with a frozen LoRA teacher, per
    optimizer step with full fine-tuning) and read it with shared-prefix attention instead of
    running the prefix for every row (see rdcore.prefix_attention). Off: the plain teacher pass."""
    teacher_cache: bool = True
    """With a frozen teacher (LoRA): keep the teacher's hidden states at the distilled tokens after
    their first computation (shared by all ranks) and skip the teacher pass when a step's examples
    are all cached (from the second epoch on). Not used with full fine-tuning (live teacher)."""
    interleave: bool = True
    """Run teacher and student through each decoder layer in turn (one ZeRO-3 parameter gather
    serves both passes) instead of a whole teacher pass then a whole student pass. Llama-family
    models only; other architectures use the sequential passes (logged)."""
    teacher_cache_gb: float = 8.0
    """CPU memory cap of the teacher-target cache per rank (GiB); beyond it nothing more is cached."""
    precision: str = "fp32"
    """Parameter/compute precision: fp32 (CPU, exact tests) or bf16."""
    seed: int = 0
    """Seed for model init (tiny), data order and dropout."""
    output_dir: str = "runs/default"
    """Where config.json, metrics.jsonl, checkpoints and the final model go."""
    ds_config: str = "ds_configs/zero3_cpu.json"
    """DeepSpeed JSON config; batch sizes and optimizer settings are filled in from this config."""
    save_every: int = 0
    """Save a resumable checkpoint every this many optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 0
    """Keep only this many newest complete checkpoints per stage, deleting older ones (and their
    converted ``.universal`` copies) once a newer one is complete (0: keep all)."""
    stop_at_step: int = 0
    """Save a checkpoint and exit after this optimizer step (0: never); resume later with the same
    flags. For splitting a run across time-limited job allocations (and for testing resumption)."""
    resume: bool = False
    """Continue the run in output_dir from its last complete checkpoint (same flags; on another
    number of ranks, grad_accum/micro_batch_size may change so that the global batch stays the
    same, and the checkpoint is converted to DeepSpeed's universal format)."""
    overwrite: bool = False
    """Delete an existing run in output_dir and start afresh."""
    tensorboard: bool = True
    """Write TensorBoard scalars to output_dir/tensorboard (needs the tensorboard package)."""
    save_model: str = "merged"
    """What output_dir/final holds at the end. merged: the model as a safetensors Hugging Face
    folder (with LoRA the adapter too, in final/adapter). adapter (LoRA only): the adapter and
    the tokenizer, not the model's weights -- a few MB instead of a copy of the model; loading
    final/ (evaluation, --model) merges it into the base model in memory after checking that the
    base model's files are unchanged. off: no final/ (on/off also accepted: on = merged)."""

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r} "
             "(rule_distill_enhanced and LoRA land with the trainer issue)")
        need(self.finetune in FINETUNE_MODES,
             f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        self.task = TASK_ALIASES.get(self.task, self.task)
        need(self.data is not None or self.task in TASKS,
             f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if self.data is None:
            need(self.shots in TASKS[self.task].shots,
                 f"task {self.task!r} has k-shot splits {TASKS[self.task].shots}, not {self.shots}")
        need(self.template in TEMPLATES, f"template must be one of {TEMPLATES}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}")
        if self.method == "rule_distill_enhanced":
            need(self.finetune == "lora",
                 "rule_distill_enhanced needs finetune=lora: with full fine-tuning the stage-1 teacher "
                 "and the restarted student would need two copies of the weights")
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other")
        # on/off and the booleans of configs written before save_model took "adapter"
        given = self.save_model.lower() if isinstance(self.save_model, str) else self.save_model
        self.save_model = {True: "merged", False: "off", "on": "merged", "true": "merged",
                           "false": "off"}.get(given, given)
        need(self.save_model in SAVE_MODEL, f"save_model must be one of {SAVE_MODEL}, got "
             f"{self.save_model!r}")
        need(self.save_model != "adapter" or self.finetune == "lora",
             "save_model=adapter needs finetune=lora (full fine-tuning has no adapter)")
        if self.select_best and self.val_data is None:
            need(self.data is None, "select_best with --data needs --val_data (a validation file "
                 "of the same format)")
            need(self.seed in SEEDS, f"select_best reads the task's validation file for --seed, "
                 f"which exists for seeds {SEEDS}, not {self.seed}: pass one of them or --val_data")
        if self.val_data is not None:
            need(Path(self.val_data).is_file(), f"val_data {self.val_data!r} is not a file")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("max_length", "epochs", "micro_batch_size", "grad_accum", "lora_r",
                     "lora_alpha"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "save_every", "keep_checkpoints", "stop_at_step",
                     "beta", "alpha",
                     "weight_decay", "stage1_epochs"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.teacher_cache_gb >= 0, f"teacher_cache_gb must be >= 0, got {self.teacher_cache_gb}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        ds_path = Path(self.ds_config)
        repo_copy = Path(__file__).resolve().parent.parent / ds_path
        if not ds_path.is_file() and not ds_path.is_absolute() and repo_copy.is_file():
            self.ds_config = str(repo_copy)  # relative paths also resolve against the repository
        need(Path(self.ds_config).is_file(), f"ds_config {self.ds_config!r} is not a file")

    @property
    def distill(self) -> bool:
        return self.method.startswith("rule_distill")

    @property
    def torch_dtype(self) -> Any:
        """The parameter dtype that ``precision`` names."""
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def teacher_mode(self) -> str:
        """How the teacher pass sees the weights (see :class:`rdcore.distill.RuleDistillModule`)."""
        if self.finetune == "full":
            return "live"
        return "teacher" if self.method == "rule_distill_enhanced" else "disabled"

    def global_batch(self, world: int) -> int:
        """Examples per optimizer step over ``world`` ranks: ``world · grad_accum ·
        micro_batch_size``. The data order, the loss normalisation and the schedule depend on it."""
        return world * self.grad_accum * self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (on/off), got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per :class:`TrainConfig` field, plus ``--config``."""
    parser = argparse.ArgumentParser(
        prog="rdcore/train.py",
        description="rdcore: rule distillation under DeepSpeed ZeRO-3. "
        "Run with: deepspeed --num_accelerators 2 rdcore/train.py [--config FILE] [flags]. "
        "Flags override the config file, which overrides the defaults.")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None,
                        help="JSON or YAML file of {field: value} (fields as the flags below)")
    hints = typing.get_type_hints(TrainConfig)
    docs = _field_docs()
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        arg_type: Any
        if kind is bool:
            arg_type = _parse_bool
        elif kind in (int, float):
            arg_type = kind
        else:
            arg_type = str
        parser.add_argument(f"--{f.name}", type=arg_type, default=argparse.SUPPRESS,
                            help=f"{docs.get(f.name, '')} (default: {f.default})")
    return parser


def _field_docs() -> dict[str, str]:
    """The docstring under each field of TrainConfig (for --help)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split()).replace("%", "%%")
    return docs


def load_config_file(path: str) -> dict[str, Any]:
    """Read a JSON or YAML config file; unknown fields are an error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # json/yaml parse errors
        raise ConfigError(f"{path}: cannot parse ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}")
    return data


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    file = args.pop("config", None)
    values = load_config_file(file) if file else {}
    values.update(args)
    try:
        return TrainConfig(**values)
    except TypeError as err:
        raise ConfigError(str(err)) from None

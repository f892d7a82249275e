"""Training configuration: one dataclass, a docstring per field, validated in one place.

Every field is a command-line flag of ``train.py`` (built by :mod:`rdcore.cli`: its first docstring
sentence is the help line, ``Literal`` fields list their choices, the ``group`` metadata puts it in a
``--help`` section). Fields marked ``resumable`` may change when a run is resumed; every other field
must equal the run's. The resolved configuration is written to ``<output_dir>/config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from rdcore import ConfigError
from rdcore.cli import check_choices, option, parse_config
from rdcore.data import SEEDS, TASK_ALIASES, TASKS

Method = Literal["inst_tune_no_rule", "inst_tune_rule", "rule_distill_base", "rule_distill_enhanced"]
Finetune = Literal["lora", "full"]
Precision = Literal["fp32", "bf16"]
SaveModel = Literal["merged", "adapter", "off"]
Template = Literal["alpaca", "chat", "chat_system"]
Task = Literal["math", "jailbreak", "bob", "rulebook"]

METHODS: tuple[str, ...] = get_args(Method)
FINETUNE_MODES: tuple[str, ...] = get_args(Finetune)
PRECISIONS: tuple[str, ...] = get_args(Precision)
SAVE_MODEL: tuple[str, ...] = get_args(SaveModel)

N = TypeVar("N")

MODEL, RESPONSES, METHOD, LOSS, SCHEDULE, VALID, TEACHER, SYSTEM, RUN = (
    "model and data", "teacher-written responses", "method", "loss", "batches and schedule",
    "model selection", "teacher pass", "precision and DeepSpeed", "run folder and checkpoints")
Responses = Literal["reference", "teacher"]


@dataclass(frozen=True)
class LossWeights:
    """The weights of the loss terms, handed to the module as one object: distillation is
    ``KL·T² + β·hidden MSE + α·CE``; instruction tuning is the CE alone."""

    temperature: float = 1.0
    """Distillation temperature T; the KL term is multiplied by T²."""
    beta: float = 10.0
    """Weight of the normalised hidden-state MSE."""
    alpha: float = 0.0
    """Weight of the hard-label CE added to distillation."""

    def total(self, terms: Mapping[str, N], distill: bool) -> N:
        """The loss from its terms (``kl``, ``hidden_mse``, ``ce``; absent ones count 0) — the one
        place the total is defined, for tensors in the forward pass and floats in the metrics."""
        if not distill:
            return terms["ce"]
        total = terms["kl"] + self.beta * terms["hidden_mse"]
        if self.alpha > 0 and "ce" in terms:
            total = total + self.alpha * terms["ce"]
        return total


@dataclass
class TrainConfig:
    """Everything a training run depends on (command-line flags have the same names)."""

    # ---- model and data --------------------------------------------------------------------------
    model: str = option("smollm2-135m", MODEL)
    """Preset (tiny, smollm2-135m) or the path of a local Hugging Face model folder."""
    task: Task = option("math", MODEL)
    """Packaged task: math (a @@@ b = a+b+1; alias arithmetic), jailbreak, bob or rulebook. bob:
    the paper's sentiment rule (alias sentiment); rulebook: the rules of rdcore.rulebook (see
    ``rule``; needs --responses teacher); ignored with ``data``."""
    rule: str = option("", MODEL)
    """The rule book's rule(s) to train on (task rulebook): a name, or several separated by commas
    (one student learns all of them; each row keeps its own rule)."""
    shots: int = option(8, MODEL)
    """k of the packaged k-shot training split."""
    data: str | None = option(None, MODEL)
    """A JSON/JSONL file of {rule, input, output[, context]} rows instead of a packaged task."""
    rule_text: str = option("", MODEL)
    """Replace every row's rule with this text ("canonical": the task's single wording, see
    rdcore.data.canonical_rule; empty: the rules as in the files)."""
    template: Template = option("alpaca", MODEL)
    """Prompt template: alpaca (the paper's), chat (the rule in the user turn) or chat_system. The
    chat templates are the tokenizer's; chat_system puts the rule into the system message."""
    max_length: int = option(1024, MODEL)
    """Longest allowed sequence; a longer example is an error, never truncated."""

    # ---- teacher-written responses ---------------------------------------------------------------
    responses: Responses = option("reference", RESPONSES)
    """What the model trains on: reference (the files' outputs) or teacher (written by the teacher).
    teacher: before training, the model with the rule in its context writes the response to every
    input (for Rule-Distill-Enhanced's stage 2: the stage-1 teacher), stored in the run folder and
    resumed; rows may then omit 'output'. Every method then trains on the text the starting model
    writes with the rule (context distillation)."""
    response_tokens: int = option(64, RESPONSES)
    """Longest teacher-written response, in tokens."""
    response_temperature: float = option(0.0, RESPONSES)
    """Sampling temperature of teacher-written responses (0: greedy; sampled draws follow --seed)."""

    # ---- method ----------------------------------------------------------------------------------
    method: Method = option("rule_distill_enhanced", METHOD)
    """The paper's method: CE without/with the rule, distillation from the starting model, or from a
    teacher tuned with the rule first. inst_tune_no_rule / inst_tune_rule: CE without / with the
    rule; rule_distill_base: distillation from the starting model with the rule in context;
    rule_distill_enhanced: stage 1 = inst_tune_rule on the same examples trains the teacher adapter,
    stage 2 = distillation from it (LoRA only)."""
    finetune: Finetune = option("lora", METHOD)
    """What trains: lora (one frozen base, the student trains its adapter; the teacher is the base
    with a frozen teacher adapter or with adapters disabled) or full (every weight; the teacher is the
    live model). Both share one copy of the weights."""
    lora_r: int = option(16, METHOD)
    """LoRA rank (the paper: 16)."""
    lora_alpha: int = option(16, METHOD)
    """LoRA alpha (the paper: 16)."""
    lora_dropout: float = option(0.05, METHOD)
    """LoRA dropout (the paper: 0.05); adapters go on the attention projections."""
    stage1_epochs: int = option(0, METHOD)
    """Epochs of Rule-Distill-Enhanced's stage 1 (0: the same as ``epochs``)."""

    # ---- loss ------------------------------------------------------------------------------------
    temperature: float = option(1.0, LOSS)
    """Distillation temperature T; the KL term is multiplied by T²."""
    beta: float = option(10.0, LOSS)
    """Weight of the normalised hidden-state MSE (the paper's default; its script uses 10000)."""
    alpha: float = option(0.0, LOSS)
    """Weight of the hard-label CE added to distillation (the paper: 0)."""

    # ---- batches and schedule --------------------------------------------------------------------
    epochs: int = option(1, SCHEDULE)
    """Passes over the training examples."""
    max_steps: int = option(0, SCHEDULE)
    """Stop after this many optimizer steps (0: run all epochs)."""
    micro_batch_size: int = option(1, SCHEDULE, resumable=True)
    """Examples per rank per forward pass (a resume may change it if the global batch stays)."""
    grad_accum: int = option(1, SCHEDULE, resumable=True)
    """Micro-batches accumulated per optimizer step (a resume may change it if the global batch
    stays)."""
    lr: float = option(1e-4, SCHEDULE)
    """Peak learning rate (AdamW), cosine decay to 0 after ``warmup_steps``."""
    warmup_steps: int = option(0, SCHEDULE)
    """Linear warm-up steps."""
    weight_decay: float = option(0.0, SCHEDULE)
    """AdamW weight decay."""
    seed: int = option(0, SCHEDULE)
    """Seed for model init (tiny), data order and dropout."""

    # ---- model selection -------------------------------------------------------------------------
    select_best: bool = option(False, VALID)
    """The paper's model selection: export the epoch with the lowest validation CE, not the last.
    After every epoch the mean token CE on the validation file is computed (``val_loss`` in
    metrics.jsonl) and the best epoch is exported (final/, and Enhanced's stage-1 teacher adapter).
    The CE is the student's, without the rule; for inst_tune_rule (and Enhanced's stage 1) it is
    read with the rule, as that model is used."""
    val_data: str | None = option(None, VALID)
    """Validation file for ``select_best`` ({rule, input, output} rows like ``data``; needed with
    ``data``). Default with a packaged task: its ``valid`` split for ``shots`` and ``seed``."""

    # ---- teacher pass ----------------------------------------------------------------------------
    prefix_cache: bool = option(True, TEACHER, resumable=True)
    """Compute the rule prefix's K/V once and read it with shared-prefix attention. Once per run
    with a frozen LoRA teacher, once per optimizer step with full fine-tuning (see
    rdcore.prefix_attention); off: the plain teacher pass."""
    teacher_cache: bool = option(True, TEACHER, resumable=True)
    """With a frozen teacher (LoRA), keep its outputs at the distilled tokens and skip its pass.
    The hidden states are kept after their first computation (shared by all ranks) and a step's
    teacher pass is skipped when all its examples are cached (from the second epoch on); not used
    with full fine-tuning (live teacher)."""
    teacher_cache_gb: float = option(8.0, TEACHER, resumable=True)
    """CPU memory cap of the teacher-target cache per rank (GiB); beyond it nothing more is cached."""
    interleave: bool = option(True, TEACHER, resumable=True)
    """Run teacher and student through each decoder layer in turn, so one ZeRO-3 gather serves both.
    Instead of a whole teacher pass then a whole student pass; models whose decoder is not a plain
    stack of layers use the sequential passes (logged)."""

    # ---- precision and DeepSpeed -----------------------------------------------------------------
    precision: Precision = option("fp32", SYSTEM)
    """Parameter/compute precision: fp32 (CPU, exact tests) or bf16."""
    ds_config: str = option("ds_configs/zero3_cpu.json", SYSTEM)
    """DeepSpeed JSON config; batch sizes and optimizer settings are filled in from this config."""
    activation_checkpointing: bool = option(False, SYSTEM, resumable=True)
    """Recompute each decoder layer of the student pass in backward instead of keeping its
    activations: the student's activation memory drops to one hidden state per layer and token,
    for about one more student forward per step; the same gradients. The teacher pass (no grad) is
    unchanged."""

    # ---- run folder and checkpoints --------------------------------------------------------------
    output_dir: str = option("runs/default", RUN, resumable=True)
    """Where config.json, metrics.jsonl, checkpoints and the final model go."""
    resume: bool = option(False, RUN, resumable=True)
    """Continue the run in output_dir from its last complete checkpoint, with the same flags. On
    another number of ranks grad_accum/micro_batch_size may change so that the global batch stays
    the same; the checkpoint is then converted to DeepSpeed's universal format."""
    overwrite: bool = option(False, RUN, resumable=True)
    """Delete an existing run in output_dir and start afresh."""
    save_every: int = option(0, RUN, resumable=True)
    """Save a resumable checkpoint every this many optimizer steps (0: only at the end)."""
    keep_checkpoints: int = option(0, RUN, resumable=True)
    """Keep only this many newest complete checkpoints per stage (0: keep all). Older ones (and
    their converted ``.universal`` copies) are deleted once a newer one is complete."""
    stop_at_step: int = option(0, RUN, resumable=True)
    """Save a checkpoint and exit after this optimizer step (0: never); resume later with the same
    flags. For splitting a run across time-limited job allocations (and for testing resumption)."""
    tensorboard: bool = option(True, RUN, resumable=True)
    """Write TensorBoard scalars to output_dir/tensorboard (needs the tensorboard package)."""
    report: int = option(16, RUN, resumable=True)
    """After training, judge this many held-out test inputs before and after, and print the table.
    Rows: the starting model without the rule, the teacher with it, and the trained model
    without it (with --task rulebook: the rule's test file; else --report_data; 0: off)."""
    report_data: str | None = option(None, RUN, resumable=True)
    """A judged test file (rows with judge/expect, as rdcore.evaluate --data reads) for --report."""
    save_model: SaveModel = option("merged", RUN, resumable=True)
    """What output_dir/final holds at the end: merged, adapter or off. merged: the model as a
    safetensors Hugging Face folder (with LoRA the adapter too, in final/adapter). adapter (LoRA
    only): the adapter and the tokenizer, not the model's weights -- a few MB instead of a copy of
    the model; loading final/ (evaluation, --model) merges it into the base model in memory after
    checking that the base model's files are unchanged. off: no final/ (on/off also accepted: on =
    merged)."""

    def __post_init__(self) -> None:
        """Every check of the configuration, in one place (choices from the annotations)."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        self.task = TASK_ALIASES.get(self.task, self.task)
        # on/off and the booleans of configs written before save_model took "adapter"
        given = self.save_model.lower() if isinstance(self.save_model, str) else self.save_model
        self.save_model = {True: "merged", False: "off", "on": "merged", "true": "merged",
                           "false": "off"}.get(given, given)
        check_choices(self, skip=() if self.data is None else ("task",))  # data: task ignored
        if self.task == "rulebook" and self.data is None:
            from rdcore import rulebook

            need(bool(self.rule), "task rulebook needs --rule (one of "
                 f"{', '.join(rulebook.BY_NAME)}, or several separated by commas)")
            for name in self.rules:
                need(name in rulebook.BY_NAME, f"the rule book has no rule {name!r}; its rules: "
                     f"{', '.join(rulebook.BY_NAME)}")
            need(self.shots in rulebook.SHOTS, f"the rule book has k-shot splits "
                 f"{rulebook.SHOTS}, not {self.shots}")
            need(self.responses == "teacher", "the rule book's rows have no reference outputs: "
                 "use --responses teacher")
        elif self.data is None:
            need(self.shots in TASKS[self.task].shots,
                 f"task {self.task!r} has k-shot splits {TASKS[self.task].shots}, not {self.shots}")
        if self.method == "rule_distill_enhanced":
            need(self.finetune == "lora",
                 "rule_distill_enhanced needs finetune=lora: with full fine-tuning the stage-1 teacher "
                 "and the restarted student would need two copies of the weights")
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other")
        need(self.save_model != "adapter" or self.finetune == "lora",
             "save_model=adapter needs finetune=lora (full fine-tuning has no adapter)")
        if self.select_best and self.val_data is None:
            need(self.data is None, "select_best with --data needs --val_data (a validation file "
                 "of the same format)")
            need(self.seed in SEEDS or self.task == "rulebook",
             f"select_best reads the task's validation file for --seed, "
                 f"which exists for seeds {SEEDS}, not {self.seed}: pass one of them or --val_data")
        if self.val_data is not None:
            need(Path(self.val_data).is_file(), f"val_data {self.val_data!r} is not a file")
        if self.report_data is not None:
            need(Path(self.report_data).is_file(), f"report_data {self.report_data!r} is not a "
                 "file")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("max_length", "epochs", "micro_batch_size", "grad_accum", "lora_r",
                     "lora_alpha", "response_tokens"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "save_every", "keep_checkpoints", "stop_at_step",
                     "beta", "alpha", "weight_decay", "stage1_epochs", "teacher_cache_gb",
                     "response_temperature", "report"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        ds_path = Path(self.ds_config)
        repo_copy = Path(__file__).resolve().parent.parent / ds_path
        if not ds_path.is_file() and not ds_path.is_absolute() and repo_copy.is_file():
            self.ds_config = str(repo_copy)  # relative paths also resolve against the repository
        need(Path(self.ds_config).is_file(), f"ds_config {self.ds_config!r} is not a file")

    @property
    def rules(self) -> list[str]:
        """The rule book rules named by ``rule``."""
        return [r.strip() for r in self.rule.split(",") if r.strip()]

    @property
    def distill(self) -> bool:
        return self.method.startswith("rule_distill")

    @property
    def loss(self) -> LossWeights:
        """The loss weights as the module takes them."""
        return LossWeights(temperature=self.temperature, beta=self.beta, alpha=self.alpha)

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

    @classmethod
    def resumable_fields(cls) -> set[str]:
        """Fields that may differ between a run and its resumption (``grad_accum`` and
        ``micro_batch_size`` only as long as the global batch stays the same)."""
        return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


PROG = "rdcore/train.py"
DESCRIPTION = ("rdcore: rule distillation under DeepSpeed ZeRO-3.\n"
               "Run with: deepspeed --num_accelerators 2 rdcore/train.py [--config FILE] [flags].\n"
               "Flags override the config file, which overrides the defaults; booleans take on/off.")


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a command line (defaults < ``--config`` file < flags)."""
    return parse_config(TrainConfig, argv, prog=PROG, description=DESCRIPTION, config_file=True)

"""One model, two roles: the teacher and student passes of a shared-weight model, and the loss.

:class:`RuleDistillModule` wraps a Hugging Face causal LM (optionally with PEFT LoRA adapters). Its
``forward(batch, scale)`` runs, inside *one* top-level call — so DeepSpeed's ZeRO-3 module hooks see
one forward per step and its parameter-prefetch trace stays valid —

1. the teacher pass (rule in context) under ``no_grad`` and in eval mode (no dropout): with the
   frozen teacher adapter (LoRA, Rule-Distill-Enhanced), with the adapters disabled (LoRA,
   Rule-Distill-Base) or with the live weights (full fine-tuning) — or its outputs from the
   :class:`TeacherTargets` cache;
2. the student pass (no rule) with gradients;
3. the loss on the distilled rows only — hidden states gathered at the positions that predict response
   tokens: ``KL·T²`` by the fused lm_head+KL kernel (:func:`rdcore.kernels.fused_linear_kl`, never
   [N, V] logits, with the model's own logit transform) ``+ β·`` normalised hidden MSE
   (:func:`rdcore.kernels.normalized_hidden_mse`) ``+ α·`` CE; the total is
   :meth:`rdcore.config.LossWeights.total`.

The module is steered only through its arguments and methods: ``forward(batch, scale, ce_side=…)``
(``ce_side``: the CE of one side's sequences, for validation) and :meth:`after_optimizer_step`
(a live teacher's rule-prefix K/V is stale after an update). What the teacher did is in
:attr:`RuleDistillModule.work`.

ZeRO-3: the fused kernel needs the whole lm_head weight in forward and its gradient must reach the
partitioned parameter. :class:`FusedKLHead` registers *the same* ``Parameter`` as its own, so
ZeRO-3's module hooks gather it for the kernel's forward and backward like any module's weight.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rdcore import ConfigError
from rdcore.architecture import (
    causal_lm,
    decoder,
    decoder_layers,
    final_norm,
    logit_spec,
    lora_targets,
    model_name,
)
from rdcore.config import LossWeights
from rdcore.data import Batch
from rdcore.kernels import fused_linear_kl, normalized_hidden_mse
from rdcore.prefix_attention import (
    PrefixKV,
    active,
    finish,
    grouped_teacher_inputs,
    install,
    suffix_rows,
    teacher_inputs,
)

log = logging.getLogger(__name__)

STUDENT, TEACHER = "student", "teacher"
TEACHER_MODES = ("live", "disabled", "teacher")


# --------------------------------------------------------------------------------------------------
# Building the model (full or LoRA)
# --------------------------------------------------------------------------------------------------
def lora_config(r: int, alpha: int, dropout: float, targets: tuple[str, ...] | None = None,
                model: nn.Module | None = None) -> Any:
    """PEFT LoRA config on ``targets`` (default: the attention projections found in ``model``, see
    :func:`rdcore.architecture.lora_targets`; the classic q, k, v, o names without a model)."""
    from peft import LoraConfig

    if targets is None:
        targets = lora_targets(model) if model is not None else (
            "q_proj", "k_proj", "v_proj", "o_proj")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      bias="none", task_type="CAUSAL_LM")


def add_lora(model: nn.Module, config: Any, teacher_state: dict[str, torch.Tensor] | None = None
             ) -> nn.Module:
    """Wrap ``model`` with a trainable ``student`` adapter and, if ``teacher_state`` is given (a PEFT
    adapter state dict), a frozen ``teacher`` adapter. Base weights are frozen."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(model, config, adapter_name=STUDENT)
    if teacher_state is not None:
        peft_model.add_adapter(TEACHER, config)
        result = set_peft_model_state_dict(peft_model, teacher_state, adapter_name=TEACHER)
        missing = [k for k in result.missing_keys if f".{TEACHER}." in k]
        if missing:
            raise ConfigError(f"the teacher adapter misses {len(missing)} tensors, e.g. {missing[0]}")
        _activate(peft_model, STUDENT)
    for name, p in peft_model.named_parameters():
        p.requires_grad_(f".{STUDENT}." in name and "lora_" in name)
    return peft_model


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute each decoder layer of the passes *with gradients* in backward instead of keeping
    its activations (transformers' per-layer gradient checkpointing, non-reentrant
    ``torch.utils.checkpoint``, the random state replayed: the same dropout, the same gradients).
    The student keeps one hidden state per layer instead of its attention and MLP intermediates,
    for one more student forward per step. The teacher pass is untouched: it runs in eval mode
    under ``no_grad`` (transformers checkpoints only modules in training mode), so its rule-prefix
    K/V cache is read as before. Returns the number of layers recomputed as the model stands
    (checkpointing on and in training mode: call it after ``model.train()``)."""
    lm = causal_lm(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{model_name(model)} does not support gradient checkpointing "
                          "(--activation_checkpointing)")
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also makes the embedding output require grad (for the reentrant form, whose
    # checkpointed layers pass no gradient to their parameters otherwise); the non-reentrant form
    # does not need it, and it would make the teacher's embedding output a grad-requiring leaf
    if hasattr(lm, "disable_input_require_grads"):
        lm.disable_input_require_grads()
    return recomputed_layers(model)


def recomputed_layers(model: nn.Module) -> int:
    """The decoder layers that are recomputed in backward as the model stands: checkpointing on
    and in training mode (transformers checkpoints only a layer in training mode)."""
    return sum(bool(getattr(m, "gradient_checkpointing", False)) and m.training
               for m in decoder_layers(model))


def _lora_layers(model: nn.Module) -> Iterator[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


def _activate(model: nn.Module, adapter: str) -> None:
    """Switch the active adapter without touching ``requires_grad`` (PEFT's own ``set_adapter`` flips
    it, which would change the optimizer's view of the parameters)."""
    for layer in _lora_layers(model):
        layer._active_adapter = adapter


@contextlib.contextmanager
def teacher_adapter(model: nn.Module, mode: str) -> Iterator[None]:
    """``mode``: "teacher" (the frozen teacher adapter), "disabled" (the base model), "live".
    ``model`` may also be a part of the model (one decoder layer): only its adapters switch."""
    if mode == "live":
        yield
        return
    layers = list(_lora_layers(model))
    if mode == "disabled":
        before = [layer.disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, was in zip(layers, before):
                layer._disable_adapters = was
        return
    for layer in layers:
        layer._active_adapter = TEACHER
    try:
        yield
    finally:
        for layer in layers:
            layer._active_adapter = STUDENT


@contextlib.contextmanager
def eval_mode(part: nn.Module) -> Iterator[None]:
    """``part`` and its submodules in eval mode (no dropout); every module's own ``training`` flag
    is restored afterwards (not ``part.train()``, which would set them all alike)."""
    was = [(m, m.training) for m in part.modules()]
    part.train(False)
    try:
        yield
    finally:
        for m, training in was:
            m.training = training


@contextlib.contextmanager
def teacher_view(part: nn.Module, mode: str) -> Iterator[None]:
    """The teacher's view of ``part`` (a model or one of its modules): no gradients, eval mode (no
    dropout), the teacher's adapter."""
    with eval_mode(part), torch.no_grad(), teacher_adapter(part, mode):
        yield


# --------------------------------------------------------------------------------------------------
# The loss head and the teacher-target cache
# --------------------------------------------------------------------------------------------------
class FusedKLHead(nn.Module):
    """The lm_head weight (and bias) registered as this module's own parameters (the same
    ``Parameter`` objects, not copies), so ZeRO-3 gathers them around the fused kernel in forward
    and backward. ``spec``: the model's logit transform (softcap, scale)."""

    def __init__(self, lm_head: nn.Linear, scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        self.weight = lm_head.weight
        self.bias = lm_head.bias
        self.scale, self.softcap = scale, softcap

    def forward(self, student_NH: torch.Tensor, teacher_NH: torch.Tensor, mask_N: torch.Tensor,
                temperature: float) -> torch.Tensor:
        """Σ over masked rows of T²·KL(teacher ‖ student), teacher logits from the same head."""
        return fused_linear_kl(student_NH, teacher_NH, self.weight, bias=self.bias, mask=mask_N,
                               temperature=temperature, logit_scale=self.scale,
                               softcap=self.softcap, reduction="sum")


def _rows(h_BTH: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:
    return h_BTH.reshape(-1, h_BTH.shape[-1]).index_select(0, index_N)


def _local_any(flag: bool) -> bool:
    return flag


def _local_gather(ids: list[int], rows: list[int], states_LNH: torch.Tensor
                  ) -> list[tuple[list[int], list[int], torch.Tensor]]:
    return [(ids, rows, states_LNH)]


class TeacherTargets:
    """The frozen teacher's outputs at the distilled rows, per example: ``[L + 1, n_i, H]`` (the L
    matched hidden states, then the last hidden state, from which the fused kernel recomputes the
    teacher logits). Held in CPU memory up to ``max_bytes``; beyond it nothing more is added.

    Shared by all ranks through the two communication functions it is handed (the trainer's
    ``engine.any_rank`` and ``engine.all_gather_rows``; by default a single process): a batch is
    taken from the cache only if *every* rank can take its own (ZeRO-3 needs all ranks to run the
    same passes), and what one rank computes is added on all."""

    def __init__(self, max_bytes: int, any_rank: Callable[[bool], bool] = _local_any,
                 all_gather: Callable[..., list[tuple[list[int], list[int], torch.Tensor]]]
                 = _local_gather):
        self.max_bytes = max_bytes
        self.store: dict[int, torch.Tensor] = {}
        self.nbytes = 0
        self.full = False
        self._any_rank, self._all_gather = any_rank, all_gather

    def has_all(self, ids: list[int]) -> bool:
        return all(i in self.store for i in ids)

    def ready(self, ids: list[int]) -> bool:
        """Every rank holds its batch's examples (a collective: call on every rank)."""
        return not self._any_rank(not self.has_all(ids))

    def get(self, ids: list[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([self.store[i] for i in ids], dim=1).to(device=device, dtype=dtype)

    def put(self, ids: list[int], rows: list[int], states_LNH: torch.Tensor) -> None:
        """Add examples ``ids`` whose ``rows[j]`` consecutive rows of ``states_LNH`` are theirs."""
        for i, part in zip(ids, states_LNH.split(rows, dim=1)):
            if i in self.store:
                continue
            size = part.numel() * part.element_size()
            if self.nbytes + size > self.max_bytes:
                self.full = True
                return
            self.store[i] = part.detach().to("cpu", copy=True)
            self.nbytes += size

    def add(self, ids: list[int], rows: list[int], states_LNH: torch.Tensor) -> None:
        """This rank's computed examples, shared with (and from) every rank (a collective)."""
        for shared in self._all_gather(ids, rows, states_LNH):
            self.put(*shared)


@dataclass
class TeacherWork:
    """What the teacher has done so far (this rank)."""

    passes: int = 0
    """Teacher passes run."""
    cached: int = 0
    """Batches whose teacher outputs came from the teacher-target cache."""
    tokens: int = 0
    """Token positions the teacher ran (padding included)."""
    prefix_builds: int = 0
    """Rule-prefix K/V computations."""
    seconds: float = 0.0
    """Wall time of the teacher passes (only with ``time_teacher``; sequential passes only)."""


# --------------------------------------------------------------------------------------------------
# The module DeepSpeed wraps
# --------------------------------------------------------------------------------------------------
class RuleDistillModule(nn.Module):
    """Teacher/student passes and the loss for one micro-batch.

    ``method``: ``inst_tune_no_rule`` / ``inst_tune_rule`` (CE on the student / teacher sequence), or
    distillation (``rule_distill_base`` / ``rule_distill_enhanced``): KL·T² + β·hidden MSE + α·CE.
    ``teacher_mode``: "live" (full fine-tuning: the teacher is the current model), "disabled" (LoRA,
    Base: the model without adapters) or "teacher" (LoRA, Enhanced: the frozen stage-1 adapter).
    ``loss``: the loss weights and temperature. ``rule_prefix_ids``: the shared rule prefix whose
    K/V the teacher computes once (distillation only) — or ``rule_prefixes``, one per rule group
    (several rules in one run; each batch row says its group: ``Batch.prefix_index``);
    ``targets``: a teacher-target cache (a frozen teacher only); ``interleave``: teacher and
    student through each decoder layer in turn (used only if it reproduces the sequential passes
    on this model, see :func:`interleaves_exactly`);
    ``time_teacher``: record the teacher passes' wall time in :attr:`work` (synchronises CUDA).
    """

    def __init__(self, model: nn.Module, method: str, teacher_mode: str = "live", *,
                 loss: LossWeights | None = None, rule_prefix_ids: list[int] | None = None,
                 rule_prefixes: list[list[int]] | None = None,
                 targets: TeacherTargets | None = None, interleave: bool = False,
                 time_teacher: bool = False):
        super().__init__()
        if teacher_mode not in TEACHER_MODES:
            raise ConfigError(f"teacher_mode must be one of {TEACHER_MODES}, got {teacher_mode!r}")
        self.model = model
        self.method = method
        self.distill = method.startswith("rule_distill")
        self.teacher_mode = teacher_mode
        self.loss = loss or LossWeights()
        spec = logit_spec(model)
        self.kl_head = FusedKLHead(causal_lm(model).get_output_embeddings(), spec.scale,
                                   spec.softcap)
        self.time_teacher = time_teacher
        self.work = TeacherWork()
        # Rule-prefix K/V caches (distillation only), one per rule group. Valid for the whole run
        # when the teacher is frozen; rebuilt after every optimizer step when it is the live model.
        prefixes = rule_prefixes if rule_prefixes is not None else (
            [rule_prefix_ids] if rule_prefix_ids else [])
        self.prefix_caches: list[PrefixKV] = []
        if prefixes and self.distill:
            install(model)
            for g, ids in enumerate(prefixes):
                self.register_buffer(f"prefix_ids_{g}", torch.tensor(ids, dtype=torch.long),
                                     persistent=False)
                self.prefix_caches.append(PrefixKV(len(ids)))
        self.prefix: PrefixKV | None = self.prefix_caches[0] if self.prefix_caches else None
        """The single rule prefix's cache (the first group's with several)."""
        if targets is not None and teacher_mode == "live":
            raise ConfigError("the teacher-target cache needs a frozen teacher (LoRA); with full "
                              "fine-tuning the teacher is the live model")
        self.targets = targets if self.distill else None
        self.interleave = bool(interleave and self.distill)
        if self.interleave and not interleaves_exactly(model, teacher_mode):
            log.warning("%s: the layer-interleaved passes do not reproduce this model's decoder; "
                        "using sequential teacher and student passes", model_name(model))
            self.interleave = False

    # ---- the interface -------------------------------------------------------------------------
    def forward(self, batch: Batch, scale: float, ce_side: str | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(loss, stats)``: ``loss = scale · Σ_n w_n · ℓ_n`` (w_n: ``batch.row_weight``)
        and the weighted sums of each term (detached). ``scale`` carries the global-batch
        normalisation. ``ce_side`` (``student``/``teacher``): the CE of that side's sequences
        whatever the method (validation)."""
        if ce_side is not None or not self.distill:
            side = ce_side or ("teacher" if self.method == "inst_tune_rule" else "student")
            h_NH = _rows(self._decoder(batch, side).last_hidden_state,
                         batch.side(side).distill_index)
            ce = self._ce(h_NH, batch.target_ids, batch.row_weight)
            return ce * scale, {"ce": ce.detach()}
        t_states, t_last, s_states, s_last = self._passes(batch)
        mask_N = batch.row_weight > 0
        terms = {"kl": self.kl_head(s_last, t_last, mask_N, self.loss.temperature),
                 "hidden_mse": normalized_hidden_mse(s_states, t_states, mask=mask_N) * mask_N.sum()}
        if self.loss.alpha > 0:
            terms["ce"] = self._ce(s_last, batch.target_ids, batch.row_weight)
        return self.loss.total(terms, distill=True) * scale, {k: v.detach() for k, v in terms.items()}

    def after_optimizer_step(self) -> None:
        """The weights changed: a live teacher's rule-prefix K/V must be computed again."""
        if self.teacher_mode == "live":
            for cache in self.prefix_caches:
                cache.invalidate()

    def total_loss(self, terms: dict[str, float]) -> float:
        """The loss of this method from its terms (see :meth:`LossWeights.total`)."""
        return self.loss.total(terms, distill=self.distill)

    # ---- pieces --------------------------------------------------------------------------------
    def _decoder(self, batch: Batch, side: str, hidden: bool = False) -> Any:
        inputs = batch.side(side)
        return decoder(self.model)(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids, output_hidden_states=hidden, use_cache=False)

    def _ce(self, h_NH: torch.Tensor, targets_N: torch.Tensor, row_w_N: torch.Tensor) -> torch.Tensor:
        """Σ_n w_n CE_n from the model's own logits at the distilled rows only ([N, V])."""
        spec = logit_spec(self.model)
        logits_NV = causal_lm(self.model).get_output_embeddings()(h_NH)
        logits_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))
        if spec.scale != 1.0:
            logits_NV = logits_NV * spec.scale
        if spec.softcap is not None:
            logits_NV = torch.tanh(logits_NV / spec.softcap) * spec.softcap
        ce_N = nn.functional.cross_entropy(logits_NV, targets_N, reduction="none")
        return (ce_N * row_w_N).sum()

    def _passes(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor,
                                             list[torch.Tensor], torch.Tensor]:
        """Teacher (matched states, last state) and student (matched states, last state) at the
        distilled rows; the teacher from the cache, interleaved with the student, or on its own."""
        ids = batch.example_ids
        s_idx = batch.student_distill_index
        cached = self.targets is not None and self.targets.ready(ids)  # the same on every rank
        if cached:
            states = self.targets.get(ids, s_idx.device, self.kl_head.weight.dtype)
            self.work.cached += 1
            t_states, t_last = list(states[:-1].unbind(0)), states[-1]
            s_hidden = self._decoder(batch, "student", hidden=True).hidden_states
        elif self.interleave:
            t_states, t_last, s_hidden = self._interleaved(batch)
        else:
            t_states, t_last = self._teacher(batch)
            s_hidden = self._decoder(batch, "student", hidden=True).hidden_states
        if self.targets is not None and not cached:
            self.targets.add(ids, batch.rows_per_example, torch.stack([*t_states, t_last]))
        # hidden_states = (embeddings, layer 1 … layer L-1 outputs, final-norm output): the paper
        # matches all but the last.
        s_states = [_rows(h, s_idx) for h in s_hidden[:-1]]
        return t_states, t_last, s_states, _rows(s_hidden[-1], s_idx)

    def _teacher_input(self, batch: Batch) -> tuple[Any, ...]:
        """(input_ids, attention_mask, position_ids, prefix state or None, distill index, prefix
        passes to run first; see :func:`rdcore.prefix_attention.teacher_inputs`)."""
        self.work.passes += 1
        if not self.prefix_caches:
            t = batch.side("teacher")
            self.work.tokens += t.input_ids.numel()
            return t.input_ids, t.attention_mask, t.position_ids, None, t.distill_index, []
        suffix = batch.side("teacher_suffix")
        if len(self.prefix_caches) > 1:  # several rules: prefix passes, then each row its own
            groups = batch.prefix_index or [0] * suffix.input_ids.shape[0]
            ids, pos, state, passes = grouped_teacher_inputs(
                self.prefix_caches, [getattr(self, f"prefix_ids_{g}")
                                     for g in range(len(self.prefix_caches))],
                groups, suffix.input_ids, suffix.attention_mask, suffix.position_ids)
            self.work.prefix_builds += len(passes)
            self.work.tokens += suffix.input_ids.numel() + sum(p[0].numel() for p in passes)
            return ids, None, pos, state, suffix.distill_index, passes
        tokens = suffix.input_ids.numel()
        if not self.prefix.valid:
            self.work.prefix_builds += 1
            tokens += self.prefix.length
        self.work.tokens += tokens
        # a live teacher rebuilds the cache every step: packed, one decoder call (the same module
        # calls every micro-batch); a frozen one builds it once, with a prefix-only call first
        ids, pos, state, prefix = teacher_inputs(
            self.prefix, self.prefix_ids_0, suffix.input_ids, suffix.attention_mask,
            suffix.position_ids, packed=self.teacher_mode == "live")
        return ids, None, pos, state, suffix.distill_index, [prefix] if prefix else []

    def _run_prefix(self, passes: list[tuple[Any, ...]]) -> None:
        """Rule prefixes alone (a frozen teacher's once per run): each fills its K/V cache."""
        for ids, pos, state in passes:
            with teacher_view(self.model, self.teacher_mode), active(state):
                decoder(self.model)(input_ids=ids, position_ids=pos, use_cache=False)
            finish(state, causal_lm(self.model).config.num_hidden_layers)

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        if not self.time_teacher:
            yield
            return
        sync = torch.cuda.synchronize if self.kl_head.weight.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        self.work.seconds += time.perf_counter() - t0

    def _teacher(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher's hidden states at the distilled rows: (L matched states, last state)."""
        with self._timed(), torch.no_grad():
            ids, attn, pos, state, t_idx, prefix = self._teacher_input(batch)
            self._run_prefix(prefix)
            with teacher_view(self.model, self.teacher_mode), active(state):
                out = decoder(self.model)(input_ids=ids, attention_mask=attn, position_ids=pos,
                                          output_hidden_states=True, use_cache=False)
            finish(state, causal_lm(self.model).config.num_hidden_layers)
            rows = (lambda h: suffix_rows(state, h)) if state is not None else (lambda h: h)
            t_states = [_rows(rows(h), t_idx) for h in out.hidden_states[:-1]]
            return t_states, _rows(rows(out.hidden_states[-1]), t_idx)

    def _interleaved(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor,
                                                  list[torch.Tensor]]:
        """Teacher and student through each decoder layer in turn: the layer's teacher call (no
        grad, eval, teacher adapter), then its student call. Under ZeRO-3 the layer's parameters,
        gathered for the first call, are still resident for the second (the reuse distance), so
        the teacher adds almost no all-gather volume. See :func:`interleaved_passes`."""
        t_ids, t_attn, t_pos, state, t_idx, prefix = self._teacher_input(batch)
        self._run_prefix(prefix)
        s = batch.side("student")
        t_hidden, t_last, s_out = interleaved_passes(
            self.model, self.teacher_mode, state,
            dict(input_ids=t_ids, attention_mask=t_attn, position_ids=t_pos),
            dict(input_ids=s.input_ids, attention_mask=s.attention_mask,
                 position_ids=s.position_ids))
        finish(state, causal_lm(self.model).config.num_hidden_layers)
        rows = (lambda h: suffix_rows(state, h)) if state is not None else (lambda h: h)
        t_states = [_rows(rows(h), t_idx) for h in t_hidden[:-1]]
        return t_states, _rows(rows(t_last), t_idx), s_out.hidden_states


# --------------------------------------------------------------------------------------------------
# Layer-interleaved teacher and student passes, for any decoder that is a stack of layers
# --------------------------------------------------------------------------------------------------
class _Recorder(nn.Module):
    """Stands in for a decoder layer during the teacher's set-up call: notes the arguments the
    decoder hands the layer (its masks, position embeddings …) and returns the input unchanged."""

    def __init__(self, layer: nn.Module, sink: list[tuple[torch.Tensor, tuple[Any, ...],
                                                           dict[str, Any]]]):
        super().__init__()
        self.sink = sink
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink.append((hidden_states, args, kwargs))
        return hidden_states


@contextlib.contextmanager
def _swapped_layers(dec: nn.Module, layers: nn.ModuleList, stand_ins: list[nn.Module]
                    ) -> Iterator[None]:
    name = next(n for n, m in dec.named_children() if m is layers)
    dec._modules[name] = nn.ModuleList(stand_ins)
    try:
        yield
    finally:
        dec._modules[name] = layers


def interleaved_passes(model: nn.Module, teacher_mode: str, state: Any,
                       teacher: dict[str, torch.Tensor | None], student: dict[str, torch.Tensor]
                       ) -> tuple[list[torch.Tensor], torch.Tensor, Any]:
    """Run the teacher (no grad, eval mode, its adapter, the prefix pass ``state``) and the student
    through each decoder layer in turn, letting the model's own decoder prepare both.

    1. The teacher's set-up: the decoder runs on the teacher inputs with its layers replaced by
       recorders, so its own code computes the embeddings and every layer's arguments (masks per
       layer type, position embeddings, …) — whatever the family does before its layers.
    2. The student pass: the decoder runs on the student inputs; each layer first runs the teacher's
       hidden state with the recorded arguments, then the student's.
    3. The teacher's final norm.

    Returns the teacher's hidden states (embedding output, every layer's output), its final-norm
    output, and the student decoder's output (``hidden_states`` included). Valid for decoders that
    do nothing between layers — :func:`interleaves_exactly` checks that on the model."""
    dec, layers = decoder(model), decoder_layers(model)
    norm = final_norm(model)
    if norm is None:
        raise ConfigError(f"{model_name(model)}: no final norm found for the interleaved passes")
    n = causal_lm(model).config.num_hidden_layers
    recorded: list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]] = []
    with teacher_view(model, teacher_mode), active(state), \
            _swapped_layers(dec, layers, [_Recorder(layer, recorded) for layer in layers]):
        dec(**teacher, use_cache=False, output_hidden_states=False)
    if len(recorded) != n:
        raise ConfigError(f"{model_name(model)}: its decoder called {len(recorded)} of {n} layers")
    t_hidden = [recorded[0][0]]  # the recorders pass the embedding output through unchanged
    originals = []
    for i, layer in enumerate(layers[:n]):
        _, args, kwargs = recorded[i]

        def forward(hidden_states: torch.Tensor, *s_args: Any, _layer: nn.Module = layer,
                    _orig: Callable[..., Any] = layer.forward, _args: tuple[Any, ...] = args,
                    _kwargs: dict[str, Any] = kwargs, **s_kwargs: Any) -> Any:
            with teacher_view(_layer, teacher_mode), active(state):
                t_hidden.append(_orig(t_hidden[-1], *_args, **_kwargs))
            return _orig(hidden_states, *s_args, **s_kwargs)

        originals.append(layer)
        layer.forward = forward
    try:
        s_out = dec(**student, use_cache=False, output_hidden_states=True)
    finally:
        for layer in originals:
            del layer.forward
    with teacher_view(norm, teacher_mode):
        t_last = norm(t_hidden[-1])
    return t_hidden, t_last, s_out


@torch.no_grad()
def interleaves_exactly(model: nn.Module, teacher_mode: str, tokens: int = 10) -> bool:
    """Whether :func:`interleaved_passes` reproduces the sequential teacher and student passes on
    this model: checked on a probe (random token ids, eval mode, a left-padded teacher batch of two
    rows and an unpadded student row), up to rounding. False for a decoder that does more than
    calling its layers in turn, or whose layers cannot be found."""
    try:
        decoder_layers(model)
        if final_norm(model) is None:
            return False
    except Exception:
        return False
    lm = causal_lm(model)
    device = lm.get_output_embeddings().weight.device
    g = torch.Generator().manual_seed(0)
    vocab = lm.config.vocab_size
    t_ids = torch.randint(3, vocab, (2, tokens), generator=g).to(device)
    t_mask = torch.ones_like(t_ids)
    t_mask[1, -3:] = 0  # padding (right: as collate pads)
    t_pos = (t_mask.cumsum(-1) - 1).clamp_min(0)
    s_ids = torch.randint(3, vocab, (1, tokens - 2), generator=g).to(device)
    teacher = dict(input_ids=t_ids, attention_mask=t_mask, position_ids=t_pos)
    student = dict(input_ids=s_ids, attention_mask=torch.ones_like(s_ids),
                   position_ids=torch.arange(tokens - 2, device=device)[None])
    dec = decoder(model)
    with eval_mode(model):
        try:
            t_hidden, t_last, s_out = interleaved_passes(model, teacher_mode, None, teacher, student)
        except Exception as err:
            log.info("interleaved passes fail on %s: %s", model_name(model), err)
            return False
        with teacher_adapter(model, teacher_mode):
            want_t = dec(**teacher, output_hidden_states=True, use_cache=False).hidden_states
        want_s = dec(**student, output_hidden_states=True, use_cache=False).hidden_states
    real = t_mask.bool()
    got_t = [*t_hidden[:-1], t_last]

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        a, b = a.float(), b.float()
        tol = 1e-4 if a.dtype == torch.float32 and lm.dtype != torch.float32 else 1e-5
        if lm.dtype in (torch.bfloat16, torch.float16):
            tol = 2e-2
        return bool(((a - b).norm() <= tol * b.norm().clamp_min(1e-6)).item())

    return (len(got_t) == len(want_t) and len(s_out.hidden_states) == len(want_s)
            and all(close(a[real], b[real]) for a, b in zip(got_t, want_t))
            and all(close(a, b) for a, b in zip(s_out.hidden_states, want_s)))

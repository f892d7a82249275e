"""One model, two roles: the teacher and student passes of a shared-weight model, and the loss.

:class:`RuleDistillModule` wraps a Hugging Face causal LM (optionally with PEFT LoRA adapters). Its
``forward`` runs, inside *one* top-level call — so DeepSpeed's ZeRO-3 module hooks see one forward per
step and its parameter-prefetch trace stays valid —

1. the teacher pass (rule in context) under ``no_grad`` and in eval mode (no dropout), through the
   inner decoder module: with the frozen teacher adapter (LoRA, Rule-Distill-Enhanced), with the
   adapters disabled (LoRA, Rule-Distill-Base) or with the live weights (full fine-tuning);
2. the student pass (no rule) with gradients;
3. the loss on the distilled rows only — hidden states gathered at the positions that predict response
   tokens: ``KL·T²`` by the fused lm_head+KL kernel (:func:`kernels.fused_linear_kl`, never [N, V]
   logits) ``+ β·`` normalised hidden MSE (:func:`kernels.normalized_hidden_mse`) ``+ α·`` CE.

ZeRO-3: the fused kernel needs the whole lm_head weight in forward and its gradient must reach the
partitioned parameter. :class:`FusedKLHead` registers *the same* ``Parameter`` as its own, so
ZeRO-3's module hooks gather it for the kernel's forward and backward like any module's weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kernels import fused_linear_kl, normalized_hidden_mse
from rdcore import ConfigError
from rdcore.losses import ce_rows
from rdcore.prefix_attention import (
    PrefixKV,
    active,
    finish,
    install,
    suffix_rows,
    teacher_inputs,
)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
STUDENT, TEACHER = "student", "teacher"


# --------------------------------------------------------------------------------------------------
# Building the model (full or LoRA)
# --------------------------------------------------------------------------------------------------
def lora_config(r: int, alpha: int, dropout: float, targets: tuple[str, ...] = LORA_TARGETS) -> Any:
    from peft import LoraConfig

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


def causal_lm(model: nn.Module) -> nn.Module:
    """The underlying ``…ForCausalLM`` of a plain or PEFT-wrapped model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --------------------------------------------------------------------------------------------------
# The module DeepSpeed wraps
# --------------------------------------------------------------------------------------------------
class FusedKLHead(nn.Module):
    """The lm_head weight registered as this module's own parameter (the same ``Parameter`` object,
    not a copy), so ZeRO-3 gathers it around the fused kernel in forward and backward."""

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        if getattr(lm_head, "bias", None) is not None:
            raise ConfigError("lm_head with a bias is not supported by the fused KL kernel")
        self.weight = lm_head.weight

    def forward(self, student_NH: torch.Tensor, teacher_NH: torch.Tensor, mask_N: torch.Tensor,
                temperature: float) -> torch.Tensor:
        """Σ over masked rows of T²·KL(teacher ‖ student), teacher logits from the same weight."""
        return fused_linear_kl(student_NH, teacher_NH, self.weight, mask=mask_N,
                               temperature=temperature, reduction="sum")


def _rows(h_BTH: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:
    return h_BTH.reshape(-1, h_BTH.shape[-1]).index_select(0, index_N)


class TeacherTargets:
    """The frozen teacher's outputs at the distilled rows, per example: ``[L + 1, n_i, H]`` (the L
    matched hidden states, then the last hidden state, from which the fused kernel recomputes the
    teacher logits). Held in CPU memory up to ``max_bytes``; beyond it nothing more is added."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.store: dict[int, torch.Tensor] = {}
        self.nbytes = 0
        self.full = False

    def has_all(self, ids: list[int]) -> bool:
        return all(i in self.store for i in ids)

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


class RuleDistillModule(nn.Module):
    """Teacher/student passes and the loss for one micro-batch.

    ``method``: ``inst_tune_no_rule`` / ``inst_tune_rule`` (CE on the student / teacher sequence), or
    distillation (``rule_distill_base`` / ``rule_distill_enhanced``): KL·T² + β·hidden MSE + α·CE.
    ``teacher_mode``: "live" (full fine-tuning: the teacher is the current model), "disabled" (LoRA,
    Base: the model without adapters) or "teacher" (LoRA, Enhanced: the frozen stage-1 adapter).
    """

    def __init__(self, model: nn.Module, method: str, teacher_mode: str = "live",
                 temperature: float = 1.0, beta: float = 10.0, alpha: float = 0.0,
                 rule_prefix_ids: list[int] | None = None, teacher_cache_bytes: int = 0,
                 interleave: bool = False):
        super().__init__()
        self.model = model
        self.method = method
        self.teacher_mode = teacher_mode
        self.temperature = temperature
        self.beta = beta
        self.alpha = alpha
        self.kl_head = FusedKLHead(causal_lm(model).lm_head)
        self.interleave = interleave and method.startswith("rule_distill")
        if self.interleave:
            check_interleavable(model)
        # Rule-prefix K/V cache (distillation only). Valid for the whole run when the teacher is
        # frozen; the trainer invalidates it after every optimizer step when it is the live model.
        self.prefix: PrefixKV | None = None
        if rule_prefix_ids and method.startswith("rule_distill"):
            install(model)
            self.register_buffer("prefix_ids", torch.tensor(rule_prefix_ids, dtype=torch.long),
                                 persistent=False)
            self.prefix = PrefixKV(len(rule_prefix_ids))
        # Teacher-target cache: only for a frozen teacher (its outputs never change).
        self.targets: TeacherTargets | None = None
        if teacher_cache_bytes > 0 and method.startswith("rule_distill"):
            if teacher_mode == "live":
                raise ConfigError("the teacher-target cache needs a frozen teacher (LoRA); with full "
                                  "fine-tuning the teacher is the live model")
            self.targets = TeacherTargets(teacher_cache_bytes)
        self.teacher_from_cache = False
        """Set by the trainer (the same on every rank): take this batch's teacher from the cache."""
        self.last_targets: tuple[list[int], list[int], torch.Tensor] | None = None
        """(example ids, rows per example, [L+1, N, H]) of the last computed teacher pass."""
        self.ce_side: str | None = None
        """Set by the trainer for validation: ``forward`` returns the CE on this side's sequence
        (``student``: without the rule, ``teacher``: with it) whatever the method."""
        self.counters = {"teacher_passes": 0, "teacher_cached": 0, "teacher_tokens": 0,
                         "prefix_builds": 0}
        """Work done by the teacher: passes run / taken from the cache, token positions it ran
        (padding included), rule-prefix K/V computations."""

    def _decoder(self, batch: dict[str, torch.Tensor], side: str, hidden: bool) -> Any:
        return causal_lm(self.model).model(
            input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"],
            position_ids=batch[f"{side}_position_ids"], output_hidden_states=hidden, use_cache=False)

    def _ce(self, h_NH: torch.Tensor, targets_N: torch.Tensor, row_w_N: torch.Tensor) -> torch.Tensor:
        logits_NV = causal_lm(self.model).lm_head(h_NH)  # [N, V] for the distilled rows only
        return (ce_rows(logits_NV, targets_N) * row_w_N).sum()

    def forward(self, batch: dict[str, torch.Tensor], row_weight_N: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(loss, stats)``: ``loss = scale · Σ_n w_n · ℓ_n`` (w_n ∈ {0, 1}) and the weighted
        sums of each term (detached). ``scale`` carries the global-batch normalisation."""
        stats: dict[str, torch.Tensor] = {}
        if self.ce_side is not None or not self.method.startswith("rule_distill"):
            side = self.ce_side or ("teacher" if self.method == "inst_tune_rule" else "student")
            out = self._decoder(batch, side, hidden=False)
            ce = self._ce(_rows(out.last_hidden_state, batch[f"{side}_distill_index"]),
                          batch["target_ids"], row_weight_N)
            stats["ce"] = ce.detach()
            return ce * scale, stats

        s_idx = batch["student_distill_index"]
        if self.interleave and not self.teacher_from_cache:
            t_states, t_last, s_hidden, s_last_BTH = self._interleaved(batch)
        else:
            t_states, t_last = self._teacher(batch)
            s_out = self._decoder(batch, "student", hidden=True)
            s_hidden, s_last_BTH = s_out.hidden_states, s_out.last_hidden_state
        # hidden_states = (embeddings, layer 1 … layer L-1 outputs, final-norm output): the paper
        # matches all but the last.
        s_states = [_rows(h, s_idx) for h in s_hidden[:-1]]
        s_last = _rows(s_last_BTH, s_idx)

        mask_N = row_weight_N > 0
        kl = self.kl_head(s_last, t_last, mask_N, self.temperature)
        mse = normalized_hidden_mse(s_states, t_states, mask=mask_N) * mask_N.sum()
        loss = kl + self.beta * mse
        stats["kl"], stats["hidden_mse"] = kl.detach(), mse.detach()
        if self.alpha > 0:
            ce = self._ce(s_last, batch["target_ids"], row_weight_N)
            loss = loss + self.alpha * ce
            stats["ce"] = ce.detach()
        return loss * scale, stats

    def _teacher_input(self, batch: dict[str, torch.Tensor]) -> tuple[Any, ...]:
        """(input_ids, attention_mask, position_ids, prefix state or None, distill index, prefix
        pass to run first or None; see :func:`rdcore.prefix_attention.teacher_inputs`)."""
        self.counters["teacher_passes"] += 1
        if self.prefix is None:
            self.counters["teacher_tokens"] += batch["teacher_input_ids"].numel()
            return (batch["teacher_input_ids"], batch["teacher_attention_mask"],
                    batch["teacher_position_ids"], None, batch["teacher_distill_index"], None)
        tokens = batch["teacher_suffix_input_ids"].numel()
        if not self.prefix.valid:
            self.counters["prefix_builds"] += 1
            tokens += self.prefix.length
        self.counters["teacher_tokens"] += tokens
        # a live teacher rebuilds the cache every step: packed, one decoder call (the same module
        # calls every micro-batch); a frozen one builds it once, with a prefix-only call first
        ids, pos, state, prefix = teacher_inputs(
            self.prefix, self.prefix_ids, batch["teacher_suffix_input_ids"],
            batch["teacher_suffix_attention_mask"], batch["teacher_suffix_position_ids"],
            packed=self.teacher_mode == "live")
        return ids, None, pos, state, batch["teacher_suffix_distill_index"], prefix

    def _remember(self, batch: dict[str, torch.Tensor], t_states: list[torch.Tensor],
                  t_last: torch.Tensor) -> None:
        self.last_targets = None
        if self.targets is not None and "example_ids" in batch:
            ids, rows = batch["example_ids"].tolist(), batch["rows_per_example"].tolist()
            self.last_targets = (ids, rows, torch.stack([*t_states, t_last]))
            self.targets.put(*self.last_targets)

    def _interleaved(self, batch: dict[str, torch.Tensor]) -> tuple[Any, ...]:
        """Teacher and student through each decoder layer in turn: the layer's teacher call (no
        grad, eval, teacher adapter), then its student call. Under ZeRO-3 the layer's parameters,
        gathered for the first call, are still resident for the second (the reuse distance), so
        the teacher adds almost no all-gather volume. Returns (teacher matched states, teacher last
        state) at the distilled rows and the student's hidden states [B, T, H] (as HF's
        ``hidden_states``) and last state."""
        from transformers.masking_utils import create_causal_mask

        dec = causal_lm(self.model).model
        t_ids, t_attn, t_pos, state, t_idx, prefix = self._teacher_input(batch)
        s_ids, s_attn = batch["student_input_ids"], batch["student_attention_mask"]
        s_pos = batch["student_position_ids"]
        mode = self.teacher_mode

        p_h = p_pe = None
        if prefix is not None:  # the prefix alone, as a third stream through the same layers
            p_ids, p_pos, p_state = prefix
            with teacher_view(dec.embed_tokens, mode):
                p_h = dec.embed_tokens(p_ids)
                p_pe = dec.rotary_emb(p_h, position_ids=p_pos)
        with teacher_view(dec.embed_tokens, mode):
            t_h = dec.embed_tokens(t_ids)
        s_h = dec.embed_tokens(s_ids)
        with torch.no_grad(), active(state):
            t_mask = create_causal_mask(config=dec.config, inputs_embeds=t_h, attention_mask=t_attn,
                                        past_key_values=None, position_ids=t_pos)
            t_pe = dec.rotary_emb(t_h, position_ids=t_pos)
        s_mask = create_causal_mask(config=dec.config, inputs_embeds=s_h, attention_mask=s_attn,
                                    past_key_values=None, position_ids=s_pos)
        s_pe = dec.rotary_emb(s_h, position_ids=s_pos)
        t_hidden, s_hidden = [t_h], [s_h]
        for layer in dec.layers[: dec.config.num_hidden_layers]:
            if p_h is not None:
                with teacher_view(layer, mode), active(p_state):
                    p_h = layer(p_h, attention_mask=None, position_embeddings=p_pe,
                                position_ids=p_pos)
            with teacher_view(layer, mode), active(state):
                t_h = layer(t_h, attention_mask=t_mask, position_embeddings=t_pe, position_ids=t_pos)
            s_h = layer(s_h, attention_mask=s_mask, position_embeddings=s_pe, position_ids=s_pos)
            t_hidden.append(t_h)
            s_hidden.append(s_h)
        if prefix is not None:
            finish(p_state, dec.config.num_hidden_layers)
        finish(state, dec.config.num_hidden_layers)
        with teacher_view(dec.norm, mode):
            t_last = dec.norm(t_h)
        rows = (lambda h: suffix_rows(state, h)) if state is not None else (lambda h: h)
        t_states = [_rows(rows(h), t_idx) for h in t_hidden[:-1]]
        t_last = _rows(rows(t_last), t_idx)
        s_last = dec.norm(s_h)
        self._remember(batch, t_states, t_last)
        return t_states, t_last, [*s_hidden[:-1], s_last], s_last

    @torch.no_grad()
    def _teacher(self, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher's hidden states at the distilled rows: (L matched states, last state)."""
        ids = batch["example_ids"].tolist() if "example_ids" in batch else None
        if self.teacher_from_cache:
            if self.targets is None or ids is None or not self.targets.has_all(ids):
                raise RuntimeError("teacher_from_cache set but the batch's targets are not cached")
            dev, dtype = batch["teacher_input_ids"].device, self.kl_head.weight.dtype
            states = self.targets.get(ids, dev, dtype)
            self.last_targets = None
            self.counters["teacher_cached"] += 1
            return list(states[:-1].unbind(0)), states[-1]
        ids, attn, pos, state, t_idx, prefix = self._teacher_input(batch)
        dec = causal_lm(self.model).model
        if prefix is not None:  # build the rule-prefix cache: the prefix alone, once
            with teacher_view(self.model, self.teacher_mode), active(prefix[2]):
                dec(input_ids=prefix[0], position_ids=prefix[1], use_cache=False)
            finish(prefix[2], dec.config.num_hidden_layers)
        with teacher_view(self.model, self.teacher_mode), active(state):
            out = dec(input_ids=ids, attention_mask=attn, position_ids=pos,
                      output_hidden_states=True, use_cache=False)
        finish(state, dec.config.num_hidden_layers)
        rows = (lambda h: suffix_rows(state, h)) if state is not None else (lambda h: h)
        t_states = [_rows(rows(h), t_idx) for h in out.hidden_states[:-1]]
        t_last = _rows(rows(out.last_hidden_state), t_idx)
        self._remember(batch, t_states, t_last)
        return t_states, t_last


def interleavable(model: nn.Module) -> bool:
    """The layer-interleaved forward re-implements the Llama decoder loop (embed, rotary, causal
    mask, layers, norm); other architectures (e.g. Gemma's scaled embeddings, sliding windows)
    would compute something else, so only Llama models qualify."""
    lm = causal_lm(model)
    return getattr(lm.config, "model_type", None) == "llama" and not getattr(
        lm.config, "sliding_window", None)


def check_interleavable(model: nn.Module) -> None:
    if not interleavable(model):
        kind = getattr(causal_lm(model).config, "model_type", None)
        raise ConfigError(f"the interleaved teacher/student forward needs a Llama-architecture "
                          f"model (this one: {kind!r}); use --interleave off")

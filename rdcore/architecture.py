"""What rdcore needs to know about a causal LM, found from the model rather than from a list of names.

transformers' decoder families share one layout — ``XxxForCausalLM`` with a decoder (``.model``: an
embedding, a stack of decoder layers, a final norm) and an ``lm_head`` — and differ in details that
change the loss if ignored: a logit transform after the head (Gemma 2/3's final-logit softcap,
Cohere's ``logit_scale``, Granite's ``logits_scaling``), a head bias, the names of the attention
projections (Phi-3's fused ``qkv_proj``), sliding windows and attention softcapping (handled by
:mod:`rdcore.prefix_attention`). :func:`inspect_model` reads those from the model and then *checks*
them on a short probe input against the model's own forward pass: the fused KL must reproduce the
model's logits, and ``hidden_states`` must be (embedding output, layer 1 … L−1 outputs, final-norm
output) — a family that breaks either stops at start-up with an error naming the model and what
differs, never with a silently different loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rdcore import ModelError
from rdcore.kernels import LogitSpec

PROBE_TOKENS = 12


def causal_lm(model: nn.Module) -> nn.Module:
    """The underlying ``…ForCausalLM`` of a plain or PEFT-wrapped model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_name(model: nn.Module) -> str:
    lm = causal_lm(model)
    path = getattr(lm.config, "_name_or_path", "") or ""
    return f"{type(lm).__name__}" + (f" ({path})" if path else "")


def decoder(model: nn.Module) -> nn.Module:
    """The decoder under the head (``lm.model`` in every transformers decoder family: its
    ``base_model``)."""
    lm = causal_lm(model)
    dec = getattr(lm, "base_model", None)
    if dec is None or dec is lm:
        raise ModelError(f"{model_name(model)}: no decoder module under the language-model head")
    return dec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers: the decoder's ``nn.ModuleList`` with ``num_hidden_layers``
    entries."""
    dec = decoder(model)
    n = getattr(causal_lm(model).config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in dec.named_children() if isinstance(m, nn.ModuleList)]
    found = [m for _, m in lists if n is None or len(m) >= n]
    if len(found) != 1:
        raise ModelError(f"{model_name(model)}: its decoder has no single stack of "
                         f"{n} layers (module lists: {[(k, len(m)) for k, m in lists]})")
    return found[0]


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm the decoder applies after its last layer: its one child with parameters besides
    the embedding and the layers (``norm``; ``final_layernorm`` in Phi-1/2)."""
    dec = decoder(model)
    layers = decoder_layers(model)
    embed = dec.get_input_embeddings()
    rest = [m for m in dec.children() if m is not layers and m is not embed
            and any(True for _ in m.parameters())]
    return rest[0] if len(rest) == 1 else None


def lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The linear projections of the attention block of a decoder layer, named as within the layer
    (``self_attn.q_proj`` …; Phi-3: ``self_attn.qkv_proj``, ``self_attn.o_proj``; GPT-NeoX:
    ``attention.query_key_value``, ``attention.dense``) — PEFT target names matching every layer."""
    layer = decoder_layers(model)[0]
    blocks = _attention_blocks(layer)
    if len(blocks) != 1:
        raise ModelError(f"{model_name(model)}: cannot tell the attention block of a decoder "
                         f"layer (children: {[n for n, _ in layer.named_children()]})")
    name, block = blocks[0]
    names = tuple(f"{name}.{sub}" for sub, m in block.named_modules()
                  if sub and isinstance(m, nn.Linear))
    if not names:
        raise ModelError(f"{model_name(model)}: its attention block {name} has no nn.Linear "
                         "projections for LoRA")
    return names


def _attention_blocks(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of a decoder layer that hold its attention projections: by class name
    (``…Attention``), else by attribute name (``…attn…``), among children with linear layers."""
    linear = [(n, m) for n, m in layer.named_children()
              if any(isinstance(x, nn.Linear) for x in m.modules())]
    by_class = [(n, m) for n, m in linear if "attention" in type(m).__name__.lower()]
    return by_class or [(n, m) for n, m in linear if "attn" in n.lower() or "attention" in n.lower()]


def logit_spec(model: nn.Module, temperature: float = 1.0) -> LogitSpec:
    """The model's own logit transform after ``lm_head`` (see :class:`rdcore.kernels.LogitSpec`),
    read from its configuration; :func:`inspect_model` checks it against the model's output."""
    lm = causal_lm(model)
    cfg = lm.config
    scale = 1.0
    if getattr(lm, "logit_scale", None) is not None and not isinstance(lm.logit_scale, nn.Module):
        scale *= float(lm.logit_scale)  # Cohere
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)  # Granite
    cap = getattr(cfg, "final_logit_softcapping", None)
    return LogitSpec(temperature, scale, float(cap) if cap else None)


def head(model: nn.Module) -> nn.Linear:
    lm = causal_lm(model)
    out = lm.get_output_embeddings()
    if not isinstance(out, nn.Linear):
        raise ModelError(f"{model_name(model)}: its output head is {type(out).__name__}, not an "
                         "nn.Linear: the fused KL cannot compute its logits")
    return out


@dataclass(frozen=True)
class ModelReport:
    """What :func:`inspect_model` found (and checked) about a model."""

    name: str
    spec: LogitSpec
    """The logit transform after the head (temperature 1)."""
    head_bias: bool
    layers: int
    lora_targets: tuple[str, ...]
    logits_max_diff: float
    """Largest difference between the model's logits and the fused path's transform on the probe."""


def _probe_ids(model: nn.Module, tokens: int) -> torch.Tensor:
    lm = causal_lm(model)
    vocab = lm.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    return torch.randint(min(3, vocab - 1), vocab, (1, tokens), generator=g).to(
        head(model).weight.device)


@torch.no_grad()
def inspect_model(model: nn.Module, *, probe_tokens: int = PROBE_TOKENS) -> ModelReport:
    """Read the model's head, logit transform, layers and LoRA targets, and check on a probe input
    (eval mode, no gradients) that ``spec(lm_head(last_hidden_state))`` is the model's ``logits``
    and that ``hidden_states`` has the expected layout. Raises :class:`rdcore.ModelError` naming the
    model and what differs."""
    from rdcore.distill import eval_mode

    lm = causal_lm(model)
    name = model_name(model)
    spec = logit_spec(model)
    lin = head(model)
    layers = decoder_layers(model)
    ids = _probe_ids(model, probe_tokens)
    with eval_mode(model):
        out = lm(input_ids=ids, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states
    n = lm.config.num_hidden_layers
    if hidden is None or len(hidden) != n + 1:
        raise ModelError(f"{name}: output_hidden_states gives {None if hidden is None else len(hidden)} "
                         f"states, not the embedding output plus {n} layers: the hidden-state term "
                         "(embeddings + every layer but the last) cannot be matched")
    raw = nn.functional.linear(hidden[-1].float(), lin.weight.float(),
                               None if lin.bias is None else lin.bias.float())
    from rdcore.kernels.linear_kl_torch import apply_spec

    mine = apply_spec(raw, spec)
    theirs = out.logits.float()
    diff = (mine - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    tol = 1e-4 * max(scale, 1.0) if lin.weight.dtype == torch.float32 else 2e-2 * max(scale, 1.0)
    if not math.isfinite(diff) or diff > tol:
        raise ModelError(
            f"{name}: the fused KL's logits (lm_head, then scale {spec.scale:g} and softcap "
            f"{spec.softcap}) differ from the model's own by up to {diff:.3g} on a probe input: "
            "this family transforms its logits in a way rdcore does not know (or its last hidden "
            "state is not the final-norm output); distilling it would match a different "
            "distribution, so it is refused")
    return ModelReport(name, spec, lin.bias is not None, len(layers), lora_targets(model), diff)


def describe(report: ModelReport) -> str:
    """One line for the log."""
    extra = []
    if report.spec.scale != 1.0:
        extra.append(f"logit scale {report.spec.scale:g}")
    if report.spec.softcap:
        extra.append(f"final-logit softcap {report.spec.softcap:g}")
    if report.head_bias:
        extra.append("head bias")
    return (f"{report.name}: {report.layers} layers, LoRA targets {', '.join(report.lora_targets)}"
            + (f", {', '.join(extra)}" if extra else ""))


def attention_modules(model: nn.Module) -> list[Any]:
    """The attention block of every decoder layer (in layer order)."""
    out = []
    for layer in decoder_layers(model):
        out.extend(m for _, m in _attention_blocks(layer)[:1])
    return out

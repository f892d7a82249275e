"""Shared-prefix attention: the teacher reads the rule prefix's K/V once for the whole batch.

Every teacher sequence is ``rule prefix (P tokens, identical in all rows) + suffix (S_b tokens)``.
Instead of running P prefix tokens through the model for each of the B rows, the teacher pass

* **use**: runs only the suffixes ``[B, S]`` and attends to the kept prefix K/V (after RoPE, one
  copy per layer);
* **build**, when the cache is rebuilt every optimizer step (the teacher is the live model): one
  *packed* sequence ``[prefix ; suffix_1 ; … ; suffix_B]`` (length P + B·S) goes through the
  decoder; in every layer the prefix tokens attend causally to themselves and each suffix attends
  to the prefix and causally to its own row. It is the same sequence of module calls as *use*
  (only shapes differ), so DeepSpeed ZeRO-3's prefetch trace stays valid whether a micro-batch
  builds or uses the cache;
* **prefix**, when the cache is built once per run (a frozen teacher): the prefix alone ``[1, P]``
  first, then *use*. Every step's suffixes are then computed the same way, so a resumed run
  reproduces the uninterrupted one exactly; the extra module calls of that one step cost one
  re-recording of ZeRO-3's prefetch trace per run.

The suffix attention splits the keys into prefix and suffix (Hydragen; FlashInfer's cascade
attention is the GPU analogue). With queries q (B·g·S of them per KV head, g = query heads per KV
head) and scale c::

    s_p = c · q K_pᵀ        one batched product against the single prefix K/V   [Hkv, B·g·S, P]
    s_s = c · q K_sᵀ        + causal/padding mask, per row                       [B, Hkv, g, S, S]
    m   = logsumexp(s_p ⊕ s_s)            (the two partial log-sum-exps merged)
    out = exp(s_p − m) V_p + exp(s_s − m) V_s

The prefix K/V are never copied per row: memory for the prefix does not grow with B. Scores are
computed in fp32 (or the inputs' wider dtype) and the output is cast back to the query dtype.

Outside an active teacher pass the registered implementation is exactly PyTorch SDPA (transformers'
``sdpa`` attention and mask functions), so the student pass is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

IMPLEMENTATION = "rdcore_prefix_sdpa"
"""Name under which the attention and mask functions are registered with transformers."""


@dataclass
class PrefixKV:
    """One copy of the rule prefix's keys and values per layer: ``[Hkv, P, D]`` each."""

    length: int
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    valid: bool = False

    def invalidate(self) -> None:
        self.keys.clear()
        self.values.clear()
        self.valid = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


@dataclass
class _Pass:
    mode: str  # "build" (packed input) or "use" (suffixes only)
    cache: PrefixKV
    suffix_mask: torch.Tensor  # [B, S], True at real suffix tokens
    batch: int
    suffix_len: int


_ACTIVE: contextvars.ContextVar[_Pass | None] = contextvars.ContextVar("rdcore_prefix_pass",
                                                                       default=None)


# --------------------------------------------------------------------------------------------------
# The attention math
# --------------------------------------------------------------------------------------------------
def cascade_attention(q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
                      kp_KPD: torch.Tensor, vp_KPD: torch.Tensor, mask_BS: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """Suffix queries attend to a shared prefix (no mask) and causally to their own row.

    q: [B, Hq, S, D]; k, v: [B, Hkv, S, D]; kp, vp: [Hkv, P, D] (one copy for all rows);
    mask_BS: True at real (non-pad) suffix tokens. Returns [B, Hq, S, D] in q's dtype.
    """
    B, Hq, S, D = q_BHSD.shape
    Hkv = k_BKSD.shape[1]
    g = Hq // Hkv
    acc = torch.promote_types(q_BHSD.dtype, torch.float32)
    q = q_BHSD.to(acc).view(B, Hkv, g, S, D)
    # prefix: one batched product, batch = KV heads, M = every query of every row
    q_KMD = q.permute(1, 0, 2, 3, 4).reshape(Hkv, B * g * S, D)
    s_p = torch.bmm(q_KMD, kp_KPD.to(acc).transpose(1, 2)) * scaling  # [Hkv, BgS, P]
    # suffix self-attention per row, K/V broadcast over the g query heads of a KV head
    s_s = torch.matmul(q, k_BKSD.to(acc).unsqueeze(2).transpose(-1, -2)) * scaling  # [B,Hkv,g,S,S]
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    allowed = causal & mask_BS[:, None, None, None, :]
    s_s = s_s.masked_fill(~allowed, float("-inf"))
    lse_p = torch.logsumexp(s_p, dim=-1).view(Hkv, B, g, S).permute(1, 0, 2, 3)  # [B, Hkv, g, S]
    lse_s = torch.logsumexp(s_s, dim=-1)  # -inf for a query that sees no suffix key (left pads)
    m = torch.logaddexp(lse_p, lse_s)  # finite: every query sees the whole prefix
    m_KM = m.permute(1, 0, 2, 3).reshape(Hkv, B * g * S, 1)
    out_p = torch.bmm(torch.exp(s_p - m_KM), vp_KPD.to(acc))  # [Hkv, BgS, D]
    out_p = out_p.view(Hkv, B, g, S, D).permute(1, 0, 2, 3, 4)
    out_s = torch.matmul(torch.exp(s_s - m.unsqueeze(-1)), v_BKSD.to(acc).unsqueeze(2))
    return (out_p + out_s).reshape(B, Hq, S, D).to(q_BHSD.dtype)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)


# --------------------------------------------------------------------------------------------------
# The transformers attention interface
# --------------------------------------------------------------------------------------------------
def prefix_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None, **kwargs: Any
                             ) -> tuple[torch.Tensor, None]:
    """transformers attention function: SDPA, or the shared-prefix attention inside a teacher
    pass. Returns ``[batch, seq, heads, head_dim]`` like every transformers attention function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _ACTIVE.get()
    if state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout:
        raise RuntimeError("shared-prefix attention runs the teacher in eval mode (no dropout)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    cache, B, S = state.cache, state.batch, state.suffix_len
    if state.mode == "prefix":  # the prefix alone [1, H, P, D]: keep its K/V, causal attention
        cache.keys[layer], cache.values[layer] = key[0].detach(), value[0].detach()
        out = _sdpa_causal(query, key, value, scale)
    elif state.mode == "build":
        P = cache.length
        kp, vp = key[0, :, :P], value[0, :, :P]
        cache.keys[layer], cache.values[layer] = kp.detach(), vp.detach()
        out_prefix = _sdpa_causal(query[:, :, :P], key[:, :, :P], value[:, :, :P], scale)

        def rows(t: torch.Tensor) -> torch.Tensor:  # [1, H, B·S, D] → [B, H, S, D]
            return t[0, :, P:].unflatten(1, (B, S)).transpose(0, 1)

        out_BHSD = cascade_attention(rows(query), rows(key), rows(value), kp, vp,
                                     state.suffix_mask, scale)
        out = torch.cat([out_prefix, out_BHSD.transpose(0, 1).reshape(1, -1, B * S,
                                                                     query.shape[-1])], dim=2)
    else:
        out = cascade_attention(query, key, value, cache.keys[layer], cache.values[layer],
                                state.suffix_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def prefix_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers mask function: SDPA's mask, none inside a teacher pass (the attention function
    builds its own from the suffix padding)."""
    from transformers.masking_utils import sdpa_mask

    if _ACTIVE.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the implementation with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, prefix_mask)


def install(model: torch.nn.Module) -> None:
    """Switch a transformers model (plain or PEFT-wrapped) to the prefix-capable attention."""
    register()
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = target.config._attn_implementation
    if current not in ("sdpa", "eager", IMPLEMENTATION, None):
        raise RuntimeError(f"the rule-prefix cache needs SDPA attention; this model uses {current!r} "
                           "(use --prefix_cache off)")
    target.set_attn_implementation(IMPLEMENTATION)


# --------------------------------------------------------------------------------------------------
# Running a teacher pass with the prefix
# --------------------------------------------------------------------------------------------------
def teacher_inputs(cache: PrefixKV, prefix_ids_P: torch.Tensor, suffix_ids_BS: torch.Tensor,
                   suffix_mask_BS: torch.Tensor, suffix_pos_BS: torch.Tensor, packed: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, _Pass,
                              tuple[torch.Tensor, torch.Tensor, _Pass] | None]:
    """The decoder input of a teacher pass with the rule prefix: ``(input_ids, position_ids,
    state, prefix_pass)``. Run the decoder's attention calls — and its mask creation — under
    :func:`active` ``(state)``, then :func:`suffix_rows` maps its hidden states to ``[B, S, H]``.

    With a valid cache: the suffixes ``[B, S]``, reading it. Otherwise the cache is built:
    ``packed`` — one packed ``[1, P + B·S]`` sequence computes the prefix and the suffixes in one
    decoder call (the same module calls as using the cache: for a cache rebuilt every step);
    else ``prefix_pass = (ids [1, P], positions, state)`` is a decoder call on the prefix alone to
    run first (then :func:`finish` it), after which the suffixes read the cache exactly as on every
    later step — so a run resumed mid-way computes what the uninterrupted run did."""
    B, S = suffix_ids_BS.shape
    mask = suffix_mask_BS.bool()
    if cache.valid:
        return suffix_ids_BS, suffix_pos_BS, _Pass("use", cache, mask, B, S), None
    P = cache.length
    cache.invalidate()
    prefix_pos = torch.arange(P, device=suffix_pos_BS.device)
    if not packed:
        prefix = (prefix_ids_P.to(suffix_ids_BS)[None], prefix_pos[None],
                  _Pass("prefix", cache, mask, B, S))
        return suffix_ids_BS, suffix_pos_BS, _Pass("use", cache, mask, B, S), prefix
    ids = torch.cat([prefix_ids_P.to(suffix_ids_BS), suffix_ids_BS.reshape(-1)])[None]
    pos = torch.cat([prefix_pos, suffix_pos_BS.reshape(-1)])[None]
    return ids, pos, _Pass("build", cache, mask, B, S), None


@contextlib.contextmanager
def active(state: _Pass | None) -> Iterator[None]:
    """Route the registered attention and mask functions to the teacher pass ``state`` (None: a
    plain SDPA pass). A building pass marks its cache valid with :func:`finish` once every layer
    has run."""
    if state is None:
        yield
        return
    token = _ACTIVE.set(state)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def finish(state: _Pass | None, num_layers: int) -> None:
    """After a teacher pass: a building pass's cache becomes valid (checked complete)."""
    if state is not None and state.mode in ("build", "prefix"):
        if len(state.cache.keys) != num_layers:
            raise RuntimeError(f"the prefix pass stored K/V for {len(state.cache.keys)} of "
                               f"{num_layers} layers: does every layer use the attention interface?")
        state.cache.valid = True


def suffix_rows(state: _Pass, h: torch.Tensor) -> torch.Tensor:
    """A teacher-pass hidden state as ``[B, S, H]`` (drops the packed prefix when building)."""
    if state.mode == "use":
        return h
    return h[0, state.cache.length:].reshape(state.batch, state.suffix_len, h.shape[-1])


def run_with_prefix(decoder: torch.nn.Module, cache: PrefixKV, prefix_ids_P: torch.Tensor,
                    suffix_ids_BS: torch.Tensor, suffix_mask_BS: torch.Tensor,
                    suffix_pos_BS: torch.Tensor, output_hidden_states: bool = True,
                    packed: bool = True) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run the decoder (the ``…Model`` under the LM head) on the suffixes with the rule prefix in
    context. Builds ``cache`` first if it is not valid (see :func:`teacher_inputs` for
    ``packed``). Returns the suffixes' last hidden state ``[B, S, H]`` and, if asked, every hidden
    state (embeddings … final norm) as ``[B, S, H]``. Call under ``no_grad`` in eval mode."""
    ids, pos, state, prefix = teacher_inputs(cache, prefix_ids_P, suffix_ids_BS, suffix_mask_BS,
                                             suffix_pos_BS, packed)
    if prefix is not None:
        with active(prefix[2]):
            decoder(input_ids=prefix[0], position_ids=prefix[1], use_cache=False)
        finish(prefix[2], decoder.config.num_hidden_layers)
    with active(state):
        out = decoder(input_ids=ids, position_ids=pos, output_hidden_states=output_hidden_states,
                      use_cache=False)
    finish(state, decoder.config.num_hidden_layers)
    hidden = out.hidden_states
    if hidden is not None:
        hidden = tuple(suffix_rows(state, h) for h in hidden)
    return suffix_rows(state, out.last_hidden_state), hidden

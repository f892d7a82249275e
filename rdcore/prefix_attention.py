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
  reproduces the uninterrupted one exactly.

The suffix attention splits the keys into prefix and suffix (Hydragen; FlashInfer's cascade
attention), each part returning its log-sum-exp, merged exactly::

    out_p, lse_p = attn(q, K_p, V_p)                 all B·S suffix queries against the one prefix
    out_s, lse_s = attn(q, K_s, V_s)                 per row: causal, padding
    m = logaddexp(lse_p, lse_s);   out = exp(lse_p − m)·out_p + exp(lse_s − m)·out_s

Every argument transformers passes is honoured: ``scaling``, ``sliding_window`` (a key is seen when
``pos_q − pos_k < window``, positions from the rows' position ids, as transformers' own mask),
``softcap`` (``cap·tanh(score/cap)`` before masking), grouped-query heads; dropout is off (the
teacher runs in eval mode). Anything else (attention sinks, a position bias, bidirectional layers)
is refused with an error naming the model and the argument.

Two backends compute ``attn``: ``exact`` (plain PyTorch, fp32 scores: the CPU path and the
reference) and ``flex`` (``torch.nn.attention.flex_attention`` with the masks as ``mask_mod`` and the
softcap as ``score_mod``, returning the LSE: compiled on CUDA, where no score matrix is
materialised; eager — unfused — on CPU, where the tests compare it with ``exact``). ``auto``: flex
on CUDA, exact elsewhere. The prefix K/V are never copied per row: memory for the prefix does not
grow with B.

Outside an active teacher pass the registered implementation is the model's own (``sdpa``,
``eager``, …) with its own mask function, so the student pass is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

PREFIX = "rdcore_prefix_"
"""Registered implementation names: ``rdcore_prefix_<the model's own implementation>``."""
Backend = Literal["auto", "exact", "flex"]
HONOURED = {"scaling", "sliding_window", "softcap", "dropout"}
IGNORED = {"position_ids", "use_cache", "output_hidden_states", "output_attentions",
           "cache_position", "past_key_values", "past_key_value", "layer_idx", "is_causal"}
"""Keyword arguments transformers passes that do not change the attention of a teacher pass
(``is_causal`` is checked: only causal attention is supported)."""


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


@dataclass
class _Pass:
    mode: str  # "prefix" (the prefix alone), "build" (packed input) or "use" (suffixes only)
    cache: PrefixKV | list[PrefixKV]  # a list: one per rule group (``groups`` says whose row)
    suffix_mask: torch.Tensor  # [B, S], True at real suffix tokens
    suffix_pos: torch.Tensor  # [B, S] absolute positions (P at a row's first suffix token)
    batch: int
    suffix_len: int
    backend: str
    groups: torch.Tensor | None = None  # [B] each row's rule group (several prefixes)


_ACTIVE: contextvars.ContextVar[_Pass | None] = contextvars.ContextVar("rdcore_prefix_pass",
                                                                       default=None)


# --------------------------------------------------------------------------------------------------
# The attention math: one part (queries against a set of keys) with its log-sum-exp
# --------------------------------------------------------------------------------------------------
Visible = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``visible(b, q_idx, kv_idx) -> bool`` (broadcasting index tensors), as flex's ``mask_mod``."""


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Visible | None,
           scaling: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, Q, D], k/v [B, Hkv, K, D] → (out [B, Hq, Q, D] in fp32, lse [B, Hq, Q]); scores
    in fp32 (or fp64). A query that sees no key gets out 0 and lse −inf."""
    B, Hq, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(B, Hkv, Hq // Hkv, Q, D)
    s = torch.matmul(qg, k.to(acc).unsqueeze(2).transpose(-1, -2)) * scaling  # [B, Hkv, g, Q, K]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if visible is not None:
        b = torch.arange(B, device=q.device)[:, None, None]
        qi = torch.arange(Q, device=q.device)[None, :, None]
        ki = torch.arange(K, device=q.device)[None, None, :]
        allowed = visible(b, qi, ki).expand(B, Q, K)
        s = s.masked_fill(~allowed[:, None, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    out = torch.matmul(p, v.to(acc).unsqueeze(2))
    return out.reshape(B, Hq, Q, D), lse.reshape(B, Hq, Q)


_FLEX: dict[str, Any] = {}
FLEX_FAILURES: list[str] = []
"""Why compiled flex attention fell back to ``exact`` in this process (empty: it never did). The
GPU check reads it: a fallback gives the right answer at the exact path's O(S²) memory."""


def _flex_functions(cuda: bool) -> tuple[Any, Any, Any, bool]:
    """(flex_attention, create_block_mask, AuxRequest or None, compiled): compiled on CUDA."""
    key = "cuda" if cuda else "cpu"
    if key not in _FLEX:
        from torch.nn.attention import flex_attention as fa

        attend, make_mask = fa.flex_attention, fa.create_block_mask
        if cuda:
            attend = torch.compile(attend, dynamic=True)
        _FLEX[key] = (attend, make_mask, getattr(fa, "AuxRequest", None), cuda)
    return _FLEX[key]


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Visible | None,
          scaling: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same through ``flex_attention`` (fused on CUDA: no score matrix).

    Compiled with dynamic shapes but constant floats: a dynamic ``scale`` or softcap becomes a
    0-d CPU tensor in the graph, which inductor's flex lowering cannot read (torch 2.11 on an H200:
    ``LoweringException: unbacked_bindings``, and the decoding template left with no choices).
    The main flex kernel is forced (also for short query blocks). Should compiling still fail, the
    reason is warned once and kept in ``FLEX_FAILURES``, and ``exact`` answers instead."""
    import warnings

    attend, make_mask, aux, compiled = _flex_functions(q.is_cuda)
    if compiled and FLEX_FAILURES:
        return _exact(q, k, v, visible, scaling, softcap)
    B, Hq, Q, _ = q.shape
    K = k.shape[2]
    block_mask = None
    if visible is not None:
        block_mask = make_mask(lambda b, h, qi, ki: visible(b, qi, ki), B, None, Q, K,
                               device=q.device)
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, qi, ki):
            return torch.tanh(score / softcap) * softcap
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scaling,
                  enable_gqa=Hq != k.shape[1])
    if q.is_cuda:
        kwargs["kernel_options"] = {"FORCE_USE_FLEX_ATTENTION": True}
    failed = None
    with warnings.catch_warnings(), torch._dynamo.config.patch(specialize_float=True):
        warnings.simplefilter("ignore")  # the CPU path warns that it is unfused
        try:
            if aux is not None:
                out, extra = attend(q, k, v, return_aux=aux(lse=True), **kwargs)
                lse = extra.lse
            else:  # torch < 2.9
                out, lse = attend(q, k, v, return_lse=True, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            if not compiled:
                raise
            inner = getattr(e, "inner_exception", None) or e  # inductor's own error, if wrapped
            failed = f"{type(inner).__name__}: {(str(inner).strip() or '?').splitlines()[0][:300]}"
    if failed is not None:
        FLEX_FAILURES.append(failed)
        warnings.warn(f"rdcore: compiled flex attention failed on torch {torch.__version__} "
                      f"({failed}); the teacher's prefix attention uses the exact backend from "
                      "now on (O(S²) memory)", RuntimeWarning, stacklevel=2)
        return _exact(q, k, v, visible, scaling, softcap)
    return out.float(), lse.float()


def _part(backend: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return _flex if backend == "flex" else _exact


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
           ) -> torch.Tensor:
    """Exact softmax over the union of two key sets from each part's output and log-sum-exp."""
    m = torch.logaddexp(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, 0.0)
    wa = torch.exp(lse_a - m).nan_to_num(0.0).unsqueeze(-1)
    wb = torch.exp(lse_b - m).nan_to_num(0.0).unsqueeze(-1)
    return out_a * wa + out_b * wb


def _prefix_part(q_BHSD: torch.Tensor, kp_KPD: torch.Tensor, vp_KPD: torch.Tensor,
                 pos_BS: torch.Tensor, scaling: float, sliding_window: int | None,
                 softcap: float | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query of every row against the one prefix copy (batch 1, B·S queries): (out, lse)
    as [B, Hq, S, D], [B, Hq, S]."""
    B, Hq, S, D = q_BHSD.shape
    q_1HMD = q_BHSD.transpose(0, 1).reshape(1, Hq, B * S, D)
    flat_pos = pos_BS.reshape(-1)
    seen_prefix = None
    if sliding_window is not None:
        def seen_prefix(b, qi, ki):
            return flat_pos[qi] - ki < sliding_window
    out_p, lse_p = _part(backend)(q_1HMD, kp_KPD[None], vp_KPD[None], seen_prefix, scaling, softcap)
    return out_p.reshape(Hq, B, S, D).transpose(0, 1), lse_p.reshape(Hq, B, S).transpose(0, 1)


def _suffix_part(q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
                 mask_BS: torch.Tensor, pos_BS: torch.Tensor, scaling: float,
                 sliding_window: int | None, softcap: float | None, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's queries against its own suffix keys: causal, padding, window."""

    def seen_suffix(b, qi, ki):
        ok = (ki <= qi) & mask_BS[b, ki]
        if sliding_window is not None:
            ok = ok & (pos_BS[b, qi] - pos_BS[b, ki] < sliding_window)
        return ok

    return _part(backend)(q_BHSD, k_BKSD, v_BKSD, seen_suffix, scaling, softcap)


def cascade_attention(q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
                      kp_KPD: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]],
                      vp_KPD: torch.Tensor | None, mask_BS: torch.Tensor, scaling: float,
                      pos_BS: torch.Tensor | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, backend: str = "exact",
                      groups_B: torch.Tensor | None = None) -> torch.Tensor:
    """Suffix queries attend to a shared prefix and causally to their own row.

    q: [B, Hq, S, D]; k, v: [B, Hkv, S, D]; kp, vp: [Hkv, P, D] (one copy for all rows) — or
    ``kp`` a list of ``(kp, vp)`` per rule group, ``vp`` None and ``groups_B`` [B] each row's group
    (rows attend to their own group's prefix; each prefix is read once for its rows); mask_BS:
    True at real (non-pad) suffix tokens; pos_BS: absolute positions (default P + index: a
    right-padded batch), used by ``sliding_window``. Returns [B, Hq, S, D] in q's dtype.
    """
    B, Hq, S, D = q_BHSD.shape
    mask_BS = mask_BS.bool()
    shared = isinstance(kp_KPD, torch.Tensor)
    if pos_BS is None:
        if not shared:
            raise ValueError("several prefixes need the rows' positions")
        pos_BS = kp_KPD.shape[1] + torch.arange(S, device=q_BHSD.device).expand(B, S)
    if shared:
        out_p, lse_p = _prefix_part(q_BHSD, kp_KPD, vp_KPD, pos_BS, scaling, sliding_window,
                                    softcap, backend)
    else:  # each group's rows against that group's prefix
        acc = torch.promote_types(q_BHSD.dtype, torch.float32)
        out_p = q_BHSD.new_zeros((B, Hq, S, D), dtype=acc)
        lse_p = q_BHSD.new_full((B, Hq, S), float("-inf"), dtype=acc)
        for g in torch.unique(groups_B).tolist():
            rows = (groups_B == g).nonzero().flatten()
            kp, vp = kp_KPD[g]
            o, lse = _prefix_part(q_BHSD[rows], kp, vp, pos_BS[rows], scaling, sliding_window,
                                  softcap, backend)
            out_p[rows], lse_p[rows] = o.to(acc), lse.to(acc)
    out_s, lse_s = _suffix_part(q_BHSD, k_BKSD, v_BKSD, mask_BS, pos_BS, scaling,
                                sliding_window, softcap, backend)
    return _merge(out_p, lse_p, out_s, lse_s).to(q_BHSD.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                     sliding_window: int | None = None, softcap: float | None = None,
                     backend: str = "exact") -> torch.Tensor:
    """Plain causal attention of one unpadded sequence batch (the prefix alone), in q's dtype."""

    def seen(b, qi, ki):
        ok = ki <= qi
        if sliding_window is not None:
            ok = ok & (qi - ki < sliding_window)
        return ok

    out, _ = _part(backend)(q, k, v, seen, scaling, softcap)
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------------
# The transformers attention interface
# --------------------------------------------------------------------------------------------------
def _own_attention(module: torch.nn.Module, original: str) -> Callable[..., Any]:
    """The model's own attention function for the implementation name ``original``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if original == "eager" or original not in ALL_ATTENTION_FUNCTIONS:
        if eager is None:
            raise RuntimeError(f"{type(module).__name__} has no eager attention function")
        return eager
    return ALL_ATTENTION_FUNCTIONS[original]


def _check_kwargs(module: torch.nn.Module, kwargs: dict[str, Any], dropout: float) -> None:
    if dropout:
        raise RuntimeError("shared-prefix attention runs the teacher in eval mode (no dropout)")
    unknown = {k: v for k, v in kwargs.items()
               if k not in HONOURED | IGNORED and v is not None and v is not False}
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        unknown["is_causal"] = False
    if unknown:
        raise UnsupportedAttentionError(
            f"{type(module).__name__} passes {sorted(unknown)} to its attention function, which "
            "the rule-prefix cache does not implement (it honours scaling, sliding_window and "
            "softcap): use --prefix_cache off")


class UnsupportedAttentionError(RuntimeError):
    """The model's attention needs an argument the shared-prefix attention does not implement."""


def make_attention(original: str) -> Callable[..., tuple[torch.Tensor, None]]:
    """The attention function registered as ``rdcore_prefix_<original>``."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                  scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        state = _ACTIVE.get()
        if state is None:
            return _own_attention(module, original)(module, query, key, value, attention_mask,
                                                    dropout=dropout, scaling=scaling, **kwargs)
        _check_kwargs(module, kwargs, dropout)
        return _teacher_attention(state, module, query, key, value, scaling, kwargs), None

    attention.__name__ = f"{PREFIX}{original}_attention"
    return attention


def _teacher_attention(state: _Pass, module: torch.nn.Module, query: torch.Tensor,
                       key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                       kwargs: dict[str, Any]) -> torch.Tensor:
    """Inside a teacher pass: [batch, seq, heads, head_dim] like every attention function."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window, cap = kwargs.get("sliding_window"), kwargs.get("softcap")
    layer = module.layer_idx
    cache, B, S = state.cache, state.batch, state.suffix_len
    if state.mode == "prefix":  # the prefix alone [1, H, P, D]: keep its K/V, causal attention
        cache.keys[layer], cache.values[layer] = key[0].detach(), value[0].detach()
        out = causal_attention(query, key, value, scale, window, cap, state.backend)
    elif state.mode == "build":
        P = cache.length
        kp, vp = key[0, :, :P], value[0, :, :P]
        cache.keys[layer], cache.values[layer] = kp.detach(), vp.detach()
        out_prefix = causal_attention(query[:, :, :P], key[:, :, :P], value[:, :, :P], scale,
                                      window, cap, state.backend)

        def rows(t: torch.Tensor) -> torch.Tensor:  # [1, H, B·S, D] → [B, H, S, D]
            return t[0, :, P:].unflatten(1, (B, S)).transpose(0, 1)

        out_BHSD = cascade_attention(rows(query), rows(key), rows(value), kp, vp,
                                     state.suffix_mask, scale, state.suffix_pos, window, cap,
                                     state.backend)
        out = torch.cat([out_prefix, out_BHSD.transpose(0, 1).reshape(1, -1, B * S,
                                                                     query.shape[-1])], dim=2)
    elif state.groups is not None:  # several rule prefixes: each row its own
        out = cascade_attention(query, key, value, [(c.keys[layer], c.values[layer]) for c in cache],
                                None, state.suffix_mask, scale, state.suffix_pos, window, cap,
                                state.backend, groups_B=state.groups)
    else:
        out = cascade_attention(query, key, value, cache.keys[layer], cache.values[layer],
                                state.suffix_mask, scale, state.suffix_pos, window, cap,
                                state.backend)
    return out.transpose(1, 2).contiguous()


def make_mask_function(original: str) -> Callable[..., Any]:
    """The mask function registered as ``rdcore_prefix_<original>``: the model's own, none inside
    a teacher pass (the attention function builds its own from the suffix padding)."""

    def mask(*args: Any, **kwargs: Any) -> Any:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        if _ACTIVE.get() is not None:
            return None
        if original == "eager" or original not in ALL_MASK_ATTENTION_FUNCTIONS:
            return ALL_MASK_ATTENTION_FUNCTIONS["eager"](*args, **kwargs)
        return ALL_MASK_ATTENTION_FUNCTIONS[original](*args, **kwargs)

    return mask


def install(model: torch.nn.Module) -> str:
    """Switch a transformers model (plain or PEFT-wrapped) to the prefix-capable attention (its own
    implementation outside a teacher pass); returns the registered name. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = target.config._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return current
    name = PREFIX + current
    AttentionInterface.register(name, make_attention(current))
    AttentionMaskInterface.register(name, make_mask_function(current))
    target.set_attn_implementation(name)
    return name


def original_implementation(model: torch.nn.Module) -> str:
    """The model's own attention implementation (before :func:`install`)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = target.config._attn_implementation or "eager"
    return current[len(PREFIX):] if current.startswith(PREFIX) else current


# --------------------------------------------------------------------------------------------------
# Running a teacher pass with the prefix
# --------------------------------------------------------------------------------------------------
def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "exact", "flex"):
        raise ValueError(f"backend must be auto, exact or flex, got {backend!r}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "exact"
    return backend


def teacher_inputs(cache: PrefixKV, prefix_ids_P: torch.Tensor, suffix_ids_BS: torch.Tensor,
                   suffix_mask_BS: torch.Tensor, suffix_pos_BS: torch.Tensor, packed: bool,
                   backend: str = "auto"
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
    how = resolve_backend(backend, suffix_ids_BS.device)
    if cache.valid:
        return suffix_ids_BS, suffix_pos_BS, _Pass("use", cache, mask, suffix_pos_BS, B, S,
                                                   how), None
    P = cache.length
    cache.invalidate()
    prefix_pos = torch.arange(P, device=suffix_pos_BS.device)
    if not packed:
        prefix = (prefix_ids_P.to(suffix_ids_BS)[None], prefix_pos[None],
                  _Pass("prefix", cache, mask, suffix_pos_BS, B, S, how))
        return suffix_ids_BS, suffix_pos_BS, _Pass("use", cache, mask, suffix_pos_BS, B, S,
                                                   how), prefix
    ids = torch.cat([prefix_ids_P.to(suffix_ids_BS), suffix_ids_BS.reshape(-1)])[None]
    pos = torch.cat([prefix_pos, suffix_pos_BS.reshape(-1)])[None]
    return ids, pos, _Pass("build", cache, mask, suffix_pos_BS, B, S, how), None


def grouped_teacher_inputs(caches: list[PrefixKV], prefix_ids: list[torch.Tensor],
                           groups: list[int], suffix_ids_BS: torch.Tensor,
                           suffix_mask_BS: torch.Tensor, suffix_pos_BS: torch.Tensor,
                           backend: str = "auto"
                           ) -> tuple[torch.Tensor, torch.Tensor, _Pass,
                                      list[tuple[torch.Tensor, torch.Tensor, _Pass]]]:
    """The teacher pass of a batch whose rows continue different rule prefixes (one cache per
    rule group): ``(input_ids, position_ids, state, prefix_passes)`` — a prefix-alone pass for
    every group whose cache is not valid yet, whether or not the batch has its rows (so that all
    ZeRO-3 ranks run the same module calls whatever their rows; run and :func:`finish` them
    first), then the suffixes, each row reading its own group's prefix."""
    B, S = suffix_ids_BS.shape
    mask = suffix_mask_BS.bool()
    how = resolve_backend(backend, suffix_ids_BS.device)
    passes = []
    for g, cache in enumerate(caches):
        if not cache.valid:
            cache.invalidate()
            P = cache.length
            ids = prefix_ids[g].to(suffix_ids_BS)[None]
            pos = torch.arange(P, device=suffix_pos_BS.device)[None]
            passes.append((ids, pos, _Pass("prefix", cache, mask, suffix_pos_BS, B, S, how)))
    groups_B = torch.tensor(groups, device=suffix_ids_BS.device)
    state = _Pass("use", caches, mask, suffix_pos_BS, B, S, how, groups=groups_B)
    return suffix_ids_BS, suffix_pos_BS, state, passes


@contextlib.contextmanager
def active(state: _Pass | None) -> Iterator[None]:
    """Route the registered attention and mask functions to the teacher pass ``state`` (None: a
    plain pass). A building pass marks its cache valid with :func:`finish` once every layer has
    run."""
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

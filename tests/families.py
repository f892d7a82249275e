"""Tiny random models of the decoder families rdcore supports, saved as Hugging Face folders with
the locally trained tiny tokenizer (``rdcore.models.tiny_tokenizer``), to load through
``--model DIR`` as a user's own model would be.

Each configuration exercises what makes its family different: sliding windows shorter than the
teacher sequences (Mistral on every layer; Qwen2 on some; Gemma 2/3 alternating with full
layers), Gemma 2's attention and final-logit softcaps and its eager-only attention, Gemma 3's
per-layer-type rotary embeddings, Phi-3's fused ``qkv_proj``, Cohere's ``logit_scale`` (a tied
head), Granite's ``logits_scaling`` and multipliers (an untied head), Phi-1/2's lm_head bias and
``final_layernorm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WINDOW = 24
"""Sliding window of the families that have one: shorter than every packaged teacher sequence
(the tiny tokenizer's math prompts are > 150 tokens), so it changes the result."""


def _configs(vocab: int, pad: int, eos: int) -> dict[str, tuple[str, dict[str, Any]]]:
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  pad_token_id=pad, bos_token_id=eos, eos_token_id=eos)
    types = ["sliding_attention", "full_attention"]
    return {
        "llama": ("LlamaConfig", dict(common, tie_word_embeddings=False)),
        "qwen2": ("Qwen2Config", dict(common, use_sliding_window=True, sliding_window=WINDOW,
                                      max_window_layers=1)),
        "qwen3": ("Qwen3Config", dict(common, head_dim=16)),
        "mistral": ("MistralConfig", dict(common, sliding_window=WINDOW)),
        "gemma2": ("Gemma2Config", dict(common, head_dim=16, query_pre_attn_scalar=16,
                                        sliding_window=WINDOW, layer_types=types,
                                        attn_logit_softcapping=0.05, final_logit_softcapping=0.5)),
        "gemma3": ("Gemma3TextConfig", dict(
            common, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, layer_types=types,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
        "phi3": ("Phi3Config", dict(common, sliding_window=None)),
        "cohere": ("CohereConfig", dict(common, logit_scale=0.5)),
        "granite": ("GraniteConfig", dict(common, embedding_multiplier=4.0, logits_scaling=0.25,
                                          residual_multiplier=0.5, attention_multiplier=0.2,
                                          tie_word_embeddings=False)),
        "phi": ("PhiConfig", dict({k: v for k, v in common.items() if k != "num_key_value_heads"},
                                  partial_rotary_factor=0.5)),
    }


FAMILIES = tuple(_configs(2048, 1, 0))
"""The family names, in the matrix's order."""
WHAT = {
    "llama": "untied head (the tiny preset's architecture)",
    "qwen2": "sliding window on one of two layers",
    "qwen3": "q/k norms",
    "mistral": "sliding window on every layer",
    "gemma2": "attention + final-logit softcaps, sliding/full layers, eager attention only",
    "gemma3": "sliding/full layers with their own rotary embeddings, tied head",
    "phi3": "fused qkv_proj",
    "cohere": "logit_scale, tied head, parallel attention/MLP",
    "granite": "logits_scaling, embedding/residual/attention multipliers, untied head",
    "phi": "lm_head bias, final_layernorm, partial rotary",
}


def build(family: str, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) of a tiny random ``family`` model (fp32, eval mode)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from rdcore.models import tiny_tokenizer

    tok = tiny_tokenizer()
    cls_name, kwargs = _configs(len(tok), tok.pad_token_id, tok.eos_token_id)[family]
    config = getattr(transformers, cls_name)(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), tok


def folder(family: str, root: Path, seed: int = 0) -> Path:
    """The tiny ``family`` model saved as a Hugging Face folder under ``root`` (built once)."""
    path = root / f"tiny-{family}"
    if not (path / "config.json").is_file():
        model, tok = build(family, seed)
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
    return path

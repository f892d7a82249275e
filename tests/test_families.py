"""Every decoder family of ``tests/families.py`` without DeepSpeed (the 2-rank ZeRO-3 runs are in
``test_families_zero3.py``):

* the distillation loss — fused KL and CE — equals a plain-PyTorch reference computed from the
  model's *own* ``logits`` and ``hidden_states`` (so softcaps, logit scales and head biases are
  honoured by the fused path);
* the rule-prefix cache, the teacher-target cache and the layer-interleaved passes give the plain
  loss and gradients (fp64: exact up to rounding), with sliding windows shorter than the teacher
  sequences and attention softcapping;
* the shared-prefix attention's two backends (exact, flex) agree, windows and softcaps included.
"""

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, build

from rdcore.architecture import causal_lm
from rdcore.config import LossWeights
from rdcore.data import Encoder, collate, load_task
from rdcore.distill import (
    RuleDistillModule,
    TeacherTargets,
    add_lora,
    checkpoint_activations,
    lora_config,
)
from rdcore.prefix_attention import cascade_attention, causal_attention

T, BETA, ALPHA = 1.3, 5.0, 0.7


def data_and_batch(tok, start=0, n=3, prefix=True):
    """Right-padded: transformers' Gemma 2 computes its eager softmax in fp32, where the fp64 mask
    value becomes −inf, so a left-padded row's pad queries give NaN — which reaches real rows
    through their (zero) attention weights. The tiny-Llama tests cover left padding."""
    data = Encoder(tok).encode(load_task("math", "train", 8))
    exs = data.examples[start:start + n]
    batch = collate(exs, tok.pad_token_id, prefix_len=data.rule_prefix_len if prefix else 0,
                    padding_side="right", example_ids=list(range(start, start + n)))
    return data, batch


def reference_loss(model, batch):
    """KL·T² + β·hidden MSE + α·CE from the model's own forward outputs (full logits)."""
    with torch.no_grad():
        t = model(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask,
                  position_ids=batch.teacher_position_ids, output_hidden_states=True)
    s = model(input_ids=batch.student_input_ids, attention_mask=batch.student_attention_mask,
              position_ids=batch.student_position_ids, output_hidden_states=True)
    ti, si = batch.teacher_distill_index, batch.student_distill_index
    tl = t.logits.reshape(-1, t.logits.shape[-1])[ti].double() / T
    sl = s.logits.reshape(-1, s.logits.shape[-1])[si].double()
    kl = (F.softmax(tl, -1) * (F.log_softmax(tl, -1) - F.log_softmax(sl / T, -1))).sum() * T * T
    ce = F.cross_entropy(sl, batch.target_ids, reduction="sum")
    mse = 0
    for hs, ht in zip(s.hidden_states[:-1], t.hidden_states[:-1]):
        a = F.normalize(hs.reshape(-1, hs.shape[-1])[si], dim=-1)
        b = F.normalize(ht.reshape(-1, ht.shape[-1])[ti], dim=-1)
        mse = mse + (a - b).pow(2).mean(-1)
    return kl + BETA * (mse / (len(s.hidden_states) - 1)).sum() + ALPHA * ce


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_loss_equals_the_models_own_logits(family):
    model, tok = build(family)
    model = model.double()
    _, batch = data_and_batch(tok, prefix=False)
    module = RuleDistillModule(model, "rule_distill_base", "live",
                               loss=LossWeights(temperature=T, beta=BETA, alpha=ALPHA))
    model.eval()  # the reference has no dropout either
    loss, stats = module(batch, 1.0)
    assert set(stats) == {"kl", "hidden_mse", "ce"} and stats["kl"] > 0
    ref = reference_loss(model, batch)
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["live", "disabled"])
def test_caches_and_interleaving_change_nothing(family, mode):
    """fp64: the prefix cache (built, then used), the teacher-target cache and the interleaving
    reproduce the plain passes' loss and gradients (Mistral, Qwen2, Gemma 2/3: sliding windows of
    24 tokens in teacher sequences of > 150; Gemma 2: attention softcap 0.05, low enough to bend
    the tiny model's scores) — and so do they with activation checkpointing."""
    model, tok = build(family)
    model = model.double()
    if mode == "disabled":
        model = add_lora(model, lora_config(4, 8, 0.0, model=model))
        for p in model.parameters():  # a non-zero student adapter
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
    data, _ = data_and_batch(tok)
    loss = LossWeights(beta=BETA)
    plain = RuleDistillModule(model, "rule_distill_base", mode, loss=loss)
    cached = RuleDistillModule(model, "rule_distill_base", mode, loss=loss,
                               rule_prefix_ids=data.rule_prefix_ids, interleave=True,
                               targets=None if mode == "live" else TeacherTargets(2**30))
    checkpointed = RuleDistillModule(model, "rule_distill_base", mode, loss=loss,
                                     rule_prefix_ids=data.rule_prefix_ids, interleave=True,
                                     targets=None if mode == "live" else TeacherTargets(2**30))
    assert cached.interleave and checkpointed.interleave, family
    # fp64 is exact up to rounding, except that transformers' Gemma 2 eager attention takes its
    # softmax in fp32 (the cached teacher's cascade attention keeps fp64)
    rel = 1e-6 if family == "gemma2" else 1e-9
    for start in (0, 3, 0):  # builds the prefix, uses it, (LoRA) takes the teacher from the cache
        _, batch = data_and_batch(tok, start)
        results = []
        for m in (plain, cached, checkpointed):
            model.zero_grad()
            model.train()
            if m is checkpointed:
                assert checkpoint_activations(model) == causal_lm(model).config.num_hidden_layers
            value, _ = m(batch, 1.0)
            value.backward()
            results.append((value.item(), [p.grad.clone() for p in model.parameters()
                                           if p.requires_grad]))
            lm = causal_lm(model)
            getattr(lm, "activation_checkpointing_disable", lm.gradient_checkpointing_disable)()
        cached.after_optimizer_step()  # a live teacher's prefix is rebuilt after each update
        checkpointed.after_optimizer_step()
        assert results[0][0] > 1e-6
        for got in results[1:]:
            assert got[0] == pytest.approx(results[0][0], rel=rel), family
            for a, b in zip(got[1], results[0][1]):  # each gradient tensor, as a whole
                assert (a - b).norm() <= 100 * rel * b.norm() + 1e-15, family
    for m in (cached, checkpointed):
        assert m.work.prefix_builds == (3 if mode == "live" else 1)
        if mode != "live":
            assert m.work.cached == 1


@pytest.mark.parametrize("window, softcap", [(None, None), (5, None), (None, 2.0), (3, 2.0)])
def test_prefix_attention_backends_agree_with_full_attention(window, softcap):
    """cascade_attention (prefix + own causal suffix) = one masked softmax over [prefix; suffix]
    with windows by position, for both backends; so does the prefix's own causal attention."""
    torch.manual_seed(0)
    B, Hq, Hkv, P, S, D = 3, 4, 2, 7, 6, 8
    q = torch.randn(B, Hq, S, D, dtype=torch.float64)
    k, v = torch.randn(B, Hkv, S, D, dtype=torch.float64), torch.randn(B, Hkv, S, D,
                                                                          dtype=torch.float64)
    kp, vp = torch.randn(Hkv, P, D, dtype=torch.float64), torch.randn(Hkv, P, D, dtype=torch.float64)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    mask[2, 4:] = False  # right padding
    pos = (P + (mask.long().cumsum(-1) - 1).clamp_min(0))
    got = {b: cascade_attention(q.float(), k.float(), v.float(), kp.float(), vp.float(), mask,
                                0.4, pos, window, softcap, backend=b) for b in ("exact", "flex")}
    for b in range(B):
        kk = torch.cat([kp, k[b]], 1).repeat_interleave(Hq // Hkv, 0)
        vv = torch.cat([vp, v[b]], 1).repeat_interleave(Hq // Hkv, 0)
        s = q[b] @ kk.transpose(1, 2) * 0.4
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        kpos = torch.cat([torch.arange(P), pos[b]])
        allowed = torch.cat([torch.ones(S, P, dtype=torch.bool),
                             torch.ones(S, S, dtype=torch.bool).tril() & mask[b][None]], 1)
        if window:
            allowed &= pos[b][:, None] - kpos[None, :] < window
        want = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv
        real = mask[b]
        for backend, out in got.items():
            torch.testing.assert_close(out[b][:, real].double(), want[:, real], rtol=2e-5,
                                       atol=2e-5, msg=backend)
            assert torch.isfinite(out[b]).all()
    # the prefix alone: plain causal attention (window by index)
    qp = torch.randn(1, Hq, P, D)
    kp1, vp1 = kp.float()[None], vp.float()[None]
    s = qp @ kp1.repeat_interleave(2, 1).transpose(-1, -2) * 0.4
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    i = torch.arange(P)
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed &= i[:, None] - i[None, :] < window
    want = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vp1.repeat_interleave(2, 1)
    for backend in ("exact", "flex"):
        torch.testing.assert_close(causal_attention(qp, kp1, vp1, 0.4, window, softcap, backend),
                                   want, rtol=2e-5, atol=2e-5)

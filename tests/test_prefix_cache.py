"""Rule-prefix cache and teacher-target cache without DeepSpeed: the teacher's hidden states and
distilled-row logits with the cache equal those of the plain teacher pass."""

import pytest
import torch

from rdcore.architecture import causal_lm
from rdcore.config import LossWeights
from rdcore.data import Encoder, RuleExample, collate, load_task
from rdcore.distill import RuleDistillModule, TeacherTargets
from rdcore.models import load_model
from rdcore.prefix_attention import (
    PrefixKV,
    active,
    cascade_attention,
    finish,
    suffix_rows,
    teacher_inputs,
)

DTYPE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def run_with_prefix(decoder, cache, prefix_ids_P, suffix_ids_BS, suffix_mask_BS, suffix_pos_BS,
                    packed=True, backend="auto"):
    """The decoder on the suffixes with the rule prefix in context (building ``cache`` first if
    it is not valid): every hidden state as [B, S, H]. Under no_grad in eval mode."""
    ids, pos, state, prefix = teacher_inputs(cache, prefix_ids_P, suffix_ids_BS, suffix_mask_BS,
                                             suffix_pos_BS, packed, backend)
    if prefix is not None:
        with active(prefix[2]):
            decoder(input_ids=prefix[0], position_ids=prefix[1], use_cache=False)
        finish(prefix[2], decoder.config.num_hidden_layers)
    with active(state):
        out = decoder(input_ids=ids, position_ids=pos, output_hidden_states=True, use_cache=False)
    finish(state, decoder.config.num_hidden_layers)
    return tuple(suffix_rows(state, h) for h in out.hidden_states)


def nbytes(cache):
    return sum(t.numel() * t.element_size() for t in (*cache.keys.values(), *cache.values.values()))


def plain_teacher(model, batch):
    with torch.no_grad():
        out = causal_lm(model).model(
            input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask,
            position_ids=batch.teacher_position_ids, output_hidden_states=True, use_cache=False)
    idx = batch.teacher_distill_index
    return [h.reshape(-1, h.shape[-1])[idx] for h in out.hidden_states]


def cached_teacher(model, batch, cache, prefix_ids, packed=True):
    with torch.no_grad():
        hidden = run_with_prefix(causal_lm(model).model, cache, torch.tensor(prefix_ids),
                                 batch.teacher_suffix_input_ids,
                                 batch.teacher_suffix_attention_mask,
                                 batch.teacher_suffix_position_ids, packed=packed)
    idx = batch.teacher_suffix_distill_index
    return [h.reshape(-1, h.shape[-1])[idx] for h in hidden]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def mid_word_data(tok):
    """Rules that share a prefix ending inside a word ("…the opera" + "tor" / "tion")."""
    rows = [RuleExample(rule=f"The opera{tail} @@@ adds its operands plus one.", context="",
                        input=f"{a} @@@ {b}", output=str(a + b + 1), source="test")
            for tail, a, b in [("tor", 3, 4), ("tion", 10, 25), ("tor", 7, 1), ("tion", 120, 5),
                               ("tor", 2, 2), ("tion", 61, 9), ("tor", 8, 33), ("tion", 4, 400)]]
    return Encoder(tok).encode(rows)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_teacher_equals_plain(side, dtype, packed):
    model, tok = load_model("tiny", seed=11, dtype=dtype)
    model.eval()
    from rdcore.prefix_attention import install

    install(model)
    for data in (Encoder(tok).encode(load_task("math", "train", 8)), mid_word_data(tok)):
        P = data.rule_prefix_len
        assert P > 0
        prefix_ids = data.rule_prefix_ids
        cache = PrefixKV(P)
        for bsz in range(1, 9):
            batch = collate(data.examples[:bsz], tok.pad_token_id, padding_side=side, prefix_len=P)
            plain = plain_teacher(model, batch)
            building = not cache.valid
            got = cached_teacher(model, batch, cache, prefix_ids, packed)
            assert cache.valid and len(cache.keys) == model.config.num_hidden_layers
            lm = causal_lm(model).lm_head
            # logits at the distilled rows, compared in fp32 (both from the same weight)
            want_logits, got_logits = lm(plain[-1]).float(), lm(got[-1]).float()
            tol = DTYPE_TOL[dtype]
            if dtype == torch.bfloat16:  # bf16 noise: compare against an fp32 model
                tol = 5 * max(rel_err(plain[-1], plain_fp32(side, bsz, data)) , 1e-3)
            for layer, (a, b) in enumerate(zip(got, plain)):
                assert rel_err(a, b) <= tol, (bsz, layer, building, rel_err(a, b))
            assert rel_err(got_logits, want_logits) <= tol


_FP32 = {}


def plain_fp32(side, bsz, data):
    if "model" not in _FP32:
        _FP32["model"] = load_model("tiny", seed=11, dtype=torch.float32)
    model, tok = _FP32["model"]
    batch = collate(data.examples[:bsz], tok.pad_token_id, padding_side=side,
                    prefix_len=data.rule_prefix_len)
    return plain_teacher(model, batch)[-1]


def test_prefix_memory_does_not_grow_with_batch():
    model, tok = load_model("tiny", seed=2)
    model.eval()
    from rdcore.prefix_attention import install

    install(model)
    data = Encoder(tok).encode(load_task("math", "train", 8))
    sizes = []
    for bsz in (1, 8):
        cache = PrefixKV(data.rule_prefix_len)
        batch = collate(data.examples[:bsz], tok.pad_token_id, prefix_len=data.rule_prefix_len)
        cached_teacher(model, batch, cache, data.rule_prefix_ids)
        sizes.append(nbytes(cache))
        k = cache.keys[0]
        assert k.shape == (model.config.num_key_value_heads, data.rule_prefix_len,
                           model.config.hidden_size // model.config.num_attention_heads)
    assert sizes[0] == sizes[1] > 0


def test_cascade_attention_matches_full_attention_gqa():
    torch.manual_seed(0)
    B, Hq, Hkv, P, S, D = 3, 6, 2, 7, 5, 4
    q = torch.randn(B, Hq, S, D, dtype=torch.float64)
    k, v = torch.randn(B, Hkv, S, D, dtype=torch.float64), torch.randn(B, Hkv, S, D, dtype=torch.float64)
    kp, vp = torch.randn(Hkv, P, D, dtype=torch.float64), torch.randn(Hkv, P, D, dtype=torch.float64)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    mask[2, 4:] = False  # right padding
    got = cascade_attention(q, k, v, kp, vp, mask, 0.5)
    for b in range(B):
        kk = torch.cat([kp, k[b]], 1).repeat_interleave(Hq // Hkv, 0)
        vv = torch.cat([vp, v[b]], 1).repeat_interleave(Hq // Hkv, 0)
        s = q[b] @ kk.transpose(1, 2) * 0.5
        allowed = torch.cat([torch.ones(S, P, dtype=torch.bool),
                             torch.ones(S, S, dtype=torch.bool).tril() & mask[b][None]], 1)
        want = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv
        real = mask[b]
        torch.testing.assert_close(got[b][:, real], want[:, real])
        assert torch.isfinite(got[b]).all()  # pad queries too (they see the prefix)


def test_collate_rejects_a_prefix_that_is_not_shared():
    _, tok = load_model("tiny", seed=2)
    data = Encoder(tok).encode(load_task("math", "train", 8))
    from rdcore import DataError

    with pytest.raises(DataError, match="not a rule prefix"):
        collate(data.examples[:2], tok.pad_token_id, prefix_len=data.rule_prefix_len + 1)


def lora_with_teacher(model, dtype):
    """A LoRA model whose frozen teacher adapter has non-zero weights (as stage 1 leaves it) and
    whose student adapter is non-zero too, so teacher, base and student all differ."""
    from peft import get_peft_model_state_dict

    from rdcore.distill import STUDENT, add_lora, lora_config

    cfg = lora_config(4, 8, 0.0)
    donor = add_lora(load_model("tiny", seed=4, dtype=dtype)[0], cfg)
    g = torch.Generator().manual_seed(0)
    for name, p in donor.named_parameters():
        if "lora_" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.3).to(dtype)
    peft = add_lora(model, cfg, get_peft_model_state_dict(donor, adapter_name=STUDENT))
    for p in peft.parameters():
        if p.requires_grad:
            p.data = (torch.randn(p.shape, generator=g) * 0.1).to(dtype)
    return peft


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("mode", ["live", "disabled", "teacher"])
def test_module_loss_with_caches_equals_without(mode, interleave):
    """RuleDistillModule: prefix cache (build then use), teacher-target cache and the layer-
    interleaved forward give the plain loss and gradients (fp64: exact up to rounding)."""
    from rdcore.distill import add_lora, lora_config

    dtype = torch.float64  # exact math, no fp32 noise
    model, tok = load_model("tiny", seed=4, dtype=dtype)
    if mode == "disabled":
        model = add_lora(model, lora_config(4, 8, 0.0))
    elif mode == "teacher":
        model = lora_with_teacher(model, dtype)
    data = Encoder(tok).encode(load_task("math", "train", 8))
    P = data.rule_prefix_len
    loss = LossWeights(beta=5.0)
    plain = RuleDistillModule(model, "rule_distill_base", mode, loss=loss)
    variants = {
        "interleave": RuleDistillModule(model, "rule_distill_base", mode, loss=loss,
                                        interleave=interleave),
        "caches": RuleDistillModule(model, "rule_distill_base", mode, loss=loss,
                                    rule_prefix_ids=data.rule_prefix_ids, interleave=interleave,
                                    targets=None if mode == "live" else TeacherTargets(2**30)),
    }
    assert variants["interleave"].interleave == interleave  # the probe accepts the tiny Llama
    for start in (0, 3, 0):  # the second batch uses the prefix; the third is fully cached
        exs = data.examples[start: start + 3]
        ids = list(range(start, start + 3))
        batch = collate(exs, tok.pad_token_id, prefix_len=P, padding_side="left", example_ids=ids)
        results = []
        for m in (plain, *variants.values()):
            model.zero_grad()
            model.train()
            loss, _ = m(batch, 1.0)
            loss.backward()
            assert model.training  # the teacher's eval mode was undone
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results.append((loss.detach(), grads))
        assert results[0][0] > 1e-4  # teacher and student differ
        for loss, grads in results[1:]:
            assert loss.item() == pytest.approx(results[0][0].item(), rel=1e-10)
            for a, b in zip(grads, results[0][1]):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert variants["caches"].prefix.valid
    if mode != "live":  # the third batch's teacher came from the cache
        assert variants["caches"].work.cached == 1 and len(variants["caches"].targets.store) == 6


@pytest.mark.parametrize("mode", ["live", "teacher"])
def test_several_rules_keep_one_prefix_each(mode):
    """Rows of two rules in one batch: one K/V cache per rule (each read by its own rows, its size
    independent of the batch), and the loss and gradients of the plain teacher pass (fp64)."""
    import dataclasses

    from rdcore import rulebook
    from rdcore.data import load_rule_file

    dtype = torch.float64
    model, tok = load_model("tiny", seed=4, dtype=dtype)
    if mode == "teacher":
        model = lora_with_teacher(model, dtype)
    rows = []
    for name in ("french", "closing"):
        got = load_rule_file(rulebook.rule_file(name, "train", 8), require_output=False)[:4]
        rows += [dataclasses.replace(ex, output=f"answer {i}") for i, ex in enumerate(got)]
    data = Encoder(tok).encode(rows)
    assert data.prefix_groups == [0] * 4 + [1] * 4 and len(data.prefixes) == 2
    assert min(data.group_prefix_lens) > data.rule_prefix_len  # each rule's prefix is longer
    loss = LossWeights(beta=5.0)
    plain = RuleDistillModule(model, "rule_distill_base", mode, loss=loss)
    cached = RuleDistillModule(model, "rule_distill_base", mode, loss=loss,
                               rule_prefixes=data.prefixes, interleave=True)
    sizes = []
    for ids in ([0, 5], [1, 2, 6, 7], [3, 4]):  # mixed batches, then one of each rule
        groups, lens = zip(*(data.prefix_of(i) for i in ids))
        batch = collate([data[i] for i in ids], tok.pad_token_id, prefix_len=list(lens),
                        prefix_index=list(groups), example_ids=ids)
        results = []
        for m in (plain, cached):
            model.zero_grad()
            value, _ = m(batch, 1.0)
            value.backward()
            results.append((value.item(), [p.grad.clone() for p in model.parameters()
                                           if p.requires_grad]))
        assert results[1][0] == pytest.approx(results[0][0], rel=1e-10)
        for a, b in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
        sizes.append([nbytes(c) for c in cached.prefix_caches])
        cached.after_optimizer_step()
    # a frozen teacher computes each prefix once; a live one again after every update
    assert cached.work.prefix_builds == (2 if mode == "teacher" else 6)
    if mode == "teacher":
        assert sizes[0] == sizes[1] == sizes[2] and all(s > 0 for s in sizes[0])


def _flex_case():
    torch.manual_seed(1)
    B, Hq, Hkv, P, S, D = 2, 4, 2, 6, 5, 16
    q = torch.randn(B, Hq, S, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kp, vp = torch.randn(Hkv, P, D), torch.randn(Hkv, P, D)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 3:] = False
    pos = P + (mask.long().cumsum(-1) - 1).clamp_min(0)
    return q, k, v, kp, vp, mask, 0.3, pos, 7, 20.0


def test_compiled_flex_keeps_scale_and_softcap_constant(monkeypatch):
    """A dynamic float reaches inductor's flex lowering as a 0-d CPU tensor, which it cannot read
    (seen on an H200 with torch 2.11): the compiled call must see scale and softcap as constants."""
    from torch.nn.attention import flex_attention as fa

    import rdcore.prefix_attention as pa

    inputs = []

    def record(gm, example_inputs):
        inputs.extend(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    attend = torch.compile(fa.flex_attention, dynamic=True, backend=record)
    monkeypatch.setitem(pa._FLEX, "cpu", (attend, fa.create_block_mask, fa.AuxRequest, True))
    case = _flex_case()
    got = cascade_attention(*case, backend="flex")
    want = cascade_attention(*case, backend="exact")
    torch._dynamo.reset()
    assert inputs, "the compiled function was not called"
    floats = [x for x in inputs if isinstance(x, torch.Tensor) and x.dtype == torch.float64]
    assert not floats, f"floats traced as tensors: {floats}"
    mask = case[5]
    torch.testing.assert_close(got[mask[:, None].expand_as(got[..., 0])],
                               want[mask[:, None].expand_as(want[..., 0])], atol=1e-5, rtol=1e-5)
    assert not pa.FLEX_FAILURES


def test_compiled_flex_that_fails_falls_back_to_exact_with_a_warning(monkeypatch):
    from torch.nn.attention import flex_attention as fa

    import rdcore.prefix_attention as pa

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, RuntimeError("no choices"), None)

    monkeypatch.setitem(pa._FLEX, "cpu", (broken, fa.create_block_mask, fa.AuxRequest, True))
    monkeypatch.setattr(pa, "FLEX_FAILURES", [])
    case = _flex_case()
    with pytest.warns(RuntimeWarning, match="exact backend"):
        got = cascade_attention(*case, backend="flex")
    torch.testing.assert_close(got, cascade_attention(*case, backend="exact"))
    assert len(pa.FLEX_FAILURES) == 1 and "no choices" in pa.FLEX_FAILURES[0]
    cascade_attention(*case, backend="flex")  # no second compile attempt
    assert len(calls) == 1

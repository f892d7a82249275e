"""RuleDistillModule without DeepSpeed: the loss equals a plain full-logits computation, and the
teacher pass sees the weights each mode promises."""

import json

import pytest
import torch
import torch.nn.functional as F

from rdcore import ConfigError
from rdcore.architecture import causal_lm
from rdcore.config import LossWeights, TrainConfig, config_from_args
from rdcore.data import Encoder, collate, load_task
from rdcore.distill import (
    STUDENT,
    TEACHER,
    RuleDistillModule,
    add_lora,
    lora_config,
    teacher_adapter,
)
from rdcore.models import load_model


def batch_of(tok, n=3):
    data = Encoder(tok).encode(load_task("math", "train", 8))
    exs = data.examples[:n]
    return collate(exs, tok.pad_token_id)


def reference_loss(model, batch, beta, T):
    """Paper's loss on full logits (fixed off-by-one), summed over distilled rows."""
    with torch.no_grad():
        t = model(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask,
                  position_ids=batch.teacher_position_ids, output_hidden_states=True)
    s = model(input_ids=batch.student_input_ids, attention_mask=batch.student_attention_mask,
              position_ids=batch.student_position_ids, output_hidden_states=True)
    ti, si = batch.teacher_distill_index, batch.student_distill_index
    tl = t.logits.reshape(-1, t.logits.shape[-1])[ti] / T
    sl = s.logits.reshape(-1, s.logits.shape[-1])[si] / T
    kl = (F.softmax(tl, -1) * (F.log_softmax(tl, -1) - F.log_softmax(sl, -1))).sum() * T * T
    mse = 0
    for hs, ht in zip(s.hidden_states[:-1], t.hidden_states[:-1]):
        a = F.normalize(hs.reshape(-1, hs.shape[-1])[si], dim=-1)
        b = F.normalize(ht.reshape(-1, ht.shape[-1])[ti], dim=-1)
        mse = mse + (a - b).pow(2).mean(-1)
    mse = (mse / (len(s.hidden_states) - 1)).sum()
    return kl + beta * mse


def test_full_mode_loss_and_gradients_match_full_logits(tiny):
    model, tok = load_model("tiny", seed=5)
    batch = batch_of(tok)
    module = RuleDistillModule(model, "rule_distill_base", "live",
                               loss=LossWeights(temperature=1.5, beta=7.0))
    loss, stats = module(batch, 1.0)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_loss(model, batch, 7.0, 1.5)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    assert set(stats) == {"kl", "hidden_mse"}


def test_zero_weight_rows_do_not_count(tiny):
    model, tok = tiny
    batch = batch_of(tok)
    module = RuleDistillModule(model, "rule_distill_base", "live", loss=LossWeights(alpha=0.3))
    batch.row_weight[:2] = 0
    _, stats = module(batch, 1.0)
    kept = {k: v.clone() for k, v in stats.items()}
    batch.target_ids = batch.target_ids.clone()
    batch.target_ids[:2] = 0  # the dropped rows' targets must not matter either
    _, again = module(batch, 1.0)
    for k in kept:
        torch.testing.assert_close(kept[k], again[k])


def test_lora_teacher_modes():
    model, tok = load_model("tiny", seed=2)
    cfg = lora_config(4, 8, 0.0)
    # a teacher adapter with non-zero weights, as stage 1 would leave it
    donor = add_lora(load_model("tiny", seed=2)[0], cfg)
    g = torch.Generator().manual_seed(0)
    for name, p in donor.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    from peft import get_peft_model_state_dict

    teacher_state = get_peft_model_state_dict(donor, adapter_name=STUDENT)
    peft = add_lora(model, cfg, teacher_state)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all(f".{STUDENT}." in n for n in trainable)
    ids = torch.tensor([tok("62 @@@ 51 = ?")["input_ids"]])
    with torch.no_grad():
        student = peft(input_ids=ids).logits  # fresh student adapter: equals the base
        with teacher_adapter(peft, "disabled"):
            base = peft(input_ids=ids).logits
        with teacher_adapter(peft, "teacher"):
            teacher = peft(input_ids=ids).logits
        reference = donor(input_ids=ids).logits
    torch.testing.assert_close(student, base)
    torch.testing.assert_close(teacher, reference, rtol=1e-5, atol=1e-5)
    assert (teacher - base).abs().max() > 1e-3
    assert all(p.requires_grad == (n in trainable) for n, p in peft.named_parameters())
    assert any(f".{TEACHER}." in n for n, _ in peft.named_parameters())
    assert causal_lm(peft).lm_head is causal_lm(model).lm_head


def test_config_file_flags_and_validation(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nmethod: rule_distill_base\nfinetune: full\nbeta: 3\n")
    cfg = config_from_args(["--config", str(path), "--beta", "5"])
    assert (cfg.model, cfg.method, cfg.finetune, cfg.beta) == ("tiny", "rule_distill_base", "full", 5)
    assert TrainConfig().method == "rule_distill_enhanced" and TrainConfig().finetune == "lora"
    (tmp_path / "bad.json").write_text(json.dumps({"modle": "tiny"}))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['modle'\]"):
        config_from_args(["--config", str(tmp_path / "bad.json")])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot parse"):
        config_from_args(["--config", str(tmp_path / "broken.json")])
    with pytest.raises(ConfigError, match="needs finetune=lora"):
        TrainConfig(method="rule_distill_enhanced", finetune="full")
    with pytest.raises(ConfigError, match="k-shot splits"):
        TrainConfig(task="math", shots=5)
    assert TrainConfig(task="arithmetic").task == "math"
    # select_best needs a validation file: the task's (for one of its seeds) or val_data
    with pytest.raises(ConfigError, match=r"validation file for --seed.*not 0"):
        TrainConfig(select_best=True)
    assert TrainConfig(select_best=True, seed=2345).select_best
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"rule": "r", "input": "i", "output": "o"}]))
    with pytest.raises(ConfigError, match="needs --val_data"):
        TrainConfig(select_best=True, data=str(rows), seed=2345)
    assert TrainConfig(select_best=True, data=str(rows), val_data=str(rows)).val_data
    with pytest.raises(ConfigError, match="val_data .* is not a file"):
        TrainConfig(select_best=True, val_data=str(tmp_path / "missing.json"))
    # save_model: merged / adapter / off; on/off and the booleans of older configs still read
    assert config_from_args(["--save_model", "adapter"]).save_model == "adapter"
    assert config_from_args(["--save_model", "off"]).save_model == "off"
    assert config_from_args(["--save_model", "On"]).save_model == "merged"
    assert TrainConfig(save_model=True).save_model == "merged"
    assert TrainConfig(save_model=False).save_model == "off"
    with pytest.raises(ConfigError, match="save_model must be one of"):
        TrainConfig(save_model="weights")
    with pytest.raises(ConfigError, match="save_model=adapter needs finetune=lora"):
        TrainConfig(save_model="adapter", finetune="full", method="rule_distill_base")


def test_deepspeed_config_conflicts_are_errors(tmp_path):
    from rdcore.engine import ds_config_for

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3},
                                "train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu = 4 conflicts"):
        ds_config_for(TrainConfig(ds_config=str(path), micro_batch_size=2), 2)
    ds = ds_config_for(TrainConfig(ds_config=str(path), micro_batch_size=4, grad_accum=3), 2)
    assert ds["train_batch_size"] == 24 and ds["optimizer"]["params"]["lr"] == 1e-4
    path.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_max_reuse_distance": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_prefetch_bucket_size": 7}}))
    ds = ds_config_for(TrainConfig(ds_config=str(path)), 2, hidden_size=64, layer_numel=5000)
    zo = ds["zero_optimization"]
    assert zo["reduce_bucket_size"] == 4096 and zo["stage3_max_reuse_distance"] == 5000
    assert zo["stage3_param_persistence_threshold"] == 640 and zo["stage3_prefetch_bucket_size"] == 7
    with pytest.raises(ConfigError, match="shape is unknown"):
        ds_config_for(TrainConfig(ds_config=str(path)), 2)
    for name in ("zero3_multinode_bf16.json", "zero3_multinode_zeropp.json"):  # shipped files
        ds = ds_config_for(TrainConfig(ds_config=f"ds_configs/{name}", precision="bf16"), 16,
                           hidden_size=4096, layer_numel=218_112_000)
        assert "auto" not in json.dumps(ds)
    path.write_text("{oops")
    with pytest.raises(ConfigError, match="malformed JSON"):
        ds_config_for(TrainConfig(ds_config=str(path)), 1)


def test_output_dir_protection(tmp_path):
    from rdcore.train import prepare_output_dir

    out = tmp_path / "run"
    cfg = TrainConfig(model="tiny", output_dir=str(out))
    prepare_output_dir(cfg, 0)
    with pytest.raises(ConfigError, match="holds another run"):
        prepare_output_dir(cfg, 0)
    with pytest.raises(ConfigError, match=r"flags differ .*'beta'"):
        prepare_output_dir(TrainConfig(model="tiny", output_dir=str(out), beta=3, resume=True), 0)
    prepare_output_dir(TrainConfig(model="tiny", output_dir=str(out), resume=True, save_every=2), 0)
    (out / "junk").write_text("x")
    prepare_output_dir(TrainConfig(model="tiny", output_dir=str(out), overwrite=True), 0)
    assert not (out / "junk").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(ConfigError, match="refusing to delete"):
        prepare_output_dir(TrainConfig(model="tiny", output_dir=str(other), overwrite=True), 0)


def test_schedule_fills_the_last_batch_and_splits_it_over_ranks():
    from rdcore.train import filled_batches, micro_batches, step_schedule, steps_per_epoch

    cfg = TrainConfig(epochs=2, micro_batch_size=2, grad_accum=3, seed=1234)
    world, n = 2, 13
    assert cfg.global_batch(world) == 12 and steps_per_epoch(n, cfg, world) == 2
    steps = step_schedule(n, cfg, world)
    assert len(steps) == 4 and all(len(s) == 12 for s in steps)
    for e in range(2):  # each epoch: every example once at weight 1, the fill at weight 0
        epoch = steps[2 * e] + steps[2 * e + 1]
        order = [i for i, w in epoch if w == 1.0]
        assert sorted(order) == list(range(n))
        assert epoch[n:] == [(i, 0.0) for i in order[:11]]
    assert [i for i, _ in steps[0]] != [i for i, _ in steps[2]]  # reshuffled per epoch
    # the ranks' micro-batches partition the global batch, accumulation step by step
    parts = [micro_batches(steps[1], cfg, world, r) for r in range(world)]
    assert all(len(p) == 3 and all(len(mb) == 2 for mb in p) for p in parts)
    assert [x for a in range(3) for r in range(world) for x in parts[r][a]] == steps[1]
    assert micro_batches(steps[1], cfg, world, 1, grad_accum=1) == [steps[1][2:4]]
    assert filled_batches([4, 2], 3) == [[(4, 1.0), (2, 1.0), (4, 0.0)]]
    assert filled_batches([4, 2, 0], 3) == [[(4, 1.0), (2, 1.0), (0, 1.0)]]
    cut = TrainConfig(epochs=2, micro_batch_size=2, grad_accum=3, seed=1234, max_steps=3)
    assert step_schedule(n, cut, world) == steps[:3]


def test_eval_mode_restores_each_modules_own_flag():
    from rdcore.distill import eval_mode

    net = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout(0.5)))
    net.train()
    net[1].eval()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == [True, True, False, False]
    with pytest.raises(RuntimeError), eval_mode(net):
        raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == [True, True, False, False]


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("mode", ["live", "disabled"])
def test_activation_checkpointing_same_gradients_fewer_saved_bytes(mode, interleave):
    """--activation_checkpointing: the student's layers are recomputed in backward — the same loss
    and gradients (fp64, dropout on: the random state is replayed), far fewer bytes kept for
    backward; the teacher still reads its rule-prefix cache (built once, then used)."""
    from rdcore.distill import checkpoint_activations

    dtype = torch.float64
    data = None
    results = []
    for ckpt in (False, True):
        model, tok = load_model("tiny", seed=4, dtype=dtype)
        if mode == "disabled":
            torch.manual_seed(0)  # the same LoRA A both times
            model = add_lora(model, lora_config(4, 8, 0.1))  # dropout: replayed in the recompute
        model.train()
        if ckpt:
            assert checkpoint_activations(model) == 2  # the tiny model's layers
        data = data or Encoder(tok).encode(load_task("math", "train", 8))
        module = RuleDistillModule(model, "rule_distill_base", mode, loss=LossWeights(beta=5.0),
                                   rule_prefix_ids=data.rule_prefix_ids, interleave=interleave)
        saved = []
        got = []
        for start in (0, 3):  # the first batch builds the prefix K/V, the second reads it
            ids = list(range(start, start + 3))
            batch = collate(data.examples[start: start + 3], tok.pad_token_id,
                            prefix_len=data.rule_prefix_len, example_ids=ids)
            model.zero_grad()
            torch.manual_seed(11)
            count = [0]

            def pack(t, count=count):
                count[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = module(batch, 1.0)
            loss.backward()
            saved.append(count[0])
            got.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                        if p.requires_grad]))
        assert module.prefix.valid and module.interleave == interleave
        assert module.work.prefix_builds == 1  # built by the first batch, read by the second
        results.append((saved, got))
    (saved_off, off), (saved_on, on) = results
    for (loss_a, grads_a), (loss_b, grads_b) in zip(off, on):
        assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-12)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
    for a, b in zip(saved_off, saved_on):
        assert b < 0.5 * a, (a, b)  # the student's intermediates are not kept


def test_activation_checkpointing_needs_a_model_that_supports_it():
    from rdcore.distill import checkpoint_activations

    model, _ = load_model("tiny", seed=4)
    type(model).supports_gradient_checkpointing = False
    try:
        with pytest.raises(ConfigError, match="--activation_checkpointing"):
            checkpoint_activations(model)
    finally:
        del type(model).supports_gradient_checkpointing

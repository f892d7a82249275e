import json
import os
import shutil

import pytest
import torch

from rdcore import ModelError
from rdcore.models import PRESETS, load_model, smollm2_dir, smollm2_gguf_path, tiny_tokenizer


def test_offline_switches_are_set():
    import rdcore  # noqa: F401

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ[var] == "1"


def test_offline_switches_keep_a_users_own_choice():
    """Importing rdcore sets the offline switches only where they are unset."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env["HF_HUB_OFFLINE"] = "0"
    probe = ("import os, rdcore; print(os.environ['HF_HUB_OFFLINE'], "
             "os.environ['TRANSFORMERS_OFFLINE'])")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True, cwd="/").stdout.split()
    assert out == ["0", "1"]


def test_tiny_is_deterministic(tiny):
    model, tok = tiny
    again, tok2 = load_model("tiny")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    other, _ = load_model("tiny", seed=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    assert tok.get_vocab() == tok2.get_vocab()
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)


def test_tiny_tokenizer_training_is_deterministic(tmp_path, monkeypatch, tiny_tok):
    monkeypatch.setenv("RDCORE_CACHE_DIR", str(tmp_path))  # force a fresh training run
    fresh = tiny_tokenizer()
    assert fresh.get_vocab() == tiny_tok.get_vocab()
    assert any(p.name.startswith("tiny-tokenizer-") for p in tmp_path.iterdir())
    text = "Bob is a president. 62 @@@ 51 = ?"
    assert fresh(text)["input_ids"] == tiny_tok(text)["input_ids"]
    assert fresh.decode(fresh(text)["input_ids"]) == text
    assert fresh.chat_template and fresh.eos_token_id is not None


def test_local_directory_round_trip(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(str(tmp_path))
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    assert tok2("62 @@@ 51")["input_ids"] == tok("62 @@@ 51")["input_ids"]


def test_bad_names_give_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="neither a preset .* nor a local directory"):
        load_model("meta-llama/Llama-3.1-8B")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="safetensors only"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="'tiny' preset only"):
        load_model("smollm2-135m", hidden_size=32)
    assert set(PRESETS) == {"tiny", "smollm2-135m", "gemma3-270m"}


@pytest.mark.slow
def test_smollm2_conversion_is_exact_and_the_model_is_real():
    from transformers import AutoModelForCausalLM

    model, tok = load_model("smollm2-135m")
    folder = smollm2_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "DONE").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    gguf = smollm2_gguf_path()
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32)
    ids = tok("Rule distillation teaches a model", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits, rtol=0, atol=0)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])


def test_adapter_folder_loads_merged_and_checks_its_base(tmp_path, tiny):
    """A final/ written with --save_model adapter: load_model merges the adapter into the base
    model named in the manifest, and refuses when the base model's files changed since."""
    from peft import get_peft_model_state_dict

    from rdcore.distill import STUDENT, add_lora, lora_config
    from rdcore.models import ADAPTER_MANIFEST, is_model_dir, write_adapter_manifest

    model, tok = tiny
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    tok.save_pretrained(base_dir)
    base, _ = load_model(str(base_dir))
    final = tmp_path / "final"
    final.mkdir()
    write_adapter_manifest(final, str(base_dir), 0, base, f"adapter/{STUDENT}")
    peft = add_lora(base, lora_config(4, 8, 0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained-looking adapter (B = 0 would merge to the base)
    peft.save_pretrained(final / "adapter", selected_adapters=[STUDENT])
    assert get_peft_model_state_dict(peft, adapter_name=STUDENT)
    expected = peft.merge_and_unload()
    assert is_model_dir(final) and not (final / "config.json").exists()
    loaded, tok2 = load_model(str(final))
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    want = dict(expected.named_parameters())
    changed = 0
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p, want[n], rtol=0, atol=1e-6)
        changed += not torch.equal(p, model.state_dict()[n])
    assert changed > 0  # the adapter was merged: not the base model
    assert tok2("62 @@@ 51")["input_ids"] == tok("62 @@@ 51")["input_ids"]
    # trained in bf16: the base is checked and merged in bf16, then cast to the dtype asked for
    bf16 = tmp_path / "final_bf16"
    bf16.mkdir()
    base16, _ = load_model(str(base_dir), dtype=torch.bfloat16)
    write_adapter_manifest(bf16, str(base_dir), 0, base16, f"adapter/{STUDENT}")
    shutil.copytree(final / "adapter", bf16 / "adapter")
    got16, _ = load_model(str(bf16))  # fp32 asked: no false alarm from the bf16 fingerprint
    assert next(got16.parameters()).dtype == torch.float32
    for n, p in got16.named_parameters():
        torch.testing.assert_close(p, want[n], rtol=0, atol=2e-2)  # bf16 rounding only
    # the base model's files change: refused, not a silently different model
    from safetensors.torch import load_file, save_file

    weights = load_file(str(base_dir / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    save_file(weights, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="have changed since"):
        load_model(str(final))
    spec = json.loads((final / ADAPTER_MANIFEST).read_text())
    spec["base_model"] = str(tmp_path / "gone")
    (final / ADAPTER_MANIFEST).write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="holds only an adapter; its base model"):
        load_model(str(final))
